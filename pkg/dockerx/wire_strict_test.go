package dockerx

import (
	"encoding/json"
	"errors"
	"strings"
	"testing"

	"github.com/isode-run/isode/pkg/protocol"
)

// TestDecodeReplyStrict: frames a strict agent never sends are violations,
// in particular those that encoding/json alone would accept.
func TestDecodeReplyStrict(t *testing.T) {
	big := `"` + strings.Repeat("x", 512<<10) + `"`
	tests := []struct {
		name    string
		give    string
		wantErr string // a violation's text
	}{
		// encoding/json keeps the last of duplicate keys.
		{name: "duplicate id", give: `{"id":3,"result":1,"id":7}`, wantErr: `duplicate key "id"`},
		{name: "duplicate id after a large result", give: `{"id":3,"result":` + big + `,"id":7}`, wantErr: `duplicate key "id"`},
		{name: "duplicate result", give: `{"id":3,"result":1,"result":2}`, wantErr: `duplicate key "result"`},
		{name: "duplicate console", give: `{"id":3,"result":1,"console":"a","console":"b"}`, wantErr: `duplicate key "console"`},
		{name: "duplicate console_truncated", give: `{"id":3,"result":1,"console_truncated":false,"console_truncated":true}`, wantErr: "duplicate key"},
		{name: "duplicate error", give: `{"id":3,"error":{"code":"timeout","message":""},"error":{"code":"internal","message":""}}`, wantErr: `duplicate key "error"`},
		{name: "duplicate error code", give: `{"id":3,"error":{"code":"internal","message":"","code":"timeout"}}`, wantErr: `duplicate key "code"`},
		{name: "duplicate error message", give: `{"id":3,"error":{"code":"timeout","message":"a","message":"b"}}`, wantErr: `duplicate key "message"`},
		// Keys differing only in case: encoding/json matches them case-insensitively.
		{name: "id in capitals", give: `{"id":3,"result":1,"ID":7}`, wantErr: `unknown field "ID"`},
		{name: "code in capitals", give: `{"id":3,"error":{"code":"timeout","message":"","Code":"internal"}}`, wantErr: `unknown field "Code"`},
		// Wrong types, several of which encoding/json passes over.
		{name: "console a number", give: `{"id":1,"result":1,"console":5}`, wantErr: "console is not a string"},
		{name: "console null", give: `{"id":1,"result":1,"console":null}`, wantErr: "console is not a string"},
		{name: "id a string", give: `{"id":"7","result":1}`, wantErr: "not an integer"},
		{name: "id negative", give: `{"id":-1,"result":1}`, wantErr: "not an integer"},
		{name: "id a fraction", give: `{"id":1.5,"result":1}`, wantErr: "not an integer"},
		{name: "id with an exponent", give: `{"id":1e2,"result":1}`, wantErr: "not an integer"},
		{name: "id too large", give: `{"id":18446744073709551616,"result":1}`, wantErr: "not an integer"},
		{name: "id null", give: `{"id":null,"result":1}`, wantErr: "not an integer"},
		{name: "console_truncated a string", give: `{"id":1,"result":1,"console_truncated":"yes"}`, wantErr: "not a boolean"},
		{name: "console_truncated a number", give: `{"id":1,"result":1,"console_truncated":1}`, wantErr: "not a boolean"},
		{name: "console_truncated null", give: `{"id":1,"result":1,"console_truncated":null}`, wantErr: "not a boolean"},
		{name: "error an array", give: `{"id":1,"error":[]}`, wantErr: "error is not an object"},
		{name: "error null", give: `{"id":1,"result":1,"error":null}`, wantErr: "error is not an object"},
		{name: "error code a number", give: `{"id":1,"error":{"code":1,"message":""}}`, wantErr: "code is not a string"},
		{name: "error message null", give: `{"id":1,"error":{"code":"timeout","message":null}}`, wantErr: "message is not a string"},
		{name: "error without message", give: `{"id":1,"error":{"code":"timeout"}}`, wantErr: "lacks its code or message"},
		{name: "error with an extra field", give: `{"id":1,"error":{"code":"timeout","message":"","x":1}}`, wantErr: "unknown field"},
		// result is exactly one JSON value.
		{name: "result of two values", give: `{"id":1,"result":1 2}`, wantErr: "not a reply"},
		{name: "result spliced", give: `{"id":1,"result":1,"id":7,"console":""}`, wantErr: "duplicate key"},
		{name: "result missing", give: `{"id":1,"result":}`, wantErr: "not a reply"},
		{name: "nested too deep", give: `{"id":1,"result":` + strings.Repeat("[", 10001) + strings.Repeat("]", 10001) + `}`, wantErr: "not a reply"},
		// The object itself.
		{name: "trailing object", give: `{"id":1,"result":1}{"id":2,"result":2}`, wantErr: "after its JSON"},
		{name: "trailing garbage", give: `{"id":1,"result":1}x`, wantErr: "after its JSON"},
		{name: "unclosed", give: `{"id":1,"result":1`, wantErr: "not a reply"},
		{name: "missing comma", give: `{"id":1 "result":1}`, wantErr: "not a reply"},
		{name: "closed by a bracket", give: `{"id":1,"result":1]`, wantErr: "not a reply"},
		{name: "a string", give: `"id"`, wantErr: "not a JSON object"},
		{name: "empty", give: ``, wantErr: "not a reply"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r, err := decodeReply([]byte(tt.give))
			if !errors.Is(err, errViolation) || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("got %+v, %v; want a violation containing %q", r, err, tt.wantErr)
			}
		})
	}
}

// TestDecodeReplyAccepts: what the agent sends, however it is spaced.
func TestDecodeReplyAccepts(t *testing.T) {
	tests := []struct {
		name string
		give string
		want agentReply
	}{
		{name: "spaced", give: " {\n \"id\" : 7 , \"result\" : [ 1 , 2 ] , \"console\" : \"a\" , \"console_truncated\" : true } \n",
			want: agentReply{ID: ptr(uint64(7)), Result: json.RawMessage(`[ 1 , 2 ]`), Console: "a", ConsoleTruncated: true}},
		{name: "largest id", give: `{"id":18446744073709551615,"result":"x"}`,
			want: agentReply{ID: ptr(uint64(1<<64 - 1)), Result: json.RawMessage(`"x"`)}},
		{name: "keys inside the result are the result's", give: `{"id":1,"result":{"id":7,"id":8,"error":null}}`,
			want: agentReply{ID: ptr(uint64(1)), Result: json.RawMessage(`{"id":7,"id":8,"error":null}`)}},
		{name: "error in any key order", give: `{"console":"c","error":{"message":"m\u00e9","code":"code_error"},"id":0}`,
			want: agentReply{ID: ptr(uint64(0)), Error: &protocol.Error{Code: "code_error", Message: "mé"}, Console: "c"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r, err := decodeReply([]byte(tt.give))
			if err != nil {
				t.Fatal(err)
			}
			got, _ := json.Marshal(r)
			want, _ := json.Marshal(tt.want)
			if string(got) != string(want) {
				t.Fatalf("got %s, want %s", got, want)
			}
		})
	}
}

func ptr[T any](v T) *T { return &v }

// BenchmarkDecodeReply: a result at the default limit (512 KiB), as one
// string and as many small objects.
func BenchmarkDecodeReply(b *testing.B) {
	var objs strings.Builder
	objs.WriteString("[")
	for objs.Len() < 512<<10-64 {
		if objs.Len() > 1 {
			objs.WriteString(",")
		}
		objs.WriteString(`{"i":12345,"s":"xxxxxxxxxx"}`)
	}
	objs.WriteString("]")
	for _, bb := range []struct{ name, result string }{
		{"string", `"` + strings.Repeat("x", 512<<10-2) + `"`},
		{"objects", objs.String()},
		{"small", `{"a":1}`},
	} {
		body := []byte(`{"id":12,"result":` + bb.result + `,"console":"hello\n","console_truncated":false}`)
		b.Run(bb.name, func(b *testing.B) {
			b.SetBytes(int64(len(body)))
			for b.Loop() {
				if _, err := decodeReply(body); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
