package protocol_test

import (
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/isode-run/isode/pkg/protocol"
)

func TestShardIsFNV1a32(t *testing.T) {
	// Reference values of FNV-1a 32 (from the FNV specification's test
	// vectors), so that clients in other languages can check themselves.
	tests := []struct {
		key  string
		hash uint32
	}{
		{"a", 0xe40c292c},
		{"foobar", 0xbf9cf968},
	}
	for _, tt := range tests {
		if got := protocol.Shard(tt.key, 1<<31); got != int(tt.hash%(1<<31)) {
			t.Errorf("Shard(%q) = %d, want %d", tt.key, got, tt.hash%(1<<31))
		}
		if got := protocol.Shard(tt.key, 64); got != int(tt.hash%64) {
			t.Errorf("Shard(%q, 64) = %d, want %d", tt.key, got, tt.hash%64)
		}
	}
}

func TestSubjects(t *testing.T) {
	if s := protocol.RunSubject("isode", 7); s != "isode.run.7" {
		t.Errorf("RunSubject = %q", s)
	}
	for _, tt := range []struct {
		subject string
		shard   int
		ok      bool
	}{
		{"isode.run.7", 7, true},
		{"isode.run.0", 0, true},
		{"isode.run.07", 0, false},
		{"isode.run.-1", 0, false},
		{"isode.run.", 0, false},
		{"isode.run.1.2", 0, false},
		{"other.run.1", 0, false},
	} {
		shard, ok := protocol.ParseRunSubject("isode", tt.subject)
		if ok != tt.ok || shard != tt.shard {
			t.Errorf("ParseRunSubject(%q) = %d, %v", tt.subject, shard, ok)
		}
	}
	if n := protocol.ConsumerName("a.b", 3); n != "a_b-shard-3" {
		t.Errorf("ConsumerName = %q", n)
	}
	if n := protocol.StreamName("a.b"); n != "A_B" {
		t.Errorf("StreamName = %q", n)
	}
}

func TestValidateIsolateKey(t *testing.T) {
	tests := []struct {
		give    string
		wantErr bool
	}{
		{"tenant1", false},
		{"acme.com/user:42@eu-1+x=y~z_", false},
		{strings.Repeat("k", protocol.MaxIsolateKeyBytes), false},
		{"", true},
		{strings.Repeat("k", protocol.MaxIsolateKeyBytes+1), true},
		{"a b", true},
		{"a\x00b", true},
		{"a\nb", true},
		{"a*", true},
		{"a>", true},
		{"ténant", true},
	}
	for _, tt := range tests {
		err := protocol.ValidateIsolateKey(tt.give)
		if (err != nil) != tt.wantErr {
			t.Errorf("ValidateIsolateKey(%q) = %v", tt.give, err)
		}
		if err != nil && !errors.Is(err, protocol.ErrBadRequest) {
			t.Errorf("ValidateIsolateKey(%q) error %v is not a bad request", tt.give, err)
		}
	}
}

func TestDecodeRequest(t *testing.T) {
	tests := []struct {
		name    string
		give    string
		wantErr string
	}{
		{"ok", `{"v":1,"isolate_key":"t","code":"return 1"}`, ""},
		{"ok with input and timeout", `{"v":1,"isolate_key":"t","code":"x","input":{"a":1},"timeout_ms":500}`, ""},
		{"unknown fields ignored", `{"v":1,"isolate_key":"t","code":"x","extra":true}`, ""},
		{"empty", ``, "empty"},
		{"array", `[]`, "not a JSON object"},
		{"truncated", `{"v":1`, "not valid JSON"},
		{"missing v", `{"isolate_key":"t","code":"x"}`, "field v is missing"},
		{"future v", `{"v":2,"isolate_key":"t","code":"x"}`, "unsupported protocol version 2"},
		{"missing key", `{"v":1,"code":"x"}`, "isolate_key is empty"},
		{"missing code", `{"v":1,"isolate_key":"t"}`, "code is empty"},
		{"wrong type", `{"v":"1","isolate_key":"t","code":"x"}`, "not valid JSON"},
		{"negative timeout", `{"v":1,"isolate_key":"t","code":"x","timeout_ms":-1}`, "negative"},
		{"timeout over max", `{"v":1,"isolate_key":"t","code":"x","timeout_ms":60001}`, "over the maximum"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			req, err := protocol.DecodeRequest([]byte(tt.give))
			if tt.wantErr == "" {
				if err != nil {
					t.Fatalf("err = %v", err)
				}
				if req.IsolateKey != "t" {
					t.Fatalf("req = %+v", req)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("err = %v, want it to say %q", err, tt.wantErr)
			}
			if protocol.CodeOf(err) != protocol.CodeBadRequest {
				t.Fatalf("code = %s", protocol.CodeOf(err))
			}
		})
	}
	big := fmt.Sprintf(`{"v":1,"isolate_key":"t","code":%q}`, strings.Repeat("x", protocol.MaxRequestBytes))
	if _, err := protocol.DecodeRequest([]byte(big)); err == nil || !strings.Contains(err.Error(), "over the limit") {
		t.Fatalf("oversized request: %v", err)
	}
}

func TestErrorMatching(t *testing.T) {
	mine := &protocol.Error{Code: protocol.CodeOverloaded, Message: "my queue is full"}
	wrapped := fmt.Errorf("acquire: %w", mine)
	if !errors.Is(wrapped, protocol.ErrOverloaded) {
		t.Error("a coded error does not match its code's sentinel")
	}
	if !errors.Is(wrapped, mine) {
		t.Error("a sentinel with a message does not match itself")
	}
	other := &protocol.Error{Code: protocol.CodeOverloaded, Message: "another queue"}
	if errors.Is(wrapped, other) {
		t.Error("two sentinels with messages of the same code match each other")
	}
	if errors.Is(wrapped, protocol.ErrTimeout) {
		t.Error("matched another code")
	}
	if pe := protocol.AsError(wrapped); pe.Message != "my queue is full" {
		t.Errorf("AsError kept %q", pe.Message)
	}
	if pe := protocol.AsError(fmt.Errorf("pool: %w", protocol.ErrOverloaded)); pe.Code != protocol.CodeOverloaded || pe.Message != "pool" {
		t.Errorf("AsError of a wrapped bare sentinel = %+v", pe)
	}
	if pe := protocol.AsError(errors.New("disk on fire")); pe.Code != protocol.CodeInternal || pe.Message != "disk on fire" {
		t.Errorf("AsError of a plain error = %+v", pe)
	}
	if protocol.AsError(nil) != nil {
		t.Error("AsError(nil) != nil")
	}
	seen := map[int]protocol.Code{}
	for _, c := range protocol.Codes {
		if !c.Known() {
			t.Errorf("%s not known", c)
		}
		if prev, dup := seen[c.Status()]; dup {
			t.Errorf("%s and %s share status %d", c, prev, c.Status())
		}
		seen[c.Status()] = c
	}
}

func TestReplyJSON(t *testing.T) {
	// Falsy results survive the round trip as themselves.
	for _, v := range []string{`0`, `false`, `""`, `null`} {
		data, err := json.Marshal(&protocol.Reply{V: 1, ID: "x", Result: json.RawMessage(v)})
		if err != nil {
			t.Fatal(err)
		}
		var back protocol.Reply
		if err := json.Unmarshal(data, &back); err != nil {
			t.Fatal(err)
		}
		if string(back.Result) != v || back.Validate() != nil {
			t.Errorf("%s came back as %s (%v)", v, back.Result, back.Validate())
		}
	}
	bad := protocol.Reply{V: 1, ID: "x"}
	if bad.Validate() == nil {
		t.Error("a reply with neither result nor error validated")
	}
}

func TestCallSubjectAndServiceName(t *testing.T) {
	if s := protocol.CallSubject("isode"); s != "isode.call" {
		t.Errorf("CallSubject = %q", s)
	}
	for give, want := range map[string]string{"isode": "isode", "a.b": "a_b", "x-y_Z9": "x-y_Z9", "é*": "__"} {
		if got := protocol.ServiceName(give); got != want {
			t.Errorf("ServiceName(%q) = %q, want %q", give, got, want)
		}
	}
}
