package pool

import (
	"context"
	"encoding/json"
	"errors"
	"slices"
	"strings"
	"testing"

	"github.com/isode-run/isode/pkg/protocol"
)

// runAs starts a run of tenant key (a protocol.TenantKey) labelled label and
// waits until it is queued.
func runAs(t *testing.T, p *Pool, key, label string) <-chan result {
	t.Helper()
	before := p.Stats().Queued
	ch := goRun(context.Background(), p, key, label)
	waitStats(t, p, label+" to wait", func(s Stats) bool { return s.Queued == before+1 })
	return ch
}

// Application B has four tenants waiting for the only sandbox when
// application A's one tenant arrives: A's tenant is served next, not after
// all of B's (the ring is fair between applications first).
func TestFairBetweenApplications(t *testing.T) {
	g := newGate()
	p, _ := gatedPool(t, g, func(c *Config) { c.Clock = newFakeClock() })
	first := goRun(context.Background(), p, "app-b|t0", "b0")
	waitFor(t, "b0 to run", func() bool { return len(g.Arrived()) == 1 })
	var rest []<-chan result
	for _, l := range []string{"b1", "b2", "b3", "b4"} {
		rest = append(rest, runAs(t, p, "app-b|t"+l[1:], l))
	}
	rest = append(rest, runAs(t, p, "app-a|t0", "a0"))
	rest = append(rest, runAs(t, p, "app-a|t1", "a1"))
	close(g.open)
	collect(t, append(rest, first))
	want := []string{"b0", "b1", "a0", "b2", "a1", "b3", "b4"}
	if got := g.Arrived(); !slices.Equal(got, want) {
		t.Fatalf("runs in order %q, want %q", got, want)
	}
}

// Equal isolate keys of two applications are two tenants: two sandboxes.
func TestApplicationsKeysAreTenants(t *testing.T) {
	rt := &fakeRuntime{}
	cfg := testConfig()
	p := newPool(t, rt, cfg)
	for _, key := range []string{"tenant1", "app-a|tenant1", "app-b|tenant1"} {
		if r := <-goRun(context.Background(), p, key, key); r.err != nil {
			t.Fatal(r.err)
		}
	}
	if got := p.Stats().Assigned; got != 3 {
		t.Fatalf("%d sandboxes assigned, want 3 (one per application's tenant1)", got)
	}
}

// A queue full of application B's requests makes room for application A:
// B's newest waiting request is refused with ErrQueueFull and A's waits in
// its place. B's next request is refused outright.
func TestFullQueueMakesRoomForAnotherApplication(t *testing.T) {
	g := newGate()
	p, _ := gatedPool(t, g, func(c *Config) {
		c.Clock = newFakeClock()
		c.QueueSize = 3
		c.TenantQueueSize = 3
		c.AppQueueSize = 3
	})
	first := goRun(context.Background(), p, "app-b|t", "b0")
	waitFor(t, "b0 to run", func() bool { return len(g.Arrived()) == 1 })
	b1 := runAs(t, p, "app-b|t", "b1")
	b2 := runAs(t, p, "app-b|t", "b2")
	b3 := runAs(t, p, "app-b|u", "b3")
	// The queue is full: A's request displaces b2 (the newest of B's
	// tenant with the most waiting).
	a0 := goRun(context.Background(), p, "app-a|t", "a0")
	if r := <-b2; !errors.Is(r.err, ErrQueueFull) {
		t.Fatalf("b2: %v, want ErrQueueFull", r.err)
	}
	waitStats(t, p, "a0 to wait", func(s Stats) bool { return s.Queued == 3 })
	// A holds one, B two: B is not below A, so nothing more moves.
	if r := <-goRun(context.Background(), p, "app-b|v", "b4"); !errors.Is(r.err, ErrQueueFull) {
		t.Fatalf("b4: %v, want ErrQueueFull", r.err)
	}
	close(g.open)
	collect(t, []<-chan result{first, b1, b3, a0})
}

// An application may hold at most AppQueueSize waiting requests; the
// implicit application is not bounded by it.
func TestApplicationShareOfTheQueue(t *testing.T) {
	g := newGate()
	p, _ := gatedPool(t, g, func(c *Config) {
		c.Clock = newFakeClock()
		c.QueueSize = 8
		c.TenantQueueSize = 4
		c.AppQueueSize = 2
	})
	first := goRun(context.Background(), p, "app-b|t", "b0")
	waitFor(t, "b0 to run", func() bool { return len(g.Arrived()) == 1 })
	held := []<-chan result{first, runAs(t, p, "app-b|t", "b1"), runAs(t, p, "app-b|u", "b2")}
	if r := <-goRun(context.Background(), p, "app-b|v", "b3"); !errors.Is(r.err, ErrQueueFull) {
		t.Fatalf("b3: %v, want ErrQueueFull (B holds its share)", r.err)
	}
	held = append(held, runAs(t, p, "app-a|t", "a0"))
	for i := range 3 {
		held = append(held, runAs(t, p, "plain", "p"+string(rune('0'+i))))
	}
	close(g.open)
	collect(t, held)
}

// Application A's one idle sandbox is not taken for application B, which
// holds more: B's waiting tenant takes one of B's own sandboxes in turn.
func TestApplicationKeepsItsSandbox(t *testing.T) {
	g := newGate()
	rt := &fakeRuntime{run: func(ctx context.Context, sb *fakeSandbox, r *protocol.Request) (*protocol.Result, error) {
		if strings.HasPrefix(r.IsolateKey, "app-a|") {
			return &protocol.Result{Value: json.RawMessage(`1`)}, nil
		}
		return g.run(ctx, sb, r)
	}}
	cfg := testConfig()
	cfg.Clock = newFakeClock()
	cfg.High = 3
	p := newPool(t, rt, cfg)
	if r := <-goRun(context.Background(), p, "app-a|t", "a0"); r.err != nil {
		t.Fatal(r.err)
	}
	b1 := goRun(context.Background(), p, "app-b|t1", "b1")
	b2 := goRun(context.Background(), p, "app-b|t2", "b2")
	waitFor(t, "b1 and b2 to run", func() bool { return len(g.Arrived()) == 2 })
	// The pool is full: A's sandbox is idle, B's two are busy.
	b3 := runAs(t, p, "app-b|t3", "b3")
	close(g.open)
	collect(t, []<-chan result{b1, b2, b3})
	if slices.Contains(rt.Closed(), "app-a|t") {
		t.Fatalf("A's sandbox was taken for B: closed %q", rt.Closed())
	}
	if r := <-goRun(context.Background(), p, "app-a|t", "a1"); r.err != nil || p.Stats().Hits < 1 {
		t.Fatalf("A's next run: %v, stats %+v", r.err, p.Stats())
	}
}
