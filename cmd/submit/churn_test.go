package main

import (
	"context"
	"encoding/json"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/isode-run/isode/internal/testenv"
	"github.com/isode-run/isode/pkg/fleet"
	"github.com/isode-run/isode/pkg/protocol"
)

// The churn scenario reports the pool's creations, evictions and hits per
// second of the measurement, from the workers' stats before and after.
func TestBenchChurnReportsPoolRates(t *testing.T) {
	s := testenv.NATS(t)
	nc, err := nats.Connect(s.ClientURL())
	if err != nil {
		t.Fatal(err)
	}
	var runs atomic.Uint64
	counted := runnerFunc(func(ctx context.Context, req *protocol.Request) (*protocol.Result, error) {
		runs.Add(1)
		return runner{}.Run(ctx, req)
	})
	// Every run is a cold start that evicts another tenant's sandbox (and
	// counts three hits, so that hits are told apart).
	stats := func() protocol.PoolStats {
		n := runs.Load()
		return protocol.PoolStats{ColdStarts: n, Evictions: n, Hits: 3 * n}
	}
	cfg := fleet.DefaultConfig()
	cfg.WorkerID = "submit-churn-test"
	w, err := fleet.New(nc, counted, stats, cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := w.Start(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		w.StopPulling()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		w.Wait(ctx)
		nc.Close()
	})
	out, _, err := submit(t, "", "bench", "--nats", s.ClientURL(), "--scenario", "churn", "--tenants", "5", "--concurrency", "2", "--count", "40", "--json", "--quiet")
	if err != nil {
		t.Fatal(err)
	}
	var rep benchReport
	if err := json.Unmarshal([]byte(out), &rep); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	if len(rep.Results) != 1 || rep.Results[0].Runs != 40 || rep.Results[0].Pool == nil {
		t.Fatalf("report %s", out)
	}
	r := rep.Results[0]
	want := 40 / r.Seconds
	if p := r.Pool; p.ColdStarts < want*0.99 || p.ColdStarts > want*1.01 || p.Evictions != p.ColdStarts || p.PoolHits != 0 ||
		p.Hits < 3*want*0.99 || p.Hits > 3*want*1.01 {
		t.Fatalf("pool rates %+v, want %.1f cold starts and evictions and %.1f hits a second", *p, want, 3*want)
	}
}

type runnerFunc func(ctx context.Context, req *protocol.Request) (*protocol.Result, error)

func (f runnerFunc) Run(ctx context.Context, req *protocol.Request) (*protocol.Result, error) {
	return f(ctx, req)
}
