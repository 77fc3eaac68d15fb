package main

import (
	"encoding/json"
	"net/http"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// metricsAddr returns the address the worker logged its metrics endpoint on.
func (w *worker) metricsAddr(t *testing.T) string {
	t.Helper()
	for _, line := range strings.Split(w.log.String(), "\n") {
		var l struct {
			Message string `json:"message"`
			Addr    string `json:"addr"`
		}
		if json.Unmarshal([]byte(line), &l) == nil && l.Message == "metrics listening" {
			return l.Addr
		}
	}
	t.Fatalf("the worker did not log its metrics address:\n%s", w.log.String())
	return ""
}

// scrapeMetrics fetches and parses a worker's /metrics with the Prometheus
// text parser.
func scrapeMetrics(t *testing.T, addr string) map[string]*dto.MetricFamily {
	t.Helper()
	c := http.Client{Timeout: 5 * time.Second}
	resp, err := c.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	p := expfmt.NewTextParser(model.LegacyValidation)
	fams, err := p.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatalf("the exposition does not parse: %v", err)
	}
	return fams
}

// sumOf adds the values of a family's series whose labels include want.
func sumOf(fams map[string]*dto.MetricFamily, name string, want map[string]string) float64 {
	var sum float64
	f := fams[name]
	if f == nil {
		return -1
	}
next:
	for _, m := range f.GetMetric() {
		for k, v := range want {
			found := false
			for _, l := range m.GetLabel() {
				found = found || l.GetName() == k && l.GetValue() == v
			}
			if !found {
				continue next
			}
		}
		switch {
		case m.Counter != nil:
			sum += m.Counter.GetValue()
		case m.Gauge != nil:
			sum += m.Gauge.GetValue()
		case m.Histogram != nil:
			sum += float64(m.Histogram.GetSampleCount())
		}
	}
	return sum
}

// A worker started with --metrics-addr serves Prometheus metrics that
// parse, and its counters move as runs happen.
func TestMetricsEndpoint(t *testing.T) {
	e := newE2E(t)
	w := e.start("--metrics-addr", "127.0.0.1:0")
	addr := w.metricsAddr(t)

	before := scrapeMetrics(t, addr)
	if got := sumOf(before, "isode_shards_owned", nil); got != 64 {
		t.Errorf("isode_shards_owned = %v, want 64", got)
	}
	if got := sumOf(before, "isode_pool_free_sandboxes", nil); got < 0 {
		t.Error("no pool gauges")
	}
	if got := sumOf(before, "isode_sandbox_deaths_total", map[string]string{"cause": "out_of_memory"}); got != 0 {
		t.Errorf("deaths by out_of_memory before any run: %v", got)
	}
	if got := sumOf(before, "isode_nats_reconnects_total", nil); got != 0 {
		t.Errorf("isode_nats_reconnects_total = %v", got)
	}

	for range 3 {
		if _, err := e.run("metrics-a", `return function (cb) { cb(null, 1) }`); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := e.run("metrics-a", `return function (cb) { cb(new Error("no")) }`); err == nil {
		t.Fatal("the failing snippet succeeded")
	}
	after := scrapeMetrics(t, addr)
	ok := map[string]string{"application": "default", "code": "ok"}
	for _, c := range []struct {
		name   string
		labels map[string]string
		want   float64
	}{
		{"isode_runs_total", ok, 3},
		{"isode_runs_total", map[string]string{"code": "code_error"}, 1},
		{"isode_run_duration_seconds", map[string]string{"application": "default"}, 4},
		{"isode_queue_wait_seconds", nil, 4},
		{"isode_run_starts_total", nil, 4},
		{"isode_run_starts_total", map[string]string{"start": "warm"}, 3},
	} {
		if got := sumOf(after, c.name, c.labels); got != c.want {
			t.Errorf("%s%v = %v, want %v", c.name, c.labels, got, c.want)
		}
	}
	if got := sumOf(after, "isode_pool_assigned_sandboxes", nil); got != 1 {
		t.Errorf("isode_pool_assigned_sandboxes = %v, want 1", got)
	}
}
