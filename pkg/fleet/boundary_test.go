package fleet_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	natstest "github.com/nats-io/nats-server/v2/test"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/isode-run/isode/internal/testenv"
	"github.com/isode-run/isode/pkg/client"
	"github.com/isode-run/isode/pkg/fleet"
	"github.com/isode-run/isode/pkg/protocol"
)

// The message boundary: whatever a request carries, a worker's connection
// stays up and other requests are served.

// deadLetters subscribes to every shard's dead-letter subject.
func deadLetters(t *testing.T, nc *nats.Conn) *nats.Subscription {
	t.Helper()
	sub, err := nc.SubscribeSync("isode.dead.*")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sub.Unsubscribe() })
	return sub
}

// publishRequest stores a request in the stream with the given headers.
func publishRequest(t *testing.T, nc *nats.Conn, key, id string, hdr map[string]string) {
	t.Helper()
	m := nats.NewMsg(protocol.RunSubject("isode", protocol.Shard(key, 8)))
	m.Data = []byte(`{"v":1,"isolate_key":"` + key + `","code":"x"}`)
	m.Header.Set(protocol.HeaderMsgID, id)
	for k, v := range hdr {
		m.Header.Set(k, v)
	}
	js, _ := jetstream.New(nc)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := js.PublishMsg(ctx, m); err != nil {
		t.Fatal(err)
	}
}

func streamEmpty(t *testing.T, nc *nats.Conn, within time.Duration) {
	t.Helper()
	js, _ := jetstream.New(nc)
	waitFor(t, within, func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		s, err := js.Stream(ctx, "ISODE")
		if err != nil {
			return err
		}
		info, err := s.Info(ctx)
		if err != nil {
			return err
		}
		if info.State.Msgs != 0 {
			return fmt.Errorf("%d requests still in the stream", info.State.Msgs)
		}
		return nil
	})
}

func TestUnanswerableRequestsAreDeadLetteredAndTheConnectionStays(t *testing.T) {
	// The server's control line is smaller than the protocol's reply
	// subject limit here, so one case is only caught by the worker's check
	// against the server's limit, not by the protocol's.
	opts := testenv.NATSOptions(t)
	opts.MaxControlLine = 512
	s := natstest.RunServer(&opts)
	t.Cleanup(s.Shutdown)
	e := &env{url: s.ClientURL()}
	var err error
	if e.nc, err = nats.Connect(e.url); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(e.nc.Close)
	if e.c, err = client.New(e.nc, client.WithShards(8)); err != nil {
		t.Fatal(err)
	}
	wnc, err := nats.Connect(e.url)
	if err != nil {
		t.Fatal(err)
	}
	var calls atomic.Int32
	cfg := testConfig("w1")
	cfg.MaxControlLine = 512
	startWorkerOn(t, wnc, runnerFunc(func(ctx context.Context, req *protocol.Request) (*protocol.Result, error) {
		calls.Add(1)
		return echo(ctx, req)
	}), cfg)
	dead := deadLetters(t, e.nc)

	tests := []struct{ name, replyTo string }{
		{"missing", ""},
		{"5000 bytes", "_INBOX." + strings.Repeat("x", 5000)},
		{"over the protocol's limit", "_INBOX." + strings.Repeat("x", protocol.MaxReplySubjectBytes)},
		{"over the server's limit", "_INBOX." + strings.Repeat("x", 480)},
		{"wildcard token", "_INBOX.*"},
		{"full wildcard", "_INBOX.>"},
		{"empty token", "_INBOX..x"},
		{"trailing dot", "_INBOX.x."},
		{"space", "_INBOX.a b"},
		{"JetStream API", "$JS.API.STREAM.DELETE.ISODE"},
		{"system", "$SYS.REQ.SERVER.PING"},
		{"a worker's inbox", protocol.WorkerInboxPrefix + ".abc"},
		{"a confirmation subject", protocol.ReplyAckPrefix + ".abc.def"},
		{"a request subject", "isode.run.3"},
		{"the fleet's stats", "isode.stats"},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			hdr := map[string]string{}
			if tt.replyTo != "" {
				hdr[protocol.HeaderReplyTo] = tt.replyTo
			}
			id := "unanswerable-" + strconv.Itoa(i)
			publishRequest(t, e.nc, "t", id, hdr)
			m, err := dead.NextMsg(5 * time.Second)
			if err != nil {
				t.Fatalf("no dead letter: %v", err)
			}
			if got := m.Header.Get(protocol.HeaderMsgID); got != id {
				t.Fatalf("dead letter of %q, want %q", got, id)
			}
			if m.Header.Get(protocol.HeaderDeadReason) == "" || m.Header.Get(protocol.HeaderDeadWorker) != "w1" {
				t.Errorf("dead letter headers %v", m.Header)
			}
			if m.Subject != protocol.DeadSubject("isode", protocol.Shard("t", 8)) {
				t.Errorf("dead letter on %s", m.Subject)
			}
			if !wnc.IsConnected() {
				t.Fatalf("the worker's connection is %v (last error %v)", wnc.Status(), wnc.LastError())
			}
		})
	}
	streamEmpty(t, e.nc, 5*time.Second)
	if n := calls.Load(); n != 0 {
		t.Errorf("runner called %d times for requests nobody could be answered", n)
	}

	// Long reply subjects within both limits are answered.
	inbox := "_INBOX." + strings.Repeat("y", 380)
	sub, err := e.nc.SubscribeSync(inbox)
	if err != nil {
		t.Fatal(err)
	}
	publishRequest(t, e.nc, "t", "long-but-fine", map[string]string{protocol.HeaderReplyTo: inbox})
	m, err := sub.NextMsg(5 * time.Second)
	if err != nil {
		t.Fatalf("no reply to a 387-byte reply subject: %v", err)
	}
	if m.Header.Get(protocol.HeaderErrorCode) != "" {
		t.Fatalf("reply %s", m.Data)
	}
	// And so are ordinary requests, on the connection the attacks did not close.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := e.c.Run(ctx, "bystander", "return 1"); err != nil {
		t.Fatal(err)
	}
	if !wnc.IsConnected() {
		t.Fatalf("the worker's connection is %v", wnc.Status())
	}
}

func TestStatsRequestsCannotAimTheWorker(t *testing.T) {
	e := newEnv(t)
	wnc, err := nats.Connect(e.url)
	if err != nil {
		t.Fatal(err)
	}
	startWorkerOn(t, wnc, echo, testConfig("w1"))
	api, err := e.nc.SubscribeSync("$JS.API.STREAM.DELETE.>")
	if err != nil {
		t.Fatal(err)
	}
	for _, reply := range []string{"$JS.API.STREAM.DELETE.ISODE", "_INBOX." + strings.Repeat("z", 4070)} {
		if err := e.nc.PublishRequest(protocol.StatsSubject("isode"), reply, nil); err != nil {
			t.Fatal(err)
		}
	}
	// One worker answers stats in order: once a good request is answered,
	// the bad ones before it were handled.
	msg, err := e.nc.Request(protocol.StatsSubject("isode"), nil, 5*time.Second)
	if err != nil {
		t.Fatalf("stats after the bad requests: %v", err)
	}
	var st protocol.WorkerStats
	if err := json.Unmarshal(msg.Data, &st); err != nil || st.Worker != "w1" {
		t.Fatalf("stats %s: %v", msg.Data, err)
	}
	if m, err := api.NextMsg(100 * time.Millisecond); err == nil {
		t.Fatalf("the worker published to %s", m.Subject)
	}
	if !wnc.IsConnected() {
		t.Fatalf("the worker's connection is %v (last error %v)", wnc.Status(), wnc.LastError())
	}
}

func TestErrorMessagesCannotInjectHeaders(t *testing.T) {
	e := newEnv(t)
	startWorker(t, e, runnerFunc(func(ctx context.Context, req *protocol.Request) (*protocol.Result, error) {
		return nil, protocol.Errorf(protocol.CodeCodeError, "%s", "Error: x\r\nIsode-Error-Code: none\r\n\r\nNATS/1.0 200\r\n"+strings.Repeat("long ", 2000))
	}), testConfig("w1"))
	inbox := nats.NewInbox()
	sub, err := e.nc.SubscribeSync(inbox)
	if err != nil {
		t.Fatal(err)
	}
	publishRequest(t, e.nc, "t", "inject", map[string]string{protocol.HeaderReplyTo: inbox})
	m, err := sub.NextMsg(5 * time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if got := m.Header.Values(protocol.HeaderErrorCode); len(got) != 1 || got[0] != string(protocol.CodeCodeError) {
		t.Errorf("error code header %q", got)
	}
	se := m.Header.Get(protocol.HeaderServiceError)
	if strings.ContainsAny(se, "\r\n") || len(se) > 1024 || !strings.HasPrefix(se, "Error: x  Isode-Error-Code") {
		t.Errorf("service error header %q", se)
	}
	var rep protocol.Reply
	if err := json.Unmarshal(m.Data, &rep); err != nil || rep.Error == nil || !strings.Contains(rep.Error.Message, "\r\nIsode-Error-Code") {
		t.Errorf("the body keeps the whole message: %v %+v", err, rep.Error)
	}
}

func TestDeadlinesAreBounded(t *testing.T) {
	e := newEnv(t)
	got := make(chan time.Time, 4)
	cfg := testConfig("w1")
	cfg.MaxQueueWait = 2 * time.Second
	startWorker(t, e, runnerFunc(func(ctx context.Context, req *protocol.Request) (*protocol.Result, error) {
		dl, _ := ctx.Deadline()
		got <- dl
		return echo(ctx, req)
	}), cfg)

	body := `{"v":1,"isolate_key":"t","code":"x","timeout_ms":1000}`
	for _, far := range []string{
		strconv.FormatInt(time.Now().Add(24*365*time.Hour).UnixMilli(), 10),
		"253402300799999", // 9999-12-31
		"",                // none: the same bound
	} {
		hdr := map[string]string{}
		if far != "" {
			hdr[protocol.HeaderDeadline] = far
		}
		sent := time.Now()
		rep := publishRaw(t, e, protocol.Shard("t", 8), []byte(body), hdr)
		if rep.Error != nil {
			t.Fatalf("deadline %q: %+v", far, rep.Error)
		}
		dl := <-got
		if bound := sent.Add(cfg.MaxQueueWait + time.Second + 500*time.Millisecond); dl.After(bound) {
			t.Errorf("deadline %q: the run's deadline is %v after the request was sent, over the bound %v",
				far, dl.Sub(sent).Round(time.Millisecond), bound.Sub(sent))
		}
	}
	for _, bad := range []string{"-5", "0", "1e12", "99999999999999999999", "253402300800000", "5x"} {
		rep := publishRaw(t, e, protocol.Shard("t", 8), []byte(body), map[string]string{protocol.HeaderDeadline: bad})
		if rep.Error == nil || rep.Error.Code != protocol.CodeBadRequest {
			t.Errorf("deadline %q: %+v, want bad_request", bad, rep)
		}
	}
}

func TestPoisonRequestIsDeadLetteredAfterMaxFailures(t *testing.T) {
	e := newEnv(t)
	dead := deadLetters(t, e.nc)
	started := make(chan string, 8)
	// Each worker dies (its connection closes, its runs are abandoned)
	// while it runs the request, as a worker killed by it would.
	hang := func(id string) fleet.Runner {
		return runnerFunc(func(ctx context.Context, req *protocol.Request) (*protocol.Result, error) {
			started <- id
			<-ctx.Done()
			return nil, ctx.Err()
		})
	}
	cfg := func(id string) fleet.Config {
		c := testConfig(id)
		c.AckWait = time.Second
		c.MemberTTL = 500 * time.Millisecond
		c.Heartbeat = 100 * time.Millisecond
		c.MaxFailures = 2
		return c
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	type result struct {
		res *client.Result
		err error
	}
	done := make(chan result, 1)
	c := newClient(t, e, 8)

	for i, id := range []string{"w1", "w2"} {
		nc, err := nats.Connect(e.url)
		if err != nil {
			t.Fatal(err)
		}
		w := startWorkerOn(t, nc, hang(id), cfg(id))
		if i == 0 {
			go func() {
				res, err := c.Run(ctx, "poison", "x", client.WithTimeout(30*time.Second))
				done <- result{res, err}
			}()
		}
		select {
		case got := <-started:
			if got != id {
				t.Fatalf("run started on %s, want %s", got, id)
			}
		case <-ctx.Done():
			t.Fatalf("%s never ran the request", id)
		}
		w.Abort()
		nc.Close()
	}
	startWorker(t, e, hang("w3"), cfg("w3"))

	var r result
	select {
	case r = <-done:
	case <-ctx.Done():
		t.Fatal("no answer")
	}
	if !errors.Is(r.err, protocol.ErrDeadLettered) {
		t.Fatalf("err = %v, want dead_lettered", r.err)
	}
	if r.res == nil || r.res.Worker != "w3" {
		t.Errorf("answered by %+v, want w3", r.res)
	}
	m, err := dead.NextMsg(5 * time.Second)
	if err != nil {
		t.Fatalf("no dead letter: %v", err)
	}
	if m.Header.Get(protocol.HeaderDeadDeliveries) != "3" || !strings.Contains(string(m.Data), `"poison"`) {
		t.Errorf("dead letter %v %s", m.Header, m.Data)
	}
	select {
	case id := <-started:
		t.Errorf("%s ran the poison request again", id)
	default:
	}
	streamEmpty(t, e.nc, 5*time.Second)
}

func TestHandBacksAreNotFailures(t *testing.T) {
	e := newEnv(t)
	dead := deadLetters(t, e.nc)
	var calls atomic.Int32
	cfg := testConfig("w1")
	cfg.MaxFailures = 1
	cfg.RetryDelay = 20 * time.Millisecond
	startWorker(t, e, runnerFunc(func(ctx context.Context, req *protocol.Request) (*protocol.Result, error) {
		if calls.Add(1) <= 4 {
			return nil, protocol.Errorf(protocol.CodeOverloaded, "tenant queue full")
		}
		return echo(ctx, req)
	}), cfg)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	res, err := newClient(t, e, 8).Run(ctx, "busy", "x")
	if err != nil {
		t.Fatalf("after 4 hand-backs: %v", err)
	}
	if string(res.Value) != `"x"` || calls.Load() != 5 {
		t.Errorf("result %s after %d calls", res.Value, calls.Load())
	}
	if m, err := dead.NextMsg(50 * time.Millisecond); err == nil {
		t.Errorf("dead letter %v", m.Header)
	}
}
