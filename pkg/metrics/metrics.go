// Package metrics exposes a worker's state and the runs it answers as
// Prometheus metrics (github.com/prometheus/client_golang), for a scrape
// endpoint a worker serves when asked to (--metrics-addr).
//
// Runs are counted from their usage records (Metrics.Observe, given to
// fleet.Config.OnUsage): one per request the worker answered, never per
// replay from its reply cache. Pool gauges, sandbox deaths, NATS
// reconnects and shards owned are read from their owners at each scrape.
//
// No metric has a tenant label: the number of tenants is unbounded and
// each would be a time series. Tenants' totals are in the worker's stats
// (submit stats --tenants) and in the usage records. Run metrics carry an
// application label, "default" until applications have NATS accounts of
// their own.
package metrics

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/isode-run/isode/pkg/protocol"
)

// Pool is what the worker's pool reports at a scrape.
type Pool struct {
	Free, Assigned, Busy, Creating, Queued int
	// Deaths counts sandboxes that died on their own, by cause (an error
	// code such as "out_of_memory" or "sandbox_crashed").
	Deaths map[string]uint64
}

// Sources are read at each scrape (see Metrics.Watch). Any may be nil: its
// metrics are left out.
type Sources struct {
	Pool       func() Pool
	Reconnects func() uint64 // NATS reconnections since start
	Shards     func() int    // shards this worker owns
}

// Metrics holds a worker's registry and its instruments.
type Metrics struct {
	reg *prometheus.Registry

	runs      *prometheus.CounterVec
	starts    *prometheus.CounterVec
	duration  *prometheus.HistogramVec
	queueWait *prometheus.HistogramVec
	coldStart *prometheus.HistogramVec
	cpu       *prometheus.CounterVec
	bytesIn   *prometheus.CounterVec
	bytesOut  *prometheus.CounterVec
	sources   *sourceCollector
}

const namespace = "isode"

// New returns Metrics whose registry holds the run instruments, Go's and
// the process's own collectors, and the collectors of the Sources given to
// Watch.
func New() *Metrics {
	m := &Metrics{reg: prometheus.NewRegistry(), sources: &sourceCollector{}}
	app := []string{"application"}
	m.runs = prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: namespace, Name: "runs_total",
		Help: "Requests answered (replays from the reply cache excepted), by outcome: ok or the error code."}, []string{"application", "code"})
	m.starts = prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: namespace, Name: "run_starts_total",
		Help: "Runs by how they got their sandbox: warm (the tenant's), pool (a free one assigned), cold (created for it)."}, []string{"application", "start"})
	m.duration = prometheus.NewHistogramVec(prometheus.HistogramOpts{Namespace: namespace, Name: "run_duration_seconds",
		Help:    "Wall time of runs in their sandbox (the wait for a sandbox excluded).",
		Buckets: prometheus.ExponentialBuckets(0.0005, 2, 16)}, app)
	m.queueWait = prometheus.NewHistogramVec(prometheus.HistogramOpts{Namespace: namespace, Name: "queue_wait_seconds",
		Help:    "Time requests waited before their run: in the stream, then in the pool.",
		Buckets: prometheus.ExponentialBuckets(0.0005, 2, 18)}, app)
	m.coldStart = prometheus.NewHistogramVec(prometheus.HistogramOpts{Namespace: namespace, Name: "cold_start_seconds",
		Help:    "Time cold-start runs waited in the pool for the sandbox created for them.",
		Buckets: prometheus.ExponentialBuckets(0.05, 2, 10)}, app)
	m.cpu = prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: namespace, Name: "run_cpu_seconds_total",
		Help: "CPU time of the snippet threads that ran the runs, as the sandboxes' kernel counted it."}, app)
	m.bytesIn = prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: namespace, Name: "request_bytes_total",
		Help: "Size of the request bodies answered."}, app)
	m.bytesOut = prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: namespace, Name: "reply_bytes_total",
		Help: "Size of the reply bodies sent (without their usage member), replays excepted."}, app)
	m.reg.MustRegister(m.runs, m.starts, m.duration, m.queueWait, m.coldStart, m.cpu, m.bytesIn, m.bytesOut,
		m.sources,
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// Watch makes scrapes read src from now on. A worker serves its endpoint
// from the start and watches its pool and NATS connection once it has them.
func (m *Metrics) Watch(src Sources) {
	m.sources.mu.Lock()
	defer m.sources.mu.Unlock()
	m.sources.src = src
}

// Observe counts one answered request from its usage record; it is
// fleet.Config.OnUsage's signature.
func (m *Metrics) Observe(rec *protocol.UsageRecord) {
	app := rec.Application
	if app == "" {
		app = "default"
	}
	m.runs.WithLabelValues(app, rec.Code).Inc()
	m.queueWait.WithLabelValues(app).Observe(micros(rec.QueueMicros))
	m.bytesIn.WithLabelValues(app).Add(float64(rec.BytesIn))
	m.bytesOut.WithLabelValues(app).Add(float64(rec.BytesOut))
	if rec.Start == "" {
		return // it did not run
	}
	m.starts.WithLabelValues(app, rec.Start).Inc()
	m.duration.WithLabelValues(app).Observe(micros(rec.WallMicros))
	m.cpu.WithLabelValues(app).Add(micros(rec.CPUMicros))
	if rec.Start == protocol.StartCold {
		m.coldStart.WithLabelValues(app).Observe(micros(rec.PoolMicros))
	}
}

func micros(us int64) float64 { return float64(us) / 1e6 }

// Handler serves the registry in the Prometheus exposition formats.
func (m *Metrics) Handler() http.Handler {
	return promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{Registry: m.reg, ErrorHandling: promhttp.ContinueOnError})
}

// Registry returns the registry, for tests and for other collectors.
func (m *Metrics) Registry() *prometheus.Registry { return m.reg }

// Server serves /metrics on a listener until Close.
type Server struct {
	srv  *http.Server
	addr net.Addr
	done chan struct{}
	err  error // of Serve, once done is closed
}

// Serve listens on addr and serves m's Handler at /metrics in a goroutine
// the returned Server owns; Close stops it. It fails when addr cannot be
// listened on.
func (m *Metrics) Serve(addr string) (*Server, error) {
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("listen for metrics: %w", err)
	}
	mux := http.NewServeMux()
	mux.Handle("/metrics", m.Handler())
	s := &Server{
		srv:  &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second},
		addr: l.Addr(),
		done: make(chan struct{}),
	}
	go func() {
		defer close(s.done)
		if err := s.srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
			s.err = err
		}
	}()
	return s, nil
}

// Addr is the address the server listens on.
func (s *Server) Addr() net.Addr { return s.addr }

// Close stops the server, waiting for scrapes in progress until ctx ends,
// and returns the error serving ended with, if any.
func (s *Server) Close(ctx context.Context) error {
	err := s.srv.Shutdown(ctx)
	if err != nil {
		s.srv.Close()
	}
	<-s.done
	return errors.Join(err, s.err)
}

// sourceCollector reads Sources at each scrape: one snapshot of the pool
// for all its gauges.
type sourceCollector struct {
	src Sources
	mu  sync.Mutex // guards src; one scrape at a time reads the sources
}

var (
	descFree      = prometheus.NewDesc("isode_pool_free_sandboxes", "Ready sandboxes not assigned to a tenant.", nil, nil)
	descAssigned  = prometheus.NewDesc("isode_pool_assigned_sandboxes", "Sandboxes assigned to tenants.", nil, nil)
	descBusy      = prometheus.NewDesc("isode_pool_busy_sandboxes", "Assigned sandboxes with runs in flight.", nil, nil)
	descCreating  = prometheus.NewDesc("isode_pool_creating_sandboxes", "Sandboxes being created.", nil, nil)
	descQueued    = prometheus.NewDesc("isode_pool_queued_requests", "Requests waiting in the pool for a sandbox.", nil, nil)
	descDeaths    = prometheus.NewDesc("isode_sandbox_deaths_total", "Sandboxes that died on their own, by cause (error code).", []string{"cause"}, nil)
	descReconnect = prometheus.NewDesc("isode_nats_reconnects_total", "Reconnections of the worker's NATS connection.", nil, nil)
	descShards    = prometheus.NewDesc("isode_shards_owned", "Shards this worker pulls requests from.", nil, nil)
)

func (c *sourceCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descFree, descAssigned, descBusy, descCreating, descQueued, descDeaths, descReconnect, descShards} {
		ch <- d
	}
}

func (c *sourceCollector) Collect(ch chan<- prometheus.Metric) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.src.Pool != nil {
		p := c.src.Pool()
		ch <- prometheus.MustNewConstMetric(descFree, prometheus.GaugeValue, float64(p.Free))
		ch <- prometheus.MustNewConstMetric(descAssigned, prometheus.GaugeValue, float64(p.Assigned))
		ch <- prometheus.MustNewConstMetric(descBusy, prometheus.GaugeValue, float64(p.Busy))
		ch <- prometheus.MustNewConstMetric(descCreating, prometheus.GaugeValue, float64(p.Creating))
		ch <- prometheus.MustNewConstMetric(descQueued, prometheus.GaugeValue, float64(p.Queued))
		for cause, n := range p.Deaths {
			ch <- prometheus.MustNewConstMetric(descDeaths, prometheus.CounterValue, float64(n), cause)
		}
	}
	if c.src.Reconnects != nil {
		ch <- prometheus.MustNewConstMetric(descReconnect, prometheus.CounterValue, float64(c.src.Reconnects()))
	}
	if c.src.Shards != nil {
		ch <- prometheus.MustNewConstMetric(descShards, prometheus.GaugeValue, float64(c.src.Shards()))
	}
}
