package metrics_test

import (
	"context"
	"net/http"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/isode-run/isode/pkg/metrics"
	"github.com/isode-run/isode/pkg/protocol"
)

// scrape fetches addr's /metrics and parses it with the Prometheus text
// parser: a page it refuses fails the test.
func scrape(t *testing.T, addr string) map[string]*dto.MetricFamily {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("status %s", resp.Status)
	}
	p := expfmt.NewTextParser(model.LegacyValidation)
	fams, err := p.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatalf("the exposition does not parse: %v", err)
	}
	return fams
}

// value returns the value of the family's metric whose labels include
// want, or -1 when there is none.
func value(fams map[string]*dto.MetricFamily, name string, want map[string]string) float64 {
	f := fams[name]
	if f == nil {
		return -1
	}
next:
	for _, m := range f.GetMetric() {
		labels := map[string]string{}
		for _, l := range m.GetLabel() {
			labels[l.GetName()] = l.GetValue()
		}
		for k, v := range want {
			if labels[k] != v {
				continue next
			}
		}
		switch {
		case m.Counter != nil:
			return m.Counter.GetValue()
		case m.Gauge != nil:
			return m.Gauge.GetValue()
		case m.Histogram != nil:
			return float64(m.Histogram.GetSampleCount())
		}
	}
	return -1
}

func TestEndpointParsesAndCountersMove(t *testing.T) {
	pool := metrics.Pool{Free: 2, Assigned: 3, Busy: 1, Creating: 1, Queued: 4, Deaths: map[string]uint64{"out_of_memory": 2}}
	m := metrics.New()
	srv, err := m.Serve("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := srv.Close(ctx); err != nil {
			t.Error(err)
		}
	})
	addr := srv.Addr().String()
	if got := value(scrape(t, addr), "isode_pool_free_sandboxes", nil); got != -1 {
		t.Errorf("pool gauges before the pool is watched: %v", got)
	}
	m.Watch(metrics.Sources{
		Pool:       func() metrics.Pool { return pool },
		Reconnects: func() uint64 { return 5 },
		Shards:     func() int { return 64 },
	})

	before := scrape(t, addr)
	for name, want := range map[string]float64{
		"isode_pool_free_sandboxes": 2, "isode_pool_assigned_sandboxes": 3, "isode_pool_busy_sandboxes": 1,
		"isode_pool_creating_sandboxes": 1, "isode_pool_queued_requests": 4,
		"isode_nats_reconnects_total": 5, "isode_shards_owned": 64,
	} {
		if got := value(before, name, nil); got != want {
			t.Errorf("%s = %v, want %v", name, got, want)
		}
	}
	if got := value(before, "isode_sandbox_deaths_total", map[string]string{"cause": "out_of_memory"}); got != 2 {
		t.Errorf("deaths by out_of_memory = %v", got)
	}
	if got := value(before, "isode_runs_total", nil); got != -1 {
		t.Errorf("runs before any: %v", got)
	}

	rec := func(code, start string, wall, pool int64) *protocol.UsageRecord {
		return &protocol.UsageRecord{Application: "default", Code: code, Usage: protocol.Usage{
			Start: start, WallMicros: wall, PoolMicros: pool, QueueMicros: pool + 100, CPUMicros: wall / 2, BytesIn: 100, BytesOut: 50}}
	}
	m.Observe(rec("ok", protocol.StartWarm, 2000, 0))
	m.Observe(rec("ok", protocol.StartCold, 3000, 600_000))
	m.Observe(rec("code_error", protocol.StartPool, 1000, 5000))
	m.Observe(rec("queue_timeout", "", 0, 0))
	pool.Busy = 2
	after := scrape(t, addr)
	app := map[string]string{"application": "default"}
	for _, c := range []struct {
		name   string
		labels map[string]string
		want   float64
	}{
		{"isode_runs_total", map[string]string{"application": "default", "code": "ok"}, 2},
		{"isode_runs_total", map[string]string{"code": "code_error"}, 1},
		{"isode_runs_total", map[string]string{"code": "queue_timeout"}, 1},
		{"isode_run_starts_total", map[string]string{"start": "cold"}, 1},
		{"isode_run_duration_seconds", app, 3}, // runs that ran
		{"isode_queue_wait_seconds", app, 4},   // every answer
		{"isode_cold_start_seconds", app, 1},
		{"isode_run_cpu_seconds_total", app, 0.003},
		{"isode_request_bytes_total", app, 400},
		{"isode_reply_bytes_total", app, 200},
		{"isode_pool_busy_sandboxes", nil, 2},
	} {
		if got := value(after, c.name, c.labels); got != c.want {
			t.Errorf("%s%v = %v, want %v", c.name, c.labels, got, c.want)
		}
	}
	// Names and types follow Prometheus' conventions, and nothing is per tenant.
	for name, f := range after {
		if f.GetType() == dto.MetricType_COUNTER && len(name) > 6 && name[len(name)-6:] != "_total" {
			t.Errorf("counter %s does not end in _total", name)
		}
		for _, mm := range f.GetMetric() {
			for _, l := range mm.GetLabel() {
				if l.GetName() == "tenant" || l.GetName() == "isolate_key" {
					t.Errorf("%s has a tenant label", name)
				}
			}
		}
	}
	if f := after["isode_run_duration_seconds"]; f == nil || f.GetType() != dto.MetricType_HISTOGRAM {
		t.Errorf("isode_run_duration_seconds is not a histogram: %v", f)
	}
}
