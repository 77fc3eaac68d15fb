package pool

import (
	"context"
	"errors"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/isode-run/isode/pkg/protocol"
)

func TestIdleRecycle(t *testing.T) {
	g := newGate()
	clock := newFakeClock()
	rt := &fakeRuntime{run: func(ctx context.Context, sb *fakeSandbox, r *protocol.Request) (*protocol.Result, error) {
		if string(r.Input) == `"block"` {
			return g.run(ctx, sb, r)
		}
		return &protocol.Result{Value: []byte(`1`)}, nil
	}}
	cfg := testConfig()
	cfg.Low, cfg.High = 1, 4
	cfg.IdleTimeout = time.Minute
	cfg.Clock = clock
	p := newPool(t, rt, cfg)
	ctx := context.Background()
	ready := func(s Stats) bool { return s.Free == 1 && s.Creating == 0 && s.Closing == 0 }
	waitStats(t, p, "one free sandbox", ready)

	if _, err := p.Run(ctx, req("a")); err != nil {
		t.Fatal(err)
	}
	waitStats(t, p, "the free sandbox replaced", ready)
	sbA := rt.of("a")[0]

	// Each run restarts the idle time.
	clock.Advance(40 * time.Second)
	if _, err := p.Run(ctx, req("a")); err != nil {
		t.Fatal(err)
	}
	clock.Advance(40 * time.Second) // 80 s since a's first run, 40 s idle
	if s := p.Stats(); s.Assigned != 1 || s.IdleRecycles != 0 {
		t.Fatalf("a's sandbox recycled after 40 s idle: %+v", s)
	}
	clock.Advance(20 * time.Second)
	s := waitStats(t, p, "a's sandbox to be recycled", func(s Stats) bool { return s.IdleRecycles == 1 && s.Closing == 0 })
	if sbA.Closes() != 1 || s.Assigned != 0 || s.Free != 1 || s.Recycles != 1 {
		t.Fatalf("stats %+v, closes %d; want a's sandbox closed, one free left", s, sbA.Closes())
	}
	// Free sandboxes are the pool: they are not idle-recycled.
	clock.Advance(time.Hour)
	if s := p.Stats(); s.Free != 1 || s.IdleRecycles != 1 {
		t.Fatalf("after an hour: %+v, want the free sandbox kept", s)
	}

	// A busy sandbox is never idle (the Fission bug: last use not
	// updated), however long its run.
	rb := goRun(ctx, p, "b", "block")
	waitFor(t, "b's run to start", func() bool { return len(g.Arrived()) == 1 })
	clock.Advance(time.Hour)
	if _, err := p.Run(ctx, req("c")); err != nil { // something to sync with
		t.Fatal(err)
	}
	if s := p.Stats(); s.IdleRecycles != 1 || s.Busy != 1 {
		t.Fatalf("stats %+v, want b's busy sandbox kept", s)
	}
	close(g.open)
	if r := <-rb; r.err != nil {
		t.Fatal(r.err)
	}
	clock.Advance(time.Minute)
	waitStats(t, p, "b and c to be recycled", func(s Stats) bool { return s.IdleRecycles == 3 && s.Assigned == 0 })
}

// Recycling below Low refills free sandboxes up to Low.
func TestIdleRecycleRefillsToLow(t *testing.T) {
	clock := newFakeClock()
	rt := &fakeRuntime{}
	cfg := testConfig()
	cfg.Low, cfg.High = 2, 2
	cfg.IdleTimeout = time.Minute
	cfg.Clock = clock
	p := newPool(t, rt, cfg)
	waitStats(t, p, "two free", func(s Stats) bool { return s.Free == 2 && s.Creating == 0 })
	for _, tenant := range []string{"a", "b"} {
		if _, err := p.Run(context.Background(), req(tenant)); err != nil {
			t.Fatal(err)
		}
	}
	s := p.Stats()
	if s.Free != 0 || s.Assigned != 2 || s.Creating != 0 || s.PoolHits != 2 {
		t.Fatalf("stats %+v, want both free ones assigned and no refill at High", s)
	}
	clock.Advance(time.Minute)
	s = waitStats(t, p, "refill to Low", func(s Stats) bool { return s.Free == 2 && s.Creating == 0 && s.Closing == 0 })
	if s.IdleRecycles != 2 || s.Assigned != 0 || rt.Live() != 2 {
		t.Fatalf("stats %+v, live %d; want 2 recycled and 2 free", s, rt.Live())
	}
}

func TestMaxRequests(t *testing.T) {
	rt := &fakeRuntime{}
	cfg := testConfig()
	cfg.MaxRequests = 3
	p := newPool(t, rt, cfg)
	for range 7 {
		if _, err := p.Run(context.Background(), req("a")); err != nil {
			t.Fatal(err)
		}
	}
	sbs := rt.of("a")
	if len(sbs) != 3 {
		t.Fatalf("%d sandboxes for 7 runs, want 3", len(sbs))
	}
	for i, sb := range sbs {
		if want := min(3, 7-3*i); sb.Runs() != want {
			t.Errorf("sandbox %d ran %d, want %d", i, sb.Runs(), want)
		}
	}
	waitFor(t, "full sandboxes to close", func() bool { return sbs[0].Closes() == 1 && sbs[1].Closes() == 1 })
	if s := p.Stats(); s.MaxRequestRecycles != 2 || s.Recycles != 2 || s.Assigned != 1 {
		t.Fatalf("stats %+v, want 2 recycles for max requests", s)
	}
}

// A sandbox that reaches MaxRequests takes no new run, but its runs in
// flight finish before it is closed; the tenant's next request gets a new
// one.
func TestMaxRequestsDrains(t *testing.T) {
	g := newGate()
	rt := &fakeRuntime{run: g.run}
	cfg := testConfig()
	cfg.PerSandbox = 4
	cfg.MaxRequests = 2
	p := newPool(t, rt, cfg)
	ctx := context.Background()
	r1 := goRun(ctx, p, "a", "1")
	r2 := goRun(ctx, p, "a", "2")
	waitFor(t, "two runs", func() bool { return len(g.Arrived()) == 2 })
	r3 := goRun(ctx, p, "a", "3")
	waitFor(t, "a third run in a new sandbox", func() bool { return len(g.Arrived()) == 3 })
	sbs := rt.of("a")
	if len(sbs) != 2 || sbs[0].Closes() != 0 {
		t.Fatalf("%d sandboxes, first closed %d times; want 2, the first still open for its runs", len(sbs), sbs[0].Closes())
	}
	close(g.open)
	for _, ch := range []<-chan result{r1, r2, r3} {
		if r := <-ch; r.err != nil {
			t.Fatal(r.err)
		}
	}
	waitFor(t, "the first sandbox to close", func() bool { return sbs[0].Closes() == 1 })
}

func TestMaxAge(t *testing.T) {
	g := newGate()
	clock := newFakeClock()
	rt := &fakeRuntime{run: func(ctx context.Context, sb *fakeSandbox, r *protocol.Request) (*protocol.Result, error) {
		if string(r.Input) == `"block"` {
			return g.run(ctx, sb, r)
		}
		return &protocol.Result{Value: []byte(`1`)}, nil
	}}
	cfg := testConfig()
	cfg.Low, cfg.High = 1, 4
	cfg.PerSandbox = 2
	cfg.MaxAge = 10 * time.Minute
	cfg.Clock = clock
	p := newPool(t, rt, cfg)
	ctx := context.Background()
	waitStats(t, p, "one free", func(s Stats) bool { return s.Free == 1 && s.Creating == 0 })
	if _, err := p.Run(ctx, req("a")); err != nil {
		t.Fatal(err)
	}
	waitStats(t, p, "refill", func(s Stats) bool { return s.Free == 1 && s.Creating == 0 })
	rb := goRun(ctx, p, "a", "block")
	waitFor(t, "a's long run", func() bool { return len(g.Arrived()) == 1 })
	old := rt.of("a")[0]

	clock.Advance(10 * time.Minute)
	// The busy one drains; the free one, as old, is replaced.
	waitStats(t, p, "old sandboxes recycled", func(s Stats) bool {
		return s.MaxAgeRecycles == 2 && s.Free == 1 && s.Creating == 0 && s.Closing == 0
	})
	if old.Closes() != 0 {
		t.Fatal("a busy sandbox was closed for its age before its run ended")
	}
	if _, err := p.Run(ctx, req("a")); err != nil {
		t.Fatal(err)
	}
	if n := len(rt.of("a")); n != 2 {
		t.Fatalf("a has %d sandboxes, want a new one after the old one aged", n)
	}
	close(g.open)
	if r := <-rb; r.err != nil {
		t.Fatal(r.err)
	}
	waitFor(t, "the old sandbox to close", func() bool { return old.Closes() == 1 })
}

func TestDeath(t *testing.T) {
	tests := []struct {
		name    string
		running bool // the sandbox dies with a run in flight
	}{
		{name: "while idle"},
		{name: "mid-run", running: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			g := newGate()
			rt := &fakeRuntime{run: g.run}
			cfg := testConfig()
			p := newPool(t, rt, cfg)
			ctx := context.Background()
			first := goRun(ctx, p, "a", "a0")
			waitFor(t, "a0 to run", func() bool { return len(g.Arrived()) == 1 })
			sb := rt.of("a")[0]
			if !tt.running {
				g.open <- struct{}{} // lets one run through
				if r := <-first; r.err != nil {
					t.Fatal(r.err)
				}
			}
			sb.kill()
			if tt.running {
				r := <-first
				if protocol.CodeOf(r.err) != protocol.CodeSandboxCrashed {
					t.Fatalf("run in flight: %v, want the sandbox's own crash error", r.err)
				}
			}
			s := waitStats(t, p, "the dead sandbox removed", func(s Stats) bool { return s.Deaths == 1 && s.Closing == 0 })
			if s.Assigned != 0 || s.InFlight != 0 || sb.Closes() != 1 {
				t.Fatalf("stats %+v, closes %d; want it removed and closed once", s, sb.Closes())
			}
			if len(s.DeathCauses) != 1 || s.DeathCauses[protocol.CodeOutOfMemory] != 1 { // the fake dies of that
				t.Fatalf("death causes %v, want one out_of_memory", s.DeathCauses)
			}
			close(g.open)
			if _, err := p.Run(ctx, req("a")); err != nil {
				t.Fatalf("next run: %v", err)
			}
			if n := len(rt.of("a")); n != 2 {
				t.Fatalf("a has had %d sandboxes, want a fresh one after the death", n)
			}
		})
	}
}

// Waiters of a tenant whose sandbox dies get a new one.
func TestDeathWithWaiters(t *testing.T) {
	g := newGate()
	rt := &fakeRuntime{run: g.run}
	p := newPool(t, rt, testConfig())
	first := goRun(context.Background(), p, "a", "a0")
	waitFor(t, "a0 to run", func() bool { return len(g.Arrived()) == 1 })
	waiting := enqueue(t, p, "a1", "a2")
	rt.of("a")[0].kill()
	if r := <-first; protocol.CodeOf(r.err) != protocol.CodeSandboxCrashed {
		t.Fatalf("a0: %v", r.err)
	}
	waitFor(t, "a1 to run in a new sandbox", func() bool { return len(g.Arrived()) == 2 })
	close(g.open)
	collect(t, waiting)
	if n := len(rt.of("a")); n != 2 {
		t.Fatalf("a has had %d sandboxes, want 2", n)
	}
}

func TestCreateFailures(t *testing.T) {
	boom := errors.New("engine says no")
	tests := []struct {
		name      string
		failFirst int // attempts that fail before Create works (-1: all)
		retries   int
		wantErr   bool
		wantCalls int
	}{
		{name: "succeeds first time", failFirst: 0, retries: 3, wantCalls: 1},
		{name: "succeeds on the last attempt", failFirst: 2, retries: 3, wantCalls: 3},
		{name: "every attempt fails", failFirst: -1, retries: 3, wantErr: true, wantCalls: 3},
		{name: "no retry", failFirst: -1, retries: 1, wantErr: true, wantCalls: 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var calls atomic.Int32
			start := make(chan struct{})
			rt := &fakeRuntime{create: func(ctx context.Context, tenant string) error {
				<-start // until all three wait, so that one creation serves them
				if n := int(calls.Add(1)); tt.failFirst < 0 || n <= tt.failFirst {
					return boom
				}
				return nil
			}}
			cfg := testConfig()
			cfg.CreateRetries = tt.retries
			p := newPool(t, rt, cfg)
			// Three requests wait on the one creation.
			errs := make(chan error, 3)
			for range 3 {
				go func() {
					_, err := p.Run(context.Background(), req("a"))
					errs <- err
				}()
			}
			waitStats(t, p, "three waiters", func(s Stats) bool { return s.Queued == 3 })
			close(start)
			for range 3 {
				err := <-errs
				if !tt.wantErr {
					if err != nil {
						t.Fatal(err)
					}
					continue
				}
				if !errors.Is(err, ErrCreateFailed) || !errors.Is(err, boom) {
					t.Fatalf("Run = %v, want ErrCreateFailed wrapping the cause", err)
				}
				if pe := protocol.AsError(err); pe.Code != protocol.CodeInternal || pe.Message == "" {
					t.Fatalf("AsError = %+v", pe)
				}
			}
			if got := rt.Calls(); got != tt.wantCalls {
				t.Fatalf("%d Create calls, want %d (one creation for the tenant, with its retries)", got, tt.wantCalls)
			}
			s := waitStats(t, p, "the creation to end", func(s Stats) bool { return s.Creating == 0 })
			if s.CreateFailures != uint64(tt.wantCalls-map[bool]int{true: 0, false: 1}[tt.wantErr]) {
				t.Fatalf("CreateFailures = %d", s.CreateFailures)
			}
			if tt.wantErr && (s.Queued != 0 || len(p.tenants) != 0) {
				t.Fatalf("after giving up: %+v, tenants %d", s, len(p.tenants))
			}
		})
	}
}

// Refills retry with backoff, for as long as the pool is below Low.
func TestRefillRetries(t *testing.T) {
	var fails atomic.Int32
	fails.Store(5)
	rt := &fakeRuntime{create: func(ctx context.Context, tenant string) error {
		if fails.Add(-1) >= 0 {
			return errors.New("engine busy")
		}
		return nil
	}}
	cfg := testConfig()
	cfg.Low, cfg.High = 2, 4
	p := newPool(t, rt, cfg)
	s := waitStats(t, p, "refill despite failures", func(s Stats) bool { return s.Free == 2 && s.Creating == 0 })
	if s.CreateFailures != 5 || s.Created != 2 {
		t.Fatalf("stats %+v, want 5 failures then 2 created", s)
	}
}

func TestCreateTimeout(t *testing.T) {
	rt := &fakeRuntime{create: func(ctx context.Context, tenant string) error {
		<-ctx.Done()
		return ctx.Err()
	}}
	cfg := testConfig()
	cfg.CreateTimeout = 5 * time.Millisecond
	cfg.CreateRetries = 2
	p := newPool(t, rt, cfg)
	_, err := p.Run(context.Background(), req("a"))
	if !errors.Is(err, ErrCreateFailed) || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Run = %v, want ErrCreateFailed wrapping the attempt's deadline", err)
	}
	if rt.Calls() != 2 {
		t.Fatalf("%d attempts, want 2", rt.Calls())
	}
}

// A sandbox made for a request that left is kept for its tenant, and
// recycled like any other: nothing leaks (the cleanup checks every sandbox
// is closed exactly once).
func TestCreateOutlivesWaiter(t *testing.T) {
	release := make(chan struct{})
	rt := &fakeRuntime{create: func(ctx context.Context, tenant string) error {
		<-release
		return nil
	}}
	p := newPool(t, rt, testConfig())
	ctx, cancel := context.WithCancel(context.Background())
	rc := make(chan error, 1)
	go func() {
		_, err := p.Run(ctx, req("a"))
		rc <- err
	}()
	waitStats(t, p, "a creation", func(s Stats) bool { return s.Creating == 1 && s.Queued == 1 })
	cancel()
	if err := <-rc; !errors.Is(err, context.Canceled) {
		t.Fatalf("Run = %v, want context.Canceled", err)
	}
	close(release)
	s := waitStats(t, p, "the sandbox kept for a", func(s Stats) bool { return s.Creating == 0 && s.Assigned == 1 })
	if s.Busy != 0 {
		t.Fatalf("stats %+v", s)
	}
	if _, err := p.Run(context.Background(), req("a")); err != nil {
		t.Fatal(err)
	}
	if s := p.Stats(); s.Hits != 1 || s.Created != 1 {
		t.Fatalf("stats %+v, want the kept sandbox to serve a's next request", s)
	}
}

// A sandbox that Create returns after Close began is closed, and Close
// waits for it.
func TestCreateOutlivesClose(t *testing.T) {
	release := make(chan struct{})
	entered := make(chan struct{})
	var once sync.Once
	rt := &fakeRuntime{create: func(ctx context.Context, tenant string) error {
		once.Do(func() { close(entered) })
		<-release // ignores ctx, as a wedged engine would
		return nil
	}}
	cfg := testConfig()
	cfg.Low = 1
	p, err := New(rt, cfg)
	if err != nil {
		t.Fatal(err)
	}
	<-entered
	closed := make(chan error, 1)
	go func() { closed <- p.Close(context.Background()) }()
	waitFor(t, "Close to begin", func() bool {
		p.mu.Lock()
		defer p.mu.Unlock()
		return p.closed
	})
	select {
	case err := <-closed:
		t.Fatalf("Close returned (%v) while a creation was under way", err)
	default:
	}
	close(release)
	if err := <-closed; err != nil {
		t.Fatal(err)
	}
	rt.checkClean(t)
	if rt.Calls() != 1 {
		t.Fatalf("%d Create calls", rt.Calls())
	}
}

func TestClose(t *testing.T) {
	tests := []struct {
		name     string
		grace    time.Duration
		ctx      time.Duration // Close's own deadline, 0 for none
		finish   bool          // the run in flight finishes during the grace period
		wantRun  protocol.Code // "" for success
		wantErr  error
		wantLeft int
	}{
		{name: "runs finish within the grace period", grace: 5 * time.Second, finish: true},
		{name: "grace period over", grace: 20 * time.Millisecond, wantRun: protocol.CodeSandboxCrashed},
		{name: "no grace", grace: 0, wantRun: protocol.CodeSandboxCrashed},
		{name: "ctx ends first", grace: time.Minute, ctx: 20 * time.Millisecond, wantRun: protocol.CodeSandboxCrashed, wantErr: context.DeadlineExceeded},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before := runtime.NumGoroutine()
			g := newGate()
			rt := &fakeRuntime{run: g.run}
			cfg := testConfig()
			cfg.Low, cfg.High = 2, 4
			cfg.IdleTimeout = time.Minute
			cfg.CloseGrace = tt.grace
			p, err := New(rt, cfg)
			if err != nil {
				t.Fatal(err)
			}
			run := goRun(context.Background(), p, "a", "a0")
			waitFor(t, "a0 to run", func() bool { return len(g.Arrived()) == 1 })
			waitStats(t, p, "free sandboxes", func(s Stats) bool { return s.Free == 2 && s.Creating == 0 })

			ctx := context.Background()
			if tt.ctx > 0 {
				var cancel context.CancelFunc
				ctx, cancel = context.WithTimeout(ctx, tt.ctx)
				defer cancel()
			}
			closed := make(chan error, 1)
			go func() { closed <- p.Close(ctx) }()
			waitFor(t, "Close to begin", func() bool {
				p.mu.Lock()
				defer p.mu.Unlock()
				return p.closed
			})
			if _, err := p.Run(context.Background(), req("b")); err != ErrClosed {
				t.Fatalf("Run during Close = %v, want ErrClosed", err)
			}
			if tt.finish {
				close(g.open)
			}
			r := <-run
			if protocol.CodeOf(r.err) != tt.wantRun && !(tt.wantRun == "" && r.err == nil) {
				t.Fatalf("run in flight: %v, want %q", r.err, tt.wantRun)
			}
			err = <-closed
			if tt.wantErr == nil && err != nil || tt.wantErr != nil && !errors.Is(err, tt.wantErr) {
				t.Fatalf("Close = %v, want %v", err, tt.wantErr)
			}
			rt.checkClean(t)
			if again := p.Close(context.Background()); again != err {
				t.Fatalf("second Close = %v, want the first's result %v", again, err)
			}
			if s := p.Stats(); s.Free+s.Assigned+s.Creating+s.Closing+s.Queued+s.InFlight != 0 {
				t.Fatalf("after Close: %+v", s)
			}
			waitFor(t, "no goroutine left", func() bool { return runtime.NumGoroutine() <= before })
		})
	}
}

func TestStatsProtocol(t *testing.T) {
	s := Stats{Low: 1, High: 2, Free: 3, Assigned: 4, Busy: 5, Creating: 6, Queued: 7, Hits: 8, PoolHits: 9,
		ColdStarts: 10, Evictions: 11, Recycles: 12, Deaths: 13, CreateFailures: 14, Rejections: 15, QueueTimeouts: 16}
	w := s.Protocol()
	want := protocol.PoolStats{Free: 3, Assigned: 4, Busy: 5, Creating: 6, Queued: 7, Low: 1, High: 2, Hits: 8, PoolHits: 9,
		ColdStarts: 10, Evictions: 11, Recycles: 12, Deaths: 13, Failures: 14, Rejected: 15, QueueTimeouts: 16}
	if w != want {
		t.Fatalf("Protocol() = %+v, want %+v", w, want)
	}
}

// The counters tell a user what happened.
func TestStatsCounters(t *testing.T) {
	rt := &fakeRuntime{}
	cfg := testConfig()
	cfg.Low, cfg.High = 1, 2
	p := newPool(t, rt, cfg)
	ctx := context.Background()
	waitStats(t, p, "a free sandbox", func(s Stats) bool { return s.Free == 1 && s.Creating == 0 })
	steps := []string{
		"a", // pool hit; a refill makes High
		"a", // hit
		"b", // takes the refill: pool hit
		"c", // evicts a: cold start
		"c", // hit
	}
	for _, tenant := range steps {
		if _, err := p.Run(ctx, req(tenant)); err != nil {
			t.Fatal(err)
		}
		waitStats(t, p, "quiet", func(s Stats) bool { return s.Creating == 0 && s.Closing == 0 })
	}
	s := p.Stats()
	got := [4]uint64{s.Hits, s.PoolHits, s.ColdStarts, s.Evictions}
	if want := [4]uint64{2, 2, 1, 1}; got != want {
		t.Fatalf("hits, pool hits, cold starts, evictions = %v, want %v (%+v)", got, want, s)
	}
	if s.Created != 3 || s.Destroyed != 1 || s.Assigned != 2 || s.Free != 0 {
		t.Fatalf("stats %+v", s)
	}
}
