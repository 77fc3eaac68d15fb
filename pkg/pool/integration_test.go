package pool_test

// Tests of the pool on the real engine, through pkg/dockerx. Without a
// Docker daemon or the sandbox image (`make sandbox-image`) they skip on a
// developer's machine and fail under CI (see internal/testenv).

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/docker/docker/api/types/container"
	"github.com/docker/docker/api/types/filters"
	"github.com/docker/docker/client"

	"github.com/isode-run/isode/internal/testenv"
	"github.com/isode-run/isode/pkg/dockerx"
	"github.com/isode-run/isode/pkg/pool"
	"github.com/isode-run/isode/pkg/protocol"
)

// dockerPool is a pool on the real engine whose containers carry a worker
// id unique to the test.
type dockerPool struct {
	*pool.Pool
	tb       testing.TB
	cli      *client.Client
	rt       *dockerx.Runtime
	workerID string
}

// newDockerPool starts a dockerx runtime and a pool on it. At cleanup it
// closes both, fails the test if any container of its worker id is left,
// and removes those that are.
func newDockerPool(tb testing.TB, cfg pool.Config) *dockerPool {
	tb.Helper()
	cli := testenv.Docker(tb)
	dcfg := dockerx.DefaultConfig()
	dcfg.Image = testenv.Image(tb, cli)
	dcfg.WorkerID = "pooltest-" + randomHex(6)
	dcfg.Concurrency = cfg.PerSandbox
	d := &dockerPool{tb: tb, cli: cli, workerID: dcfg.WorkerID}
	tb.Cleanup(func() {
		if n := testenv.RemoveByLabel(tb, cli, dockerx.LabelWorker, d.workerID); n != 0 {
			tb.Errorf("%d containers left behind after Close", n)
		}
	})

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	rt, err := dockerx.New(ctx, dcfg)
	if err != nil {
		tb.Fatalf("dockerx.New: %v", err)
	}
	tb.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if err := rt.Close(ctx); err != nil {
			tb.Errorf("dockerx Runtime.Close: %v", err)
		}
	})
	p, err := pool.New(pool.RuntimeFunc(func(ctx context.Context, tenant string) (pool.Sandbox, error) {
		sb, err := rt.Create(ctx, tenant)
		if err != nil {
			return nil, err // not a typed nil in the interface
		}
		return sb, nil
	}), cfg)
	if err != nil {
		tb.Fatalf("pool.New: %v", err)
	}
	d.Pool = p
	d.rt = rt
	tb.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if err := p.Close(ctx); err != nil {
			tb.Errorf("Pool.Close: %v", err)
		}
		if ids := d.containers(); len(ids) != 0 {
			tb.Errorf("containers still there after Pool.Close: %v", ids)
		}
	})
	return d
}

// containers returns the ids of the worker's containers, running or not.
func (d *dockerPool) containers() []string {
	d.tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	list, err := d.cli.ContainerList(ctx, container.ListOptions{
		All:     true,
		Filters: filters.NewArgs(filters.Arg("label", dockerx.LabelWorker+"="+d.workerID)),
	})
	if err != nil {
		d.tb.Fatalf("list containers: %v", err)
	}
	ids := make([]string, len(list))
	for i, c := range list {
		ids[i] = c.ID
	}
	return ids
}

// waitStats polls the pool's stats until cond holds.
func (d *dockerPool) waitStats(what string, timeout time.Duration, cond func(pool.Stats) bool) pool.Stats {
	d.tb.Helper()
	deadline := time.Now().Add(timeout)
	for {
		s := d.Stats()
		if cond(s) {
			return s
		}
		if time.Now().After(deadline) {
			d.tb.Fatalf("timed out waiting for %s; stats %+v", what, s)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func quiet(s pool.Stats) bool { return s.Creating == 0 && s.Closing == 0 }

// echo runs a snippet that returns its tenant's name, and checks it did.
func (d *dockerPool) echo(ctx context.Context, tenant string) error {
	r := &protocol.Request{
		V:          protocol.Version,
		IsolateKey: tenant,
		Code:       "return function (ctx, cb) { cb(null, ctx.data); }",
		Input:      json.RawMessage(`"` + tenant + `"`),
		TimeoutMs:  5000,
	}
	res, err := d.Run(ctx, r)
	if err != nil {
		return fmt.Errorf("tenant %s: %w", tenant, err)
	}
	var got string
	if err := json.Unmarshal(res.Value, &got); err != nil || got != tenant {
		return fmt.Errorf("tenant %s: result %s, want %q", tenant, res.Value, tenant)
	}
	return nil
}

func dockerConfig() pool.Config {
	cfg := pool.DefaultConfig()
	cfg.PerSandbox = 2
	cfg.IdleTimeout = 0
	cfg.CreateConcurrency = 4
	cfg.CreateTimeout = 30 * time.Second
	cfg.MaxWait = time.Minute
	cfg.CloseGrace = 5 * time.Second
	return cfg
}

// A burst of new tenants: the first L get the free containers without a
// cold start, the others are created on demand; every tenant gets its own.
func TestDockerBurstTakesFreeContainers(t *testing.T) {
	const low, burst = 3, 6
	cfg := dockerConfig()
	cfg.Low, cfg.High = low, burst+low
	d := newDockerPool(t, cfg)
	d.waitStats("L free containers", time.Minute, func(s pool.Stats) bool { return s.Free == low && quiet(s) })
	if n := len(d.containers()); n != low {
		t.Fatalf("%d containers on the engine, want the %d free ones", n, low)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	var wg sync.WaitGroup
	errs := make(chan error, burst)
	took := make([]time.Duration, burst)
	for i := range burst {
		wg.Add(1)
		go func() {
			defer wg.Done()
			start := time.Now()
			if err := d.echo(ctx, fmt.Sprintf("burst-%d", i)); err != nil {
				errs <- err
			}
			took[i] = time.Since(start)
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	s := d.Stats()
	t.Logf("burst of %d with %d free: latencies %v; stats %+v", burst, low, took, s)
	if s.PoolHits != low || s.ColdStarts != burst-low || s.Hits != 0 {
		t.Fatalf("pool hits %d, cold starts %d, hits %d; want %d pool hits and %d cold starts",
			s.PoolHits, s.ColdStarts, s.Hits, low, burst-low)
	}
	// Each free one taken is replaced.
	s = d.waitStats("the free containers replaced", time.Minute, func(s pool.Stats) bool { return s.Free == low && quiet(s) })
	if n := len(d.containers()); n != burst+low || s.Assigned != burst {
		t.Fatalf("%d containers on the engine, %d assigned; want %d assigned + %d free", n, s.Assigned, burst, low)
	}
}

// Idle recycling removes the containers from the engine and refills to L.
func TestDockerIdleRecycleRefillsToLow(t *testing.T) {
	const low, tenants = 2, 3
	cfg := dockerConfig()
	cfg.Low, cfg.High = low, 4
	cfg.IdleTimeout = 2 * time.Second
	d := newDockerPool(t, cfg)
	d.waitStats("L free containers", time.Minute, func(s pool.Stats) bool { return s.Free == low && quiet(s) })
	free := d.containers()

	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	for i := range tenants {
		if err := d.echo(ctx, fmt.Sprintf("idle-%d", i)); err != nil {
			t.Fatal(err)
		}
	}
	// High 4: three assigned and one refill. On a loaded machine the first
	// tenants may already have idled out while the last one cold-started.
	s := d.Stats()
	if s.Assigned+int(s.IdleRecycles) != tenants || s.PoolHits != low || s.ColdStarts != tenants-low {
		t.Fatalf("stats %+v, want %d assigned or recycled (%d pool hits)", s, tenants, low)
	}

	s = d.waitStats("idle containers recycled and L free", time.Minute, func(s pool.Stats) bool {
		return s.IdleRecycles == tenants && s.Assigned == 0 && s.Free == low && quiet(s)
	})
	left := d.containers()
	if len(left) != low {
		t.Fatalf("%d containers on the engine after idle recycling, want the %d free ones: %v", len(left), low, left)
	}
	for _, id := range free { // the first free ones were assigned, then recycled
		for _, l := range left {
			if l == id {
				t.Fatalf("container %s, assigned then idle, is still on the engine", id)
			}
		}
	}
	t.Logf("stats %+v", s)
}

// BenchmarkDockerNewTenant measures a new tenant's first run through the
// pool with a free container waiting ("free") and with none ("cold"), and,
// as the baseline for the cold start, the same create+start+ready and run
// done directly on the runtime without a pool ("bare"). It reports
// cold/free and cold/bare. Every container serves one run (MaxRequests 1)
// and the pool is let settle, refills done, between iterations, off the
// clock.
//
//	go test -run '^$' -bench DockerNewTenant -benchtime 20x ./pkg/pool/
func BenchmarkDockerNewTenant(b *testing.B) {
	var freeNs, bareNs float64
	b.Run("bare", func(b *testing.B) {
		d := newDockerPool(b, dockerConfig())
		req := &protocol.Request{V: protocol.Version, IsolateKey: "bare", Code: `return function (cb) { cb(null, 1); }`, TimeoutMs: 5000}
		ctx := context.Background()
		var total time.Duration
		for range b.N {
			start := time.Now()
			sb, err := d.rt.Create(ctx, "bare")
			if err != nil {
				b.Fatal(err)
			}
			if _, err := sb.Run(ctx, req); err != nil {
				b.Fatal(err)
			}
			total += time.Since(start)
			if err := sb.Close(ctx); err != nil {
				b.Fatal(err)
			}
		}
		bareNs = float64(total.Nanoseconds()) / float64(b.N)
		b.ReportMetric(bareNs, "create+run-ns/op")
	})
	for _, bc := range []struct {
		name string
		low  int
	}{
		{name: "free", low: 1},
		{name: "cold", low: 0},
	} {
		b.Run(bc.name, func(b *testing.B) {
			cfg := dockerConfig()
			cfg.Low, cfg.High = bc.low, 2
			cfg.MaxRequests = 1
			d := newDockerPool(b, cfg)
			settled := func(s pool.Stats) bool { return s.Free == bc.low && s.Assigned == 0 && quiet(s) }
			d.waitStats("the pool to settle", time.Minute, settled)
			ctx := context.Background()
			b.ResetTimer()
			for i := range b.N {
				if err := d.echo(ctx, fmt.Sprintf("bench-%s-%d", bc.name, i)); err != nil {
					b.Fatal(err)
				}
				b.StopTimer()
				d.waitStats("the pool to settle", time.Minute, settled)
				b.StartTimer()
			}
			b.StopTimer()
			ns := float64(b.Elapsed().Nanoseconds()) / float64(b.N)
			s := d.Stats()
			switch bc.name {
			case "free":
				freeNs = ns
				if s.PoolHits != uint64(b.N) {
					b.Fatalf("pool hits %d, want %d", s.PoolHits, b.N)
				}
			case "cold":
				if s.ColdStarts != uint64(b.N) {
					b.Fatalf("cold starts %d, want %d", s.ColdStarts, b.N)
				}
				if freeNs > 0 {
					b.ReportMetric(ns/freeNs, "x-free")
				}
				if bareNs > 0 {
					b.ReportMetric(ns/bareNs, "x-bare")
				}
			}
		})
	}
}

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}
