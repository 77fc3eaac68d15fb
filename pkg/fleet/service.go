package fleet

import (
	"regexp"
	"runtime/debug"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go/micro"

	"github.com/isode-run/isode/pkg/protocol"
)

// The worker is a NATS micro service (protocol.ServiceName, "isode" by
// default) with one endpoint, "call", on protocol.CallSubject in a queue
// group of the service's name: `nats micro ls`, `nats micro info isode`
// and `nats micro stats isode` show every worker. The endpoint takes plain
// requests (call.go); the stats request of protocol.StatsSubject stays as
// it is (`submit stats` uses it), and the same worker stats come along in
// each endpoint's stats data.
//
// Discovery ($SRV.PING|INFO|STATS) is answered by the micro library on
// the reply subject of the request, not through the outbox: anyone who
// may publish on $SRV.> chooses where a worker publishes its service
// description. deploy/nats.conf lets only the ops user do so.

// callEndpoint and appCallEndpoint are the micro endpoints' names: the
// implicit application's calls and the application accounts'.
const (
	callEndpoint    = "call"
	appCallEndpoint = "app-call"
)

// serviceStats is what a worker's call endpoint reports as its stats data
// (`nats micro stats isode --json`): the door's own counters, and the
// worker's, as protocol.StatsSubject answers them.
type serviceStats struct {
	// Calls counts the plain requests taken; Queued those the stream
	// accepted; the rest were answered at once with an error (by code) or
	// dropped (no usable reply subject to answer on).
	Calls   int64            `json:"calls"`
	Queued  int64            `json:"queued"`
	Errors  map[string]int64 `json:"errors"`
	Dropped int64            `json:"dropped"`
	// AverageAcceptMicros is the mean time from taking a call to the
	// stream's acknowledgement (or refusal).
	AverageAcceptMicros int64 `json:"average_accept_us"`
	// Pending is the calls waiting for the stream's acknowledgement now.
	Pending int64                `json:"pending"`
	Worker  protocol.WorkerStats `json:"worker"`
}

// callCounters are the call door's counters.
type callCounters struct {
	calls, queued, dropped, pending atomic.Int64
	acceptNanos, accepted           atomic.Int64
	errMu                           sync.Mutex
	errors                          map[protocol.Code]int64
}

func (c *callCounters) fail(code protocol.Code) {
	c.errMu.Lock()
	defer c.errMu.Unlock()
	if c.errors == nil {
		c.errors = make(map[protocol.Code]int64)
	}
	c.errors[code]++
}

func (c *callCounters) accept(took time.Duration) {
	c.acceptNanos.Add(int64(took))
	c.accepted.Add(1)
}

// startService registers the worker as a micro service. It is stopped by
// stopService, before the worker stops pulling.
func (w *Worker) startService() (micro.Service, error) {
	name := protocol.ServiceName(w.cfg.Prefix)
	svc, err := micro.AddService(w.nc, micro.Config{
		Name:        name,
		Version:     serviceVersion(),
		Description: "JavaScript in per-tenant sandboxes: nats req " + protocol.CallSubject(w.cfg.Prefix) + " <request JSON>",
		Metadata: map[string]string{
			"worker":   w.cfg.WorkerID,
			"protocol": strconv.Itoa(protocol.Version),
			"shards":   strconv.Itoa(w.cfg.Shards),
			"stream":   protocol.StreamName(w.cfg.Prefix),
		},
		StatsHandler: func(*micro.Endpoint) any { return w.serviceStats() },
	})
	if err != nil {
		return nil, err
	}
	// The implicit application's calls, and the applications' (each
	// application's account imports CallSubject mapped to
	// protocol.AppCallSubject), in one queue group.
	for _, ep := range []struct{ name, subject, note string }{
		{callEndpoint, protocol.CallSubject(w.cfg.Prefix), ""},
		{appCallEndpoint, protocol.AppCallWildcard(w.cfg.Prefix), "an application account's " + protocol.CallSubject(w.cfg.Prefix) + ", mapped by its import"},
	} {
		meta := map[string]string{"body": "protocol.Request JSON", "reply": "protocol.Reply JSON"}
		if ep.note != "" {
			meta["note"] = ep.note
		}
		if err = svc.AddEndpoint(ep.name, micro.HandlerFunc(w.call), micro.WithEndpointSubject(ep.subject),
			micro.WithEndpointQueueGroup(name), micro.WithEndpointMetadata(meta)); err != nil {
			break
		}
	}
	if err != nil {
		svc.Stop()
		return nil, err
	}
	return svc, nil
}

// serviceStats returns the stats data of the call endpoint.
func (w *Worker) serviceStats() serviceStats {
	c := &w.calls
	st := serviceStats{
		Calls:   c.calls.Load(),
		Queued:  c.queued.Load(),
		Dropped: c.dropped.Load(),
		Pending: c.pending.Load(),
		Errors:  map[string]int64{},
		Worker:  w.workerStats(),
	}
	c.errMu.Lock()
	for k, n := range c.errors {
		st.Errors[string(k)] = n
	}
	c.errMu.Unlock()
	if n := c.accepted.Load(); n > 0 {
		st.AverageAcceptMicros = c.acceptNanos.Load() / n / 1000
	}
	return st
}

// semver is the version rule of nats.go micro (its semVerRegexp).
var semver = regexp.MustCompile(`^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?$`)

// serviceVersion is the worker binary's module version when it has one
// (a tagged build), else 0.0.0-dev: micro wants a semantic version.
func serviceVersion() string {
	if bi, ok := debug.ReadBuildInfo(); ok {
		v := strings.TrimPrefix(bi.Main.Version, "v")
		if semver.MatchString(v) {
			return v
		}
	}
	return "0.0.0-dev"
}
