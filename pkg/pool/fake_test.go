package pool

import (
	"context"
	"encoding/json"
	"fmt"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/isode-run/isode/pkg/protocol"
)

// fakeRuntime makes fakeSandboxes. Its function fields, when set, decide
// how Create and Run behave; it records what the pool did with them.
type fakeRuntime struct {
	// create runs before a sandbox is made; an error fails the attempt.
	create func(ctx context.Context, tenant string) error
	// close runs at the start of every Sandbox.Close, with the sandbox's
	// tenant; it may block.
	close func(tenant string)
	// run serves Sandbox.Run; nil answers at once with the sandbox's id.
	run func(ctx context.Context, sb *fakeSandbox, req *protocol.Request) (*protocol.Result, error)

	mu        sync.Mutex
	seq       int
	live      int // created and not yet closed
	maxLive   int
	calls     int // Create calls
	sandboxes []*fakeSandbox
	closed    []string // tenants of sandboxes, in the order of their first Close
	faults    []string // contract violations seen
}

func (r *fakeRuntime) Create(ctx context.Context, tenant string) (Sandbox, error) {
	r.mu.Lock()
	r.calls++
	r.mu.Unlock()
	if r.create != nil {
		if err := r.create(ctx, tenant); err != nil {
			return nil, err
		}
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.seq++
	sb := &fakeSandbox{rt: r, id: fmt.Sprintf("sb%d", r.seq), tenant: tenant, made: tenant, done: make(chan struct{})}
	r.live++
	r.maxLive = max(r.maxLive, r.live)
	r.sandboxes = append(r.sandboxes, sb)
	return sb, nil
}

func (r *fakeRuntime) fault(format string, args ...any) {
	r.mu.Lock()
	r.faults = append(r.faults, fmt.Sprintf(format, args...))
	r.mu.Unlock()
}

func (r *fakeRuntime) Live() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.live
}

func (r *fakeRuntime) MaxLive() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.maxLive
}

func (r *fakeRuntime) Calls() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.calls
}

// Closed returns the tenants of closed sandboxes ("" for free ones), in
// the order they were closed.
func (r *fakeRuntime) Closed() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]string(nil), r.closed...)
}

// all returns the sandboxes made so far.
func (r *fakeRuntime) all() []*fakeSandbox {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]*fakeSandbox(nil), r.sandboxes...)
}

// of returns the sandboxes that served tenant, in order of creation.
func (r *fakeRuntime) of(tenant string) []*fakeSandbox {
	var out []*fakeSandbox
	for _, sb := range r.all() {
		if sb.Tenant() == tenant {
			out = append(out, sb)
		}
	}
	return out
}

// checkClean fails t unless every sandbox was closed exactly once and no
// contract was broken.
func (r *fakeRuntime) checkClean(t testing.TB) {
	t.Helper()
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, f := range r.faults {
		t.Errorf("fake runtime: %s", f)
	}
	for _, sb := range r.sandboxes {
		sb.mu.Lock()
		if sb.closes != 1 {
			t.Errorf("sandbox %s (tenant %q) closed %d times, want 1", sb.id, sb.tenant, sb.closes)
		}
		sb.mu.Unlock()
	}
	if r.live != 0 {
		t.Errorf("%d sandboxes left alive", r.live)
	}
}

type fakeSandbox struct {
	rt   *fakeRuntime
	id   string
	made string // tenant passed to Create

	mu       sync.Mutex
	tenant   string
	runs     int
	inflight int
	closes   int
	dead     bool
	err      error
	done     chan struct{}
}

func (s *fakeSandbox) ID() string { return s.id }

func (s *fakeSandbox) Tenant() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.tenant
}

func (s *fakeSandbox) Runs() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.runs
}

func (s *fakeSandbox) Closes() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.closes
}

func (s *fakeSandbox) Run(ctx context.Context, req *protocol.Request) (*protocol.Result, error) {
	s.mu.Lock()
	if s.tenant != req.IsolateKey {
		s.rt.fault("sandbox %s of tenant %q ran a request of %q", s.id, s.tenant, req.IsolateKey)
	}
	if s.closes > 0 || s.dead {
		s.mu.Unlock()
		return nil, protocol.Errorf(protocol.CodeSandboxCrashed, "sandbox %s is gone", s.id)
	}
	s.runs++
	s.inflight++
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		s.inflight--
		s.mu.Unlock()
	}()
	if s.rt.run != nil {
		return s.rt.run(ctx, s, req)
	}
	return &protocol.Result{Value: json.RawMessage(`"` + s.id + `"`)}, nil
}

func (s *fakeSandbox) Assign(tenant string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.tenant != "" {
		s.rt.fault("sandbox %s of tenant %q reassigned to %q", s.id, s.tenant, tenant)
	}
	s.tenant = tenant
}

func (s *fakeSandbox) Close(ctx context.Context) error {
	if s.rt.close != nil {
		s.rt.close(s.Tenant())
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.closes++
	if s.closes == 1 {
		s.rt.mu.Lock()
		s.rt.live--
		s.rt.closed = append(s.rt.closed, s.tenant)
		s.rt.mu.Unlock()
		if !s.dead {
			close(s.done)
		}
	}
	return nil
}

func (s *fakeSandbox) Done() <-chan struct{} { return s.done }

func (s *fakeSandbox) Err() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.err
}

// kill makes the sandbox die on its own, as an OOM-killed container does.
func (s *fakeSandbox) kill() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.dead || s.closes > 0 {
		return
	}
	s.dead = true
	s.err = protocol.Errorf(protocol.CodeOutOfMemory, "sandbox %s was killed", s.id)
	close(s.done)
}

// fakeClock is a Clock that moves only when told to.
type fakeClock struct {
	mu     sync.Mutex
	now    time.Time
	timers []*fakeTimer
}

func newFakeClock() *fakeClock {
	return &fakeClock{now: time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)}
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) NewTimer(d time.Duration) Timer {
	c.mu.Lock()
	defer c.mu.Unlock()
	t := &fakeTimer{c: c, at: c.now.Add(d), ch: make(chan time.Time, 1)}
	if d <= 0 {
		t.ch <- c.now
	} else {
		c.timers = append(c.timers, t)
	}
	return t
}

// Advance moves the clock on by d and fires the timers then due.
func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
	kept := c.timers[:0]
	for _, t := range c.timers {
		if !t.at.After(c.now) {
			t.ch <- c.now
		} else {
			kept = append(kept, t)
		}
	}
	c.timers = kept
}

type fakeTimer struct {
	c  *fakeClock
	at time.Time
	ch chan time.Time
}

func (t *fakeTimer) C() <-chan time.Time { return t.ch }

func (t *fakeTimer) Stop() bool {
	t.c.mu.Lock()
	defer t.c.mu.Unlock()
	for i, x := range t.c.timers {
		if x == t {
			t.c.timers = append(t.c.timers[:i], t.c.timers[i+1:]...)
			return true
		}
	}
	return false
}

// waitFor polls cond until it holds, failing t after a deadline.
func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(200 * time.Microsecond)
	}
}

// waitStats polls the pool's stats until cond holds.
func waitStats(t testing.TB, p *Pool, what string, cond func(Stats) bool) Stats {
	t.Helper()
	var s Stats
	deadline := time.Now().Add(10 * time.Second)
	for {
		s = p.Stats()
		if cond(s) {
			return s
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s; stats %+v", what, s)
		}
		time.Sleep(200 * time.Microsecond)
	}
}

// testConfig is a small, fast configuration for unit tests.
func testConfig() Config {
	c := DefaultConfig()
	c.Low = 0
	c.High = 4
	c.PerSandbox = 1
	c.QueueSize = 64
	c.TenantQueueSize = 16
	c.IdleTimeout = 0
	c.CreateConcurrency = 4
	c.CreateTimeout = 5 * time.Second
	c.CreateRetries = 3
	c.CreateBackoff = time.Millisecond
	c.CreateBackoffMax = 4 * time.Millisecond
	c.RemoveTimeout = 5 * time.Second
	c.MaxWait = time.Minute
	c.CloseGrace = 5 * time.Second
	return c
}

// newPool starts a pool that is closed, and checked for leaks, at the end
// of the test.
func newPool(t testing.TB, rt *fakeRuntime, cfg Config) *Pool {
	t.Helper()
	before := runtime.NumGoroutine()
	p, err := New(rt, cfg)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := p.Close(ctx); err != nil {
			t.Errorf("Close: %v", err)
		}
		p.mu.Lock()
		if p.creating != 0 || p.closing != 0 || len(p.entries) != 0 || p.createRunning != 0 {
			t.Errorf("after Close: creating %d, closing %d, entries %d, create slots %d",
				p.creating, p.closing, len(p.entries), p.createRunning)
		}
		p.mu.Unlock()
		rt.checkClean(t)
		waitFor(t, "the pool's goroutines to end", func() bool { return runtime.NumGoroutine() <= before })
	})
	return p
}

func req(tenant string) *protocol.Request {
	return &protocol.Request{V: protocol.Version, IsolateKey: tenant, Code: "return function (cb) { cb(null, 1); }"}
}

// gate blocks runs until opened; it counts the runs that reached it.
type gate struct {
	mu      sync.Mutex
	open    chan struct{}
	arrived []string // tenants, in the order their runs reached the gate
}

func newGate() *gate { return &gate{open: make(chan struct{})} }

func (g *gate) run(ctx context.Context, sb *fakeSandbox, r *protocol.Request) (*protocol.Result, error) {
	g.mu.Lock()
	g.arrived = append(g.arrived, strings.Trim(string(r.Input), `"`))
	g.mu.Unlock()
	select {
	case <-g.open:
		return &protocol.Result{Value: json.RawMessage(`"` + sb.id + `"`)}, nil
	case <-sb.done:
		return nil, protocol.Errorf(protocol.CodeSandboxCrashed, "sandbox %s died", sb.id)
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

func (g *gate) Arrived() []string {
	g.mu.Lock()
	defer g.mu.Unlock()
	return append([]string(nil), g.arrived...)
}

// result of a Run started in the background.
type result struct {
	res *protocol.Result
	err error
}

// goRun starts p.Run in the background; the request's Input carries label
// so that gates can tell runs apart.
func goRun(ctx context.Context, p *Pool, tenant, label string) <-chan result {
	ch := make(chan result, 1)
	r := req(tenant)
	r.Input = json.RawMessage(`"` + label + `"`)
	go func() {
		res, err := p.Run(ctx, r)
		ch <- result{res, err}
	}()
	return ch
}
