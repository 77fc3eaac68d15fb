package pool

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/isode-run/isode/pkg/protocol"
)

func TestConfigValidate(t *testing.T) {
	tests := []struct {
		name      string
		give      func(*Config)
		wantField string // "" for a valid config
	}{
		{name: "defaults", give: func(*Config) {}},
		{name: "zero fields take defaults", give: func(c *Config) { *c = Config{High: 1} }},
		{name: "high zero", give: func(c *Config) { c.High = 0; c.Low = 0 }, wantField: "High"},
		{name: "low above high", give: func(c *Config) { c.Low, c.High = 5, 4 }, wantField: "Low"},
		{name: "low negative", give: func(c *Config) { c.Low = -1 }, wantField: "Low"},
		{name: "per sandbox negative", give: func(c *Config) { c.PerSandbox = -1 }, wantField: "PerSandbox"},
		{name: "tenant queue above queue", give: func(c *Config) { c.QueueSize, c.TenantQueueSize = 4, 5 }, wantField: "TenantQueueSize"},
		{name: "negative idle", give: func(c *Config) { c.IdleTimeout = -time.Second }, wantField: "IdleTimeout"},
		{name: "negative max requests", give: func(c *Config) { c.MaxRequests = -1 }, wantField: "MaxRequests"},
		{name: "backoff max below backoff", give: func(c *Config) { c.CreateBackoff, c.CreateBackoffMax = time.Second, time.Millisecond }, wantField: "CreateBackoffMax"},
		{name: "negative grace", give: func(c *Config) { c.CloseGrace = -1 }, wantField: "CloseGrace"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := DefaultConfig()
			tt.give(&c)
			err := c.Validate()
			if tt.wantField == "" {
				if err != nil {
					t.Fatalf("Validate: %v", err)
				}
				return
			}
			if !errors.Is(err, ErrInvalidConfig) {
				t.Fatalf("Validate = %v, want ErrInvalidConfig", err)
			}
			if !strings.Contains(err.Error(), tt.wantField) {
				t.Fatalf("Validate = %v, want it to name %s", err, tt.wantField)
			}
			if _, err := New(&fakeRuntime{}, c); !errors.Is(err, ErrInvalidConfig) {
				t.Fatalf("New = %v, want ErrInvalidConfig", err)
			}
		})
	}
}

func TestErrorsCarryCodes(t *testing.T) {
	tests := []struct {
		give error
		want protocol.Code
	}{
		{ErrClosed, protocol.CodeShuttingDown},
		{ErrQueueFull, protocol.CodeOverloaded},
		{ErrTenantQueueFull, protocol.CodeOverloaded},
		{ErrQueueTimeout, protocol.CodeQueueTimeout},
		{ErrCreateFailed, protocol.CodeInternal},
		{fmt.Errorf("%w after 3 attempts: %w", ErrCreateFailed, errors.New("boom")), protocol.CodeInternal},
	}
	for _, tt := range tests {
		if got := protocol.CodeOf(tt.give); got != tt.want {
			t.Errorf("CodeOf(%v) = %s, want %s", tt.give, got, tt.want)
		}
		if pe := protocol.AsError(tt.give); pe.Message == "" {
			t.Errorf("%v has no message", tt.give)
		}
	}
	if errors.Is(ErrTenantQueueFull, ErrQueueFull) || errors.Is(ErrQueueFull, ErrTenantQueueFull) {
		t.Error("the two overloaded sentinels must be told apart")
	}
	if !errors.Is(ErrTenantQueueFull, protocol.ErrOverloaded) {
		t.Error("ErrTenantQueueFull must match protocol.ErrOverloaded")
	}
}

func TestRunPassesResultsAndErrorsThrough(t *testing.T) {
	codeErr := protocol.Errorf(protocol.CodeCodeError, "TypeError: x is not a function")
	rt := &fakeRuntime{run: func(ctx context.Context, sb *fakeSandbox, r *protocol.Request) (*protocol.Result, error) {
		if string(r.Input) == `"fail"` {
			return &protocol.Result{Console: "before the throw"}, codeErr
		}
		return &protocol.Result{Value: []byte(`42`)}, nil
	}}
	p := newPool(t, rt, testConfig())
	ctx := context.Background()

	res, err := p.Run(ctx, req("a"))
	if err != nil || string(res.Value) != "42" {
		t.Fatalf("Run = %v, %v; want 42", res, err)
	}
	r := req("a")
	r.Input = []byte(`"fail"`)
	res, err = p.Run(ctx, r)
	if err != codeErr {
		t.Fatalf("Run error = %v, want the sandbox's own error unchanged", err)
	}
	if res == nil || res.Console != "before the throw" {
		t.Fatalf("Run result = %v, want the console output alongside the error", res)
	}
	if _, err := p.Run(ctx, req("")); protocol.CodeOf(err) != protocol.CodeBadRequest {
		t.Fatalf("Run with no isolate key = %v, want bad_request", err)
	}
	s := p.Stats()
	if s.ColdStarts != 1 || s.Hits != 1 || s.Created != 1 || s.InFlight != 0 || s.Assigned != 1 {
		t.Fatalf("stats %+v, want 1 cold start then 1 hit in one sandbox", s)
	}
}

func TestLowWatermarkKept(t *testing.T) {
	rt := &fakeRuntime{}
	cfg := testConfig()
	cfg.Low, cfg.High = 3, 6
	p := newPool(t, rt, cfg)
	ctx := context.Background()

	waitStats(t, p, "L free sandboxes", func(s Stats) bool { return s.Free == 3 && s.Creating == 0 })

	// Each free sandbox taken is replaced in the background.
	for i, tenant := range []string{"a", "b"} {
		if _, err := p.Run(ctx, req(tenant)); err != nil {
			t.Fatal(err)
		}
		s := waitStats(t, p, "the free sandbox to be replaced", func(s Stats) bool { return s.Free == 3 && s.Creating == 0 })
		if s.PoolHits != uint64(i+1) || s.ColdStarts != 0 || s.Assigned != i+1 {
			t.Fatalf("after tenant %s: stats %+v, want %d pool hits and no cold start", tenant, s, i+1)
		}
	}
	// Within High only: 2 assigned + 3 free + c takes one and it is
	// replaced (6 = High); d takes one that cannot be replaced.
	for _, tenant := range []string{"c", "d"} {
		if _, err := p.Run(ctx, req(tenant)); err != nil {
			t.Fatal(err)
		}
	}
	s := waitStats(t, p, "refills to stop at High", func(s Stats) bool { return s.Creating == 0 && s.Assigned == 4 })
	if s.Free != 2 || s.Assigned+s.Free != cfg.High {
		t.Fatalf("stats %+v, want 4 assigned and 2 free (High = 6)", s)
	}

	// A free sandbox that dies is replaced.
	var freeOne *fakeSandbox
	for _, sb := range rt.all() {
		if sb.Tenant() == "" {
			freeOne = sb
			break
		}
	}
	freeOne.kill()
	s = waitStats(t, p, "the dead free sandbox to be replaced", func(s Stats) bool {
		return s.Deaths == 1 && s.Free == 2 && s.Closing == 0 && s.Creating == 0
	})
	if got := rt.MaxLive(); got > cfg.High {
		t.Fatalf("%d sandboxes alive at once, High is %d", got, cfg.High)
	}
}

func TestHighNeverExceeded(t *testing.T) {
	tests := []struct {
		name                  string
		low, high, per        int
		tenants, perTenant    int
		maxRequests, maxConns int
	}{
		{name: "few tenants", low: 1, high: 4, per: 2, tenants: 3, perTenant: 40},
		{name: "more tenants than high", low: 2, high: 4, per: 1, tenants: 16, perTenant: 20},
		{name: "many tenants and recycling", low: 2, high: 5, per: 3, tenants: 40, perTenant: 10, maxRequests: 3},
		{name: "high of one", low: 1, high: 1, per: 2, tenants: 8, perTenant: 10},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			rt := &fakeRuntime{
				create: func(ctx context.Context, tenant string) error {
					jitter()
					return nil
				},
				run: func(ctx context.Context, sb *fakeSandbox, r *protocol.Request) (*protocol.Result, error) {
					jitter()
					return &protocol.Result{Value: []byte(`1`)}, nil
				},
			}
			cfg := testConfig()
			cfg.Low, cfg.High, cfg.PerSandbox = tt.low, tt.high, tt.per
			cfg.MaxRequests = tt.maxRequests
			cfg.QueueSize = tt.tenants * tt.perTenant
			cfg.TenantQueueSize = tt.perTenant
			cfg.CreateConcurrency = 2
			p := newPool(t, rt, cfg)
			stop := watchInvariants(t, p)

			var wg sync.WaitGroup
			errs := make(chan error, tt.tenants*tt.perTenant)
			for i := range tt.tenants {
				for range tt.perTenant {
					wg.Add(1)
					go func() {
						defer wg.Done()
						if _, err := p.Run(context.Background(), req(fmt.Sprintf("t%d", i))); err != nil {
							errs <- err
						}
					}()
				}
			}
			wg.Wait()
			stop()
			close(errs)
			for err := range errs {
				t.Errorf("Run: %v", err)
			}
			if got := rt.MaxLive(); got > tt.high {
				t.Errorf("%d sandboxes alive at once, High is %d", got, tt.high)
			}
			s := p.Stats()
			if got, want := s.Hits+s.PoolHits+s.ColdStarts, uint64(tt.tenants*tt.perTenant); got != want {
				t.Errorf("hits+pool hits+cold starts = %d, want %d runs: %+v", got, want, s)
			}
			if s.InFlight != 0 || s.Queued != 0 || s.Busy != 0 {
				t.Errorf("after every run: %+v, want nothing in flight or queued", s)
			}
			// Every sandbox served one tenant only: checked by the fake.
		})
	}
}

// jitter gives other goroutines a chance to interleave.
func jitter() {
	if rand.IntN(3) == 0 {
		time.Sleep(time.Duration(rand.IntN(200)) * time.Microsecond)
	}
}

func TestEvictionOrder(t *testing.T) {
	tests := []struct {
		name        string
		high        int
		steps       []string // tenants, run one after the other
		wantEvicted []string // tenants whose sandboxes were closed, in order
	}{
		{name: "least recently used first", high: 2, steps: []string{"a", "b", "c", "d"}, wantEvicted: []string{"a", "b"}},
		{name: "a run refreshes", high: 2, steps: []string{"a", "b", "a", "c"}, wantEvicted: []string{"b"}},
		{name: "hits evict nothing", high: 3, steps: []string{"a", "b", "c", "a", "b", "c"}},
		{name: "comeback gets a new one", high: 2, steps: []string{"a", "b", "c", "a", "c", "b"}, wantEvicted: []string{"a", "b", "a"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			rt := &fakeRuntime{}
			cfg := testConfig()
			cfg.High = tt.high
			p := newPool(t, rt, cfg)
			for _, tenant := range tt.steps {
				if _, err := p.Run(context.Background(), req(tenant)); err != nil {
					t.Fatal(err)
				}
			}
			if got := rt.Closed(); !slices.Equal(got, tt.wantEvicted) {
				t.Fatalf("evicted %q, want %q", got, tt.wantEvicted)
			}
			if s := p.Stats(); s.Evictions != uint64(len(tt.wantEvicted)) {
				t.Fatalf("Evictions = %d, want %d", s.Evictions, len(tt.wantEvicted))
			}
		})
	}
}

func TestEvictionSkipsBusy(t *testing.T) {
	g := newGate()
	rt := &fakeRuntime{run: func(ctx context.Context, sb *fakeSandbox, r *protocol.Request) (*protocol.Result, error) {
		if r.IsolateKey != "b" && r.IsolateKey != "c" {
			return g.run(ctx, sb, r)
		}
		return &protocol.Result{Value: []byte(`1`)}, nil
	}}
	cfg := testConfig()
	cfg.High = 2
	p := newPool(t, rt, cfg)
	ctx := context.Background()

	ra := goRun(ctx, p, "a", "a0") // least recently used, but busy
	waitFor(t, "a's run to start", func() bool { return len(g.Arrived()) == 1 })
	for _, tenant := range []string{"b", "c"} {
		if _, err := p.Run(ctx, req(tenant)); err != nil {
			t.Fatal(err)
		}
	}
	if got := rt.Closed(); !slices.Equal(got, []string{"b"}) {
		t.Fatalf("evicted %q, want b's sandbox only (a's is busy)", got)
	}
	rd := goRun(ctx, p, "d", "d0") // evicts c's, idle
	waitFor(t, "d's run to start", func() bool { return len(g.Arrived()) == 2 })
	if got := rt.Closed(); !slices.Equal(got, []string{"b", "c"}) {
		t.Fatalf("evicted %q, want b then c", got)
	}
	// Every sandbox busy: e waits, and evicts the first one to go idle.
	re := goRun(ctx, p, "e", "e0")
	waitStats(t, p, "e to wait", func(s Stats) bool { return s.Queued == 1 })
	if got := len(rt.Closed()); got != 2 {
		t.Fatalf("%d sandboxes closed while all were busy, want 2", got)
	}
	close(g.open)
	for _, ch := range []<-chan result{ra, rd, re} {
		if r := <-ch; r.err != nil {
			t.Fatal(r.err)
		}
	}
	if s := p.Stats(); s.Evictions != 3 || s.ColdStarts != 5 {
		t.Fatalf("stats %+v, want 3 evictions and 5 cold starts", s)
	}
}

// With one busy tenant more than High, every tenant gets a fair share and
// the worker keeps most of its throughput: preemption swaps one sandbox at
// a time instead of stalling everyone (a global FIFO barrier, tried first,
// kept about a tenth of it).
func TestOverloadFairAndEfficient(t *testing.T) {
	throughput := func(tenants int) (total int64, per []int64, s Stats) {
		rt := &fakeRuntime{
			create: func(ctx context.Context, tenant string) error {
				time.Sleep(10 * time.Millisecond) // simulated engine work
				return nil
			},
			run: func(ctx context.Context, sb *fakeSandbox, r *protocol.Request) (*protocol.Result, error) {
				time.Sleep(time.Millisecond) // simulated snippet
				return &protocol.Result{Value: []byte(`1`)}, nil
			},
		}
		cfg := testConfig()
		cfg.High, cfg.PerSandbox = 4, 2
		p := newPool(t, rt, cfg)
		stop := watchInvariants(t, p)
		defer stop()
		counts := make([]atomic.Int64, tenants)
		ctx, cancel := context.WithTimeout(context.Background(), 600*time.Millisecond)
		defer cancel()
		var wg sync.WaitGroup
		for i := range tenants {
			for range 3 {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for ctx.Err() == nil {
						if _, err := p.Run(ctx, req(fmt.Sprintf("t%d", i))); err == nil {
							counts[i].Add(1)
						}
					}
				}()
			}
		}
		wg.Wait()
		for i := range counts {
			per = append(per, counts[i].Load())
			total += per[i]
		}
		return total, per, p.Stats()
	}
	base, _, _ := throughput(4)
	total, per, s := throughput(5)
	t.Logf("4 tenants: %d runs; 5 tenants: %d runs %v; %+v", base, total, per, s)
	if s.Preemptions == 0 {
		t.Fatal("no preemption with more busy tenants than High")
	}
	for i, n := range per {
		if n < total/5/4 {
			t.Errorf("tenant %d ran %d of %d: starved", i, n, total)
		}
	}
	if total < base*2/5 {
		t.Errorf("5 tenants ran %d, under 40%% of the %d that 4 tenants ran", total, base)
	}
}

// TestRefillDelay: a free sandbox taken is replaced only after RefillDelay,
// so the new tenant's first run has the CPU to itself; tenants that find
// no free sandbox meanwhile still get one made at once.
func TestRefillDelay(t *testing.T) {
	rt := &fakeRuntime{}
	clock := newFakeClock()
	cfg := testConfig()
	cfg.Low, cfg.High = 2, 6
	cfg.RefillDelay = time.Second
	cfg.Clock = clock
	p := newPool(t, rt, cfg)
	ctx := context.Background()
	waitStats(t, p, "L free sandboxes", func(s Stats) bool { return s.Free == 2 && s.Creating == 0 })

	for _, tenant := range []string{"a", "b"} {
		if _, err := p.Run(ctx, req(tenant)); err != nil {
			t.Fatal(err)
		}
	}
	time.Sleep(50 * time.Millisecond) // a refill not held back would be under way by now
	if s := p.Stats(); s.Free != 0 || s.Creating != 0 || s.PoolHits != 2 {
		t.Fatalf("stats %+v before the refill delay passed, want both free sandboxes taken and none being made", s)
	}
	// A third new tenant does not wait for the delay: its sandbox is made now.
	if _, err := p.Run(ctx, req("c")); err != nil {
		t.Fatal(err)
	}
	if s := p.Stats(); s.ColdStarts != 1 || s.Assigned != 3 || s.Free != 0 {
		t.Fatalf("stats %+v, want c served by a cold start during the refill delay", s)
	}
	clock.Advance(time.Second)
	waitStats(t, p, "the refill after the delay", func(s Stats) bool { return s.Free == 2 && s.Creating == 0 })
}
