package protocol

import (
	"bytes"
	"encoding/json"
	"fmt"
	"time"
	"unicode/utf8"
)

// Limits of the wire types. Workers may enforce lower limits (for example a
// shorter maximum timeout) but never higher ones.
const (
	MaxIsolateKeyBytes = 128
	MaxCodeBytes       = 256 << 10
	MaxInputBytes      = 256 << 10
	// MaxRequestBytes bounds a whole encoded Request.
	MaxRequestBytes = 640 << 10
	// MaxResultBytes bounds the JSON encoding of a result.
	MaxResultBytes = 512 << 10
	// MaxConsoleBytes bounds the console output returned with a reply;
	// output beyond it is dropped and ConsoleTruncated is set.
	MaxConsoleBytes = 64 << 10

	DefaultTimeout = 10 * time.Second
	MaxTimeout     = 60 * time.Second
)

// Request asks a worker to run a snippet for a tenant.
//
// Code is the body of a JavaScript function that returns the function to
// call, as in the original isode:
//
//	return function (cb) { cb(null, "Hello, world!"); }
//
// The returned function may also take (ctx, cb), where ctx.data is Input,
// or be async / return a promise. See the README for the full contract.
type Request struct {
	// V is the wire version; it must equal Version.
	V int `json:"v"`
	// IsolateKey names the tenant (trust domain). See ValidateIsolateKey.
	IsolateKey string `json:"isolate_key"`
	// Code is the snippet, at most MaxCodeBytes.
	Code string `json:"code"`
	// Input is optional JSON handed to the snippet as ctx.data.
	Input json.RawMessage `json:"input,omitempty"`
	// TimeoutMs bounds the snippet's run time; 0 means DefaultTimeout.
	TimeoutMs int64 `json:"timeout_ms,omitempty"`
}

// Timeout returns the run timeout the request asks for (DefaultTimeout when unset).
func (r *Request) Timeout() time.Duration {
	if r.TimeoutMs <= 0 {
		return DefaultTimeout
	}
	return time.Duration(r.TimeoutMs) * time.Millisecond
}

// Validate checks the request against the limits above and returns a
// *Error with CodeBadRequest naming the first violation.
func (r *Request) Validate() error {
	if r.V != Version {
		if r.V == 0 {
			return Errorf(CodeBadRequest, "field v is missing: set it to the protocol version %d", Version)
		}
		return Errorf(CodeBadRequest, "unsupported protocol version %d: this worker speaks version %d", r.V, Version)
	}
	if err := ValidateIsolateKey(r.IsolateKey); err != nil {
		return err
	}
	if r.Code == "" {
		return Errorf(CodeBadRequest, "field code is empty: send the body of a function that returns a function, e.g. `return function (cb) { cb(null, 1); }`")
	}
	if len(r.Code) > MaxCodeBytes {
		return Errorf(CodeBadRequest, "code is %d bytes, over the limit of %d", len(r.Code), MaxCodeBytes)
	}
	if !utf8.ValidString(r.Code) {
		return Errorf(CodeBadRequest, "code is not valid UTF-8")
	}
	if len(r.Input) > 0 {
		if len(r.Input) > MaxInputBytes {
			return Errorf(CodeBadRequest, "input is %d bytes, over the limit of %d", len(r.Input), MaxInputBytes)
		}
		if !json.Valid(r.Input) {
			return Errorf(CodeBadRequest, "input is not valid JSON")
		}
	}
	if r.TimeoutMs < 0 {
		return Errorf(CodeBadRequest, "timeout_ms is negative")
	}
	// Compare milliseconds: converted to a Duration first, a huge value
	// overflows into a small or negative one and passes.
	if r.TimeoutMs > MaxTimeout.Milliseconds() {
		return Errorf(CodeBadRequest, "timeout_ms %d is over the maximum of %d", r.TimeoutMs, MaxTimeout.Milliseconds())
	}
	return nil
}

// ValidateIsolateKey checks an isolate key: 1 to MaxIsolateKeyBytes bytes of
// ASCII letters, digits and the characters - _ . : @ + = / ~. Whitespace,
// control characters and the NATS wildcards * and > are refused.
func ValidateIsolateKey(key string) error {
	if key == "" {
		return Errorf(CodeBadRequest, "isolate_key is empty: name the tenant the code belongs to")
	}
	if len(key) > MaxIsolateKeyBytes {
		return Errorf(CodeBadRequest, "isolate_key is %d bytes, over the limit of %d", len(key), MaxIsolateKeyBytes)
	}
	for i := 0; i < len(key); i++ {
		if !keyByte(key[i]) {
			return Errorf(CodeBadRequest, "isolate_key has a character that is not allowed (%q at byte %d): use letters, digits and - _ . : @ + = / ~", key[i], i)
		}
	}
	return nil
}

func keyByte(c byte) bool {
	switch {
	case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9':
		return true
	}
	switch c {
	case '-', '_', '.', ':', '@', '+', '=', '/', '~':
		return true
	}
	return false
}

// DecodeRequest parses and validates an encoded Request. Every failure is a
// *Error with CodeBadRequest whose message says what is wrong.
func DecodeRequest(data []byte) (*Request, error) {
	if len(data) > MaxRequestBytes {
		return nil, Errorf(CodeBadRequest, "request is %d bytes, over the limit of %d", len(data), MaxRequestBytes)
	}
	data = bytes.TrimSpace(data)
	if len(data) == 0 {
		return nil, Errorf(CodeBadRequest, "request body is empty: send a JSON object")
	}
	if data[0] != '{' {
		return nil, Errorf(CodeBadRequest, "request body is not a JSON object")
	}
	var r Request
	if err := json.Unmarshal(data, &r); err != nil {
		return nil, Errorf(CodeBadRequest, "request is not valid JSON for this protocol: %v", err)
	}
	if err := r.Validate(); err != nil {
		return nil, err
	}
	return &r, nil
}

// Result is what a snippet produced.
type Result struct {
	// Value is the JSON encoding of the value the snippet returned;
	// "null" when it returned nothing.
	Value json.RawMessage `json:"result"`
	// Console is what the snippet printed, at most MaxConsoleBytes.
	Console string `json:"console,omitempty"`
	// ConsoleTruncated is set when console output was dropped.
	ConsoleTruncated bool `json:"console_truncated,omitempty"`
	// Usage is what the run cost, as far as the runner measured it (the
	// sandbox: CPU and memory; the pool: Start and PoolMicros). The worker
	// completes it and sends it as Reply.Usage; it is not encoded here.
	Usage Usage `json:"-"`
}

// Reply answers one Request. Exactly one of Result and Error is set.
type Reply struct {
	V  int    `json:"v"`
	ID string `json:"id"`
	// Result is the JSON value the snippet returned ("null" included).
	Result json.RawMessage `json:"result,omitempty"`
	// Console is the snippet's console output, also on errors.
	Console          string `json:"console,omitempty"`
	ConsoleTruncated bool   `json:"console_truncated,omitempty"`
	Error            *Error `json:"error,omitempty"`
	// Worker is the id of the worker that answered.
	Worker string `json:"worker,omitempty"`
	// RunMicros is the time spent running the snippet, in microseconds.
	RunMicros int64 `json:"run_us,omitempty"`
	// Usage is what the request cost (see Usage); absent from replies of
	// workers older than it.
	Usage *Usage `json:"usage,omitempty"`
}

// Validate checks that a Reply is well formed. Error codes this package does
// not know (from newer workers) are accepted; callers treat them as
// CodeInternal unless they know better.
func (r *Reply) Validate() error {
	if r.V != Version {
		return fmt.Errorf("reply has protocol version %d, want %d", r.V, Version)
	}
	if (r.Error == nil) == (len(r.Result) == 0) {
		return fmt.Errorf("reply must carry exactly one of result and error")
	}
	return nil
}

// WorkerStats is what a worker answers on StatsSubject.
type WorkerStats struct {
	V        int       `json:"v"`
	Worker   string    `json:"worker"`
	Started  time.Time `json:"started"`
	Shards   []int     `json:"shards"`
	InFlight int       `json:"in_flight"`
	Pool     PoolStats `json:"pool"`
	// Tenants are the busiest tenants' totals since the worker started,
	// most CPU first, at most a few dozen; the last entry, named
	// OtherTenants, folds every other tenant (absent when there is none).
	Tenants []TenantStats `json:"tenants,omitempty"`
}

// TenantStats are one tenant's totals on one worker, from the usage
// records it published.
type TenantStats struct {
	IsolateKey string `json:"isolate_key"`
	// Application is the application the isolate key belongs to (empty or
	// DefaultApplication: the implicit one).
	Application string `json:"application,omitempty"`
	// Runs counts requests answered, errors included.
	Runs uint64 `json:"runs"`
	// Errors counts the answers that were errors, by code.
	Errors     map[string]uint64 `json:"errors,omitempty"`
	CPUMicros  uint64            `json:"cpu_us"`
	WallMicros uint64            `json:"wall_us"`
}

// Key is the tenant's TenantKey: its isolate key within its application.
func (s *TenantStats) Key() string { return TenantKey(s.Application, s.IsolateKey) }

// OtherTenants is the IsolateKey of the TenantStats that folds the
// tenants not listed by name. It is not a valid isolate key.
const OtherTenants = "(others)"

// PoolStats are a worker's container pool counters.
type PoolStats struct {
	Free     int `json:"free"`
	Assigned int `json:"assigned"`
	Busy     int `json:"busy"`
	Creating int `json:"creating"`
	Queued   int `json:"queued"`
	Low      int `json:"low"`
	High     int `json:"high"`

	Hits          uint64 `json:"hits"`
	PoolHits      uint64 `json:"pool_hits"`
	ColdStarts    uint64 `json:"cold_starts"`
	Evictions     uint64 `json:"evictions"`
	Recycles      uint64 `json:"recycles"`
	Deaths        uint64 `json:"deaths"`
	Failures      uint64 `json:"failures"`
	Rejected      uint64 `json:"rejected"`
	QueueTimeouts uint64 `json:"queue_timeouts"`
}
