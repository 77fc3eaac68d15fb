package client

import (
	"context"
	"encoding/json"
	"errors"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/isode-run/isode/pkg/protocol"
)

func replyMsg(t *testing.T, value string) *nats.Msg {
	t.Helper()
	data, err := json.Marshal(&protocol.Reply{V: protocol.Version, ID: "req-1", Result: json.RawMessage(value)})
	if err != nil {
		t.Fatal(err)
	}
	return &nats.Msg{Subject: "_INBOX.x.1.r", Data: data}
}

func ackMsg(data string) *nats.Msg {
	return &nats.Msg{Subject: "_INBOX.x.1.a", Data: []byte(data)}
}

func noPublish() error { return nil }

func newCall() *call {
	return &call{reply: make(chan *nats.Msg, 1), ack: make(chan *nats.Msg, 1)}
}

// The PubAck and the reply arrive on one subscription in either order.
// A reply that is there is returned whatever the PubAck says; a refusal
// with no reply ends the wait at once.
func TestWait(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	// select picks at random among ready cases: repeat, so that a wait
	// that let the PubAck win would fail here.
	for range 100 {
		for _, ack := range []string{`{"stream":"ISODE","seq":1}`, `{"stream":"ISODE","seq":1,"duplicate": true}`} {
			cl := newCall()
			cl.reply <- replyMsg(t, "42")
			cl.ack <- ackMsg(ack)
			res, err := cl.wait(ctx, "req-1", time.Hour, noPublish)
			if err != nil || string(res.Value) != "42" {
				t.Fatalf("with a reply and the PubAck %s queued: %+v, %v; want the reply", ack, res, err)
			}
		}
	}

	// A reply before any PubAck needs none.
	cl := newCall()
	cl.reply <- replyMsg(t, "7")
	if res, err := cl.wait(ctx, "req-1", time.Hour, noPublish); err != nil || string(res.Value) != "7" {
		t.Fatalf("reply without PubAck: %+v, %v", res, err)
	}

	// A duplicate with no reply ends at once, long before ctx does.
	cl = newCall()
	cl.ack <- ackMsg(`{"stream":"ISODE","seq":1,"duplicate": true}`)
	start := time.Now()
	if _, err := cl.wait(ctx, "req-1", time.Hour, noPublish); !errors.Is(err, protocol.ErrDuplicateRequest) || time.Since(start) > time.Second {
		t.Fatalf("duplicate PubAck: %v after %v", err, time.Since(start))
	}
}

// Until the stream acknowledges a request, wait publishes it again. A
// duplicate or no-stream answer after a copy went out does not end the
// wait: an earlier copy may have been stored (a PubAck lost while the
// stream's leader changed), or a copy met a stream with no leader.
func TestWaitResends(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cl := newCall()
	var published atomic.Int32
	publish := func() error {
		switch published.Add(1) {
		case 1:
			cl.ack <- &nats.Msg{Subject: "_INBOX.x.1.a", Header: nats.Header{"Status": []string{"503"}}}
		case 2:
			cl.ack <- ackMsg(`{"stream":"ISODE","seq":1,"duplicate": true}`)
			cl.reply <- replyMsg(t, "9")
		}
		return nil
	}
	res, err := cl.wait(ctx, "req-1", 10*time.Millisecond, publish)
	if err != nil || string(res.Value) != "9" {
		t.Fatalf("wait = %+v, %v; want the reply 9 after two copies", res, err)
	}
	if n := published.Load(); n != 2 {
		t.Errorf("published %d copies, want 2", n)
	}

	// Acknowledged: no more copies; the end of ctx is ErrNoReply.
	cl = newCall()
	cl.ack <- ackMsg(`{"stream":"ISODE","seq":2}`)
	published.Store(0)
	short, cancelShort := context.WithTimeout(ctx, 200*time.Millisecond)
	defer cancelShort()
	_, err = cl.wait(short, "req-1", 10*time.Millisecond, func() error { published.Add(1); return nil })
	if !errors.Is(err, ErrNoReply) || !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("acknowledged, no reply: %v; want ErrNoReply and the deadline", err)
	}
	if n := published.Load(); n != 0 {
		t.Errorf("published %d copies of an acknowledged request", n)
	}

	// Never acknowledged: copies until ctx ends, then ErrNotAcknowledged.
	cl = newCall()
	published.Store(0)
	short2, cancelShort2 := context.WithTimeout(ctx, 200*time.Millisecond)
	defer cancelShort2()
	_, err = cl.wait(short2, "req-1", 20*time.Millisecond, func() error { published.Add(1); return nil })
	if !errors.Is(err, ErrNotAcknowledged) || !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("never acknowledged: %v; want ErrNotAcknowledged and the deadline", err)
	}
	if n := published.Load(); n < 3 {
		t.Errorf("published %d copies in 200ms every 20ms, want several", n)
	}
}
