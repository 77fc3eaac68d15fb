package fleet_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/micro"

	"github.com/isode-run/isode/pkg/client"
	"github.com/isode-run/isode/pkg/protocol"
)

// callRaw sends body as a plain request to isode.call and returns the
// reply message and its decoded reply.
func callRaw(t *testing.T, nc *nats.Conn, body []byte, hdr nats.Header) (*nats.Msg, *protocol.Reply) {
	t.Helper()
	m := &nats.Msg{Subject: protocol.CallSubject("isode"), Data: body, Header: hdr}
	got, err := nc.RequestMsg(m, 10*time.Second)
	if err != nil {
		t.Fatalf("call: %v", err)
	}
	var rep protocol.Reply
	if err := json.Unmarshal(got.Data, &rep); err != nil {
		t.Fatalf("reply %q: %v", got.Data, err)
	}
	if err := rep.Validate(); err != nil {
		t.Fatalf("reply %s: %v", got.Data, err)
	}
	return got, &rep
}

// countingEcho is echo that counts its runs.
func countingEcho(n *atomic.Int32) runnerFunc {
	return func(ctx context.Context, req *protocol.Request) (*protocol.Result, error) {
		n.Add(1)
		return echo(ctx, req)
	}
}

func TestCallRoundTripNextToTheClient(t *testing.T) {
	e := newEnv(t)
	var runs atomic.Int32
	startWorker(t, e, countingEcho(&runs), testConfig("w1"))

	got, rep := callRaw(t, e.nc, []byte(`{"v":1,"isolate_key":"acme","code":"return 1","input":{"a":[1,2]},"timeout_ms":2000}`), nil)
	if rep.Error != nil || string(rep.Result) != `{"a":[1,2]}` || rep.Console != "ran acme" || rep.Worker != "w1" {
		t.Fatalf("reply %s", got.Data)
	}
	if rep.ID == "" || got.Header.Get(protocol.HeaderRequestID) != rep.ID {
		t.Errorf("request id %q, header %q", rep.ID, got.Header.Get(protocol.HeaderRequestID))
	}
	if h := got.Header.Get(protocol.HeaderServiceErrorCode); h != "" {
		t.Errorf("a result with %s: %s", protocol.HeaderServiceErrorCode, h)
	}
	// A trace context comes back through the door too.
	const tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
	got, _ = callRaw(t, e.nc, []byte(`{"v":1,"isolate_key":"acme","code":"return 1"}`), nats.Header{protocol.HeaderTraceparent: []string{tp}})
	if h := got.Header.Get(protocol.HeaderTraceparent); h != tp {
		t.Errorf("traceparent through the door: %q", h)
	}
	// The other door, on the same worker, at the same time.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	res, err := newClient(t, e, 8).Run(ctx, "acme", "x", client.WithInput(json.RawMessage(`7`)))
	if err != nil || string(res.Value) != "7" {
		t.Fatalf("client: %v %v", res, err)
	}
	if n := runs.Load(); n != 3 {
		t.Errorf("%d runs, want 3", n)
	}
}

func TestCallErrorsCarryServiceHeaders(t *testing.T) {
	e := newEnv(t)
	startWorker(t, e, runnerFunc(func(ctx context.Context, req *protocol.Request) (*protocol.Result, error) {
		return &protocol.Result{Console: "before"}, protocol.Errorf(protocol.CodeCodeError, "Error: boom\r\nInjected: 1")
	}), testConfig("w1"))
	got, rep := callRaw(t, e.nc, []byte(`{"v":1,"isolate_key":"t","code":"throw"}`), nil)
	if rep.Error == nil || rep.Error.Code != protocol.CodeCodeError || rep.Console != "before" {
		t.Fatalf("reply %s", got.Data)
	}
	if h := got.Header.Get(protocol.HeaderServiceErrorCode); h != "422" {
		t.Errorf("%s = %q", protocol.HeaderServiceErrorCode, h)
	}
	if h := got.Header.Get(protocol.HeaderServiceError); h != "Error: boom  Injected: 1" {
		t.Errorf("%s = %q", protocol.HeaderServiceError, h)
	}
	if got.Header.Get("Injected") != "" {
		t.Error("a header was injected")
	}
}

func TestCallBadInputGetsStableErrors(t *testing.T) {
	e := newEnv(t)
	var runs atomic.Int32
	startWorker(t, e, countingEcho(&runs), testConfig("w1"))
	oversize, _ := json.Marshal(map[string]any{"v": 1, "isolate_key": "t", "code": strings.Repeat("x", protocol.MaxRequestBytes)})
	tests := []struct {
		name string
		give string
		hdr  nats.Header
		want string // in the message
	}{
		{name: "not JSON", give: `run this please`, want: "JSON"},
		{name: "empty", give: ``, want: "empty"},
		{name: "not an object", give: `[1]`, want: "object"},
		{name: "missing version", give: `{"isolate_key":"t","code":"x"}`, want: "v"},
		{name: "missing key", give: `{"v":1,"code":"x"}`, want: "isolate_key"},
		{name: "missing code", give: `{"v":1,"isolate_key":"t"}`, want: "code"},
		{name: "invalid key", give: `{"v":1,"isolate_key":"a b*","code":"x"}`, want: "isolate_key"},
		{name: "timeout over the limit", give: `{"v":1,"isolate_key":"t","code":"x","timeout_ms":3600000}`, want: "timeout"},
		{name: "oversize body", give: string(oversize), want: "limit"},
		{name: "bad deadline", give: `{"v":1,"isolate_key":"t","code":"x"}`,
			hdr: nats.Header{protocol.HeaderDeadline: []string{"soon"}}, want: protocol.HeaderDeadline},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, rep := callRaw(t, e.nc, []byte(tt.give), tt.hdr)
			if rep.Error == nil || rep.Error.Code != protocol.CodeBadRequest || !strings.Contains(rep.Error.Message, tt.want) {
				t.Fatalf("reply %.300s, want bad_request naming %q", got.Data, tt.want)
			}
			if h := got.Header.Get(protocol.HeaderServiceErrorCode); h != "400" {
				t.Errorf("%s = %q", protocol.HeaderServiceErrorCode, h)
			}
			if got.Header.Get(protocol.HeaderServiceError) == "" || got.Header.Get(protocol.HeaderErrorCode) != "bad_request" {
				t.Errorf("headers %v", got.Header)
			}
		})
	}
	// A deadline already passed is not a bad request: the stream's path
	// answers it queue_timeout, without running it.
	got, rep := callRaw(t, e.nc, []byte(`{"v":1,"isolate_key":"t","code":"x"}`),
		nats.Header{protocol.HeaderDeadline: []string{fmt.Sprint(time.Now().Add(-time.Second).UnixMilli())}})
	if rep.Error == nil || rep.Error.Code != protocol.CodeQueueTimeout || got.Header.Get(protocol.HeaderServiceErrorCode) != "504" {
		t.Fatalf("past deadline: %s", got.Data)
	}
	if n := runs.Load(); n != 0 {
		t.Errorf("runner called %d times", n)
	}
	// The worker still serves.
	if _, rep := callRaw(t, e.nc, []byte(`{"v":1,"isolate_key":"t","code":"ok"}`), nil); rep.Error != nil || string(rep.Result) != `"ok"` {
		t.Fatalf("after bad calls: %+v", rep)
	}
	st := microStats(t, e.nc, 1)[0]
	if st.Errors["bad_request"] != int64(len(tests)) {
		t.Errorf("stats count %v bad requests, want %d", st.Errors, len(tests))
	}
}

// callStats is the stats data of the call endpoint, as far as tests read it.
type callStats struct {
	Calls   int64            `json:"calls"`
	Queued  int64            `json:"queued"`
	Errors  map[string]int64 `json:"errors"`
	Dropped int64            `json:"dropped"`
	Worker  protocol.WorkerStats
}

// microStats asks $SRV.STATS.isode and returns the call endpoint's data of
// the first n workers that answer.
func microStats(t *testing.T, nc *nats.Conn, n int) []callStats {
	t.Helper()
	var out []callStats
	for _, st := range discover[micro.Stats](t, nc, "STATS", n) {
		for _, ep := range st.Endpoints {
			if ep.Name != "call" {
				continue
			}
			var cs callStats
			if err := json.Unmarshal(ep.Data, &cs); err != nil {
				t.Fatalf("stats data %s: %v", ep.Data, err)
			}
			out = append(out, cs)
		}
	}
	if len(out) != n {
		t.Fatalf("%d call endpoints in the stats of %d workers", len(out), n)
	}
	return out
}

// discover sends a $SRV request for the isode service and gathers the
// answers of n distinct instances.
func discover[T any](t *testing.T, nc *nats.Conn, verb string, n int) []T {
	t.Helper()
	inbox := nats.NewInbox()
	sub, err := nc.SubscribeSync(inbox)
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Unsubscribe()
	if err := nc.PublishRequest("$SRV."+verb+".isode", inbox, nil); err != nil {
		t.Fatal(err)
	}
	seen := map[string]bool{}
	var out []T
	deadline := time.Now().Add(10 * time.Second)
	for len(out) < n {
		m, err := sub.NextMsg(time.Until(deadline))
		if err != nil {
			t.Fatalf("%s: %d of %d instances answered: %v", verb, len(out), n, err)
		}
		var id micro.ServiceIdentity
		var v T
		if json.Unmarshal(m.Data, &id) != nil || json.Unmarshal(m.Data, &v) != nil {
			t.Fatalf("%s answer %s", verb, m.Data)
		}
		if !seen[id.ID] {
			seen[id.ID] = true
			out = append(out, v)
		}
	}
	return out
}

func TestCallWithoutUsableReplyIsDroppedAndCounted(t *testing.T) {
	e := newEnv(t)
	var runs atomic.Int32
	startWorker(t, e, countingEcho(&runs), testConfig("w1"))
	apiSub, err := e.nc.SubscribeSync("$JS.API.STREAM.DELETE.>")
	if err != nil {
		t.Fatal(err)
	}
	body := []byte(`{"v":1,"isolate_key":"t","code":"x"}`)
	if err := e.nc.Publish(protocol.CallSubject("isode"), body); err != nil {
		t.Fatal(err)
	}
	for _, reply := range []string{"$JS.API.STREAM.DELETE.ISODE", "isode.run.1", "_ISODE_ACK.x"} {
		if err := e.nc.PublishRequest(protocol.CallSubject("isode"), reply, body); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, 10*time.Second, func() error {
		st := microStats(t, e.nc, 1)[0]
		if st.Dropped != 4 || st.Calls != 4 {
			return fmt.Errorf("%d calls, %d dropped, want 4 and 4", st.Calls, st.Dropped)
		}
		return nil
	})
	if m, err := apiSub.NextMsg(100 * time.Millisecond); err == nil {
		t.Fatalf("worker published to %s", m.Subject)
	}
	if n := runs.Load(); n != 0 {
		t.Errorf("runner called %d times for calls nobody can be told about", n)
	}
}

func TestCallOverloadedIsAnsweredAtOnce(t *testing.T) {
	e := newEnv(t)
	release := make(chan struct{})
	var started atomic.Int32
	cfg := testConfig("w1")
	cfg.StreamMaxMsgs = 2
	startWorker(t, e, runnerFunc(func(ctx context.Context, req *protocol.Request) (*protocol.Result, error) {
		started.Add(1)
		select {
		case <-release:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
		return echo(ctx, req)
	}), cfg)
	// Two calls fill the stream (a work queue keeps a request until it is
	// acked, after its run).
	done := make(chan *nats.Msg, 2)
	for i := 0; i < 2; i++ {
		go func(i int) {
			m, err := e.nc.Request(protocol.CallSubject("isode"), fmt.Appendf(nil, `{"v":1,"isolate_key":"k%d","code":"x","input":%d}`, i, i), 20*time.Second)
			if err != nil {
				t.Error(err)
			}
			done <- m
		}(i)
	}
	waitFor(t, 10*time.Second, func() error {
		if n := started.Load(); n != 2 {
			return fmt.Errorf("%d runs started", n)
		}
		return nil
	})
	begin := time.Now()
	got, rep := callRaw(t, e.nc, []byte(`{"v":1,"isolate_key":"k3","code":"x"}`), nil)
	if rep.Error == nil || rep.Error.Code != protocol.CodeOverloaded || got.Header.Get(protocol.HeaderServiceErrorCode) != "429" {
		t.Fatalf("third call on a full stream: %s %v", got.Data, got.Header)
	}
	if took := time.Since(begin); took > 5*time.Second {
		t.Errorf("overloaded took %v: not at once", took)
	}
	close(release)
	for i := 0; i < 2; i++ {
		if m := <-done; m == nil || !strings.Contains(string(m.Data), `"result"`) {
			t.Errorf("held call answered %v", m)
		}
	}
	if n := microStats(t, e.nc, 1)[0].Errors["overloaded"]; n != 1 {
		t.Errorf("overloaded counted %d times", n)
	}
}

func TestMicroDiscoveryShowsEveryWorker(t *testing.T) {
	e := newEnv(t)
	startWorker(t, e, echo, testConfig("w1"))
	startWorker(t, e, echo, testConfig("w2"))
	infos := discover[micro.Info](t, e.nc, "INFO", 2)
	workers := map[string]bool{}
	for _, in := range infos {
		workers[in.Metadata["worker"]] = true
		// The implicit application's door, and the application accounts'.
		if in.Name != "isode" || in.Version == "" || len(in.Endpoints) != 2 ||
			in.Endpoints[0].Subject != "isode.call" || in.Endpoints[0].QueueGroup != "isode" ||
			in.Endpoints[1].Subject != "isode.app.*.call" || in.Endpoints[1].QueueGroup != "isode" {
			t.Errorf("info %+v", in)
		}
	}
	if !workers["w1"] || !workers["w2"] {
		t.Errorf("workers in the infos: %v", workers)
	}
	discover[micro.Ping](t, e.nc, "PING", 2)

	for i := 0; i < 4; i++ {
		if _, rep := callRaw(t, e.nc, fmt.Appendf(nil, `{"v":1,"isolate_key":"k%d","code":"x"}`, i), nil); rep.Error != nil {
			t.Fatal(rep.Error)
		}
	}
	var calls int
	for _, st := range discover[micro.Stats](t, e.nc, "STATS", 2) {
		ep := st.Endpoints[0]
		calls += ep.NumRequests
		var cs callStats
		if err := json.Unmarshal(ep.Data, &cs); err != nil || cs.Worker.Worker == "" {
			t.Errorf("stats data %s: %v", ep.Data, err)
		}
		if ep.NumRequests > 0 && ep.AverageProcessingTime <= 0 {
			t.Errorf("stats %+v", ep)
		}
	}
	if calls != 4 {
		t.Errorf("the workers' stats count %d calls, want 4", calls)
	}
}

func TestStoppedWorkerTakesNoCalls(t *testing.T) {
	e := newEnv(t)
	w1 := startWorker(t, e, echo, testConfig("w1"))
	w1.StopPulling()
	_, err := e.nc.Request(protocol.CallSubject("isode"), []byte(`{"v":1,"isolate_key":"t","code":"x"}`), 5*time.Second)
	if !errors.Is(err, nats.ErrNoResponders) {
		t.Fatalf("call to a fleet whose only worker stopped: %v, want no responders", err)
	}
	startWorker(t, e, echo, testConfig("w2"))
	if _, rep := callRaw(t, e.nc, []byte(`{"v":1,"isolate_key":"t","code":"x"}`), nil); rep.Worker != "w2" {
		t.Fatalf("answered by %q", rep.Worker)
	}
}
