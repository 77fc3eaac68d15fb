package main

import (
	"context"
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/isode-run/isode/internal/testenv"
	isode "github.com/isode-run/isode/pkg/client"
	"github.com/isode-run/isode/pkg/protocol"
)

// TestNATSPermissions checks deploy/nats.conf from the outside: a worker
// serves under the worker user, the application runs the original examples
// under the app user, `submit stats` works for the ops user, and each user
// is refused what its role does not need.
func TestNATSPermissions(t *testing.T) {
	cli := testenv.Docker(t)
	img := testenv.Image(t, cli)
	n := newDeployNATS(t)

	refused := func(user string) (*nats.Conn, <-chan error) {
		errs := make(chan error, 64)
		nc := n.connect(user, nats.ErrorHandler(func(_ *nats.Conn, _ *nats.Subscription, err error) {
			select {
			case errs <- err:
			default:
			}
		}))
		return nc, errs
	}
	app, appErrs := refused("app-a")
	c, err := isode.New(app)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	e := &e2e{t: t, url: n.url("worker"), cli: cli, image: img, nc: app, c: c}
	w := e.start()

	// The application: the original examples.
	res, err := e.run("tenant1", `return function (cb) { cb(null, "Hello, world!"); }`)
	if err != nil || string(res.Value) != `"Hello, world!"` {
		t.Fatalf("tenant1 as the app user: %v %v", res, err)
	}
	res, err = e.run("tenant2", `return function (cb) { cb(null, process.versions); }`)
	var versions map[string]string
	if err != nil || json.Unmarshal(res.Value, &versions) != nil || versions["node"] == "" {
		t.Fatalf("tenant2 as the app user: %v %v", res, err)
	}

	// Operators: stats and read-only stream info.
	ops, opsErrs := refused("ops")
	// Operators read the usage records (submit top does).
	usage, err := ops.SubscribeSync(protocol.UsageWildcard(protocol.DefaultPrefix))
	if err != nil {
		t.Fatal(err)
	}
	ops.Flush()
	m, err := ops.Request(protocol.StatsSubject(protocol.DefaultPrefix), nil, 10*time.Second)
	if err != nil {
		t.Fatalf("stats as the ops user: %v", err)
	}
	var st protocol.WorkerStats
	if err := json.Unmarshal(m.Data, &st); err != nil || st.Worker != w.id {
		t.Fatalf("stats as the ops user: %s (%v)", m.Data, err)
	}
	// Operators discover the workers as a micro service.
	m, err = ops.Request("$SRV.PING.isode", nil, 10*time.Second)
	if err != nil || !strings.Contains(string(m.Data), `"name":"isode"`) {
		t.Fatalf("$SRV.PING.isode as the ops user: %v %v", m, err)
	}
	// The application calls the plain request/reply door.
	m, err = app.Request(protocol.CallSubject(protocol.DefaultPrefix),
		[]byte(`{"v":1,"isolate_key":"tenant1","code":"return function (cb) { cb(null, 6 * 7); }"}`), 30*time.Second)
	var rep protocol.Reply
	if err != nil || json.Unmarshal(m.Data, &rep) != nil || string(rep.Result) != "42" {
		t.Fatalf("isode.call as the app user: %v %v", m, err)
	}
	if m, err := usage.NextMsg(10 * time.Second); err != nil || !strings.Contains(string(m.Data), `"isolate_key":"tenant1"`) {
		t.Fatalf("a usage record as the ops user: %v %v", m, err)
	}
	js, err := jetstream.New(ops)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := js.Stream(ctx, protocol.StreamName(protocol.DefaultPrefix)); err != nil {
		t.Errorf("stream info as the ops user: %v", err)
	}

	worker, workerErrs := refused("worker")
	pub := func(nc *nats.Conn, subject string) func() error {
		return func() error { return nc.Publish(subject, []byte("{}")) }
	}
	sub := func(nc *nats.Conn, subject string) func() error {
		return func() error { _, err := nc.SubscribeSync(subject); return err }
	}
	for _, tt := range []struct {
		name    string
		nc      *nats.Conn
		errs    <-chan error
		subject string
		do      func() error
	}{
		{"app reads the requests workers pull", app, appErrs, "_ISODE_WORKER.>", sub(app, "_ISODE_WORKER.>")},
		{"app reads the request subjects", app, appErrs, "isode.run.>", sub(app, "isode.run.>")},
		{"app reads reply confirmations", app, appErrs, "_ISODE_ACK.>", sub(app, "_ISODE_ACK.>")},
		{"app pulls requests", app, appErrs, "$JS.API.CONSUMER.MSG.NEXT.ISODE.isode-shard-0", pub(app, "$JS.API.CONSUMER.MSG.NEXT.ISODE.isode-shard-0")},
		{"app deletes the stream", app, appErrs, "$JS.API.STREAM.DELETE.ISODE", pub(app, "$JS.API.STREAM.DELETE.ISODE")},
		{"app purges the stream", app, appErrs, "$JS.API.STREAM.PURGE.ISODE", pub(app, "$JS.API.STREAM.PURGE.ISODE")},
		{"app joins the fleet", app, appErrs, "$KV.isode_workers.intruder", pub(app, "$KV.isode_workers.intruder")},
		{"app asks for stats", app, appErrs, "isode.stats", pub(app, "isode.stats")},
		{"app answers a request", app, appErrs, "_INBOX.someone", pub(app, "_INBOX.someone")},
		{"app reads usage records", app, appErrs, "isode.usage.*", sub(app, "isode.usage.*")},
		{"app forges usage records", app, appErrs, "isode.usage.1", pub(app, "isode.usage.1")},
		{"ops submits a request", ops, opsErrs, "isode.run.1", pub(ops, "isode.run.1")},
		{"ops deletes the stream", ops, opsErrs, "$JS.API.STREAM.DELETE.ISODE", pub(ops, "$JS.API.STREAM.DELETE.ISODE")},
		{"app sends discovery requests", app, appErrs, "$SRV.INFO.isode", pub(app, "$SRV.INFO.isode")},
		{"app takes calls", app, appErrs, "isode.call", sub(app, "isode.call")},
		{"ops calls", ops, opsErrs, "isode.call", pub(ops, "isode.call")},
		{"worker deletes the stream", worker, workerErrs, "$JS.API.STREAM.DELETE.ISODE", pub(worker, "$JS.API.STREAM.DELETE.ISODE")},
		{"worker reads the applications' inboxes", worker, workerErrs, "_INBOX.>", sub(worker, "_INBOX.>")},
		{"worker publishes into the system account", worker, workerErrs, "$SYS.REQ.SERVER.PING", pub(worker, "$SYS.REQ.SERVER.PING")},
	} {
		t.Run(tt.name, func(t *testing.T) {
			if err := tt.do(); err != nil && !errors.Is(err, nats.ErrPermissionViolation) {
				t.Fatal(err)
			}
			tt.nc.Flush()
			deadline := time.After(10 * time.Second)
			for {
				select {
				case err := <-tt.errs:
					// The server names the subject it refused.
					if errors.Is(err, nats.ErrPermissionViolation) && strings.Contains(err.Error(), `"`+tt.subject+`"`) {
						return
					}
				case <-deadline:
					t.Fatalf("no permission violation for %q within 10s: the user is allowed what it should not be", tt.subject)
				}
			}
		})
	}

	// The stream is intact and the worker still serves.
	if _, err := js.Stream(ctx, protocol.StreamName(protocol.DefaultPrefix)); err != nil {
		t.Errorf("stream after the refused calls: %v", err)
	}
	if res, err := e.run("tenant1", `return function (cb) { cb(null, 42); }`); err != nil || string(res.Value) != "42" {
		t.Fatalf("after the refused calls: %v %v", res, err)
	}

	// A worker's whole life (start, serve, leave) needed nothing it lacks.
	w.shutdown(t)
	for _, v := range n.log.violationsOf("worker") {
		if !strings.Contains(v, "isode.run.1") && !strings.Contains(v, "STREAM.DELETE") &&
			!strings.Contains(v, "_INBOX.>") && !strings.Contains(v, "$SYS") {
			t.Errorf("the worker process hit a permission of deploy/nats.conf: %s", v)
		}
	}
}
