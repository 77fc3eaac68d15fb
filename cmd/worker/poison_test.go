package main

// The poison suite: the message boundary under attack. Three worker
// processes on one NATS server configured as deployed (deploy/nats.conf),
// a bystander load of several tenants throughout, and an attacker that
// holds only the application's permissions and sends, one class at a
// time, every kind of malformed request. For each: no worker disconnects
// or exits, the stream drains within the deadline bound, and the poison
// request lands in the dead-letter subject where that applies. At the end
// no request the stream accepted from a bystander is lost, and the
// bystanders' p99 during the attacks is reported against before.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/isode-run/isode/internal/testenv"
	isode "github.com/isode-run/isode/pkg/client"
	"github.com/isode-run/isode/pkg/protocol"
)

// poisonArgs bound a request's life tightly, so the suite can wait for
// it; the queue wait still leaves bystanders room for cold starts on a
// loaded 2-core machine.
var poisonArgs = []string{"--ack-wait", "2s", "--max-queue-wait", "15s", "--max-failures", "2", "--max-timeout", "20s"}

// poisonBound is how long after its publish a request is surely gone from
// the stream: max queue wait + its run timeout + an ack wait + slack.
const poisonBound = 15*time.Second + 2*time.Second + 2*time.Second + 5*time.Second

// attacker publishes raw requests with the application's credentials.
type attacker struct {
	t     *testing.T
	nc    *nats.Conn
	js    jetstream.JetStream
	inbox string // replies arrive on inbox + "." + name

	mu      sync.Mutex
	replies map[string]chan *nats.Msg
}

func newAttacker(t *testing.T, f *testFleet) *attacker {
	nc := f.nats.connect("app-a")
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	a := &attacker{t: t, nc: nc, js: js, inbox: nc.NewInbox(), replies: map[string]chan *nats.Msg{}}
	if _, err := nc.Subscribe(a.inbox+".*", func(m *nats.Msg) {
		a.mu.Lock()
		ch := a.replies[strings.TrimPrefix(m.Subject, a.inbox+".")]
		a.mu.Unlock()
		if ch != nil {
			select {
			case ch <- m:
			default:
			}
		}
	}); err != nil {
		t.Fatal(err)
	}
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
	return a
}

// replyTo returns a reply subject of the attacker's own, and the channel
// its replies arrive on.
func (a *attacker) replyTo(name string) (string, <-chan *nats.Msg) {
	ch := make(chan *nats.Msg, 4)
	a.mu.Lock()
	a.replies[name] = ch
	a.mu.Unlock()
	return a.inbox + "." + name, ch
}

// body is a valid request body for key.
func body(key, code string, timeoutMs int) []byte {
	b, _ := json.Marshal(protocol.Request{V: protocol.Version, IsolateKey: key, Code: code, TimeoutMs: int64(timeoutMs)})
	return b
}

// publish stores a request on the shard of key; it fails the test if the
// stream does not take it.
func (a *attacker) publish(key string, data []byte, hdr nats.Header) {
	a.t.Helper()
	m := nats.NewMsg(protocol.RunSubject(protocol.DefaultPrefix, protocol.Shard(key, protocol.DefaultShards)))
	m.Data = data
	for k, vs := range hdr {
		m.Header[k] = vs
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := a.js.PublishMsg(ctx, m); err != nil {
		a.t.Fatalf("the stream refused the attack's request: %v", err)
	}
}

// want waits for a reply and checks its error code ("" for a result).
func want(t *testing.T, ch <-chan *nats.Msg, code protocol.Code) *protocol.Reply {
	t.Helper()
	select {
	case m := <-ch:
		var rep protocol.Reply
		if err := json.Unmarshal(m.Data, &rep); err != nil {
			t.Fatalf("reply %q: %v", m.Data, err)
		}
		got := protocol.Code("")
		if rep.Error != nil {
			got = rep.Error.Code
		}
		if got != code {
			t.Fatalf("reply %+v, want code %q", rep, code)
		}
		if m.Reply != "" {
			m.Respond(nil) // confirm it, as a client does
		}
		return &rep
	case <-time.After(20 * time.Second):
		t.Fatalf("no reply within 20s, want %q", code)
		return nil
	}
}

// deadLetterWatch collects dead letters, as an operator watching them.
type deadLetterWatch struct {
	mu   sync.Mutex
	msgs []*nats.Msg
}

func watchDeadLetters(t *testing.T, f *testFleet) *deadLetterWatch {
	w := &deadLetterWatch{}
	if _, err := f.ops.Subscribe("isode.dead.*", func(m *nats.Msg) {
		w.mu.Lock()
		w.msgs = append(w.msgs, m)
		w.mu.Unlock()
	}); err != nil {
		t.Fatal(err)
	}
	if err := f.ops.Flush(); err != nil {
		t.Fatal(err)
	}
	return w
}

// wait returns the dead letter that match accepts, waiting up to 20 s.
func (w *deadLetterWatch) wait(t *testing.T, what string, match func(m *nats.Msg) bool) *nats.Msg {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		w.mu.Lock()
		for _, m := range w.msgs {
			if match(m) {
				w.mu.Unlock()
				if m.Header.Get(protocol.HeaderDeadReason) == "" || m.Header.Get(protocol.HeaderDeadWorker) == "" {
					t.Errorf("dead letter of %s without reason or worker: %v", what, m.Header)
				}
				return m
			}
		}
		w.mu.Unlock()
		if time.Now().After(deadline) {
			t.Fatalf("no dead letter of %s within 20s", what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func byID(id string) func(*nats.Msg) bool {
	return func(m *nats.Msg) bool { return m.Header.Get(protocol.HeaderMsgID) == id }
}

// streamDrains waits until the request stream holds nothing on subject
// ("" for the whole stream) and returns how long that took.
func (f *testFleet) streamDrains(t *testing.T, within time.Duration, subject string) time.Duration {
	t.Helper()
	js, err := jetstream.New(f.ops)
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	var last string
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		s, err := js.Stream(ctx, protocol.StreamName(protocol.DefaultPrefix))
		var info *jetstream.StreamInfo
		if err == nil {
			if subject == "" {
				info, err = s.Info(ctx)
			} else {
				info, err = s.Info(ctx, jetstream.WithSubjectFilter(subject))
			}
		}
		cancel()
		n := uint64(0)
		if err == nil {
			n = info.State.Msgs
			if subject != "" {
				n = info.State.Subjects[subject]
			}
		}
		switch {
		case err != nil:
			last = err.Error()
		case n == 0:
			return time.Since(start)
		default:
			last = fmt.Sprintf("%d requests in the stream", n)
		}
		if time.Since(start) > within {
			t.Fatalf("the stream did not drain within %v: %s", within, last)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// latencies returns the bystanders' answered latencies for requests sent
// in [from, to).
func (l *fleetLoad) latencies(from, to time.Time) []time.Duration {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []time.Duration
	for _, r := range l.all {
		if r.worker != "" && !r.sent.Before(from) && r.sent.Before(to) {
			out = append(out, r.at.Sub(r.sent))
		}
	}
	return out
}

func quantile(d []time.Duration, q float64) time.Duration {
	if len(d) == 0 {
		return 0
	}
	s := slices.Clone(d)
	slices.Sort(s)
	return s[min(len(s)-1, int(q*float64(len(s))))]
}

// poisonCase is one attack and what the fleet must do with it.
type poisonCase struct {
	name    string
	outcome string // for the summary table
	attack  func(t *testing.T, a *attacker, dead *deadLetterWatch)
}

func TestPoisonSuite(t *testing.T) {
	if testing.Short() {
		t.Skip("the poison suite runs worker processes for a few minutes")
	}
	f := newFleet(t)
	procs := []*fleetProc{f.start("p1", poisonArgs...), f.start("p2", poisonArgs...), f.start("p3", poisonArgs...)}
	ids := make([]string, len(procs))
	for i, p := range procs {
		p.waitReady(t, 90*time.Second)
		ids[i] = p.id
	}
	f.steady(ids, 60*time.Second)
	dead := watchDeadLetters(t, f)
	a := newAttacker(t, f)
	tenants := fleetTenants(f.name+"-bystander", 6)
	load := f.startLoad(3, tenants)
	// The attacker's tenant is on a shard no bystander uses, so the
	// stream's count on that shard shows when its requests are gone.
	busy := map[int]bool{}
	for _, k := range tenants {
		busy[protocol.Shard(k, protocol.DefaultShards)] = true
	}
	atk := ""
	for i := 0; atk == ""; i++ {
		if k := f.name + "-atk-" + strconv.Itoa(i); !busy[protocol.Shard(k, protocol.DefaultShards)] {
			atk = k
		}
	}
	atkSubject := protocol.RunSubject(protocol.DefaultPrefix, protocol.Shard(atk, protocol.DefaultShards))

	// Before: the bystanders alone.
	// Past the bystanders' cold starts before the baseline is measured.
	load.waitFor(90*time.Second, "bystanders not served", func(rs []*fleetRequest) bool { return answeredCount(rs) >= 300 })
	beforeFrom := time.Now()
	time.Sleep(4 * time.Second) // a measurement window, not synchronisation
	beforeTo := time.Now()

	uniq := func(s string) string { return f.name + "-" + s }
	cases := []poisonCase{
		{"reply subject of 5,000 bytes", "dead-lettered, not run", func(t *testing.T, a *attacker, dead *deadLetterWatch) {
			a.publish(atk, body(atk, "return 1", 1000), nats.Header{protocol.HeaderMsgID: {uniq("long")},
				protocol.HeaderReplyTo: {a.inbox + "." + strings.Repeat("x", 5000)}})
			dead.wait(t, "a long reply subject", byID(uniq("long")))
		}},
		{"wildcard reply subjects", "dead-lettered, not run", func(t *testing.T, a *attacker, dead *deadLetterWatch) {
			for i, r := range []string{a.inbox + ".*", a.inbox + ".>", "_INBOX..x"} {
				id := uniq("wild-" + strconv.Itoa(i))
				a.publish(atk, body(atk, "return 1", 1000), nats.Header{protocol.HeaderMsgID: {id}, protocol.HeaderReplyTo: {r}})
				dead.wait(t, r, byID(id))
			}
		}},
		{"$-prefixed and fleet-internal reply subjects", "dead-lettered, not run; the stream survives", func(t *testing.T, a *attacker, dead *deadLetterWatch) {
			for i, r := range []string{"$JS.API.STREAM.DELETE.ISODE", "$SYS.REQ.SERVER.PING", "isode.run.7", "isode.stats",
				protocol.ReplyAckPrefix + ".x.y", protocol.WorkerInboxPrefix + ".x"} {
				id := uniq("reserved-" + strconv.Itoa(i))
				a.publish(atk, body(atk, "return 1", 1000), nats.Header{protocol.HeaderMsgID: {id}, protocol.HeaderReplyTo: {r}})
				dead.wait(t, r, byID(id))
			}
		}},
		{"request id of 4,000 bytes", "bad_request, id not echoed", func(t *testing.T, a *attacker, dead *deadLetterWatch) {
			r, ch := a.replyTo("longid")
			a.publish(atk, body(atk, "return 1", 1000), nats.Header{protocol.HeaderMsgID: {strings.Repeat("i", 4000)}, protocol.HeaderReplyTo: {r}})
			if rep := want(t, ch, protocol.CodeBadRequest); rep.ID != "" {
				t.Errorf("the reply echoes an id of %d bytes", len(rep.ID))
			}
		}},
		{"header values at and over the stream's 64 KiB header limit, 300 garbage headers", "at the limit: bad_request; over it: refused by the stream; garbage ignored, run", func(t *testing.T, a *attacker, dead *deadLetterWatch) {
			r, ch := a.replyTo("bighdr")
			a.publish(atk, body(atk, "return 1", 1000), nats.Header{protocol.HeaderMsgID: {uniq("bighdr")}, protocol.HeaderReplyTo: {r},
				protocol.HeaderDeadline: {strings.Repeat("9", 63<<10)}})
			want(t, ch, protocol.CodeBadRequest)
			over := nats.NewMsg(atkSubject)
			over.Data = body(atk, "return 1", 1000)
			over.Header.Set(protocol.HeaderMsgID, uniq("overhdr"))
			over.Header.Set(protocol.HeaderReplyTo, r)
			over.Header.Set("X-Big", strings.Repeat("9", 65<<10))
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			if _, err := a.js.PublishMsg(ctx, over); err == nil {
				t.Fatal("the stream took a request with 65 KiB of headers")
			}
			r, ch = a.replyTo("junk")
			h := nats.Header{protocol.HeaderMsgID: {uniq("junk")}, protocol.HeaderReplyTo: {r}, protocol.HeaderReplyAck: {strings.Repeat("?", 1000)}}
			for i := range 300 {
				h.Set("X-Junk-"+strconv.Itoa(i), strings.Repeat("\x01\x7f", 20))
			}
			a.publish(atk, body(atk, "return function (cb) { cb(null, 2); }", 1000), h)
			want(t, ch, "")
		}},
		{"negative, zero and garbage deadlines", "bad_request", func(t *testing.T, a *attacker, dead *deadLetterWatch) {
			for i, v := range []string{"-1", "0", "soon", "99999999999999999999"} {
				r, ch := a.replyTo("dl" + strconv.Itoa(i))
				a.publish(atk, body(atk, "return 1", 1000), nats.Header{protocol.HeaderMsgID: {uniq("dl" + strconv.Itoa(i))}, protocol.HeaderReplyTo: {r}, protocol.HeaderDeadline: {v}})
				want(t, ch, protocol.CodeBadRequest)
			}
		}},
		{"missing headers", "no id: bad_request; no reply subject: dead-lettered", func(t *testing.T, a *attacker, dead *deadLetterWatch) {
			r, ch := a.replyTo("noid")
			a.publish(atk, body(atk, "return 1", 1000), nats.Header{protocol.HeaderReplyTo: {r}})
			want(t, ch, protocol.CodeBadRequest)
			key := uniq("noheaders")
			a.publish(key, body(key, "return 1", 1000), nil)
			dead.wait(t, "a request without headers", func(m *nats.Msg) bool { return strings.Contains(string(m.Data), key) })
		}},
		{"non-JSON and oversize bodies", "bad_request", func(t *testing.T, a *attacker, dead *deadLetterWatch) {
			for i, b := range [][]byte{[]byte("\x00\xff not json"), []byte(`{"v":1,"isolate_key":"` + atk + `","code":` + strings.Repeat("[", 10000)),
				append([]byte(`{"v":1,"isolate_key":"`+atk+`","code":"`), append([]byte(strings.Repeat("x", protocol.MaxRequestBytes)), '"', '}')...)} {
				r, ch := a.replyTo("body" + strconv.Itoa(i))
				a.publish(atk, b, nats.Header{protocol.HeaderMsgID: {uniq("body" + strconv.Itoa(i))}, protocol.HeaderReplyTo: {r}})
				want(t, ch, protocol.CodeBadRequest)
			}
		}},
		{"far-future deadlines, replies nobody confirms (x30)", "run once each, replies offered until the bounded deadline, then dropped", func(t *testing.T, a *attacker, dead *deadLetterWatch) {
			for i := range 30 {
				a.publish(atk, body(atk, "return function (cb) { cb(null, 3); }", 1000), nats.Header{
					protocol.HeaderMsgID: {uniq("far-" + strconv.Itoa(i))}, protocol.HeaderReplyTo: {"_INBOX.nobody-listens." + strconv.Itoa(i)},
					protocol.HeaderReplyAck: {"1"}, protocol.HeaderDeadline: {"253402300799999"}})
			}
			took := f.streamDrains(t, poisonBound, atkSubject)
			t.Logf("the stream drained %v after the last far-future request", took.Round(100*time.Millisecond))
		}},
		{"duplicate ids, by a retry and by a second publisher", "duplicate_request at once, not a wait until the deadline", func(t *testing.T, a *attacker, dead *deadLetterWatch) {
			c, err := isode.New(f.nats.connect("app-a"))
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			code := "return function (cb) { cb(null, 4); }"
			if _, err := c.Run(ctx, atk, code, isode.WithRequestID(uniq("retried"))); err != nil {
				t.Fatal(err)
			}
			start := time.Now()
			if _, err := c.Run(ctx, atk, code, isode.WithRequestID(uniq("retried"))); !errors.Is(err, protocol.ErrDuplicateRequest) {
				t.Fatalf("retry: %v, want duplicate_request", err)
			}
			a.publish(atk, body(atk, code, 1000), nats.Header{protocol.HeaderMsgID: {uniq("taken")}, protocol.HeaderReplyTo: {"_INBOX.elsewhere"}})
			if _, err := c.Run(ctx, atk, code, isode.WithRequestID(uniq("taken"))); !errors.Is(err, protocol.ErrDuplicateRequest) {
				t.Fatalf("id taken by another publisher: %v, want duplicate_request", err)
			}
			if took := time.Since(start); took > 10*time.Second {
				t.Errorf("duplicates took %v to be reported", took)
			}
		}},
		{"forged statuses on confirmation subjects", "no effect: tokens cannot be guessed", func(t *testing.T, a *attacker, dead *deadLetterWatch) {
			// The attacker learns a worker's confirmation prefix from a
			// reply of its own, then forges no-responders statuses for the
			// tokens the old, counter-based subjects would have had, and
			// for random ones, while the bystanders' replies flow.
			r, ch := a.replyTo("learn")
			a.publish(atk, body(atk, "return 1", 1000), nats.Header{protocol.HeaderMsgID: {uniq("learn")}, protocol.HeaderReplyTo: {r}, protocol.HeaderReplyAck: {"1"}})
			var m *nats.Msg
			select {
			case m = <-ch:
			case <-time.After(20 * time.Second):
				t.Fatal("no reply to learn from")
			}
			prefix := m.Reply[:strings.LastIndexByte(m.Reply, '.')+1]
			load.mu.Lock()
			dupes := load.dupes
			load.mu.Unlock()
			status := nats.Header{"Status": {"503"}}
			for n := range 3000 {
				for _, tok := range []string{strconv.FormatUint(uint64(n), 36), randomHex(13)} {
					if err := a.nc.PublishMsg(&nats.Msg{Subject: prefix + tok, Header: status}); err != nil {
						t.Fatal(err)
					}
				}
			}
			if err := a.nc.Flush(); err != nil {
				t.Fatal(err)
			}
			m.Respond(nil)
			load.waitFor(20*time.Second, "bystanders not served after the forgeries", func(rs []*fleetRequest) bool { return answeredCount(rs) > 0 })
			time.Sleep(time.Second) // let a forged status take effect, if one could
			load.mu.Lock()
			defer load.mu.Unlock()
			if load.dupes != dupes {
				t.Errorf("bystanders got %d replies twice: a forged status was taken for real", load.dupes-dupes)
			}
		}},
		{"sandbox frame with duplicate keys", "that sandbox recycled (sandbox_crashed); nobody else affected", func(t *testing.T, a *attacker, dead *deadLetterWatch) {
			r, ch := a.replyTo("frame")
			a.publish("atk-frame", body("atk-frame", forgedFrameSnippet, 5000), nats.Header{protocol.HeaderMsgID: {uniq("frame")}, protocol.HeaderReplyTo: {r}})
			want(t, ch, protocol.CodeSandboxCrashed)
		}},
	}

	type row struct{ name, outcome string }
	var rows []row
	attackFrom := time.Now()
	for _, c := range cases {
		ok := t.Run(c.name, func(t *testing.T) {
			c.attack(t, a, dead)
			for _, p := range procs {
				if p.exited() {
					t.Fatalf("worker %s exited: %v\n%s", p.id, p.err, p.tail(20))
				}
				if l := p.log(); strings.Contains(l, "disconnected from NATS") || strings.Contains(l, "connection closed") {
					t.Fatalf("worker %s lost its NATS connection:\n%s", p.id, p.tail(20))
				}
			}
		})
		if ok {
			rows = append(rows, row{c.name, c.outcome})
		}
	}
	attackTo := time.Now()
	f.steady(ids, 30*time.Second) // all three still answer and own every shard
	tl := load.finish(60 * time.Second)
	load.check(tl)
	drained := f.streamDrains(t, poisonBound, "")
	before, during := load.latencies(beforeFrom, beforeTo), load.latencies(attackFrom, attackTo)
	p99b, p99d := quantile(before, 0.99), quantile(during, 0.99)
	ratio := float64(p99d) / float64(max(p99b, time.Microsecond))
	var b strings.Builder
	b.WriteString("| attack | outcome |\n| --- | --- |\n")
	for _, r := range rows {
		fmt.Fprintf(&b, "| %s | %s |\n", r.name, r.outcome)
	}
	fmt.Fprintf(&b, "\nBystanders: %d runs before, p50 %v p99 %v; %d runs during the attacks, p50 %v p99 %v (p99 x%.2f); %d accepted, %d lost. Stream empty %v after the last attack.\n",
		len(before), quantile(before, 0.5).Round(10*time.Microsecond), p99b.Round(10*time.Microsecond),
		len(during), quantile(during, 0.5).Round(10*time.Microsecond), p99d.Round(10*time.Microsecond), ratio,
		tl.accepted, tl.lost, drained.Round(100*time.Millisecond))
	t.Logf("summary:\n%s", b.String())
	if p := os.Getenv("ISODE_POISON_SUMMARY"); p != "" {
		if err := os.WriteFile(p, []byte(b.String()), 0o644); err != nil {
			t.Error(err)
		}
	}
}

// forgedFrameSnippet writes a frame with duplicate keys straight to the
// agent's protocol output, bypassing the agent (found as in
// pkg/dockerx/forged_frame_test.go: the only pipe of which the process
// holds one end, write-only): the host must take it as a protocol
// violation of this sandbox alone.
const forgedFrameSnippet = `return function (cb) {
  ` + testenv.PipesJS + `
  const body = Buffer.from('{"id":2,"result":"forged","id":2}');
  const head = Buffer.alloc(4); head.writeUInt32BE(body.length, 0);
  require("fs").writeSync(pipes().out, Buffer.concat([head, body]));
  setTimeout(function () { cb(null, "frame written, sandbox still up"); }, 3000);
}`
