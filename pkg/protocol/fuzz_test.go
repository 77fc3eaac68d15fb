package protocol_test

import (
	"bytes"
	"encoding/json"
	"errors"
	"reflect"
	"strings"
	"testing"

	"github.com/isode-run/isode/pkg/protocol"
)

// FuzzDecodeRequest: no input crashes the decoder; every failure is a
// *protocol.Error with CodeBadRequest and a message; every success is a
// request that validates, has a valid isolate key and a timeout within
// (0, MaxTimeout], and comes back equal
// after json.Marshal and a second DecodeRequest.
//
//	go test -run='^$' -fuzz=FuzzDecodeRequest -fuzztime=30s ./pkg/protocol/
func FuzzDecodeRequest(f *testing.F) {
	for _, s := range []string{
		`{"v":1,"isolate_key":"t","code":"return function (cb) { cb(null, 1); }"}`,
		`{"v":1,"isolate_key":"tenant-1:a@b.c/d~e+f=g_h","code":"x","input":{"a":[1,2,{"b":null}]},"timeout_ms":100}`,
		` {"v":1,"isolate_key":"t","code":"x","input": [ 1 , "<&>" , 1e400 ] ,"timeout_ms":60000} `,
		`{"v":1,"isolate_key":"t","code":"x","input":null}`,
		`{"v":1,"isolate_key":"t","code":"x","input":"\u2028 \ud800 \u0000"}`,
		`{"V":1,"ISOLATE_KEY":"t","Code":"x","v":1}`,
		`{"v":1,"isolate_key":"t","code":"x","timeout_ms":-1}`,
		`{"v":1,"isolate_key":"t","code":"x","timeout_ms":60001}`,
		`{"v":1,"isolate_key":"t","code":"x","timeout_ms":1.5}`,
		`{"v":1,"isolate_key":"t","code":"x","timeout_ms":9223372036855}`,  // ×1e6 overflows to a negative Duration
		`{"v":1,"isolate_key":"t","code":"x","timeout_ms":18446744073710}`, // ×1e6 overflows to 448µs
		`{"v":1,"isolate_key":"a*","code":"x"}`,
		`{"v":1,"isolate_key":"t","code":"\ud800"}`,
		`{"v":1,"isolate_key":"t","code":"` + "\xff" + `"}`,
		`{"v":2,"isolate_key":"t","code":"x"}`,
		`{"v":1e400}`, `null`, `{}`, `[]`, `{"input":`, "\xff\xfe", ``, ` `,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		req, err := protocol.DecodeRequest(data)
		if err != nil {
			pe, ok := err.(*protocol.Error)
			if !ok || pe.Code != protocol.CodeBadRequest || pe.Message == "" {
				t.Fatalf("error %#v is not a *protocol.Error with code bad_request and a message", err)
			}
			if req != nil {
				t.Fatalf("a rejected request came back too: %+v", req)
			}
			return
		}
		if err := req.Validate(); err != nil {
			t.Fatalf("decoded request does not validate: %v", err)
		}
		if err := protocol.ValidateIsolateKey(req.IsolateKey); err != nil {
			t.Fatalf("decoded request has an invalid isolate key: %v", err)
		}
		if d := req.Timeout(); d <= 0 || d > protocol.MaxTimeout || req.TimeoutMs > protocol.MaxTimeout.Milliseconds() {
			t.Fatalf("decoded request has timeout_ms %d (Timeout() = %v), outside (0, %v]", req.TimeoutMs, d, protocol.MaxTimeout)
		}

		again, err := json.Marshal(req)
		if err != nil {
			t.Fatalf("re-encode: %v", err)
		}
		back, err := protocol.DecodeRequest(again)
		if err != nil {
			// json.Marshal escapes <, > and & (and U+2028/9) as \u00XX, so
			// a request accepted near a byte limit may be over it once
			// re-encoded. Nothing else may make it fail.
			input, _ := json.Marshal(req.Input)
			if errors.Is(err, protocol.ErrBadRequest) && strings.Contains(err.Error(), "over the limit") &&
				(len(again) > protocol.MaxRequestBytes || len(input) > protocol.MaxInputBytes) {
				return
			}
			t.Fatalf("re-encoded request %s does not decode: %v", again, err)
		}
		if back.V != req.V || back.IsolateKey != req.IsolateKey || back.Code != req.Code || back.TimeoutMs != req.TimeoutMs {
			t.Fatalf("round trip changed the request:\n got %+v\nwant %+v", back, req)
		}
		if !sameJSON(t, back.Input, req.Input) {
			t.Fatalf("round trip changed the input: %s became %s", req.Input, back.Input)
		}
	})
}

// sameJSON reports whether a and b are both absent or the same JSON value
// (json.Marshal compacts and escapes a RawMessage, so bytes may differ).
func sameJSON(t *testing.T, a, b json.RawMessage) bool {
	t.Helper()
	if len(a) == 0 || len(b) == 0 {
		return len(a) == len(b)
	}
	decode := func(raw json.RawMessage) any {
		d := json.NewDecoder(bytes.NewReader(raw))
		d.UseNumber()
		var v any
		if err := d.Decode(&v); err != nil {
			t.Fatalf("input %s validated but does not decode: %v", raw, err)
		}
		return v
	}
	return reflect.DeepEqual(decode(a), decode(b))
}
