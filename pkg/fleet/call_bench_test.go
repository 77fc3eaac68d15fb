package fleet_test

import (
	"context"
	"fmt"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/isode-run/isode/pkg/protocol"
)

// BenchmarkDoors is the load test of the two ways in, side by side in one
// run against one server and one worker (the runner answers at once): 32
// callers over 50 tenants through pkg/client (a header inbox, confirmed
// replies) and through the plain door isode.call (nc.Request, as any
// NATS client), and, as the baseline of the machine at that moment, a
// core NATS echo through the same server. Each reports its throughput and
// its median and 99th percentile round trips:
//
//	go test -run '^$' -bench Doors -benchtime 20000x ./pkg/fleet/
func BenchmarkDoors(b *testing.B) {
	e := newEnv(b)
	cfg := testConfig("bench")
	startWorker(b, e, echo, cfg)
	c := newClient(b, e, cfg.Shards)
	keys := make([]string, 50)
	bodies := make([][]byte, 50)
	for i := range keys {
		keys[i] = fmt.Sprintf("tenant-%d", i)
		bodies[i] = fmt.Appendf(nil, `{"v":1,"isolate_key":%q,"code":"x"}`, keys[i])
	}
	ec, err := nats.Connect(e.url)
	if err != nil {
		b.Fatal(err)
	}
	defer ec.Close()
	if _, err := ec.Subscribe("bench.echo", func(m *nats.Msg) { m.Respond(m.Data) }); err != nil {
		b.Fatal(err)
	}
	ec.Flush()
	doors := []struct {
		name string
		call func(ctx context.Context, i int) error
	}{
		{"client", func(ctx context.Context, i int) error {
			_, err := c.Run(ctx, keys[i], "x")
			return err
		}},
		{"call", func(ctx context.Context, i int) error {
			m, err := e.nc.RequestWithContext(ctx, protocol.CallSubject("isode"), bodies[i])
			if err != nil {
				return err
			}
			if m.Header.Get(protocol.HeaderServiceErrorCode) != "" {
				return fmt.Errorf("error reply %s", m.Data)
			}
			return nil
		}},
		{"echo", func(ctx context.Context, i int) error {
			_, err := e.nc.RequestWithContext(ctx, "bench.echo", bodies[i])
			return err
		}},
	}
	for _, d := range doors {
		b.Run(d.name, func(b *testing.B) {
			// Warm up: the consumers, the client's inbox, the stream's blocks.
			for i := 0; i < 200; i++ {
				if err := d.call(context.Background(), i%50); err != nil {
					b.Fatal(err)
				}
			}
			lat := make([]time.Duration, b.N)
			var next atomic.Int64
			b.SetParallelism(16) // 32 callers on 2 CPUs
			b.ResetTimer()
			b.RunParallel(func(pb *testing.PB) {
				ctx := context.Background()
				for pb.Next() {
					i := next.Add(1) - 1
					start := time.Now()
					ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
					err := d.call(ctx, int(i%50))
					cancel()
					if err != nil {
						b.Error(err)
						return
					}
					if int(i) < len(lat) {
						lat[i] = time.Since(start)
					}
				}
			})
			b.StopTimer()
			n := min(int(next.Load()), len(lat))
			got := lat[:n]
			slices.Sort(got)
			if n > 0 {
				b.ReportMetric(float64(got[n/2].Microseconds()), "p50-us")
				b.ReportMetric(float64(got[n*99/100].Microseconds()), "p99-us")
			}
			b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "req/s")
		})
	}
}
