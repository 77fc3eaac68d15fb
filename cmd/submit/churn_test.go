package main

import (
	"context"
	"encoding/json"
	"sync/atomic"
	"testing"

	"github.com/isode-run/isode/pkg/protocol"
)

// The churn scenario reports the pool's creations, evictions and hits per
// second of the measurement, from the workers' stats before and after.
func TestBenchChurnReportsPoolRates(t *testing.T) {
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
	url := startFleet(t, "submit-churn-test", counted, stats)
	out, _, err := submit(t, "", "bench", "--nats", url, "--scenario", "churn", "--tenants", "5", "--concurrency", "2", "--count", "40", "--json", "--quiet")
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
