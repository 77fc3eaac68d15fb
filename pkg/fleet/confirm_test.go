package fleet_test

import (
	"context"
	"encoding/json"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/isode-run/isode/pkg/protocol"
)

// publishConfirmed stores a request that asks for confirmed replies
// (protocol.HeaderReplyAck), as pkg/client sends it, with replies to inbox.
func publishConfirmed(t *testing.T, e *env, id, key, inbox string, deadline time.Time) {
	t.Helper()
	js, err := jetstream.New(e.nc)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := json.Marshal(protocol.Request{V: protocol.Version, IsolateKey: key, Code: "x", Input: json.RawMessage(`"in"`)})
	m := nats.NewMsg(protocol.RunSubject(protocol.DefaultPrefix, protocol.Shard(key, 8)))
	m.Data = body
	m.Header.Set(protocol.HeaderMsgID, id)
	m.Header.Set(protocol.HeaderReplyTo, inbox)
	m.Header.Set(protocol.HeaderDeadline, strconv.FormatInt(deadline.UnixMilli(), 10))
	m.Header.Set(protocol.HeaderReplyAck, "1")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := js.PublishMsg(ctx, m); err != nil {
		t.Fatal(err)
	}
}

// streamMsgs returns how many requests the stream holds.
func streamMsgs(t *testing.T, e *env) uint64 {
	t.Helper()
	js, _ := jetstream.New(e.nc)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	s, err := js.Stream(ctx, protocol.StreamName(protocol.DefaultPrefix))
	if err != nil {
		t.Fatal(err)
	}
	info, err := s.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	return info.State.Msgs
}

// startCounting starts a worker that hands requests back quickly and
// echoes their input, counting its runs.
func startCounting(t *testing.T) (*env, *atomic.Int32) {
	e := newEnv(t)
	calls := new(atomic.Int32)
	cfg := testConfig("w1")
	cfg.RetryDelay = 50 * time.Millisecond
	startWorker(t, e, runnerFunc(func(ctx context.Context, req *protocol.Request) (*protocol.Result, error) {
		calls.Add(1)
		return &protocol.Result{Value: req.Input}, nil
	}), cfg)
	return e, calls
}

// A reply published while nobody listened on the requester's inbox (its
// connection was being re-established after a NATS restart, say) reaches
// the requester once it listens again, without the snippet running twice.
func TestUnreceivedReplyIsSentAgainWhenRequesterListens(t *testing.T) {
	e, calls := startCounting(t)

	inbox := nats.NewInbox()
	publishConfirmed(t, e, "unheard-1", "tenant-a", inbox, time.Now().Add(time.Minute))
	// Nobody listens yet: the worker runs the request and finds no one.
	deadline := time.Now().Add(10 * time.Second)
	for calls.Load() == 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if calls.Load() != 1 {
		t.Fatalf("the request was not run (calls %d)", calls.Load())
	}
	time.Sleep(300 * time.Millisecond) // a few offers to nobody

	got := make(chan *nats.Msg, 16)
	sub, err := e.nc.Subscribe(inbox, func(m *nats.Msg) {
		if m.Reply != "" {
			m.Respond(nil)
		}
		got <- m
	})
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Unsubscribe()
	var rep protocol.Reply
	select {
	case m := <-got:
		if err := json.Unmarshal(m.Data, &rep); err != nil || string(rep.Result) != `"in"` || rep.ID != "unheard-1" {
			t.Fatalf("reply %s (%v)", m.Data, err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the reply never reached the requester once it listened")
	}
	// Confirmed: the request leaves the stream and is not offered again.
	for n := streamMsgs(t, e); n != 0; n = streamMsgs(t, e) {
		if time.Now().After(deadline) {
			t.Fatalf("%d requests still in the stream after the reply was confirmed", n)
		}
		time.Sleep(20 * time.Millisecond)
	}
	time.Sleep(500 * time.Millisecond)
	if n := len(got); n != 0 {
		t.Errorf("%d more replies after the confirmation", n)
	}
	if n := calls.Load(); n != 1 {
		t.Errorf("the snippet ran %d times, want once (the reply comes from the cache)", n)
	}
}

// A reply nobody confirms is offered until the request's deadline, then
// dropped: the stream does not keep it forever.
func TestUnconfirmedReplyIsDroppedAtDeadline(t *testing.T) {
	e, calls := startCounting(t)

	// The requester listens but never confirms (an old client that sets
	// the header by mistake): every offer waits out ReplyAckWait.
	inbox := nats.NewInbox()
	var replies atomic.Int32
	sub, err := e.nc.Subscribe(inbox, func(*nats.Msg) { replies.Add(1) })
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Unsubscribe()
	deadline := time.Now().Add(3 * time.Second)
	publishConfirmed(t, e, "unconfirmed-1", "tenant-b", inbox, deadline)

	limit := deadline.Add(10 * time.Second)
	for streamMsgs(t, e) != 0 {
		if time.Now().After(limit) {
			t.Fatalf("the request is still in the stream 10s after its deadline")
		}
		time.Sleep(50 * time.Millisecond)
	}
	if time.Now().Before(deadline) {
		t.Errorf("the request left the stream before its deadline, unconfirmed")
	}
	if n := replies.Load(); n < 2 {
		t.Errorf("the reply was published %d times before the deadline, want it offered again", n)
	}
	if n := calls.Load(); n != 1 {
		t.Errorf("the snippet ran %d times, want once", n)
	}
}
