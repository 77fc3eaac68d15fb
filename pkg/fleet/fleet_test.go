package fleet_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/isode-run/isode/internal/testenv"
	"github.com/isode-run/isode/pkg/client"
	"github.com/isode-run/isode/pkg/fleet"
	"github.com/isode-run/isode/pkg/protocol"
)

// runnerFunc adapts a function to fleet.Runner.
type runnerFunc func(ctx context.Context, req *protocol.Request) (*protocol.Result, error)

func (f runnerFunc) Run(ctx context.Context, req *protocol.Request) (*protocol.Result, error) {
	return f(ctx, req)
}

// echo answers with the request's input, or the code's text when there is none.
var echo = runnerFunc(func(ctx context.Context, req *protocol.Request) (*protocol.Result, error) {
	if len(req.Input) > 0 {
		return &protocol.Result{Value: req.Input, Console: "ran " + req.IsolateKey}, nil
	}
	v, _ := json.Marshal(req.Code)
	return &protocol.Result{Value: v}, nil
})

type env struct {
	url string
	nc  *nats.Conn
	c   *client.Client
}

func newEnv(t testing.TB) *env {
	t.Helper()
	s := testenv.NATS(t)
	nc, err := nats.Connect(s.ClientURL())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	c, err := client.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return &env{url: s.ClientURL(), nc: nc, c: c}
}

func testConfig(id string) fleet.Config {
	cfg := fleet.DefaultConfig()
	cfg.WorkerID = id
	cfg.Shards = 8
	return cfg
}

// startWorker runs a fleet worker on its own connection until the test ends.
func startWorker(t testing.TB, e *env, run fleet.Runner, cfg fleet.Config) *fleet.Worker {
	t.Helper()
	nc, err := nats.Connect(e.url)
	if err != nil {
		t.Fatal(err)
	}
	return startWorkerOn(t, nc, run, cfg)
}

// startWorkerOn runs a fleet worker on nc until the test ends, then closes nc.
func startWorkerOn(t testing.TB, nc *nats.Conn, run fleet.Runner, cfg fleet.Config) *fleet.Worker {
	t.Helper()
	w, err := fleet.New(nc, run, nil, cfg)
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
		w.Abort()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := w.Wait(ctx); err != nil {
			t.Errorf("worker did not finish: %v", err)
		}
		nc.Close()
	})
	return w
}

func newClient(t testing.TB, e *env, shards int) *client.Client {
	c, err := client.New(e.nc, client.WithShards(shards))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func TestRoundTrip(t *testing.T) {
	e := newEnv(t)
	startWorker(t, e, echo, testConfig("w1"))
	c := newClient(t, e, 8)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	for _, in := range []string{`0`, `false`, `""`, `null`, `{"a":[1,2]}`} {
		res, err := c.Run(ctx, "tenant1", "return function (cb) { cb(null, 1); }", client.WithInput(json.RawMessage(in)))
		if err != nil {
			t.Fatalf("input %s: %v", in, err)
		}
		if string(res.Value) != in {
			t.Errorf("input %s: result %s", in, res.Value)
		}
		if res.Console != "ran tenant1" || res.Worker != "w1" {
			t.Errorf("console %q worker %q", res.Console, res.Worker)
		}
	}
}

func TestErrorsCarryCodesAndHeaders(t *testing.T) {
	e := newEnv(t)
	var calls atomic.Int32
	startWorker(t, e, runnerFunc(func(ctx context.Context, req *protocol.Request) (*protocol.Result, error) {
		calls.Add(1)
		return &protocol.Result{Console: "before the throw"}, protocol.Errorf(protocol.CodeCodeError, "Error: boom")
	}), testConfig("w1"))

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	// Publish by hand to see the headers the worker sets.
	inbox := nats.NewInbox()
	sub, err := e.nc.SubscribeSync(inbox)
	if err != nil {
		t.Fatal(err)
	}
	js, _ := jetstream.New(e.nc)
	body := `{"v":1,"isolate_key":"t","code":"return 1"}`
	m := nats.NewMsg(protocol.RunSubject("isode", protocol.Shard("t", 8)))
	m.Data = []byte(body)
	m.Header.Set(protocol.HeaderMsgID, "req-1")
	m.Header.Set(protocol.HeaderReplyTo, inbox)
	if _, err := js.PublishMsg(ctx, m); err != nil {
		t.Fatal(err)
	}
	got, err := sub.NextMsg(5 * time.Second)
	if err != nil {
		t.Fatal(err)
	}
	var rep protocol.Reply
	if err := json.Unmarshal(got.Data, &rep); err != nil {
		t.Fatal(err)
	}
	if rep.Error == nil || rep.Error.Code != protocol.CodeCodeError || rep.Console != "before the throw" || rep.ID != "req-1" {
		t.Fatalf("reply %+v", rep)
	}
	if h := got.Header.Get(protocol.HeaderServiceErrorCode); h != "422" {
		t.Errorf("%s = %q", protocol.HeaderServiceErrorCode, h)
	}
	if h := got.Header.Get(protocol.HeaderServiceError); h != "Error: boom" {
		t.Errorf("%s = %q", protocol.HeaderServiceError, h)
	}
	if h := got.Header.Get(protocol.HeaderErrorCode); h != "code_error" {
		t.Errorf("%s = %q", protocol.HeaderErrorCode, h)
	}

	// Through the client the error is a *protocol.Error matched by errors.Is.
	res, err := newClient(t, e, 8).Run(ctx, "t", "return 1")
	if !errors.Is(err, protocol.ErrCodeError) {
		t.Fatalf("err = %v", err)
	}
	if res == nil || res.Console != "before the throw" {
		t.Errorf("console lost on error: %+v", res)
	}
}

// publishRaw publishes body with the given headers to a shard and returns the reply.
func publishRaw(t *testing.T, e *env, shard int, body []byte, hdr map[string]string) *protocol.Reply {
	t.Helper()
	inbox := nats.NewInbox()
	sub, err := e.nc.SubscribeSync(inbox)
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Unsubscribe()
	m := nats.NewMsg(protocol.RunSubject("isode", shard))
	m.Data = body
	m.Header.Set(protocol.HeaderReplyTo, inbox)
	m.Header.Set(protocol.HeaderMsgID, fmt.Sprintf("raw-%d", time.Now().UnixNano()))
	for k, v := range hdr {
		m.Header.Set(k, v)
	}
	js, _ := jetstream.New(e.nc)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := js.PublishMsg(ctx, m); err != nil {
		t.Fatal(err)
	}
	got, err := sub.NextMsg(5 * time.Second)
	if err != nil {
		t.Fatalf("no reply: %v", err)
	}
	var rep protocol.Reply
	if err := json.Unmarshal(got.Data, &rep); err != nil {
		t.Fatal(err)
	}
	return &rep
}

func TestBadRequestsAreAnsweredAndWorkerKeepsServing(t *testing.T) {
	e := newEnv(t)
	var calls atomic.Int32
	startWorker(t, e, runnerFunc(func(ctx context.Context, req *protocol.Request) (*protocol.Result, error) {
		calls.Add(1)
		return echo(ctx, req)
	}), testConfig("w1"))
	sh := protocol.Shard("t", 8)
	huge := make([]byte, protocol.MaxCodeBytes+10)
	for i := range huge {
		huge[i] = 'x'
	}
	hugeBody, _ := json.Marshal(map[string]any{"v": 1, "isolate_key": "t", "code": string(huge)})
	tests := []struct {
		name  string
		shard int
		body  string
		hdr   map[string]string
		want  protocol.Code
	}{
		{"malformed JSON", sh, `{"v":1,"isolate_key":`, nil, protocol.CodeBadRequest},
		{"not an object", sh, `[1,2]`, nil, protocol.CodeBadRequest},
		{"empty body", sh, ``, nil, protocol.CodeBadRequest},
		{"missing key", sh, `{"v":1,"code":"return 1"}`, nil, protocol.CodeBadRequest},
		{"key with wildcard", protocol.Shard("a*", 8), `{"v":1,"isolate_key":"a*","code":"return 1"}`, nil, protocol.CodeBadRequest},
		{"unknown version", sh, `{"v":99,"isolate_key":"t","code":"return 1"}`, nil, protocol.CodeBadRequest},
		{"missing version", sh, `{"isolate_key":"t","code":"return 1"}`, nil, protocol.CodeBadRequest},
		{"huge code", sh, string(hugeBody), nil, protocol.CodeBadRequest},
		{"input not JSON", sh, `{"v":1,"isolate_key":"t","code":"return 1","input":nope}`, nil, protocol.CodeBadRequest},
		{"timeout over max", sh, `{"v":1,"isolate_key":"t","code":"return 1","timeout_ms":3600000}`, nil, protocol.CodeBadRequest},
		{"wrong shard", (sh + 1) % 8, `{"v":1,"isolate_key":"t","code":"return 1"}`, nil, protocol.CodeBadRequest},
		{"bad deadline", sh, `{"v":1,"isolate_key":"t","code":"return 1"}`, map[string]string{protocol.HeaderDeadline: "soon"}, protocol.CodeBadRequest},
		{"deadline passed", sh, `{"v":1,"isolate_key":"t","code":"return 1"}`,
			map[string]string{protocol.HeaderDeadline: strconv.FormatInt(time.Now().Add(-time.Second).UnixMilli(), 10)}, protocol.CodeQueueTimeout},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			rep := publishRaw(t, e, tt.shard, []byte(tt.body), tt.hdr)
			if rep.Error == nil || rep.Error.Code != tt.want {
				t.Fatalf("reply %+v, want code %s", rep, tt.want)
			}
			if rep.Error.Message == "" {
				t.Error("error without a message")
			}
		})
	}
	if n := calls.Load(); n != 0 {
		t.Errorf("runner called %d times for requests that must not run", n)
	}
	// And the worker still serves.
	rep := publishRaw(t, e, sh, []byte(`{"v":1,"isolate_key":"t","code":"ok"}`), nil)
	if rep.Error != nil || string(rep.Result) != `"ok"` {
		t.Fatalf("after bad requests: %+v", rep)
	}
}

func TestUnsafeReplySubjectsAreRefused(t *testing.T) {
	e := newEnv(t)
	var calls atomic.Int32
	startWorker(t, e, runnerFunc(func(ctx context.Context, req *protocol.Request) (*protocol.Result, error) {
		calls.Add(1)
		return echo(ctx, req)
	}), testConfig("w1"))
	js, _ := jetstream.New(e.nc)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	// A reply subject aimed at the JetStream API must never be published to.
	apiSub, err := e.nc.SubscribeSync("$JS.API.STREAM.DELETE.>")
	if err != nil {
		t.Fatal(err)
	}
	for i, reply := range []string{"$JS.API.STREAM.DELETE.ISODE", "isode.run.3", "a.*", ""} {
		m := nats.NewMsg(protocol.RunSubject("isode", protocol.Shard("t", 8)))
		m.Data = []byte(`{"v":1,"isolate_key":"t","code":"x"}`)
		m.Header.Set(protocol.HeaderMsgID, "unsafe-"+strconv.Itoa(i))
		if reply != "" {
			m.Header.Set(protocol.HeaderReplyTo, reply)
		}
		if _, err := js.PublishMsg(ctx, m); err != nil {
			t.Fatal(err)
		}
	}
	streamEmpty(t, e.nc, 5*time.Second)
	if m, err := apiSub.NextMsg(200 * time.Millisecond); err == nil {
		t.Fatalf("worker published to %s", m.Subject)
	}
	if n := calls.Load(); n != 0 {
		t.Errorf("runner called %d times", n)
	}
}

func TestRedeliveredRequestIsAnsweredFromCache(t *testing.T) {
	e := newEnv(t)
	var calls atomic.Int32
	cfg := testConfig("w1")
	cfg.DuplicateWindow = 100 * time.Millisecond
	startWorker(t, e, runnerFunc(func(ctx context.Context, req *protocol.Request) (*protocol.Result, error) {
		n := calls.Add(1)
		return &protocol.Result{Value: json.RawMessage(strconv.Itoa(int(n)))}, nil
	}), cfg)
	c := newClient(t, e, 8)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	first, err := c.Run(ctx, "t", "x", client.WithRequestID("same-id"))
	if err != nil {
		t.Fatal(err)
	}
	// After the stream's duplicate window the same id is stored again, as a
	// redelivery would be; the worker must answer it without running it.
	time.Sleep(300 * time.Millisecond) // let the 100 ms duplicate window lapse
	second, err := c.Run(ctx, "t", "x", client.WithRequestID("same-id"))
	if err != nil {
		t.Fatal(err)
	}
	if string(first.Value) != "1" || string(second.Value) != "1" || calls.Load() != 1 {
		t.Fatalf("first %s second %s calls %d: the request ran twice", first.Value, second.Value, calls.Load())
	}
}

func TestBackpressureStopsPullingAndLosesNothing(t *testing.T) {
	e := newEnv(t)
	release := make(chan struct{})
	var running, peak atomic.Int32
	cfg := testConfig("w1")
	cfg.Capacity = 3
	startWorker(t, e, runnerFunc(func(ctx context.Context, req *protocol.Request) (*protocol.Result, error) {
		n := running.Add(1)
		defer running.Add(-1)
		for {
			p := peak.Load()
			if n <= p || peak.CompareAndSwap(p, n) {
				break
			}
		}
		select {
		case <-release:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
		return echo(ctx, req)
	}), cfg)
	c := newClient(t, e, 8)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	const total = 40
	var wg sync.WaitGroup
	errs := make(chan error, total)
	for i := 0; i < total; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			key := fmt.Sprintf("tenant-%d", i)
			res, err := c.Run(ctx, key, "x", client.WithInput(json.RawMessage(strconv.Itoa(i))))
			if err == nil && string(res.Value) != strconv.Itoa(i) {
				err = fmt.Errorf("request %d got %s", i, res.Value)
			}
			errs <- err
		}(i)
	}
	js, _ := jetstream.New(e.nc)
	// The worker holds at most its capacity plus the client library's pull
	// buffer of each shard; the rest waits, undelivered, in the stream.
	bound := cfg.Capacity + cfg.Shards*cfg.PullBuffer
	held := func() (taken, waiting int, err error) {
		for sh := 0; sh < cfg.Shards; sh++ {
			cons, err := js.Consumer(ctx, "ISODE", protocol.ConsumerName("isode", sh))
			if err != nil {
				return 0, 0, err
			}
			info, err := cons.Info(ctx)
			if err != nil {
				return 0, 0, err
			}
			taken += info.NumAckPending
			waiting += int(info.NumPending)
		}
		return taken, waiting, nil
	}
	waitFor(t, 10*time.Second, func() error {
		taken, waiting, err := held()
		if err != nil {
			return err
		}
		if taken+waiting != total || running.Load() < int32(cfg.Capacity) {
			return fmt.Errorf("taken %d + waiting %d of %d, running %d", taken, waiting, total, running.Load())
		}
		return nil
	})
	// A while later the worker still has not taken more.
	time.Sleep(1500 * time.Millisecond)
	taken, waiting, err := held()
	if err != nil {
		t.Fatal(err)
	}
	if taken > bound || waiting < total-bound {
		t.Fatalf("worker took %d requests (bound %d), %d wait in the stream", taken, bound, waiting)
	}
	if p := peak.Load(); p > int32(bound) {
		t.Fatalf("peak concurrent runs %d, over the bound %d", p, bound)
	}
	t.Logf("at capacity: %d taken, %d waiting in the stream, peak %d running", taken, waiting, peak.Load())
	close(release)
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Error(err)
		}
	}
}

func TestStopPullingHandsBackQueuedRequests(t *testing.T) {
	e := newEnv(t)
	started := make(chan struct{}, 1)
	var closing atomic.Bool
	// The first worker takes the request but is "shutting down" when it
	// gets to run it: it must hand it back, and the second worker answers.
	w1 := startWorker(t, e, runnerFunc(func(ctx context.Context, req *protocol.Request) (*protocol.Result, error) {
		started <- struct{}{}
		for !closing.Load() {
			time.Sleep(5 * time.Millisecond)
		}
		return nil, protocol.Errorf(protocol.CodeShuttingDown, "closing")
	}), testConfig("w1"))
	c := newClient(t, e, 8)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	type out struct {
		res *client.Result
		err error
	}
	done := make(chan out, 1)
	go func() {
		res, err := c.Run(ctx, "t", "x")
		done <- out{res, err}
	}()
	<-started
	w1.StopPulling()
	closing.Store(true)
	startWorker(t, e, echo, testConfig("w2"))
	o := <-done
	if o.err != nil {
		t.Fatal(o.err)
	}
	if o.res.Worker != "w2" {
		t.Fatalf("answered by %s", o.res.Worker)
	}
}

func TestIncompatibleShardCountRefused(t *testing.T) {
	e := newEnv(t)
	startWorker(t, e, echo, testConfig("w1"))
	cfg := testConfig("w2")
	cfg.Shards = 16
	w, err := fleet.New(e.nc, echo, nil, cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := w.Start(ctx); !errors.Is(err, fleet.ErrIncompatibleStream) {
		t.Fatalf("err = %v, want ErrIncompatibleStream", err)
	}
}

// A single NATS server cannot hold three replicas: Start says so, naming
// the setting, rather than failing with the server's bare error.
func TestReplicasASingleServerCannotHoldRefused(t *testing.T) {
	e := newEnv(t)
	cfg := testConfig("w1")
	cfg.StreamReplicas = 3
	w, err := fleet.New(e.nc, echo, nil, cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	err = w.Start(ctx)
	if !errors.Is(err, fleet.ErrReplicas) || !strings.Contains(err.Error(), "--stream-replicas") {
		t.Fatalf("err = %v, want ErrReplicas naming --stream-replicas", err)
	}
}

func waitFor(t *testing.T, d time.Duration, f func() error) {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		err := f()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("after %v: %v", d, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func protocolShard(key string, shards int) int { return protocol.Shard(key, shards) }
