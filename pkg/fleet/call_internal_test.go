package fleet

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nats.go/micro"

	"github.com/isode-run/isode/internal/testenv"
	"github.com/isode-run/isode/pkg/protocol"
)

func TestCallRefusal(t *testing.T) {
	tests := []struct {
		name string
		give error
		want protocol.Code
	}{
		{"stream full", &jetstream.APIError{Code: 503, ErrorCode: 10077, Description: "maximum messages exceeded"}, protocol.CodeOverloaded},
		{"ingest queue full", fmt.Errorf("publish: %w", &jetstream.APIError{ErrorCode: 10167}), protocol.CodeOverloaded},
		{"no storage", &jetstream.APIError{ErrorCode: 10047}, protocol.CodeOverloaded},
		{"account limits", &jetstream.APIError{ErrorCode: 10002}, protocol.CodeOverloaded},
		{"another refusal", &jetstream.APIError{ErrorCode: 10060, Description: "expected stream does not match"}, protocol.CodeInternal},
		{"no acknowledgement in time", context.DeadlineExceeded, protocol.CodeOverloaded},
		{"no stream", jetstream.ErrNoStreamResponse, protocol.CodeInternal},
		{"anything else", errors.New("connection closed"), protocol.CodeInternal},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := callRefusal("id", "isode", tt.give)
			if got.Code != tt.want || got.Message == "" {
				t.Fatalf("callRefusal(%v) = %v, want code %s", tt.give, got, tt.want)
			}
		})
	}
}

// fakeCall is a micro.Request of a call, for the handler alone.
type fakeCall struct {
	micro.Request // answering through it would bypass the outbox: nil, so a use panics
	reply         string
	data          []byte
}

func (f fakeCall) Reply() string          { return f.reply }
func (f fakeCall) Data() []byte           { return f.data }
func (f fakeCall) Subject() string        { return "isode.call" }
func (f fakeCall) Headers() micro.Headers { return micro.Headers{} }

// TestCallAnsweredAtOnceWhenItCannotBeQueued: with every slot for calls on
// their way to the stream taken, a call is answered overloaded; after the
// service stopped, shutting_down. Neither waits for anything.
func TestCallAnsweredAtOnceWhenItCannotBeQueued(t *testing.T) {
	s := testenv.NATS(t)
	nc, err := nats.Connect(s.ClientURL())
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	cfg := DefaultConfig()
	cfg.WorkerID = "w1"
	cfg.MaxPendingCalls = 1
	w, err := New(nc, nil, nil, cfg)
	if err != nil {
		t.Fatal(err)
	}
	inbox := nats.NewInbox()
	sub, err := nc.SubscribeSync(inbox)
	if err != nil {
		t.Fatal(err)
	}
	body := []byte(`{"v":1,"isolate_key":"t","code":"x"}`)
	expect := func(code protocol.Code) {
		t.Helper()
		m, err := sub.NextMsg(5 * time.Second)
		if err != nil {
			t.Fatalf("no answer: %v", err)
		}
		if m.Header.Get(protocol.HeaderErrorCode) != string(code) || m.Header.Get(protocol.HeaderServiceErrorCode) != code.StatusString() {
			t.Fatalf("answer %s %v, want %s", m.Data, m.Header, code)
		}
	}

	w.callSlots <- struct{}{} // the one slot is taken
	w.call(fakeCall{reply: inbox, data: body})
	expect(protocol.CodeOverloaded)
	<-w.callSlots

	w.stopService()
	w.call(fakeCall{reply: inbox, data: body})
	expect(protocol.CodeShuttingDown)
	if st := w.serviceStats(); st.Errors["overloaded"] != 1 || st.Errors["shutting_down"] != 1 || st.Calls != 2 || st.Queued != 0 {
		t.Errorf("stats %+v", st)
	}
}
