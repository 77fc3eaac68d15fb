package main

// Applications as NATS accounts (deploy/auth.conf): application B, with its
// own credentials, tries everything it may try against application A on
// one fleet, under the deployment's own server configuration.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/isode-run/isode/internal/testenv"
	isode "github.com/isode-run/isode/pkg/client"
	"github.com/isode-run/isode/pkg/protocol"
)

// eavesdropper records every message one subscription sees.
type eavesdropper struct {
	mu   sync.Mutex
	msgs []*nats.Msg
}

func eavesdrop(t *testing.T, nc *nats.Conn, subject string) *eavesdropper {
	t.Helper()
	e := &eavesdropper{}
	sub, err := nc.Subscribe(subject, func(m *nats.Msg) {
		e.mu.Lock()
		e.msgs = append(e.msgs, m)
		e.mu.Unlock()
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sub.Unsubscribe() })
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
	return e
}

// seen returns the messages recorded so far.
func (e *eavesdropper) seen() []*nats.Msg {
	e.mu.Lock()
	defer e.mu.Unlock()
	return slices.Clone(e.msgs)
}

// publishAs puts a request on the stream by hand from nc with the given id
// and reply subject, and returns the PubAck.
func publishAs(t *testing.T, nc *nats.Conn, id, replyTo, key, code string) *jetstream.PubAck {
	t.Helper()
	body, _ := json.Marshal(protocol.Request{V: protocol.Version, IsolateKey: key, Code: code})
	m := nats.NewMsg(protocol.RunSubject(protocol.DefaultPrefix, protocol.Shard(key, protocol.DefaultShards)))
	m.Data = body
	m.Header.Set(protocol.HeaderMsgID, id)
	m.Header.Set(protocol.HeaderReplyTo, replyTo)
	m.Header.Set(protocol.HeaderDeadline, strconv.FormatInt(time.Now().Add(time.Minute).UnixMilli(), 10))
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	ack, err := js.PublishMsg(ctx, m)
	if err != nil {
		t.Fatalf("publish %s: %v", id, err)
	}
	return ack
}

func TestApplicationsAreIsolated(t *testing.T) {
	cli := testenv.Docker(t)
	img := testenv.Image(t, cli)
	n := newDeployNATS(t)

	bErrs := make(chan error, 256)
	a := n.connect("app-a")
	b := n.connect("app-b", nats.ErrorHandler(func(_ *nats.Conn, _ *nats.Subscription, err error) {
		select {
		case bErrs <- err:
		default:
		}
	}))
	ca, err := isode.New(a)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ca.Close() })
	cb, err := isode.New(b)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cb.Close() })
	e := &e2e{t: t, url: n.url("worker"), cli: cli, image: img, nc: a, c: ca}
	// A small stream, so that B's flood below can reach the stream's limit
	// unless its share is bounded: 64 shards x 40 = 2560 of 4000.
	w := e.start("--stream-max-msgs", "4000", "--stream-max-per-subject", "40", "--high", "8")

	// Everything each application can see of its own inboxes, and B's
	// attempt to see everything.
	usage := eavesdrop(t, n.connect("ops"), "isode.usage.*")
	seenByA := eavesdrop(t, a, "_INBOX.>")
	seenByB := eavesdrop(t, b, "_INBOX.>")
	if _, err := b.Subscribe(">", func(*nats.Msg) { t.Error("B's subscription to > received a message") }); err != nil {
		t.Fatal(err)
	}
	b.Flush()
	waitViolation(t, bErrs, ">")

	runA := func(key, code, id string) *isode.Result {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		defer cancel()
		res, err := ca.Run(ctx, key, code, isode.WithRequestID(id))
		if err != nil {
			t.Fatalf("A's run %s: %v", id, err)
		}
		return res
	}
	runB := func(key, code, id string) *isode.Result {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		defer cancel()
		res, err := cb.Run(ctx, key, code, isode.WithRequestID(id))
		if err != nil {
			t.Fatalf("B's run %s: %v", id, err)
		}
		return res
	}

	t.Run("B runs under A's isolate key in a container of its own", func(t *testing.T) {
		resA := runA("tenant1", `return function (cb) {
			globalThis.secret = "A-SECRET";
			require("fs").writeFileSync("/tmp/a-secret", "A-SECRET");
			cb(null, require("os").hostname());
		}`, "a-leave")
		resB := runB("tenant1", `return function (cb) {
			let file = null;
			try { file = require("fs").readFileSync("/tmp/a-secret", "utf8"); } catch (e) {}
			cb(null, { secret: globalThis.secret || null, file, tmp: require("fs").readdirSync("/tmp"), host: require("os").hostname() });
		}`, "b-read")
		var got struct {
			Secret, File *string
			Tmp          []string
			Host         string
		}
		if err := json.Unmarshal(resB.Value, &got); err != nil {
			t.Fatal(err)
		}
		var hostA string
		json.Unmarshal(resA.Value, &hostA)
		if got.Secret != nil || got.File != nil || slices.Contains(got.Tmp, "a-secret") || got.Host == hostA {
			t.Fatalf("B's run under A's key saw A's tenant: %s (A ran on %s)", resB.Value, hostA)
		}
		if !strings.Contains(w.log.String(), `"tenant":"app-b|tenant1"`) || !strings.Contains(w.log.String(), `"app":"app-b"`) {
			t.Errorf("the worker's log does not name B's tenant with its application")
		}
	})

	t.Run("B directs a reply into A's inbox", func(t *testing.T) {
		aInbox := a.NewRespInbox()
		direct, err := a.SubscribeSync(aInbox)
		if err != nil {
			t.Fatal(err)
		}
		defer direct.Unsubscribe()
		a.Flush()
		publishAs(t, b, "b-forged-reply", aInbox, "tenant2", `return function (cb) { cb(null, "FORGED"); }`)
		// The reply goes to B's own namespace, under the subject B named.
		waitFor(t, "B to get the reply it aimed at A", func() bool {
			return slices.ContainsFunc(seenByB.seen(), func(m *nats.Msg) bool { return m.Subject == aInbox })
		})
		if m, err := direct.NextMsg(500 * time.Millisecond); err == nil {
			t.Fatalf("A's inbox received %s", m.Data)
		}
	})

	t.Run("B reuses A's request id", func(t *testing.T) {
		code := `return function (cb) { cb(null, "A's result"); }`
		aInbox := a.NewRespInbox()
		sub, _ := a.SubscribeSync(aInbox)
		defer sub.Unsubscribe()
		a.Flush()
		publishAs(t, a, "a-shared-id", aInbox, "tenant3", code)
		rep := reply(t, sub)
		if rep.Error != nil {
			t.Fatal(rep.Error)
		}
		// The same id and body from B: the stream's de-duplication refuses
		// it (B learns nothing but that the id was taken), and nothing
		// reaches A.
		ack := publishAs(t, b, "a-shared-id", b.NewRespInbox(), "tenant3", code)
		if !ack.Duplicate {
			t.Logf("B's copy of A's id was taken as a new request (seq %d)", ack.Sequence)
		}
		if m, err := sub.NextMsg(time.Second); err == nil {
			t.Fatalf("A received a second reply: %s", m.Data)
		}
	})

	t.Run("B's calls and the CLI door stay in B's account", func(t *testing.T) {
		m, err := b.Request(protocol.CallSubject(protocol.DefaultPrefix),
			[]byte(`{"v":1,"isolate_key":"tenant1","code":"return function (cb) { cb(null, typeof globalThis.secret); }"}`), 30*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		var rep protocol.Reply
		if err := json.Unmarshal(m.Data, &rep); err != nil || string(rep.Result) != `"undefined"` {
			t.Fatalf("B's call: %s (%v)", m.Data, err)
		}
	})

	t.Run("the nats CLI works unchanged with an application's credentials", func(t *testing.T) {
		cli := testenv.NATSCLI(t)
		home := t.TempDir()
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		defer cancel()
		cmd := exec.CommandContext(ctx, cli, "--server", n.url("app-b"), "--timeout", "30s", "req", "isode.call",
			`{"v":1,"isolate_key":"tenant1","code":"return function (cb) { cb(null, 'via the CLI: ' + typeof globalThis.secret); }"}`)
		cmd.Env = append(os.Environ(), "HOME="+home, "XDG_CONFIG_HOME="+home, "NATS_CONTEXT=", "NO_COLOR=1")
		out, err := cmd.CombinedOutput()
		if err != nil || !strings.Contains(string(out), `"result":"via the CLI: undefined"`) {
			t.Fatalf("nats req isode.call as app-b: %v\n%s", err, out)
		}
	})

	t.Run("B floods the stream while A keeps being served", func(t *testing.T) {
		const warm = `return function (cb) { cb(null, 1); }`
		latencies := func(n int, tag string, during func() bool) []time.Duration {
			var out []time.Duration
			for i := 0; i < n || (during != nil && during()); i++ {
				start := time.Now()
				runA("a-warm", warm, fmt.Sprintf("a-%s-%d", tag, i))
				out = append(out, time.Since(start))
			}
			return out
		}
		before := latencies(100, "before", nil)

		// B: 64 tenants (one per shard, so every shard of B fills),
		// published as fast as the stream acknowledges.
		var accepted, refused atomic.Int64
		var flooding atomic.Bool
		flooding.Store(true)
		floodDone := make(chan struct{})
		go func() {
			defer close(floodDone)
			defer flooding.Store(false)
			js, _ := jetstream.New(b)
			inbox := b.NewRespInbox()
			keys := shardKeys(protocol.DefaultShards)
			// Until B's share is full (B publishes faster than one worker
			// drains, on any machine, once its sandboxes churn).
			for round := 0; round < 50 || refused.Load() == 0 && round < 500; round++ {
				var futures []jetstream.PubAckFuture
				for s, key := range keys {
					body, _ := json.Marshal(protocol.Request{V: protocol.Version, IsolateKey: key,
						Code: `return function (cb) { cb(null, 0); }`})
					m := nats.NewMsg(protocol.RunSubject(protocol.DefaultPrefix, s))
					m.Data = body
					m.Header.Set(protocol.HeaderMsgID, fmt.Sprintf("b-flood-%d-%d", round, s))
					m.Header.Set(protocol.HeaderReplyTo, inbox)
					// Long enough not to expire in the stream: expired
					// requests are drained at once, and on a loaded
					// machine, where B publishes slowly, a 5 s deadline
					// let the backlog drain as fast as B added to it.
					m.Header.Set(protocol.HeaderDeadline, strconv.FormatInt(time.Now().Add(30*time.Second).UnixMilli(), 10))
					f, err := js.PublishMsgAsync(m)
					if err != nil {
						refused.Add(1)
						continue
					}
					futures = append(futures, f)
				}
				<-js.PublishAsyncComplete()
				for _, f := range futures {
					select {
					case <-f.Ok():
						accepted.Add(1)
					case <-f.Err():
						refused.Add(1)
					}
				}
			}
		}()
		// A runs while B publishes and for 8 s after, while B's backlog
		// (bounded per shard) drains or expires.
		until := time.Now().Add(8 * time.Second)
		during := latencies(0, "during", func() bool { return flooding.Load() || time.Now().Before(until) })
		<-floodDone
		// A's requests were all accepted and answered (runA fails the test
		// otherwise); B's flood hit its own bound, not the stream's.
		if refused.Load() == 0 {
			t.Fatalf("B's flood of %d requests was never refused: it did not reach its share", accepted.Load())
		}
		t.Logf("A's warm run while B floods: p50 %v p99 %v over %d runs; before: p50 %v p99 %v over %d runs; B: %d accepted, %d refused (overloaded)",
			quantile(during, 0.5), quantile(during, 0.99), len(during), quantile(before, 0.5), quantile(before, 0.99), len(before),
			accepted.Load(), refused.Load())
	})

	// Usage is billed to the application that ran it, under its own key.
	byApp := map[string]int{}
	for _, m := range usage.seen() {
		var rec protocol.UsageRecord
		if err := json.Unmarshal(m.Data, &rec); err != nil {
			t.Fatal(err)
		}
		if strings.Contains(rec.IsolateKey, "|") || (rec.Application == "app-a") != strings.HasPrefix(rec.ID, "a-") {
			t.Errorf("usage record of %s: application %q, isolate key %q", rec.ID, rec.Application, rec.IsolateKey)
		}
		byApp[rec.Application]++
	}
	if byApp["app-a"] == 0 || byApp["app-b"] == 0 {
		t.Errorf("usage records by application: %v", byApp)
	}

	// Nothing of A's reached B, and nothing of B's reached A.
	for _, m := range seenByB.seen() {
		id := m.Header.Get(protocol.HeaderRequestID)
		if strings.HasPrefix(id, "a-") && id != "a-shared-id" || strings.Contains(string(m.Data), "A-SECRET") || strings.Contains(string(m.Data), "A's result") {
			t.Errorf("B saw A's message on %s: %s", m.Subject, m.Data)
		}
	}
	for _, m := range seenByA.seen() {
		if id := m.Header.Get(protocol.HeaderRequestID); strings.HasPrefix(id, "b-") || strings.Contains(string(m.Data), "FORGED") {
			t.Errorf("A saw B's message on %s: %s", m.Subject, m.Data)
		}
	}
}

// waitViolation waits for the server's permission violation on subject.
func waitViolation(t *testing.T, errs <-chan error, subject string) {
	t.Helper()
	deadline := time.After(10 * time.Second)
	for {
		select {
		case err := <-errs:
			if errors.Is(err, nats.ErrPermissionViolation) && strings.Contains(err.Error(), `"`+subject+`"`) {
				return
			}
		case <-deadline:
			t.Fatalf("no permission violation for %q within 10s", subject)
		}
	}
}

// shardKeys returns one isolate key per shard.
func shardKeys(shards int) []string {
	keys := make([]string, shards)
	found := 0
	for i := 0; found < shards; i++ {
		k := "flood-" + strconv.Itoa(i)
		if s := protocol.Shard(k, shards); keys[s] == "" {
			keys[s] = k
			found++
		}
	}
	return keys
}

// waitFor polls cond for up to 30 s.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
