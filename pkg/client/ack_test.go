package client

import (
	"encoding/json"
	"errors"
	"strings"
	"testing"

	natsserver "github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"

	"github.com/isode-run/isode/pkg/protocol"
)

// refused is the PubAck nats-server writes when a stream refuses a publish,
// built with the server's own types and error constructors, so that the
// table below checks the client's codes against the server's, not against
// a copy of them.
func refused(e *natsserver.ApiError) []byte {
	b, err := json.Marshal(&natsserver.JSPubAckResponse{PubAck: &natsserver.PubAck{Stream: "ISODE"}, Error: e})
	if err != nil {
		panic(err)
	}
	return b
}

func TestCheckAck(t *testing.T) {
	tests := []struct {
		name       string
		give       []byte
		giveStatus string // the Status header, for the no-responders answer
		wantErr    error  // nil: the request was stored
		// wantIn is what the message must mention for a person to act on it.
		wantIn string
	}{
		{name: "stored", give: []byte(`{"stream":"ISODE","seq":7}`)},
		{name: "stored in a domain", give: []byte(`{"stream":"ISODE","seq":7,"domain":"hub"}`)},
		{name: "no stream", giveStatus: "503", wantErr: ErrNoStream, wantIn: "is a worker running"},
		{
			name:    "duplicate id",
			give:    []byte(`{"stream":"ISODE","seq":7,"duplicate": true}`), // as nats-server writes it, space included
			wantErr: protocol.ErrDuplicateRequest, wantIn: `request id "req-1" was already accepted`,
		},
		{
			name:    "duplicate id being stored in a cluster",
			give:    refused(natsserver.NewJSStreamDuplicateMessageConflictError()),
			wantErr: protocol.ErrDuplicateRequest, wantIn: "Use a new id",
		},
		{
			name:    "max msgs",
			give:    refused(natsserver.NewJSStreamStoreFailedError(natsserver.ErrMaxMsgs)),
			wantErr: protocol.ErrOverloaded, wantIn: "maximum messages exceeded",
		},
		{
			name:    "max bytes",
			give:    refused(natsserver.NewJSStreamStoreFailedError(natsserver.ErrMaxBytes)),
			wantErr: protocol.ErrOverloaded, wantIn: "maximum bytes exceeded",
		},
		{
			name:    "max msgs per subject",
			give:    refused(natsserver.NewJSStreamStoreFailedError(natsserver.ErrMaxMsgsPerSubject)),
			wantErr: protocol.ErrOverloaded, wantIn: "retry later",
		},
		{
			name:    "ingest queue full",
			give:    refused(natsserver.NewJSStreamTooManyRequestsError()),
			wantErr: protocol.ErrOverloaded, wantIn: "too many requests",
		},
		{
			name:    "server storage exhausted",
			give:    refused(natsserver.NewJSStorageResourcesExceededError()),
			wantErr: protocol.ErrOverloaded, wantIn: "insufficient storage",
		},
		{
			name:    "server memory exhausted",
			give:    refused(natsserver.NewJSMemoryResourcesExceededError()),
			wantErr: protocol.ErrOverloaded, wantIn: "insufficient memory",
		},
		{
			name:    "account limits reached",
			give:    refused(natsserver.NewJSAccountResourcesExceededError()),
			wantErr: protocol.ErrOverloaded, wantIn: "resource limits exceeded",
		},
		{
			name:    "clustered stream without room",
			give:    refused(natsserver.NewJSInsufficientResourcesError()),
			wantErr: protocol.ErrOverloaded, wantIn: "insufficient resources",
		},
		{
			name:    "stream max message size lowered",
			give:    refused(natsserver.NewJSStreamMessageExceedsMaximumError()),
			wantErr: protocol.ErrBadRequest, wantIn: "raise the stream's limit",
		},
		{
			name:    "stream without per-message TTL",
			give:    refused(natsserver.NewJSMessageTTLDisabledError()),
			wantErr: protocol.ErrInternal, wantIn: "AllowMsgTTL",
		},
		{
			name:    "any other refusal",
			give:    refused(natsserver.NewJSStreamWrongLastSequenceError(3)),
			wantErr: protocol.ErrInternal, wantIn: "wrong last sequence",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := nats.NewMsg("_INBOX.x.1.a")
			m.Data = tt.give
			if tt.giveStatus != "" {
				m.Header.Set(statusHeader, tt.giveStatus)
			}
			err := checkAck("req-1", m)
			if tt.wantErr == nil {
				if err != nil {
					t.Fatalf("checkAck(%s) = %v, want nil", tt.give, err)
				}
				return
			}
			if !errors.Is(err, tt.wantErr) {
				t.Fatalf("checkAck(%s) = %v, want %v", tt.give, err, tt.wantErr)
			}
			var pe *protocol.Error
			if !errors.As(err, &pe) {
				t.Fatalf("checkAck(%s) = %T, want a *protocol.Error", tt.give, err)
			}
			if !strings.Contains(pe.Message, tt.wantIn) {
				t.Errorf("message %q does not mention %q", pe.Message, tt.wantIn)
			}
		})
	}
}

// An answer that is no PubAck is a decode error, not a fleet error: the
// caller sees that something other than the stream answered.
func TestCheckAckGarbage(t *testing.T) {
	for _, give := range []string{``, `not json`, `{"error":{"err_code":70000}}`, `[1]`} {
		m := nats.NewMsg("_INBOX.x.1.a")
		m.Data = []byte(give)
		err := checkAck("req-1", m)
		var pe *protocol.Error
		var se *json.SyntaxError
		var te *json.UnmarshalTypeError
		if err == nil || errors.As(err, &pe) || !(errors.As(err, &se) || errors.As(err, &te)) {
			t.Errorf("checkAck(%q) = %v, want a wrapped decode error", give, err)
		}
	}
}

// FuzzCheckAck: no answer on the PubAck subject crashes checkAck, and every
// one maps to nil (stored), a *protocol.Error with a known code and a
// message, or a wrapped JSON decode error.
//
//	go test -run='^$' -fuzz=FuzzCheckAck -fuzztime=30s ./pkg/client/
func FuzzCheckAck(f *testing.F) {
	for _, give := range [][]byte{
		[]byte(`{"stream":"ISODE","seq":7}`),
		[]byte(`{"stream":"ISODE","seq":7,"duplicate": true}`),
		[]byte(`{"stream":"ISODE","seq":7,"domain":"hub","duplicate":false}`),
		refused(natsserver.NewJSStreamStoreFailedError(natsserver.ErrMaxMsgs)),
		refused(natsserver.NewJSStreamDuplicateMessageConflictError()),
		refused(natsserver.NewJSMessageTTLDisabledError()),
		[]byte(`{"error":{"code":503,"err_code":65535}}`),
		[]byte(`{"error":{"err_code":70000}}`),
		[]byte(`{"error":null,"seq":-1}`),
		[]byte(`null`), []byte(`{}`), []byte(`[]`), []byte(`"x"`), []byte("\xff"), nil,
	} {
		f.Add(give, "")
	}
	f.Add([]byte(nil), statusNoResponders)
	f.Add([]byte(`{"stream":"ISODE","seq":1}`), statusNoResponders)
	f.Add([]byte(nil), "408")
	f.Fuzz(func(t *testing.T, data []byte, status string) {
		m := nats.NewMsg("_INBOX.x.1.a")
		m.Data = data
		if status != "" {
			m.Header.Set(statusHeader, status)
		}
		err := checkAck("req-1", m)
		if err == nil {
			return
		}
		if pe, ok := err.(*protocol.Error); ok {
			if !pe.Code.Known() || pe.Message == "" {
				t.Fatalf("checkAck(%q, status %q) = %#v: want a known code and a message", data, status, pe)
			}
			return
		}
		var se *json.SyntaxError
		var te *json.UnmarshalTypeError
		if (!errors.As(err, &se) && !errors.As(err, &te)) || errors.Unwrap(err) == nil {
			t.Fatalf("checkAck(%q, status %q) = %#v: neither nil, a *protocol.Error, nor a wrapped decode error", data, status, err)
		}
	})
}
