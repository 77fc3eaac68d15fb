package client

import (
	"context"
	"encoding/json"
	"errors"
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
			res, err := cl.wait(ctx, "req-1")
			if err != nil || string(res.Value) != "42" {
				t.Fatalf("with a reply and the PubAck %s queued: %+v, %v; want the reply", ack, res, err)
			}
		}
	}

	// A reply before any PubAck needs none.
	cl := newCall()
	cl.reply <- replyMsg(t, "7")
	if res, err := cl.wait(ctx, "req-1"); err != nil || string(res.Value) != "7" {
		t.Fatalf("reply without PubAck: %+v, %v", res, err)
	}

	// A duplicate with no reply ends at once, long before ctx does.
	cl = newCall()
	cl.ack <- ackMsg(`{"stream":"ISODE","seq":1,"duplicate": true}`)
	start := time.Now()
	if _, err := cl.wait(ctx, "req-1"); !errors.Is(err, protocol.ErrDuplicateRequest) || time.Since(start) > time.Second {
		t.Fatalf("duplicate PubAck: %v after %v", err, time.Since(start))
	}
}
