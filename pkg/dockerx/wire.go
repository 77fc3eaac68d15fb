package dockerx

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"slices"
	"strconv"
	"unicode/utf8"

	"github.com/isode-run/isode/pkg/protocol"
)

// The agent protocol (sandbox/agent.js): frames of a 4-byte big-endian
// length and a JSON object, requests and replies matched by id.

// agentRequest is a frame to the agent.
type agentRequest struct {
	ID        uint64          `json:"id"`
	Op        string          `json:"op"`
	Code      string          `json:"code,omitempty"`
	Input     json.RawMessage `json:"input,omitempty"`
	TimeoutMs int64           `json:"timeout_ms,omitempty"`
	// LimitMs is the limit the caller sees (TimeoutMs is that less the
	// margin for the reply's trip): the agent names it in timeout errors.
	LimitMs         int64 `json:"limit_ms,omitempty"`
	MaxResultBytes  int   `json:"max_result_bytes,omitempty"`
	MaxConsoleBytes int   `json:"max_console_bytes,omitempty"`
}

// agentReply is a frame from the agent. decodeReply fills it; the tags
// say how an agent encodes one (exactly one of Result and Error).
type agentReply struct {
	ID               *uint64         `json:"id"`
	Result           json.RawMessage `json:"result,omitempty"`
	Error            *protocol.Error `json:"error,omitempty"`
	Console          string          `json:"console"`
	ConsoleTruncated bool            `json:"console_truncated"`
	// Usage is what the agent measured of a run (absent on pings).
	Usage *agentUsage `json:"usage,omitempty"`
}

// agentUsage is the agent's measure of a run: its snippet thread's CPU
// time (nil when it could not be read) and the sandbox process's resident
// memory at the end of the run and at its peak, in bytes.
type agentUsage struct {
	CPUNanos *int64 `json:"cpu_ns"`
	RSS      int64  `json:"rss"`
	PeakRSS  int64  `json:"peak_rss"`
}

// Bounds of the figures in a usage object: over them the frame is a
// violation. No run takes more CPU than its timeout (60 s) on every core
// of a large machine; no sandbox holds a TiB.
const (
	maxUsageCPUNanos = int64(1) << 50 // 13 days
	maxUsageBytes    = int64(1) << 40
)

// agentCodes are the error codes an agent may answer with; any other is a
// protocol violation.
var agentCodes = map[protocol.Code]bool{
	protocol.CodeCodeError:      true,
	protocol.CodeTimeout:        true,
	protocol.CodeOutOfMemory:    true,
	protocol.CodeOutputTooLarge: true,
	protocol.CodeBadRequest:     true,
	protocol.CodeInternal:       true,
}

// maxMessageBytes bounds an error message from the agent; longer ones are cut.
const maxMessageBytes = 8 << 10

// encodeFrame returns the frame of v: length prefix and JSON.
func encodeFrame(v any) ([]byte, error) {
	var b bytes.Buffer
	b.Write([]byte{0, 0, 0, 0})
	enc := json.NewEncoder(&b)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(v); err != nil {
		return nil, err
	}
	frame := bytes.TrimSuffix(b.Bytes(), []byte("\n"))
	binary.BigEndian.PutUint32(frame, uint32(len(frame)-4))
	return frame, nil
}

// errViolation marks errors that mean the container broke the protocol.
var errViolation = errors.New("the sandbox broke protocol")

func violation(format string, args ...any) error {
	return fmt.Errorf("%w: "+format, append([]any{errViolation}, args...)...)
}

// decodeReply parses and checks one frame from the agent. Any error wraps
// errViolation: the frame comes from a container that runs tenants' code,
// which can write frames of its own, so nothing a strict agent would not
// send is accepted.
//
// The frame is UTF-8 and exactly one JSON object, with nothing after it.
// Its keys are id, result, error, console and console_truncated, and the
// error object's are code and message, each at most once: encoding/json
// keeps the last of duplicate keys, so {"id":3,"result":1,"id":7} would
// answer request 7. id is an integer in [0, 2^64), console and the error's
// code and message are strings, console_truncated is true or false, error
// is an object with both its keys, result is one JSON value (null
// included); no other field may be null. id and exactly one of result and
// error are present, and the error's code is one an agent may answer with.
// usage, optional, is an object of exactly cpu_ns (an integer in [0, 2^50]
// or null), rss and peak_rss (integers in [0, 2^40]).
//
// The objects are walked key by key (see eachMember), and each value is
// read whole into a json.RawMessage: a result of hundreds of KiB is
// scanned, never split into tokens.
func decodeReply(body []byte) (*agentReply, error) {
	if !utf8.Valid(body) {
		return nil, violation("frame is not UTF-8")
	}
	var r agentReply
	err := eachMember(body, func(key string, v json.RawMessage) error {
		switch key {
		case "id":
			id, err := strconv.ParseUint(string(v), 10, 64)
			if err != nil {
				return fmt.Errorf("id %s is not an integer in [0, 2^64)", truncate(string(v), 32))
			}
			r.ID = &id
		case "result":
			r.Result = v
		case "error":
			if v[0] != '{' {
				return errors.New("error is not an object")
			}
			var code, msg *string
			err := eachMember(v, func(key string, v json.RawMessage) (err error) {
				switch key {
				case "code":
					code, err = jsonString(key, v)
				case "message":
					msg, err = jsonString(key, v)
				default:
					err = fmt.Errorf("error has an unknown field %q", truncate(key, 64))
				}
				return err
			})
			if err != nil {
				return err
			}
			if code == nil || msg == nil {
				return errors.New("error lacks its code or message")
			}
			r.Error = &protocol.Error{Code: protocol.Code(*code), Message: *msg}
		case "console":
			s, err := jsonString(key, v)
			if err != nil {
				return err
			}
			r.Console = *s
		case "console_truncated":
			switch string(v) {
			case "true":
				r.ConsoleTruncated = true
			case "false":
			default:
				return errors.New("console_truncated is not a boolean")
			}
		case "usage":
			u, err := decodeUsage(v)
			if err != nil {
				return err
			}
			r.Usage = u
		default:
			return fmt.Errorf("unknown field %q", truncate(key, 64))
		}
		return nil
	})
	if err != nil {
		return nil, violation("frame is not a reply: %v", err)
	}
	if r.ID == nil {
		return nil, violation("reply has no id")
	}
	if (r.Error == nil) == (r.Result == nil) {
		return nil, violation("reply %d must carry exactly one of result and error", *r.ID)
	}
	if r.Error != nil {
		if !agentCodes[r.Error.Code] {
			return nil, violation("reply %d has error code %q", *r.ID, truncate(string(r.Error.Code), 64))
		}
		r.Error.Message = truncate(r.Error.Message, maxMessageBytes)
	}
	return &r, nil
}

// decodeUsage checks and reads the usage object of a reply (see
// decodeReply): all three keys, each once, each a bounded integer, cpu_ns
// possibly null.
func decodeUsage(v json.RawMessage) (*agentUsage, error) {
	if v[0] != '{' {
		return nil, errors.New("usage is not an object")
	}
	var u agentUsage
	var n int
	err := eachMember(v, func(key string, v json.RawMessage) error {
		n++
		switch key {
		case "cpu_ns":
			if string(v) == "null" {
				return nil
			}
			x, err := boundedInt(key, v, maxUsageCPUNanos)
			u.CPUNanos = &x
			return err
		case "rss":
			x, err := boundedInt(key, v, maxUsageBytes)
			u.RSS = x
			return err
		case "peak_rss":
			x, err := boundedInt(key, v, maxUsageBytes)
			u.PeakRSS = x
			return err
		default:
			return fmt.Errorf("usage has an unknown field %q", truncate(key, 64))
		}
	})
	if err != nil {
		return nil, err
	}
	if n != 3 {
		return nil, errors.New("usage lacks one of cpu_ns, rss and peak_rss")
	}
	return &u, nil
}

// boundedInt returns the JSON value v as an integer in [0, max]: digits
// only (no sign, fraction or exponent), or an error naming key.
func boundedInt(key string, v json.RawMessage, max int64) (int64, error) {
	x, err := strconv.ParseInt(string(v), 10, 64)
	if err != nil || x < 0 || x > max || v[0] == '+' || (len(v) > 1 && v[0] == '0') {
		return 0, fmt.Errorf("%s %s is not an integer in [0, %d]", key, truncate(string(v), 32), max)
	}
	return x, nil
}

// errTrailing: a frame holds more than one JSON value.
var errTrailing = errors.New("bytes after its JSON object")

// eachMember walks the JSON object that is the whole of data: it calls fn
// with each key and that key's value, read whole (not tokenised), in order.
// It fails on anything else in data, and on a key seen twice, before fn
// hears of the second. fn rejects the keys it does not know, so that the
// list of keys seen stays short.
func eachMember(data []byte, fn func(key string, value json.RawMessage) error) error {
	dec := json.NewDecoder(bytes.NewReader(data))
	if tok, err := dec.Token(); err != nil {
		return err
	} else if tok != json.Delim('{') {
		return errors.New("not a JSON object")
	}
	var seen []string
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return err
		}
		key, ok := tok.(string)
		if !ok { // not reached: Token returns an object's keys as strings
			return fmt.Errorf("object key %v is not a string", tok)
		}
		if slices.Contains(seen, key) {
			return fmt.Errorf("duplicate key %q", truncate(key, 64))
		}
		seen = append(seen, key)
		var v json.RawMessage
		if err := dec.Decode(&v); err != nil {
			return err
		}
		if err := fn(key, v); err != nil {
			return err
		}
	}
	if _, err := dec.Token(); err != nil { // the closing brace
		return err
	}
	if _, err := dec.Token(); err != io.EOF {
		return errTrailing
	}
	return nil
}

// jsonString returns the string that the JSON value v is, or an error
// naming key when v is of another type (null included).
func jsonString(key string, v json.RawMessage) (*string, error) {
	var s string
	if v[0] != '"' {
		return nil, fmt.Errorf("%s is not a string", key)
	}
	if err := json.Unmarshal(v, &s); err != nil {
		return nil, err
	}
	return &s, nil
}

// truncate cuts s to at most n bytes at a rune boundary.
func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	for n > 0 && !utf8.RuneStart(s[n]) {
		n--
	}
	return s[:n]
}

// frameReader cuts the stdout byte stream of a container into frames. It
// is fed Docker's stdout chunks, whose boundaries have nothing to do with
// frame boundaries.
type frameReader struct {
	max  int
	head [4]byte
	nh   int    // header bytes read
	body []byte // the body being read, len = its length
	nb   int    // body bytes read
	buf  []byte // reused for small bodies
}

// readFrom consumes exactly n bytes of r and calls fn for every complete
// frame, whose body is only valid during the call. An error from fn, a
// length over max or a short read ends it.
func (f *frameReader) readFrom(r io.Reader, n int, fn func([]byte) error) error {
	for n > 0 {
		if f.body == nil {
			k := min(4-f.nh, n)
			if _, err := io.ReadFull(r, f.head[f.nh:f.nh+k]); err != nil {
				return err
			}
			n -= k
			f.nh += k
			if f.nh < 4 {
				continue
			}
			size := int(binary.BigEndian.Uint32(f.head[:]))
			if size > f.max {
				return violation("frame of %d bytes is over the limit of %d", size, f.max)
			}
			if size == 0 {
				return violation("empty frame")
			}
			if size <= 64<<10 {
				if f.buf == nil {
					f.buf = make([]byte, 64<<10)
				}
				f.body = f.buf[:size]
			} else {
				f.body = make([]byte, size)
			}
			f.nh, f.nb = 0, 0
		}
		k := min(len(f.body)-f.nb, n)
		if _, err := io.ReadFull(r, f.body[f.nb:f.nb+k]); err != nil {
			return err
		}
		n -= k
		f.nb += k
		if f.nb == len(f.body) {
			body := f.body
			f.body = nil
			if err := fn(body); err != nil {
				return err
			}
		}
	}
	return nil
}

// tail keeps the last bytes written to it.
type tail struct {
	max int
	b   []byte
}

func (t *tail) Write(p []byte) (int, error) {
	n := len(p)
	if len(p) >= t.max {
		t.b = append(t.b[:0], p[len(p)-t.max:]...)
		return n, nil
	}
	if over := len(t.b) + len(p) - t.max; over > 0 {
		t.b = append(t.b[:0], t.b[over:]...)
	}
	t.b = append(t.b, p...)
	return n, nil
}

func (t *tail) String() string { return string(bytes.ToValidUTF8(t.b, []byte("?"))) }

// lastLine returns the last non-empty line of s, at most n bytes.
func lastLine(s string, n int) string {
	s = string(bytes.TrimRight([]byte(s), "\n\r\t "))
	if i := bytes.LastIndexByte([]byte(s), '\n'); i >= 0 {
		s = s[i+1:]
	}
	if len(s) > n {
		s = "..." + s[len(s)-n:]
	}
	return s
}
