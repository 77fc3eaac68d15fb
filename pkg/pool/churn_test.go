package pool

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/isode-run/isode/pkg/protocol"
)

// simRuntime models an engine on a small machine: making and removing a
// sandbox each take CPU, out of cores shared by all of them, so that
// creations under way at once slow each other down, as containers do on a
// 2-core machine.
type simRuntime struct {
	cores     chan struct{}
	createCPU time.Duration // CPU of one creation
	closeCPU  time.Duration // CPU of one removal
	latency   time.Duration // wall time of a creation beyond its CPU

	mu      sync.Mutex
	created int
	live    int
	maxLive int
}

func newSimRuntime(cores int, createCPU, closeCPU time.Duration) *simRuntime {
	return &simRuntime{cores: make(chan struct{}, cores), createCPU: createCPU, closeCPU: closeCPU}
}

// burn spends d of CPU in slices, taking turns on the cores.
func (r *simRuntime) burn(d time.Duration) {
	const slice = 2 * time.Millisecond
	for d > 0 {
		s := min(d, slice)
		r.cores <- struct{}{}
		time.Sleep(s)
		<-r.cores
		d -= s
	}
}

func (r *simRuntime) Create(ctx context.Context, tenant string) (Sandbox, error) {
	time.Sleep(r.latency)
	r.burn(r.createCPU)
	r.mu.Lock()
	defer r.mu.Unlock()
	r.created++
	r.live++
	r.maxLive = max(r.maxLive, r.live)
	return &simSandbox{rt: r, id: fmt.Sprintf("sim%d", r.created), tenant: tenant, done: make(chan struct{})}, nil
}

type simSandbox struct {
	rt     *simRuntime
	id     string
	mu     sync.Mutex
	tenant string
	closed bool
	done   chan struct{}
}

func (s *simSandbox) ID() string { return s.id }
func (s *simSandbox) Run(ctx context.Context, req *protocol.Request) (*protocol.Result, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil, protocol.Errorf(protocol.CodeSandboxCrashed, "closed")
	}
	if s.tenant != req.IsolateKey {
		return nil, fmt.Errorf("sandbox of %q ran %q", s.tenant, req.IsolateKey)
	}
	return &protocol.Result{}, nil
}
func (s *simSandbox) Assign(tenant string) {
	s.mu.Lock()
	s.tenant = tenant
	s.mu.Unlock()
}
func (s *simSandbox) Close(ctx context.Context) error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	s.mu.Unlock()
	s.rt.burn(s.rt.closeCPU)
	s.rt.mu.Lock()
	s.rt.live--
	s.rt.mu.Unlock()
	close(s.done)
	return nil
}
func (s *simSandbox) Done() <-chan struct{} { return s.done }
func (s *simSandbox) Err() error            { return nil }

// churnResult is what a churn simulation measured.
type churnResult struct {
	runs, errs int
	secs       float64
	stats      Stats
	created    int
}

func (r churnResult) String() string {
	return fmt.Sprintf("%.0f runs/s (%d runs, %d errors), %.1f creations/s, %.2f runs per creation, hits %d, evictions %d, preemptions %d",
		float64(r.runs)/r.secs, r.runs, r.errs, float64(r.created)/r.secs, float64(r.runs)/float64(max(1, r.created)),
		r.stats.Hits, r.stats.Evictions, r.stats.Preemptions)
}

// simulateChurn runs callers closed-loop callers over tenants in turn
// (request i is for tenant i mod tenants, as `submit bench --scenario
// churn` does) for d, against a pool of rt configured by cfg.
func simulateChurn(t testing.TB, rt *simRuntime, cfg Config, tenants, callers int, d time.Duration) churnResult {
	t.Helper()
	p, err := New(rt, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := p.Close(ctx); err != nil {
			t.Error(err)
		}
	}()
	var next, runs, errs atomic.Int64
	start := time.Now()
	stop := start.Add(d)
	var wg sync.WaitGroup
	for range callers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for time.Now().Before(stop) {
				i := next.Add(1) - 1
				if _, err := p.Run(context.Background(), req(fmt.Sprintf("t%d", i%int64(tenants)))); err != nil {
					errs.Add(1)
					continue
				}
				runs.Add(1)
			}
		}()
	}
	wg.Wait()
	secs := time.Since(start).Seconds()
	rt.mu.Lock()
	created := rt.created
	rt.mu.Unlock()
	return churnResult{runs: int(runs.Load()), errs: int(errs.Load()), secs: secs, stats: p.Stats(), created: created}
}

// churnConfig is the worker's configuration of the churn benchmark
// (--low 4 --high 16), scaled.
func churnConfig() Config {
	c := DefaultConfig()
	c.Low, c.High = 4, 16
	c.RefillDelay = 100 * time.Millisecond
	return c
}

// BenchmarkChurn simulates `submit bench --scenario churn --tenants 60
// --concurrency 32` against a worker with --low 4 --high 16 on a 2-core
// machine where a creation costs 40 ms of CPU and a removal 10 ms (a
// tenth of what a container costs there).
func BenchmarkChurn(b *testing.B) {
	for b.Loop() {
		rt := newSimRuntime(2, 40*time.Millisecond, 10*time.Millisecond)
		rt.latency = 5 * time.Millisecond
		r := simulateChurn(b, rt, churnConfig(), 60, 32, 3*time.Second)
		b.Log(r)
		b.ReportMetric(float64(r.runs)/r.secs, "runs/s")
		b.ReportMetric(float64(r.created)/r.secs, "creations/s")
	}
}

// serveOnce runs one request of each tenant, one after the other, so that
// each has a sandbox.
func serveOnce(t *testing.T, p *Pool, tenants ...string) {
	t.Helper()
	for _, tenant := range tenants {
		if _, err := p.Run(context.Background(), req(tenant)); err != nil {
			t.Fatal(err)
		}
	}
}

// blockCreate returns a create hook that blocks the creations of tenant
// until the returned func is called.
func blockCreate(tenant string) (hook func(ctx context.Context, tn string) error, release func()) {
	ch := make(chan struct{})
	var once sync.Once
	return func(ctx context.Context, tn string) error {
			if tn != tenant {
				return nil
			}
			select {
			case <-ch:
				return nil
			case <-ctx.Done():
				return ctx.Err()
			}
		}, func() {
			once.Do(func() { close(ch) })
		}
}

// An idle sandbox is evicted only when the creation that replaces it can
// start: while CreateConcurrency creations are under way, it goes on
// serving its tenant (a hit) instead of being removed early for a
// creation that would have to wait anyway.
func TestEvictionWaitsForACreationSlot(t *testing.T) {
	hook, release := blockCreate("c")
	defer release()
	rt := &fakeRuntime{create: hook}
	cfg := testConfig()
	cfg.High, cfg.CreateConcurrency = 2, 1
	p := newPool(t, rt, cfg)
	ctx := context.Background()
	serveOnce(t, p, "a", "b")
	rc := goRun(ctx, p, "c", "c0") // evicts a; its creation hangs
	waitFor(t, "c's creation", func() bool { return rt.Calls() == 3 })
	rd := goRun(ctx, p, "d", "d0")
	s := waitStats(t, p, "d to wait", func(s Stats) bool { return s.Queued == 2 })
	if s.Evictions != 1 {
		t.Fatalf("%d evictions while c's creation holds the only creation slot, want 1 (b's sandbox kept until d's creation can start); stats %+v", s.Evictions, s)
	}
	if _, err := p.Run(ctx, req("b")); err != nil {
		t.Fatal(err)
	}
	if s := p.Stats(); s.Hits != 1 {
		t.Fatalf("b's run while d waited: %d hits, want 1 (b's sandbox still there); stats %+v", s.Hits, s)
	}
	release()
	for _, ch := range []<-chan result{rc, rd} {
		if r := <-ch; r.err != nil {
			t.Fatal(r.err)
		}
	}
}

// Creations that still remove the sandbox they evicted do not hold back
// other evictions beyond CreateConcurrency of them: a slow removal
// overlaps with the next creation instead of leaving the engine idle.
func TestEvictionOverlapsRemovals(t *testing.T) {
	hook, release := blockCreate("c")
	defer release()
	slowClose := make(chan struct{})
	defer func() {
		select {
		case <-slowClose:
		default:
			close(slowClose)
		}
	}()
	rt := &fakeRuntime{create: hook, close: func(tenant string) {
		if tenant == "b" {
			<-slowClose
		}
	}}
	cfg := testConfig()
	cfg.High, cfg.CreateConcurrency = 3, 2
	p := newPool(t, rt, cfg)
	ctx := context.Background()
	for _, tenant := range []string{"a", "b", "z"} {
		if _, err := p.Run(ctx, req(tenant)); err != nil {
			t.Fatal(err)
		}
	}
	rc := goRun(ctx, p, "c", "c0") // evicts a; c's creation hangs
	waitFor(t, "c's creation", func() bool { return rt.Calls() == 4 })
	rd := goRun(ctx, p, "d", "d0") // evicts b, whose removal hangs
	waitFor(t, "b's removal", func() bool { return len(rt.Closed()) == 1 && p.Stats().Evictions == 2 })
	// One creation makes its sandbox and one removes its victim: z's
	// sandbox may go for e, whose run need not wait for either.
	select {
	case r := <-ctxRun(p, "e"):
		if r.err != nil {
			t.Fatal(r.err)
		}
	case <-time.After(2 * time.Second):
		t.Fatalf("e waited while one creation made its sandbox and one removed its victim (CreateConcurrency 2); stats %+v", p.Stats())
	}
	close(slowClose)
	release()
	for _, ch := range []<-chan result{rc, rd} {
		if r := <-ch; r.err != nil {
			t.Fatal(r.err)
		}
	}
}

// ctxRun runs a request of tenant in the background.
func ctxRun(p *Pool, tenant string) <-chan result {
	return goRun(context.Background(), p, tenant, tenant+"0")
}

// A sandbox whose tenant came back while it was resident (a hit) is kept
// over one that served only the request it was made for, even when the
// latter was used more recently.
func TestEvictionKeepsSandboxesWithHits(t *testing.T) {
	rt := &fakeRuntime{}
	cfg := testConfig()
	cfg.High = 2
	p := newPool(t, rt, cfg)
	for _, tenant := range []string{"a", "a", "b", "c"} {
		if _, err := p.Run(context.Background(), req(tenant)); err != nil {
			t.Fatal(err)
		}
	}
	if got := rt.Closed(); !slices.Equal(got, []string{"b"}) {
		t.Fatalf("evicted %q, want b's sandbox (a's had a hit)", got)
	}
}

// clockedPool is a pool of High high on a fake engine whose time moves only
// when the returned clock is advanced.
func clockedPool(t *testing.T, high int) (*Pool, *fakeRuntime, *fakeClock) {
	t.Helper()
	clock := newFakeClock()
	rt := &fakeRuntime{}
	cfg := testConfig()
	cfg.High = high
	cfg.Clock = clock
	return newPool(t, rt, cfg), rt, clock
}

// A tenant that came back before (a hit) and has since stayed away twice
// as long as it ever did, and over a second, has departed: its sandbox is
// evicted before those of tenants still active, even ones without a hit, so
// that a new set of tenants does not churn in the sandboxes the old set
// left behind until IdleTimeout.
func TestEvictionTakesDepartedTenantsFirst(t *testing.T) {
	p, rt, clock := clockedPool(t, 3)
	serveOnce(t, p, "a", "a", "b", "b") // both came back at once: hits, no absence
	clock.Advance(5 * time.Second)      // and then stopped
	serveOnce(t, p, "c", "d")           // c takes the free slot, d evicts
	if got := rt.Closed(); !slices.Equal(got, []string{"a"}) {
		t.Fatalf("evicted %q, want a's sandbox (departed, the least recently used) over c's (no hit, but active)", got)
	}
}

// A tenant that takes turns is not departed while it stays away less than
// twice its longest absence before a hit: its sandbox keeps the protection
// of its hit, and loses it only past that.
func TestEvictionKeepsTenantsThatTakeTurns(t *testing.T) {
	p, rt, clock := clockedPool(t, 2)
	serveOnce(t, p, "a")
	clock.Advance(3 * time.Second)
	serveOnce(t, p, "a", "b") // a came back after 3 s: a hit
	clock.Advance(4 * time.Second)
	serveOnce(t, p, "c") // a away 4 s, under twice 3 s: b (no hit) goes
	if got := rt.Closed(); !slices.Equal(got, []string{"b"}) {
		t.Fatalf("evicted %q, want b's sandbox (a's had a hit and a is not departed)", got)
	}
	clock.Advance(3 * time.Second)
	serveOnce(t, p, "d") // a away 7 s, over twice 3 s: departed
	if got := rt.Closed(); !slices.Equal(got, []string{"b", "a"}) {
		t.Fatalf("evicted %q, want b's then a's sandbox (a departed; c has no hit but was just used)", got)
	}
}

// evictUnderOverload fills a pool of High high with setup's runs (setup may
// move the clock on; its runs must make high-1 sandboxes), then has the
// last sandbox's creation (tenant x) hang while c and d queue behind it, so
// that c and d wait together once it ends, and returns the tenants whose
// sandboxes were evicted for them, in order.
func evictUnderOverload(t *testing.T, high int, setup func(p *Pool, clock *fakeClock)) []string {
	t.Helper()
	hook, release := blockCreate("x")
	defer release()
	clock := newFakeClock()
	rt := &fakeRuntime{create: hook}
	cfg := testConfig()
	cfg.High, cfg.CreateConcurrency = high, 1
	cfg.Clock = clock
	p := newPool(t, rt, cfg)
	setup(p, clock)
	rx := goRun(context.Background(), p, "x", "x0")
	waitFor(t, "x's creation", func() bool { return rt.Calls() == high })
	chs := append([]<-chan result{rx}, enqueue(t, p, "c0", "d0")...)
	if s := p.Stats(); s.Evictions != 0 {
		t.Fatalf("evicted while the only creation slot was taken; stats %+v", s)
	}
	release()
	collect(t, chs)
	return rt.Closed()
}

// While several tenants wait for a sandbox, an eviction takes the most
// recently used sandbox without a hit, not the least recently used one:
// tenants taking turns (more of them than High) then find the older
// sandboxes still there when their turn comes back.
func TestEvictionUnderOverloadTakesNewest(t *testing.T) {
	got := evictUnderOverload(t, 3, func(p *Pool, _ *fakeClock) { serveOnce(t, p, "a", "b") })
	if len(got) != 2 || got[0] != "b" {
		t.Fatalf("evicted %q, want b's sandbox first (the newest; a's is older)", got)
	}
}

// A one-off tenant's sandbox (no hit) whose tenant has stayed away longer
// than any tenant did before coming back, and ten quanta, has departed:
// while several tenants wait, it goes before the newest sandbox without a
// hit, so that a set of busy tenants arriving after a burst of one-off ones
// is not left to churn in the few slots the burst did not fill.
func TestEvictionUnderOverloadTakesDepartedOneOffsFirst(t *testing.T) {
	got := evictUnderOverload(t, 3, func(p *Pool, clock *fakeClock) {
		serveOnce(t, p, "a")
		clock.Advance(5 * time.Second) // a does not come back
		serveOnce(t, p, "b")
	})
	if len(got) != 2 || got[0] != "a" {
		t.Fatalf("evicted %q, want a's sandbox first (departed), not b's (the newest, as while a was active)", got)
	}
}

// A one-off tenant's sandbox is not departed while it has stayed away less
// than twice the longest any tenant stayed away before coming back: that
// is how long a rotation may take to bring it round.
func TestEvictionKeepsOneOffsWithinTheRotation(t *testing.T) {
	got := evictUnderOverload(t, 4, func(p *Pool, clock *fakeClock) {
		serveOnce(t, p, "r")
		clock.Advance(10 * time.Second)
		serveOnce(t, p, "r", "a") // r came back after 10 s
		clock.Advance(5 * time.Second)
		serveOnce(t, p, "b")
	})
	if len(got) != 2 || got[0] != "b" || got[1] != "a" {
		t.Fatalf("evicted %q, want b's then a's sandbox (the newest without a hit first; a away 5 s, under twice r's 10 s, is not departed; r's hit keeps it)", got)
	}
}

// A creation whose tenant's requests all gave up before its Create began
// (here while its victim was being removed) makes a sandbox for the next
// tenant waiting instead of one nobody wants.
func TestCreationForNobodyServesTheNextTenant(t *testing.T) {
	slowClose := make(chan struct{})
	rt := &fakeRuntime{close: func(tenant string) {
		if tenant == "a" {
			<-slowClose
		}
	}}
	cfg := testConfig()
	cfg.High, cfg.CreateConcurrency = 2, 1
	p := newPool(t, rt, cfg)
	ctx := context.Background()
	serveOnce(t, p, "a", "b")
	cctx, cancel := context.WithTimeout(ctx, 100*time.Millisecond)
	defer cancel()
	rc := goRun(cctx, p, "c", "c0") // evicts a, whose removal hangs
	waitStats(t, p, "a's eviction", func(s Stats) bool { return s.Evictions == 1 })
	rd := goRun(ctx, p, "d", "d0") // waits: one removal under way
	if r := <-rc; !errors.Is(r.err, ErrQueueTimeout) {
		t.Fatalf("c's run: %v, want ErrQueueTimeout", r.err)
	}
	close(slowClose)
	if r := <-rd; r.err != nil {
		t.Fatal(r.err)
	}
	if n, s := rt.Calls(), p.Stats(); n != 3 || s.Evictions != 1 {
		t.Fatalf("%d sandboxes made, %d evicted, want 3 and 1: the creation c gave up on serves d; stats %+v", n, s.Evictions, s)
	}
}
