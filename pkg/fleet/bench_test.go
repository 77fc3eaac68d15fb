package fleet_test

import (
	"context"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/isode-run/isode/pkg/client"
)

// Benchmarks of the NATS side alone (the runner answers at once), each next
// to a core NATS request/reply echo through the same server:
//
//	go test -run '^$' -bench . ./pkg/fleet/
//
// BenchmarkRoundTrip is one caller; BenchmarkRoundTripParallel 32 callers
// over 50 tenants. Both report the echo's ns/op and the ratio.

func echoBaseline(b *testing.B, e *env, parallel bool) float64 {
	rc, err := nats.Connect(e.url)
	if err != nil {
		b.Fatal(err)
	}
	defer rc.Close()
	if _, err := rc.Subscribe("bench.echo", func(m *nats.Msg) { m.Respond(m.Data) }); err != nil {
		b.Fatal(err)
	}
	rc.Flush()
	const n = 20000
	start := time.Now()
	if parallel {
		var next atomic.Int64
		done := make(chan struct{})
		for g := 0; g < 32; g++ {
			go func() {
				defer func() { done <- struct{}{} }()
				for next.Add(1) <= n {
					if _, err := e.nc.Request("bench.echo", []byte("x"), 5*time.Second); err != nil {
						b.Error(err)
						return
					}
				}
			}()
		}
		for g := 0; g < 32; g++ {
			<-done
		}
	} else {
		for i := 0; i < n; i++ {
			if _, err := e.nc.Request("bench.echo", []byte("x"), 5*time.Second); err != nil {
				b.Fatal(err)
			}
		}
	}
	return float64(time.Since(start).Nanoseconds()) / n
}

func BenchmarkRoundTrip(b *testing.B) {
	e := newEnv(b)
	startWorker(b, e, echo, testConfig("bench"))
	c := newClient(b, e, 8)
	ctx := context.Background()
	for i := 0; i < 100; i++ {
		if _, err := c.Run(ctx, "t", "x"); err != nil {
			b.Fatal(err)
		}
	}
	b.ResetTimer()
	for b.Loop() {
		if _, err := c.Run(ctx, "t", "x"); err != nil {
			b.Fatal(err)
		}
	}
	b.StopTimer()
	per := float64(b.Elapsed().Nanoseconds()) / float64(b.N)
	base := echoBaseline(b, e, false)
	b.ReportMetric(base, "echo-ns/op")
	b.ReportMetric(per/base, "x-echo")
}

func BenchmarkRoundTripParallel(b *testing.B) {
	e := newEnv(b)
	startWorker(b, e, echo, testConfig("bench"))
	c := newClient(b, e, 8)
	keys := make([]string, 50)
	for i := range keys {
		keys[i] = fmt.Sprintf("tenant-%d", i)
	}
	var n atomic.Int64
	b.SetParallelism(16) // 32 callers on 2 CPUs
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		ctx := context.Background()
		for pb.Next() {
			if _, err := c.Run(ctx, keys[n.Add(1)%50], "x"); err != nil {
				b.Error(err)
				return
			}
		}
	})
	b.StopTimer()
	per := float64(b.Elapsed().Nanoseconds()) / float64(b.N)
	base := echoBaseline(b, e, true)
	b.ReportMetric(base, "echo-ns/op")
	b.ReportMetric(base/per, "throughput-vs-echo")
}

var _ = client.WithShards
