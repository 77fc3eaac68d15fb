package dockerx

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"strings"
	"testing"
	"testing/iotest"
)

func TestDecodeReply(t *testing.T) {
	tests := []struct {
		name    string
		give    string
		want    string // Result JSON, or "error:<code>" for an agent error
		wantErr string // a violation's text
	}{
		{name: "result", give: `{"id":1,"result":{"a":1},"console":"x","console_truncated":false}`, want: `{"a":1}`},
		{name: "null result", give: `{"id":2,"result":null,"console":""}`, want: `null`},
		{name: "falsy result", give: `{"id":2,"result":0}`, want: `0`},
		{name: "agent error", give: `{"id":3,"error":{"code":"timeout","message":"slow"},"console":""}`, want: "error:timeout"},
		{name: "no id", give: `{"result":1}`, wantErr: "no id"},
		{name: "both", give: `{"id":1,"result":1,"error":{"code":"timeout","message":""}}`, wantErr: "exactly one"},
		{name: "neither", give: `{"id":1,"console":""}`, wantErr: "exactly one"},
		{name: "forged code", give: `{"id":1,"error":{"code":"sandbox_crashed","message":"x"}}`, wantErr: "error code"},
		{name: "unknown field", give: `{"id":1,"result":1,"extra":true}`, wantErr: "not a reply"},
		{name: "not json", give: `hello`, wantErr: "not a reply"},
		{name: "trailing bytes", give: `{"id":1,"result":1} {}`, wantErr: "after its JSON"},
		{name: "array", give: `[1]`, wantErr: "not a reply"},
		{name: "negative id", give: `{"id":-1,"result":1}`, wantErr: "not a reply"},
		{name: "bad utf8", give: "{\"id\":1,\"result\":\"\xff\"}", wantErr: "UTF-8"},
		{name: "usage", give: `{"id":1,"result":1,"usage":{"cpu_ns":1500,"rss":1048576,"peak_rss":2097152}}`, want: `1`},
		{name: "usage without cpu", give: `{"id":1,"result":1,"usage":{"cpu_ns":null,"rss":0,"peak_rss":0}}`, want: `1`},
		{name: "usage negative cpu", give: `{"id":1,"result":1,"usage":{"cpu_ns":-1,"rss":0,"peak_rss":0}}`, wantErr: "cpu_ns -1"},
		{name: "usage fractional", give: `{"id":1,"result":1,"usage":{"cpu_ns":1.5,"rss":0,"peak_rss":0}}`, wantErr: "cpu_ns 1.5"},
		{name: "usage exponent", give: `{"id":1,"result":1,"usage":{"cpu_ns":1e9,"rss":0,"peak_rss":0}}`, wantErr: "cpu_ns 1e9"},
		{name: "usage huge", give: `{"id":1,"result":1,"usage":{"cpu_ns":0,"rss":1099511627777,"peak_rss":0}}`, wantErr: "rss 1099511627777"},
		{name: "usage string", give: `{"id":1,"result":1,"usage":{"cpu_ns":"5","rss":0,"peak_rss":0}}`, wantErr: "cpu_ns"},
		{name: "usage null rss", give: `{"id":1,"result":1,"usage":{"cpu_ns":0,"rss":null,"peak_rss":0}}`, wantErr: "rss null"},
		{name: "usage missing key", give: `{"id":1,"result":1,"usage":{"cpu_ns":0,"rss":0}}`, wantErr: "lacks"},
		{name: "usage extra key", give: `{"id":1,"result":1,"usage":{"cpu_ns":0,"rss":0,"peak_rss":0,"wall_ns":0}}`, wantErr: "unknown field"},
		{name: "usage duplicate key", give: `{"id":1,"result":1,"usage":{"cpu_ns":9,"rss":0,"peak_rss":0,"cpu_ns":0}}`, wantErr: "duplicate key"},
		{name: "usage twice", give: `{"id":1,"result":1,"usage":{"cpu_ns":9,"rss":0,"peak_rss":0},"usage":{"cpu_ns":0,"rss":0,"peak_rss":0}}`, wantErr: "duplicate key"},
		{name: "usage not an object", give: `{"id":1,"result":1,"usage":[1,2,3]}`, wantErr: "not an object"},
		{name: "usage null", give: `{"id":1,"result":1,"usage":null}`, wantErr: "not an object"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r, err := decodeReply([]byte(tt.give))
			if tt.wantErr != "" {
				if !errors.Is(err, errViolation) || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("got %v, want a violation containing %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("unexpected error %v", err)
			}
			got := string(r.Result)
			if r.Error != nil {
				got = "error:" + string(r.Error.Code)
			}
			if got != tt.want {
				t.Fatalf("got %s, want %s", got, tt.want)
			}
		})
	}
}

func frame(body string) []byte {
	b := make([]byte, 4+len(body))
	binary.BigEndian.PutUint32(b, uint32(len(body)))
	copy(b[4:], body)
	return b
}

func TestFrameReaderSplitsAnywhere(t *testing.T) {
	bodies := []string{`{"id":1,"result":1}`, strings.Repeat("x", 70<<10), `{"id":2}`}
	var stream []byte
	for _, b := range bodies {
		stream = append(stream, frame(b)...)
	}
	// Feed the stream in Docker chunks of every size from 1 to 9 bytes,
	// read one byte at a time: frames must come out whole and in order.
	for chunk := 1; chunk <= 9; chunk++ {
		fr := frameReader{max: 1 << 20}
		var got []string
		r := iotest.OneByteReader(bytes.NewReader(stream))
		for off := 0; off < len(stream); off += chunk {
			n := min(chunk, len(stream)-off)
			err := fr.readFrom(r, n, func(b []byte) error { got = append(got, string(b)); return nil })
			if err != nil {
				t.Fatalf("chunk %d: %v", chunk, err)
			}
		}
		if len(got) != len(bodies) {
			t.Fatalf("chunk %d: got %d frames, want %d", chunk, len(got), len(bodies))
		}
		for i := range bodies {
			if got[i] != bodies[i] {
				t.Fatalf("chunk %d: frame %d differs", chunk, i)
			}
		}
	}
}

func TestFrameReaderRejects(t *testing.T) {
	tests := []struct {
		name string
		give []byte
		want string
	}{
		{name: "oversize", give: []byte{0x7f, 0xff, 0xff, 0xff}, want: "over the limit"},
		{name: "empty", give: []byte{0, 0, 0, 0}, want: "empty frame"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			fr := frameReader{max: 1024}
			err := fr.readFrom(bytes.NewReader(tt.give), len(tt.give), func([]byte) error { return nil })
			if !errors.Is(err, errViolation) || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("got %v, want a violation containing %q", err, tt.want)
			}
		})
	}
	fr := frameReader{max: 1024}
	err := fr.readFrom(bytes.NewReader([]byte{0, 0}), 4, func([]byte) error { return nil })
	if !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Fatalf("short stream: got %v, want unexpected EOF", err)
	}
}

func TestTailKeepsTheEnd(t *testing.T) {
	tl := tail{max: 8}
	tl.Write([]byte("hello "))
	tl.Write([]byte("world"))
	if got := tl.String(); got != "lo world" {
		t.Fatalf("got %q", got)
	}
	tl.Write([]byte(strings.Repeat("z", 20) + "END"))
	if got := tl.String(); got != "zzzzzEND" {
		t.Fatalf("got %q", got)
	}
}

func TestEncodeFrame(t *testing.T) {
	f, err := encodeFrame(agentRequest{ID: 7, Op: "run", Code: "a<b", TimeoutMs: 5})
	if err != nil {
		t.Fatal(err)
	}
	if n := binary.BigEndian.Uint32(f); int(n) != len(f)-4 {
		t.Fatalf("length %d, body %d", n, len(f)-4)
	}
	if want := `{"id":7,"op":"run","code":"a<b","timeout_ms":5}`; string(f[4:]) != want {
		t.Fatalf("got %s, want %s", f[4:], want)
	}
}

func TestExitReason(t *testing.T) {
	tests := []struct {
		name   string
		code   int
		oom    bool
		stderr string
		want   string
	}{
		{"oom kill", 137, true, "", "out_of_memory"},
		{"heap abort", 134, false, "FATAL ERROR: Reached heap limit Allocation failed - JavaScript heap out of memory", "out_of_memory"},
		{"plain abort", 134, false, "", "sandbox_crashed"},
		{"docker kill", 137, false, "", "sandbox_crashed"},
		{"exit 1", 1, false, "isode-agent: boom\n", "sandbox_crashed"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := exitReason(tt.code, tt.oom, tt.stderr, 128*MiB); string(got.Code) != tt.want {
				t.Fatalf("got %v, want %s", got, tt.want)
			}
		})
	}
}
