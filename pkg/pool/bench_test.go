package pool

import (
	"context"
	"fmt"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// BenchmarkAcquireRelease measures what the pool adds to a run: a warm
// tenant's Run through the pool (acquire, fake Sandbox.Run, release) from
// parallel goroutines, against a baseline that finds the same fake sandbox
// with a bare mutex and map lookup and calls its Run directly. The pool
// sub-benchmark reports x-baseline (its ns/op over the baseline's, measured
// in the same process) and overhead-ns.
//
//	go test -run '^$' -bench AcquireRelease -benchtime 2s ./pkg/pool/
func BenchmarkAcquireRelease(b *testing.B) {
	for _, bc := range []struct {
		name    string
		tenants int // 0: one per goroutine
	}{
		{name: "one-tenant", tenants: 1},
		{name: "tenant-per-goroutine", tenants: 0},
	} {
		var baseline atomic.Int64 // ns/op of the last baseline run
		b.Run(bc.name+"/baseline", func(b *testing.B) {
			rt := &fakeRuntime{}
			var mu sync.Mutex
			boxes := map[string]Sandbox{}
			keys := benchKeys(bc.tenants)
			for _, k := range keys {
				sb, _ := rt.Create(context.Background(), k)
				boxes[k] = sb
			}
			var next atomic.Int32
			b.ReportAllocs()
			b.ResetTimer()
			b.RunParallel(func(pb *testing.PB) {
				r := req(keys[int(next.Add(1)-1)%len(keys)])
				ctx := context.Background()
				for pb.Next() {
					mu.Lock()
					sb := boxes[r.IsolateKey]
					mu.Unlock()
					if _, err := sb.Run(ctx, r); err != nil {
						b.Error(err)
						return
					}
				}
			})
			b.StopTimer()
			baseline.Store(b.Elapsed().Nanoseconds() / int64(b.N))
		})
		b.Run(bc.name+"/pool", func(b *testing.B) {
			rt := &fakeRuntime{}
			cfg := DefaultConfig()
			keys := benchKeys(bc.tenants)
			cfg.Low, cfg.High = 0, len(keys)
			cfg.PerSandbox = 1 << 20 // no queueing: the warm path only
			cfg.IdleTimeout = time.Hour
			p, err := New(rt, cfg)
			if err != nil {
				b.Fatal(err)
			}
			defer p.Close(context.Background())
			for _, k := range keys {
				if _, err := p.Run(context.Background(), req(k)); err != nil {
					b.Fatal(err)
				}
			}
			var next atomic.Int32
			b.ReportAllocs()
			b.ResetTimer()
			b.RunParallel(func(pb *testing.PB) {
				r := req(keys[int(next.Add(1)-1)%len(keys)])
				ctx := context.Background()
				for pb.Next() {
					if _, err := p.Run(ctx, r); err != nil {
						b.Error(err)
						return
					}
				}
			})
			b.StopTimer()
			ns := float64(b.Elapsed().Nanoseconds()) / float64(b.N)
			if base := baseline.Load(); base > 0 {
				b.ReportMetric(ns/float64(base), "x-baseline")
				b.ReportMetric(ns-float64(base), "overhead-ns")
			}
			if s := p.Stats(); s.ColdStarts != uint64(len(keys)) || s.Evictions != 0 {
				b.Fatalf("not a warm path: %+v", s)
			}
		})
	}
}

// benchKeys returns n tenant keys, or one per goroutine RunParallel starts
// (GOMAXPROCS) when n is 0.
func benchKeys(n int) []string {
	if n == 0 {
		n = runtime.GOMAXPROCS(0)
	}
	keys := make([]string, n)
	for i := range keys {
		keys[i] = fmt.Sprintf("tenant-%d", i)
	}
	return keys
}
