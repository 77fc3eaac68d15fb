package client_test

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
	"github.com/isode-run/isode/pkg/client"
	"github.com/isode-run/isode/pkg/protocol"
)

const snippet = `return function (cb) { cb(null, 1); }`

// connect starts an in-process JetStream server and returns a connection
// to it, closed at cleanup.
func connect(t *testing.T) *nats.Conn {
	t.Helper()
	s := testenv.NATS(t)
	nc, err := nats.Connect(s.ClientURL())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	return nc
}

// requestStream creates the request stream as workers do (pkg/fleet's
// streamConfig: a work queue on isode.run.*, discard new, a duplicate
// window, per-message TTLs), edited by edit. It has no consumer, so what
// it accepts stays in it and nobody answers.
func requestStream(t *testing.T, nc *nats.Conn, edit func(*jetstream.StreamConfig)) jetstream.Stream {
	t.Helper()
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	cfg := jetstream.StreamConfig{
		Name:        protocol.StreamName(protocol.DefaultPrefix),
		Subjects:    []string{protocol.RunWildcard(protocol.DefaultPrefix)},
		Retention:   jetstream.WorkQueuePolicy,
		Storage:     jetstream.FileStorage,
		Discard:     jetstream.DiscardNew,
		MaxMsgs:     100_000,
		MaxBytes:    1 << 30,
		MaxMsgSize:  protocol.MaxRequestBytes + 16<<10,
		Duplicates:  2 * time.Minute,
		AllowMsgTTL: true,
	}
	if edit != nil {
		edit(&cfg)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s, err := js.CreateStream(ctx, cfg)
	if err != nil {
		t.Fatalf("create stream: %v", err)
	}
	return s
}

func newClient(t *testing.T, nc *nats.Conn) *client.Client {
	t.Helper()
	c, err := client.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// runFails runs snippet with a 30 s deadline and returns its error, failing
// the test unless Run returned within 2 s: a refusal must not wait for the
// deadline.
func runFails(t *testing.T, c *client.Client, opts ...client.RunOption) error {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	start := time.Now()
	res, err := c.Run(ctx, "tenant1", snippet, opts...)
	if took := time.Since(start); took > 2*time.Second {
		t.Fatalf("Run took %v (error %v): it waited for the deadline instead of failing at once", took, err)
	}
	if err == nil {
		t.Fatalf("Run = %+v, want an error", res)
	}
	return err
}

func TestRunNoStream(t *testing.T) {
	c := newClient(t, connect(t))
	err := runFails(t, c)
	if !errors.Is(err, client.ErrNoStream) || !errors.Is(err, protocol.ErrOverloaded) {
		t.Fatalf("err = %v, want ErrNoStream (overloaded)", err)
	}
}

// A stream that refuses the publish makes Run fail at once, with the code
// of the reason: overloaded when it is full (for each limit a worker sets
// on it), and a code that is not retried when retrying cannot help.
func TestRunStreamRefuses(t *testing.T) {
	tests := []struct {
		name    string
		give    func(*jetstream.StreamConfig)
		wantErr error
		wantIn  string
	}{
		{"max msgs", func(c *jetstream.StreamConfig) { c.MaxMsgs = 1 }, protocol.ErrOverloaded, "maximum messages exceeded"},
		{"max bytes", func(c *jetstream.StreamConfig) { c.MaxBytes = 1 << 10 }, protocol.ErrOverloaded, "maximum bytes exceeded"},
		{"max message size", func(c *jetstream.StreamConfig) { c.MaxMsgSize = 64 }, protocol.ErrBadRequest, "max message size"},
		{"no per-message TTL", func(c *jetstream.StreamConfig) { c.AllowMsgTTL = false }, protocol.ErrInternal, "AllowMsgTTL"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			nc := connect(t)
			requestStream(t, nc, tt.give)
			if errors.Is(tt.wantErr, protocol.ErrOverloaded) {
				// Fill the stream: one message of 900 bytes meets either limit.
				js, err := jetstream.New(nc)
				if err != nil {
					t.Fatal(err)
				}
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				defer cancel()
				if _, err := js.Publish(ctx, protocol.RunSubject(protocol.DefaultPrefix, 0), make([]byte, 900)); err != nil {
					t.Fatalf("fill the stream: %v", err)
				}
			}
			err := runFails(t, newClient(t, nc))
			if !errors.Is(err, tt.wantErr) {
				t.Fatalf("err = %v, want %v", err, tt.wantErr)
			}
			if !strings.Contains(err.Error(), tt.wantIn) {
				t.Errorf("err = %v: want it to say %q", err, tt.wantIn)
			}
		})
	}
}

// answerOne acts as a worker: it takes the next request from the stream
// and answers it with the result 42 on the inbox the request names.
func answerOne(t *testing.T, nc *nats.Conn, s jetstream.Stream) (id string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	cons, err := s.CreateOrUpdateConsumer(ctx, jetstream.ConsumerConfig{Durable: "test", AckPolicy: jetstream.AckExplicitPolicy})
	if err != nil {
		t.Fatal(err)
	}
	msg, err := cons.Next(jetstream.FetchMaxWait(5 * time.Second))
	if err != nil {
		t.Fatalf("take the request from the stream: %v", err)
	}
	id = msg.Headers().Get(protocol.HeaderMsgID)
	data, err := json.Marshal(&protocol.Reply{V: protocol.Version, ID: id, Result: json.RawMessage(`42`)})
	if err != nil {
		t.Fatal(err)
	}
	if err := nc.Publish(msg.Headers().Get(protocol.HeaderReplyTo), data); err != nil {
		t.Fatal(err)
	}
	if err := msg.Ack(); err != nil {
		t.Fatal(err)
	}
	return id
}

// checkDuplicate checks err is the duplicate_request a caller can act on.
func checkDuplicate(t *testing.T, err error) {
	t.Helper()
	if !errors.Is(err, protocol.ErrDuplicateRequest) {
		t.Fatalf("err = %v, want duplicate_request", err)
	}
	if protocol.CodeOf(err).Retryable() || !strings.Contains(err.Error(), "Use a new id") {
		t.Errorf("err = %v: want a code that is not retried and a message that says to use a new id", err)
	}
}

// A second Run with the id of one the stream accepted fails at once with
// duplicate_request; the first still gets its reply.
func TestRunDuplicateID(t *testing.T) {
	nc := connect(t)
	s := requestStream(t, nc, nil)
	c := newClient(t, nc)

	type outcome struct {
		res *client.Result
		err error
	}
	first := make(chan outcome, 1)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	go func() {
		res, err := c.Run(ctx, "tenant1", snippet, client.WithRequestID("order-17"))
		first <- outcome{res, err}
	}()
	// The first is in the stream once its message is.
	if !testenv.Poll(10*time.Second, func() bool {
		info, err := s.Info(ctx)
		return err == nil && info.State.Msgs == 1
	}) {
		t.Fatal("the first request never reached the stream")
	}

	checkDuplicate(t, runFails(t, c, client.WithRequestID("order-17")))

	if id := answerOne(t, nc, s); id != "order-17" {
		t.Fatalf("the stream held request %q, want order-17", id)
	}
	select {
	case o := <-first:
		if o.err != nil || string(o.res.Value) != "42" {
			t.Fatalf("first Run = %+v, %v; want the result 42", o.res, o.err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the first Run got no reply")
	}
	// Answered or not, the id stays taken for the duplicate window.
	checkDuplicate(t, runFails(t, c, client.WithRequestID("order-17")))
}

// An id taken by another publisher (a retry from another process, or a
// guess) makes Run fail at once rather than wait for a reply that goes
// elsewhere.
func TestRunIDTakenByAnotherPublisher(t *testing.T) {
	nc := connect(t)
	requestStream(t, nc, nil)

	other, err := nats.Connect(nc.ConnectedUrl())
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	m := nats.NewMsg(protocol.RunSubject(protocol.DefaultPrefix, 5))
	m.Header.Set(protocol.HeaderMsgID, "guessed")
	m.Header.Set(protocol.HeaderReplyTo, other.NewInbox())
	m.Data = []byte(`{"v":1,"isolate_key":"someone-else","code":"return 1"}`)
	ack, err := other.RequestMsg(m, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	var pa jetstream.PubAck
	if err := json.Unmarshal(ack.Data, &pa); err != nil || pa.Sequence == 0 || pa.Duplicate {
		t.Fatalf("the other publisher's request was not stored: %s (%v)", ack.Data, err)
	}

	checkDuplicate(t, runFails(t, newClient(t, nc), client.WithRequestID("guessed")))
}

// Runs without WithRequestID never collide: each is stored.
func TestRunDefaultIDsAreStored(t *testing.T) {
	nc := connect(t)
	s := requestStream(t, nc, nil)
	c := newClient(t, nc)
	for range 3 {
		ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
		_, err := c.Run(ctx, "tenant1", snippet)
		cancel()
		// Stored and unanswered (no worker): it waited for the deadline.
		if !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "no reply") {
			t.Fatalf("err = %v, want a stored request that got no reply", err)
		}
	}
	info, err := s.Info(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if info.State.Msgs != 3 {
		t.Fatalf("the stream holds %d requests, want 3", info.State.Msgs)
	}
}
