package pool

import (
	"context"
	"errors"
	"slices"
	"testing"
	"time"

	"github.com/isode-run/isode/pkg/protocol"
)

// gatedPool returns a pool of one sandbox, one run at a time, whose runs
// wait at g.
func gatedPool(t *testing.T, g *gate, edit func(*Config)) (*Pool, *fakeRuntime) {
	t.Helper()
	rt := &fakeRuntime{run: g.run}
	cfg := testConfig()
	cfg.High = 1
	if edit != nil {
		edit(&cfg)
	}
	return newPool(t, rt, cfg), rt
}

// enqueue starts runs one after the other, each only once the previous one
// waits in the queue, so that their arrival order is known.
func enqueue(t *testing.T, p *Pool, labels ...string) []<-chan result {
	t.Helper()
	var out []<-chan result
	for _, l := range labels {
		before := p.Stats().Queued
		out = append(out, goRun(context.Background(), p, l[:1], l))
		waitStats(t, p, l+" to wait", func(s Stats) bool { return s.Queued == before+1 })
	}
	return out
}

func collect(t *testing.T, chs []<-chan result) {
	t.Helper()
	for _, ch := range chs {
		if r := <-ch; r.err != nil {
			t.Error(r.err)
		}
	}
}

func TestQueueFIFOPerTenant(t *testing.T) {
	g := newGate()
	p, _ := gatedPool(t, g, nil)
	first := goRun(context.Background(), p, "a", "a0")
	waitFor(t, "a0 to run", func() bool { return len(g.Arrived()) == 1 })
	rest := enqueue(t, p, "a1", "a2", "a3", "a4", "a5")
	close(g.open)
	collect(t, append(rest, first))
	if got, want := g.Arrived(), []string{"a0", "a1", "a2", "a3", "a4", "a5"}; !slices.Equal(got, want) {
		t.Fatalf("runs in order %q, want %q", got, want)
	}
}

// A tenant that keeps the only sandbox busy with a stream of requests does
// not starve others: tenants needing a sandbox are served round-robin, each
// taking the busy sandbox in turn once it has served its quantum (zero
// here: creation takes no time on the fake clock). Each tenant's requests
// stay in order.
func TestQueueRoundRobinAcrossTenants(t *testing.T) {
	g := newGate()
	p, rt := gatedPool(t, g, func(c *Config) { c.Clock = newFakeClock() })
	first := goRun(context.Background(), p, "a", "a0")
	waitFor(t, "a0 to run", func() bool { return len(g.Arrived()) == 1 })
	rest := enqueue(t, p, "a1", "a2", "b0", "a3", "a4", "c0", "a5")
	close(g.open)
	collect(t, append(rest, first))
	want := []string{"a0", "b0", "a1", "c0", "a2", "a3", "a4", "a5"}
	if got := g.Arrived(); !slices.Equal(got, want) {
		t.Fatalf("runs in order %q, want %q", got, want)
	}
	if got := rt.Closed(); !slices.Equal(got, []string{"a", "b", "a", "c"}) {
		t.Fatalf("closed %q, want a, b, a, c (one sandbox, taken in turn)", got)
	}
	if s := p.Stats(); s.Preemptions != 4 || s.Evictions != 4 {
		t.Fatalf("stats %+v, want 4 preemptions", s)
	}
}

// A busy sandbox is preempted only once it has served its tenant for the
// quantum, four times the average creation time.
func TestPreemptionQuantum(t *testing.T) {
	g := newGate()
	clock := newFakeClock()
	p, _ := gatedPool(t, g, func(c *Config) { c.Clock = clock })
	first := goRun(context.Background(), p, "a", "a0")
	waitFor(t, "a0 to run", func() bool { return len(g.Arrived()) == 1 })
	p.mu.Lock()
	p.avgCreate = time.Second
	p.mu.Unlock()
	rest := enqueue(t, p, "b0", "a1")
	clock.Advance(3 * time.Second)
	if s := p.Stats(); s.Preemptions != 0 {
		t.Fatalf("preempted after 3 s, quantum is 4 s: %+v", s)
	}
	clock.Advance(time.Second)
	waitStats(t, p, "a's sandbox preempted for b", func(s Stats) bool { return s.Preemptions == 1 })
	close(g.open)
	collect(t, append(rest, first))
	if got, want := g.Arrived(), []string{"a0", "b0", "a1"}; !slices.Equal(got, want) {
		t.Fatalf("runs in order %q, want %q", got, want)
	}
}

// A tenant waiting for a slot in its own sandbox never holds up another
// tenant that can run.
func TestQueueOwnSlotDoesNotBlockOthers(t *testing.T) {
	tests := []struct {
		name string
		cfg  func(*Config)
	}{
		{name: "other tenant has a sandbox", cfg: func(c *Config) { c.High = 2 }},
		{name: "a free sandbox is ready", cfg: func(c *Config) { c.Low, c.High = 1, 2 }},
		{name: "room to create", cfg: func(c *Config) { c.High = 3 }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ga := newGate()
			rt := &fakeRuntime{run: func(ctx context.Context, sb *fakeSandbox, r *protocol.Request) (*protocol.Result, error) {
				if r.IsolateKey == "a" {
					return ga.run(ctx, sb, r)
				}
				return &protocol.Result{Value: []byte(`1`)}, nil
			}}
			cfg := testConfig()
			tt.cfg(&cfg)
			p := newPool(t, rt, cfg)
			if tt.name == "other tenant has a sandbox" {
				if _, err := p.Run(context.Background(), req("b")); err != nil {
					t.Fatal(err)
				}
			}
			waitStats(t, p, "free sandboxes", func(s Stats) bool { return s.Free == cfg.Low && s.Creating == 0 })
			first := goRun(context.Background(), p, "a", "a0")
			waitFor(t, "a0 to run", func() bool { return len(ga.Arrived()) == 1 })
			rest := enqueue(t, p, "a1", "a2")
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			if _, err := p.Run(ctx, req("b")); err != nil {
				t.Fatalf("b while a waits for its own slot: %v", err)
			}
			close(ga.open)
			collect(t, append(rest, first))
		})
	}
}

func TestQueueBounds(t *testing.T) {
	tests := []struct {
		name          string
		queue, tenant int
		give          []string // labels to enqueue (first letter is the tenant), all must wait
		then          string   // one more label
		wantErr       error
	}{
		{name: "tenant cap", queue: 10, tenant: 2, give: []string{"a1", "a2"}, then: "a3", wantErr: ErrTenantQueueFull},
		{name: "tenant cap leaves room for others", queue: 10, tenant: 2, give: []string{"a1", "a2"}, then: "b1"},
		{name: "total cap", queue: 3, tenant: 2, give: []string{"a1", "a2", "b1"}, then: "c1", wantErr: ErrQueueFull},
		{name: "total cap applies to a tenant under its own cap", queue: 3, tenant: 3, give: []string{"a1", "b1", "c1"}, then: "a2", wantErr: ErrQueueFull},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			g := newGate()
			p, _ := gatedPool(t, g, func(c *Config) { c.QueueSize, c.TenantQueueSize = tt.queue, tt.tenant })
			if got, want := p.Capacity(), 1+tt.queue; got != want {
				t.Fatalf("Capacity = %d, want %d", got, want)
			}
			first := goRun(context.Background(), p, "a", "a0")
			waitFor(t, "a0 to run", func() bool { return len(g.Arrived()) == 1 })
			waiting := enqueue(t, p, tt.give...)
			if tt.wantErr != nil {
				_, err := p.Run(context.Background(), req(tt.then[:1]))
				if err != tt.wantErr {
					t.Fatalf("Run = %v, want %v", err, tt.wantErr)
				}
				if !errors.Is(err, protocol.ErrOverloaded) {
					t.Fatalf("%v does not match protocol.ErrOverloaded", err)
				}
				if s := p.Stats(); s.Rejections != 1 || s.Queued != len(tt.give) {
					t.Fatalf("stats %+v, want 1 rejection and %d queued", s, len(tt.give))
				}
			} else {
				waiting = append(waiting, enqueue(t, p, tt.then)...)
			}
			close(g.open)
			collect(t, append(waiting, first))
		})
	}
}

func TestQueueDeadlines(t *testing.T) {
	tests := []struct {
		name    string
		expire  func(clock *fakeClock, cancel context.CancelFunc)
		ctx     func() (context.Context, context.CancelFunc)
		wantErr error
		timeout bool // counted as a queue timeout
	}{
		{
			name: "context deadline",
			ctx: func() (context.Context, context.CancelFunc) {
				return context.WithTimeout(context.Background(), 20*time.Millisecond)
			},
			expire:  func(*fakeClock, context.CancelFunc) {},
			wantErr: ErrQueueTimeout,
			timeout: true,
		},
		{
			name:    "max wait",
			ctx:     func() (context.Context, context.CancelFunc) { return context.WithCancel(context.Background()) },
			expire:  func(c *fakeClock, _ context.CancelFunc) { c.Advance(time.Minute) },
			wantErr: ErrQueueTimeout,
			timeout: true,
		},
		{
			name:    "cancelled",
			ctx:     func() (context.Context, context.CancelFunc) { return context.WithCancel(context.Background()) },
			expire:  func(_ *fakeClock, cancel context.CancelFunc) { cancel() },
			wantErr: context.Canceled,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			g := newGate()
			clock := newFakeClock()
			p, _ := gatedPool(t, g, func(c *Config) { c.Clock = clock; c.MaxWait = time.Minute })
			first := goRun(context.Background(), p, "a", "a0")
			waitFor(t, "a0 to run", func() bool { return len(g.Arrived()) == 1 })
			// One waiter of the same tenant, one of another: both expire.
			ctx, cancel := tt.ctx()
			defer cancel()
			errs := make(chan error, 2)
			for _, tenant := range []string{"a", "b"} {
				go func() {
					_, err := p.Run(ctx, req(tenant))
					errs <- err
				}()
			}
			waitStats(t, p, "both to wait", func(s Stats) bool { return s.Queued == 2 })
			tt.expire(clock, cancel)
			for range 2 {
				err := <-errs
				if !errors.Is(err, tt.wantErr) {
					t.Fatalf("Run = %v, want %v", err, tt.wantErr)
				}
				if tt.timeout && protocol.CodeOf(err) != protocol.CodeQueueTimeout {
					t.Fatalf("Run = %v, want code queue_timeout", err)
				}
			}
			s := p.Stats()
			if want := map[bool]uint64{true: 2, false: 0}[tt.timeout]; s.QueueTimeouts != want {
				t.Errorf("QueueTimeouts = %d, want %d", s.QueueTimeouts, want)
			}
			if s.Queued != 0 {
				t.Errorf("Queued = %d after the waiters left", s.Queued)
			}
			// The pool still serves after waiters left mid-queue.
			close(g.open)
			if r := <-first; r.err != nil {
				t.Fatal(r.err)
			}
			for _, tenant := range []string{"a", "b"} {
				if _, err := p.Run(context.Background(), req(tenant)); err != nil {
					t.Fatalf("Run %s after the timeouts: %v", tenant, err)
				}
			}
		})
	}
}

func TestQueueClosedWaiters(t *testing.T) {
	g := newGate()
	p, _ := gatedPool(t, g, nil)
	first := goRun(context.Background(), p, "a", "a0")
	waitFor(t, "a0 to run", func() bool { return len(g.Arrived()) == 1 })
	waiting := enqueue(t, p, "a1", "b1", "c1")
	closed := make(chan error, 1)
	go func() { closed <- p.Close(context.Background()) }()
	for i, ch := range waiting {
		if r := <-ch; r.err != ErrClosed {
			t.Fatalf("waiter %d: %v, want ErrClosed", i, r.err)
		}
	}
	if _, err := p.Run(context.Background(), req("d")); err != ErrClosed {
		t.Fatalf("Run after Close = %v, want ErrClosed", err)
	}
	close(g.open)
	if r := <-first; r.err != nil {
		t.Fatalf("run in flight at Close: %v, want it to finish within the grace period", r.err)
	}
	if err := <-closed; err != nil {
		t.Fatal(err)
	}
}
