package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/docker/docker/api/types/container"
	"github.com/docker/docker/api/types/filters"
	"github.com/docker/docker/client"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/isode-run/isode/internal/testenv"
	isode "github.com/isode-run/isode/pkg/client"
	"github.com/isode-run/isode/pkg/dockerx"
	"github.com/isode-run/isode/pkg/protocol"
)

func randomHex(n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// e2e is one test's NATS server, Docker engine and client.
type e2e struct {
	t     *testing.T
	url   string
	cli   *client.Client
	image string
	nc    *nats.Conn
	c     *isode.Client
}

func newE2E(t *testing.T) *e2e {
	t.Helper()
	return connectE2E(t, func() string { return testenv.NATS(t).ClientURL() })
}

// connectE2E checks for the engine and the sandbox image, then starts a
// NATS server with startNATS and connects a client to it with opts.
func connectE2E(t *testing.T, startNATS func() string, opts ...nats.Option) *e2e {
	t.Helper()
	cli := testenv.Docker(t)
	img := testenv.Image(t, cli)
	url := startNATS()
	nc, err := nats.Connect(url, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	c, err := isode.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return &e2e{t: t, url: url, cli: cli, image: img, nc: nc, c: c}
}

// worker is a worker running in this process through run(), exactly as
// the binary runs it.
type worker struct {
	id     string
	stop   context.CancelFunc
	abort  context.CancelFunc
	done   chan error
	log    *testenv.SyncBuffer
	exited bool
}

// start runs a worker until the test ends (or until stopped).
func (e *e2e) start(args ...string) *worker {
	e.t.Helper()
	id := "e2e-" + randomHex(4)
	ctx, stop := context.WithCancel(context.Background())
	abort, kill := context.WithCancel(context.Background())
	w := &worker{id: id, stop: stop, abort: kill, done: make(chan error, 1), log: &testenv.SyncBuffer{}}
	all := append([]string{"--nats", e.url, "--id", id, "--image", e.image, "--log-format", "json", "--log-level", "debug",
		"--low", "1", "--high", "6", "--grace", "10s"}, args...)
	go func() { w.done <- run(ctx, abort, all, w.log, w.log) }()
	e.t.Cleanup(func() {
		w.shutdown(e.t)
		testenv.RemoveByLabel(e.t, e.cli, dockerx.LabelWorker, id)
	})
	// Ready once it logged so.
	deadline := time.Now().Add(60 * time.Second)
	for !strings.Contains(w.log.String(), "worker ready") {
		select {
		case err := <-w.done:
			w.exited = true
			e.t.Fatalf("worker exited before it was ready: %v\n%s", err, w.log.String())
		default:
		}
		if time.Now().After(deadline) {
			e.t.Fatalf("worker not ready after 60s:\n%s", w.log.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
	return w
}

// shutdown stops the worker as SIGTERM does and checks it exits cleanly.
func (w *worker) shutdown(t *testing.T) {
	t.Helper()
	if w.exited {
		return
	}
	w.stop()
	select {
	case err := <-w.done:
		w.exited = true
		if err != nil {
			t.Errorf("worker %s: %v", w.id, err)
		}
	case <-time.After(60 * time.Second):
		w.abort()
		t.Errorf("worker %s did not stop within 60s:\n%s", w.id, w.log.String())
	}
}

// containers counts the worker's sandbox containers.
func (e *e2e) containers(workerID string) int {
	e.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	list, err := e.cli.ContainerList(ctx, container.ListOptions{All: true,
		Filters: filters.NewArgs(filters.Arg("label", dockerx.LabelWorker+"="+workerID))})
	if err != nil {
		e.t.Fatal(err)
	}
	return len(list)
}

func (e *e2e) run(key, code string, opts ...isode.RunOption) (*isode.Result, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	return e.c.Run(ctx, key, code, opts...)
}

func TestOriginalExamples(t *testing.T) {
	e := newE2E(t)
	w := e.start()

	res, err := e.run("tenant1", `return function (cb) { cb(null, "Hello, world!"); }`)
	if err != nil {
		t.Fatal(err)
	}
	if string(res.Value) != `"Hello, world!"` {
		t.Fatalf("tenant1 got %s", res.Value)
	}
	res, err = e.run("tenant2", `return function (cb) { cb(null, process.versions); }`)
	if err != nil {
		t.Fatal(err)
	}
	var versions map[string]string
	if err := json.Unmarshal(res.Value, &versions); err != nil || versions["node"] == "" || versions["v8"] == "" {
		t.Fatalf("tenant2 got %s (%v)", res.Value, err)
	}
	if res.Worker != w.id {
		t.Errorf("answered by %q, want %q", res.Worker, w.id)
	}

	// A graceful stop removes every container.
	w.shutdown(t)
	if n := e.containers(w.id); n != 0 {
		t.Fatalf("%d containers left after shutdown", n)
	}
	if !strings.Contains(w.log.String(), `"outcome":"ok"`) {
		t.Errorf("no per-request debug log line with an outcome:\n%s", w.log.String())
	}
}

func TestManyTenantsAtOnce(t *testing.T) {
	e := newE2E(t)
	e.start("--high", "4", "--concurrency", "2")
	const tenants, each = 10, 3
	var wg sync.WaitGroup
	errs := make(chan error, tenants*each)
	for i := 0; i < tenants; i++ {
		for j := 0; j < each; j++ {
			wg.Add(1)
			go func(i, j int) {
				defer wg.Done()
				in := fmt.Sprintf(`{"tenant":%d,"n":%d}`, i, j)
				res, err := e.run(fmt.Sprintf("many-%d", i),
					`return function (ctx, cb) { setTimeout(function () { cb(null, ctx.data); }, 20); }`,
					isode.WithInput(json.RawMessage(in)))
				if err == nil && string(res.Value) != in {
					err = fmt.Errorf("tenant %d run %d got %s", i, j, res.Value)
				}
				errs <- err
			}(i, j)
		}
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Error(err)
		}
	}
}

func TestSnippetErrorsAndTimeouts(t *testing.T) {
	e := newE2E(t)
	e.start()
	tests := []struct {
		name, code string
		opts       []isode.RunOption
		want       protocol.Code
		msg        string
	}{
		{"throw", `return function (cb) { throw new Error("boom"); }`, nil, protocol.CodeCodeError, "boom"},
		{"error to callback", `return function (cb) { cb(new TypeError("bad input")); }`, nil, protocol.CodeCodeError, "bad input"},
		{"syntax", `return function (cb) { cb(null, ; }`, nil, protocol.CodeCodeError, "syntax"},
		{"never calls back", `return function (cb) { }`, []isode.RunOption{isode.WithTimeout(300 * time.Millisecond)}, protocol.CodeTimeout, "300"},
		{"infinite loop", `return function (cb) { for (;;) {} }`, []isode.RunOption{isode.WithTimeout(300 * time.Millisecond)}, protocol.CodeTimeout, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := e.run("errors", tt.code, tt.opts...)
			var pe *protocol.Error
			if !errors.As(err, &pe) || pe.Code != tt.want || !strings.Contains(strings.ToLower(pe.Message), tt.msg) {
				t.Fatalf("err = %v, want %s mentioning %q", err, tt.want, tt.msg)
			}
		})
	}
	// The same tenant is still served.
	res, err := e.run("errors", `return function (cb) { cb(null, 42); }`)
	if err != nil || string(res.Value) != "42" {
		t.Fatalf("after the errors: %v %v", res, err)
	}
}

func TestOverCapacityBurstQueuesAndDrains(t *testing.T) {
	e := newE2E(t)
	// Two sandboxes running one snippet each, four waiting: the rest of the
	// burst waits in the stream, none is lost or refused.
	e.start("--high", "2", "--low", "0", "--concurrency", "1", "--queue", "4", "--tenant-queue", "2")
	const n = 24
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			res, err := e.run(fmt.Sprintf("burst-%d", i%4), `return function (ctx, cb) { setTimeout(function () { cb(null, ctx.data); }, 50); }`,
				isode.WithInput(json.RawMessage(strconv.Itoa(i))))
			if err == nil && string(res.Value) != strconv.Itoa(i) {
				err = fmt.Errorf("run %d got %s", i, res.Value)
			}
			errs <- err
		}(i)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Error(err)
		}
	}
}

// publish sends a request by hand, with a chosen deadline, and returns the
// subscription its reply arrives on.
func (e *e2e) publish(key, code string, deadline time.Time) *nats.Subscription {
	e.t.Helper()
	inbox := nats.NewInbox()
	sub, err := e.nc.SubscribeSync(inbox)
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { sub.Unsubscribe() })
	body, _ := json.Marshal(protocol.Request{V: protocol.Version, IsolateKey: key, Code: code})
	m := nats.NewMsg(protocol.RunSubject(protocol.DefaultPrefix, protocol.Shard(key, protocol.DefaultShards)))
	m.Data = body
	m.Header.Set(protocol.HeaderMsgID, "manual-"+randomHex(6))
	m.Header.Set(protocol.HeaderReplyTo, inbox)
	m.Header.Set(protocol.HeaderDeadline, strconv.FormatInt(deadline.UnixMilli(), 10))
	js, _ := jetstream.New(e.nc)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := js.PublishMsg(ctx, m); err != nil {
		e.t.Fatal(err)
	}
	return sub
}

func reply(t *testing.T, sub *nats.Subscription) *protocol.Reply {
	t.Helper()
	m, err := sub.NextMsg(60 * time.Second)
	if err != nil {
		t.Fatalf("no reply: %v", err)
	}
	var rep protocol.Reply
	if err := json.Unmarshal(m.Data, &rep); err != nil {
		t.Fatal(err)
	}
	return &rep
}

func TestExpiredRequestIsNotRun(t *testing.T) {
	e := newE2E(t)
	w := e.start()
	w.shutdown(t) // the stream stays; now nobody consumes it

	// The snippet would leave a mark in its tenant's sandbox if it ran.
	mark := `return function (cb) { require("fs").writeFileSync("/tmp/ran", "yes"); cb(null, "ran"); }`
	sub := e.publish("expiring", mark, time.Now().Add(300*time.Millisecond))
	time.Sleep(500 * time.Millisecond) // let the deadline pass while no worker runs

	e.start()
	rep := reply(t, sub)
	if rep.Error == nil || rep.Error.Code != protocol.CodeQueueTimeout {
		t.Fatalf("reply %+v, want queue_timeout", rep)
	}
	res, err := e.run("expiring", `return function (cb) { cb(null, require("fs").existsSync("/tmp/ran")); }`)
	if err != nil {
		t.Fatal(err)
	}
	if string(res.Value) != "false" {
		t.Fatal("the expired request ran")
	}
}

func TestRestartedWorkerServesWhatTheStreamHolds(t *testing.T) {
	e := newE2E(t)
	w1 := e.start("--concurrency", "1", "--high", "2", "--queue", "2", "--tenant-queue", "1")
	const n = 30
	var wg sync.WaitGroup
	type answer struct {
		worker string
		err    error
	}
	answers := make(chan answer, n)
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			res, err := e.run(fmt.Sprintf("restart-%d", i%3), `return function (ctx, cb) { setTimeout(function () { cb(null, ctx.data); }, 100); }`,
				isode.WithInput(json.RawMessage(strconv.Itoa(i))))
			if err == nil && string(res.Value) != strconv.Itoa(i) {
				err = fmt.Errorf("run %d got %s", i, res.Value)
			}
			a := answer{err: err}
			if res != nil {
				a.worker = res.Worker
			}
			answers <- a
		}(i)
	}
	// Stop the first worker mid-load, then start a second one.
	deadline := time.Now().Add(30 * time.Second)
	for strings.Count(w1.log.String(), `"outcome":"ok"`) < 3 && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	w1.shutdown(t)
	w2 := e.start()
	wg.Wait()
	close(answers)
	by := map[string]int{}
	for a := range answers {
		if a.err != nil {
			t.Error(a.err)
			continue
		}
		by[a.worker]++
	}
	if by[w1.id] == 0 || by[w2.id] == 0 {
		t.Errorf("answers by worker: %v; want both to have answered", by)
	}
	t.Logf("answers by worker: %v", by)
}

func TestBadRequestsKeepTheWorkerServing(t *testing.T) {
	e := newE2E(t)
	e.start()
	js, _ := jetstream.New(e.nc)
	huge := strings.Repeat("x", protocol.MaxCodeBytes+1)
	for _, body := range []string{
		`{"v":1,"isolate_key":`,
		`{"v":1,"code":"return 1"}`,
		`{"v":7,"isolate_key":"bad","code":"return 1"}`,
		`{"v":1,"isolate_key":"bad","code":"` + huge + `"}`,
	} {
		inbox := nats.NewInbox()
		sub, _ := e.nc.SubscribeSync(inbox)
		m := nats.NewMsg(protocol.RunSubject(protocol.DefaultPrefix, protocol.Shard("bad", protocol.DefaultShards)))
		m.Data = []byte(body)
		m.Header.Set(protocol.HeaderMsgID, "bad-"+randomHex(6))
		m.Header.Set(protocol.HeaderReplyTo, inbox)
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		_, err := js.PublishMsg(ctx, m)
		cancel()
		if err != nil {
			t.Fatal(err)
		}
		rep := reply(t, sub)
		if rep.Error == nil || rep.Error.Code != protocol.CodeBadRequest {
			t.Errorf("body %.40q: reply %+v", body, rep)
		}
	}
	res, err := e.run("bad", `return function (cb) { cb(null, "still here"); }`)
	if err != nil || string(res.Value) != `"still here"` {
		t.Fatalf("after bad requests: %v %v", res, err)
	}
}
