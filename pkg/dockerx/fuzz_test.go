package dockerx

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"testing/iotest"
)

// Frames come from containers that run tenants' code: the decoder and the
// frame reader are fuzzed with hostile input.
//
//	go test -run='^$' -fuzz=FuzzDecodeReply -fuzztime=30s ./pkg/dockerx/
//	go test -run='^$' -fuzz=FuzzFrameReader -fuzztime=30s ./pkg/dockerx/
//
// Without -fuzz, go test runs the seeds below as ordinary tests.

func FuzzDecodeReply(f *testing.F) {
	deep := strings.Repeat("[", 10001) + strings.Repeat("]", 10001)
	for _, s := range []string{
		// What an agent sends.
		`{"id":1,"result":{"a":1},"console":"x","console_truncated":false}`,
		`{"id":2,"result":null,"console":""}`,
		`{"id":3,"error":{"code":"timeout","message":"slow"},"console":"","console_truncated":true}`,
		`{"id":4,"error":{"code":"code_error","message":"` + strings.Repeat("é", 5000) + `"}}`,
		`{"id":5,"result":{"ready":true,"node":"20.20.2","workers":1,"busy":0,"queued":0,"runs":1}}`,
		`{"id":18446744073709551615,"result":"\ud800\u2028<>&"}`,
		// Duplicate and case-folded keys.
		`{"id":3,"result":1,"id":7}`,
		`{"id":3,"result":1,"ID":7}`,
		`{"id":3,"error":{"code":"internal","message":"","code":"timeout"}}`,
		`{"id":3,"error":{"code":"internal","message":"","Message":"x"}}`,
		`{"id":1,"result":1,"console":"a","console":"b","console_truncated":true,"console_truncated":false}`,
		// Wrong types and nulls.
		`{"id":"7","result":1}`, `{"id":-1,"result":1}`, `{"id":1.5,"result":1}`, `{"id":null,"result":1}`,
		`{"id":1,"result":1,"console":5}`, `{"id":1,"result":1,"console_truncated":"yes"}`,
		`{"id":1,"error":[]}`, `{"id":1,"error":null,"result":1}`, `{"id":1,"error":{"code":1,"message":""}}`,
		// Trailing bytes, several values, nothing.
		`{"id":1,"result":1} {}`, `{"id":1,"result":1}x`, `{"id":1,"result":1 2}`, ``, `null`, `[{"id":1}]`,
		// Huge numbers and deep nesting.
		`{"id":99999999999999999999999999,"result":1}`, `{"id":1,"result":1e999999}`,
		`{"id":1,"result":` + deep + `}`, `{"id":1,"result":` + deep[:10000] + deep[10001:20001] + `}`,
		`{"id":1,"error":{"code":"timeout","message":` + deep + `}}`,
		// Usage, well-formed and not.
		`{"id":6,"result":1,"console":"","console_truncated":false,"usage":{"cpu_ns":123456,"rss":73699328,"peak_rss":73957376}}`,
		`{"id":6,"error":{"code":"timeout","message":"slow"},"usage":{"cpu_ns":null,"rss":0,"peak_rss":0}}`,
		`{"id":6,"result":1,"usage":{"cpu_ns":1,"rss":0,"peak_rss":0,"CPU_NS":0}}`,
		`{"id":6,"result":1,"usage":{"cpu_ns":-1,"rss":0,"peak_rss":0}}`,
		`{"id":6,"result":1,"usage":{"cpu_ns":1e3,"rss":0,"peak_rss":0}}`,
		`{"id":6,"result":1,"Usage":{"cpu_ns":1,"rss":0,"peak_rss":0}}`,
		// Not UTF-8.
		"{\"id\":1,\"result\":\"\xff\"}", "{\"id\":1,\"result\":1,\"\xc3\":1}",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		r, err := decodeReply(body)
		if err != nil {
			if !errors.Is(err, errViolation) {
				t.Fatalf("error %v is not a violation", err)
			}
			if r != nil {
				t.Fatalf("a reply with the error %v", err)
			}
			return
		}
		checkReply(t, r)
		// Accepted frames mean the same to a plain decoder, which keeps the
		// last duplicate and folds case: none may be there to find.
		var plain agentReply
		if err := json.Unmarshal(body, &plain); err == nil { // it stops 10000 levels deep, counted from the frame
			if plain.ID == nil || *plain.ID != *r.ID || !bytes.Equal(compact(t, plain.Result), compact(t, r.Result)) || !sameUsage(plain.Usage, r.Usage) {
				t.Fatalf("a plain decoder reads %s differently", body)
			}
		}
		// Re-encoded, the reply decodes to itself.
		again, err := json.Marshal(r)
		if err != nil {
			t.Fatalf("re-encode %+v: %v", r, err)
		}
		r2, err := decodeReply(again)
		if err != nil {
			t.Fatalf("re-encoded reply %s: %v", again, err)
		}
		if *r2.ID != *r.ID || (r2.Error == nil) != (r.Error == nil) || r2.Console != r.Console || r2.ConsoleTruncated != r.ConsoleTruncated || !sameUsage(r2.Usage, r.Usage) {
			t.Fatalf("re-encoded reply %s decodes to %+v, not %+v", again, r2, r)
		}
	})
}

// checkReply asserts what decodeReply promises of a reply it accepts.
func checkReply(t *testing.T, r *agentReply) {
	t.Helper()
	if r.ID == nil {
		t.Fatal("accepted a reply without an id")
	}
	if (r.Result == nil) == (r.Error == nil) {
		t.Fatalf("accepted reply %d with result %q and error %v", *r.ID, r.Result, r.Error)
	}
	if r.Error != nil {
		if !agentCodes[r.Error.Code] {
			t.Fatalf("accepted error code %q", r.Error.Code)
		}
		if len(r.Error.Message) > maxMessageBytes {
			t.Fatalf("accepted a message of %d bytes", len(r.Error.Message))
		}
	}
	if u := r.Usage; u != nil {
		if u.CPUNanos != nil && (*u.CPUNanos < 0 || *u.CPUNanos > maxUsageCPUNanos) || u.RSS < 0 || u.RSS > maxUsageBytes || u.PeakRSS < 0 || u.PeakRSS > maxUsageBytes {
			t.Fatalf("accepted usage %+v out of bounds", *u)
		}
	}
	if r.Result != nil && !json.Valid(r.Result) {
		t.Fatalf("accepted result %q, not one JSON value", r.Result)
	}
}

func compact(t *testing.T, raw json.RawMessage) []byte {
	if raw == nil {
		return nil
	}
	var b bytes.Buffer
	if err := json.Compact(&b, raw); err != nil {
		t.Fatalf("compact %q: %v", raw, err)
	}
	return b.Bytes()
}

func FuzzFrameReader(f *testing.F) {
	cat := func(bodies ...string) []byte {
		var b []byte
		for _, s := range bodies {
			b = append(b, frame(s)...)
		}
		return b
	}
	f.Add(cat(`{"id":1,"result":1}`, `{"id":2,"result":2}`), uint16(64), []byte{1, 2, 3})
	f.Add(cat(strings.Repeat("x", 300), "y"), uint16(300), []byte{7})
	f.Add(cat(strings.Repeat("x", 301)), uint16(300), []byte{0, 255})
	f.Add(append(cat("ok"), 0, 0, 0, 0), uint16(10), []byte{5})
	f.Add([]byte{0x7f, 0xff, 0xff, 0xff, 1}, uint16(1000), []byte{2})
	f.Add(append(cat("a", "bc"), 0, 0, 1), uint16(4), []byte{1, 1, 1, 1, 9})
	f.Fuzz(func(t *testing.T, stream []byte, max uint16, cuts []byte) {
		limit := int(max)%2048 + 1
		want, wantErr := referenceFrames(stream, limit)

		// Docker's stdout chunks, of sizes taken from cuts, read through
		// a reader that returns short reads.
		fr := frameReader{max: limit}
		r := iotest.HalfReader(bytes.NewReader(stream))
		var got [][]byte
		var err error
		for off, i := 0, 0; off < len(stream) && err == nil; i++ {
			n := len(stream) - off
			if len(cuts) > 0 {
				n = min(n, int(cuts[i%len(cuts)])+1)
			}
			err = fr.readFrom(r, n, func(body []byte) error {
				if len(body) == 0 || len(body) > limit {
					t.Fatalf("a frame of %d bytes, limit %d", len(body), limit)
				}
				got = append(got, bytes.Clone(body))
				return nil
			})
			off += n
		}
		if err != nil && !errors.Is(err, errViolation) {
			t.Fatalf("error %v is not a violation", err)
		}
		if (err != nil) != wantErr || len(got) != len(want) {
			t.Fatalf("got %d frames and error %v; want %d frames, error %v", len(got), err, len(want), wantErr)
		}
		for i := range want {
			if !bytes.Equal(got[i], want[i]) {
				t.Fatalf("frame %d: got %q, want %q", i, got[i], want[i])
			}
		}
	})
}

// referenceFrames cuts a whole stream into frames the plain way, and says
// whether it breaks the framing (a length of zero or over limit) before
// its end. A frame cut short by the end is not returned.
func referenceFrames(stream []byte, limit int) ([][]byte, bool) {
	var frames [][]byte
	for len(stream) >= 4 {
		n := int(binary.BigEndian.Uint32(stream))
		if n == 0 || n > limit {
			return frames, true
		}
		if len(stream) < 4+n {
			break
		}
		frames = append(frames, stream[4:4+n])
		stream = stream[4+n:]
	}
	return frames, false
}

// sameUsage reports whether two decoded usage objects say the same.
func sameUsage(a, b *agentUsage) bool {
	if a == nil || b == nil {
		return a == b
	}
	if (a.CPUNanos == nil) != (b.CPUNanos == nil) || a.CPUNanos != nil && *a.CPUNanos != *b.CPUNanos {
		return false
	}
	return a.RSS == b.RSS && a.PeakRSS == b.PeakRSS
}
