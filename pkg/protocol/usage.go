package protocol

import (
	"strconv"
	"time"
)

// Usage is what one request cost, measured by the worker and the agent in
// the sandbox, never by the snippet: it is on every Reply a worker produced
// by answering the request (not on copies sent again from its reply cache,
// which carry the first answer's Usage), and in the UsageRecord published
// on UsageSubject.
//
// Every figure is zero when it does not apply (a request refused before it
// ran has no CPU, no start and no wall time).
type Usage struct {
	// WallMicros is the run's wall time: from the worker handing the
	// request to its tenant's sandbox to the sandbox's answer (the trip
	// over the container's attach stream included, the wait for a sandbox
	// excluded).
	WallMicros int64 `json:"wall_us"`
	// QueueMicros is the time the request waited before its run: in the
	// stream (from the stream storing it to a worker taking it, by the
	// worker's clock against the stream's, never negative) plus in the
	// worker's pool (PoolMicros).
	QueueMicros int64 `json:"queue_us"`
	// PoolMicros is the part of QueueMicros spent in the worker's pool
	// waiting for a sandbox (a cold start's creation included).
	PoolMicros int64 `json:"pool_us"`
	// CPUMicros is the CPU time (user and system) of the operating-system
	// thread that ran the snippet's JavaScript, between the agent handing
	// it the request and its answer, read by the agent's own thread from
	// the kernel's accounting (/proc/self/task/<tid>/schedstat). It does
	// not include V8's shared background threads (concurrent garbage
	// collection, compilation), the agent's routing, or processes the
	// snippet started. The snippet's thread cannot change it; the worker
	// caps it at WallMicros (see the README on what a snippet that takes
	// over its own sandbox can do).
	CPUMicros int64 `json:"cpu_us"`
	// CPUMeasured says whether CPUMicros was measured: false when the
	// sandbox's kernel does not offer per-thread accounting, or the thread
	// was gone before it could be read (its heap ran out, say).
	CPUMeasured bool `json:"cpu_measured,omitempty"`
	// MemoryBytes is the resident memory (RSS) of the tenant's sandbox
	// process (node: the agent and all its snippet threads) when the run
	// ended, and MemoryPeakBytes its high-water mark since the sandbox
	// started, both read by the agent's main thread from the kernel
	// (/proc/self/statm; getrusage's ru_maxrss, never below the former).
	// Neither is the snippet's own: Node.js has no honest
	// per-thread figure (V8's heap statistics are readable only from the
	// snippet's own thread, where the snippet can falsify them), and a
	// sandbox serves one tenant only, so this is that tenant's footprint.
	// Zero when not measured.
	MemoryBytes     int64 `json:"mem_bytes,omitempty"`
	MemoryPeakBytes int64 `json:"mem_peak_bytes,omitempty"`
	// Start says how the run got its sandbox: StartWarm, StartPool,
	// StartCold, or "" when it did not run.
	Start string `json:"start,omitempty"`
	// BytesIn is the size of the request's body as it arrived; BytesOut
	// that of the Reply's body.
	BytesIn  int64 `json:"bytes_in"`
	BytesOut int64 `json:"bytes_out"`
}

// How a run got its sandbox (Usage.Start).
const (
	// StartWarm: the tenant's sandbox was already there.
	StartWarm = "warm"
	// StartPool: a free, pre-created sandbox was assigned to the tenant.
	StartPool = "pool"
	// StartCold: a sandbox was created for the tenant while it waited.
	StartCold = "cold"
)

// UsageRecord is published once for each request a worker answers after
// decoding its body, on UsageSubject(prefix, shard): one per run, and one
// per request refused or timed out before it ran. A redelivery that a
// worker answers again from its reply cache (the first reply was not
// confirmed, or its ack was lost), or that joins the run still in
// progress, publishes none: the record of the first
// answer counts. A request run twice (its worker died after the run and
// before its ack, and another worker ran it again) has two records, one
// from each worker, each with its own RunID.
//
// Records travel over core NATS (at most once); a platform that bills
// from them captures the subject in a JetStream stream of its own, which
// de-duplicates on the record's Nats-Msg-Id header (RunID).
type UsageRecord struct {
	V int `json:"v"`
	// RunID names this answer: the request id, the worker and the
	// delivery. It is the record's Nats-Msg-Id.
	RunID string `json:"run_id"`
	// ID is the request id (HeaderMsgID).
	ID          string `json:"id"`
	IsolateKey  string `json:"isolate_key"`
	Application string `json:"application,omitempty"`
	Worker      string `json:"worker"`
	Shard       int    `json:"shard"`
	// Code is "ok" or the error code of the reply.
	Code string `json:"code"`
	// Time is when the worker answered.
	Time time.Time `json:"time"`
	// Traceparent is the request's W3C trace context (HeaderTraceparent),
	// when it had a valid one.
	Traceparent string `json:"traceparent,omitempty"`
	Usage
}

// CodeOK is UsageRecord.Code of a request that succeeded.
const CodeOK = "ok"

// UsageSubject returns the subject usage records of a shard are published
// on: "<prefix>.usage.<shard>".
func UsageSubject(prefix string, shard int) string {
	return prefix + ".usage." + strconv.Itoa(shard)
}

// UsageWildcard returns the subject filter that covers every shard's usage.
func UsageWildcard(prefix string) string { return prefix + ".usage.*" }
