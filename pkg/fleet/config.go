package fleet

import (
	"errors"
	"fmt"
	"time"

	"github.com/rs/zerolog"

	"github.com/isode-run/isode/pkg/protocol"
)

// ErrInvalidConfig wraps every error of Config.Validate.
var ErrInvalidConfig = errors.New("invalid fleet configuration")

// Config configures a Worker's NATS side.
type Config struct {
	// WorkerID names this worker in replies, stats and membership.
	WorkerID string
	// Prefix is the subject prefix (protocol.DefaultPrefix).
	Prefix string
	// Shards is the deployment's shard count; every worker and client of a
	// deployment must agree on it. It is recorded in the stream's metadata
	// and a worker with another count refuses to start.
	Shards int
	// Capacity bounds the requests this worker holds at once (running or
	// queued in the pool). When it is reached the worker stops pulling;
	// requests wait in the stream.
	Capacity int
	// AckWait is how long a pulled request may go without an ack or a
	// progress signal before JetStream gives it to another worker. Workers
	// signal progress every AckWait/3 while a request waits or runs, so this
	// bounds how soon a dead worker's requests are redelivered.
	AckWait time.Duration
	// FetchWait is the expiry of each pull request.
	FetchWait time.Duration
	// PullHeartbeat is the idle heartbeat of each shard's pull: a pull
	// silent for two of them is renewed.
	PullHeartbeat time.Duration
	// PullBuffer is how many requests of one shard the client library may
	// hold ahead of the worker taking them. At capacity the worker exceeds
	// Capacity by at most this much per owned shard.
	PullBuffer int
	// MaxDeliver bounds deliveries of one request; -1 (the default) is
	// unlimited. Every hand-back (a worker shutting down, a tenant's queue
	// full) is a delivery, so a bound would drop requests under load; the
	// request's own deadline bounds its life instead (see MaxQueueWait),
	// and MaxFailures ends a poison request.
	MaxDeliver int
	// MaxFailures is how many deliveries of one request may end without an
	// answer (the worker died while it ran, or could not publish the
	// reply) before the next worker to take it gives up: it answers
	// dead_lettered, copies the request to protocol.DeadSubject and
	// terminates it. Hand-backs on purpose (a full tenant queue, a
	// shutdown, an unconfirmed reply) do not count.
	MaxFailures int
	// MaxQueueWait bounds how long a request may wait (in the stream and
	// in the pool) before it runs: its effective deadline is at most the
	// time the stream stored it plus MaxQueueWait plus MaxTimeout, whatever
	// deadline it asks for. The stream's MaxAge is that bound plus
	// AckWait, a backstop for requests no worker takes.
	MaxQueueWait time.Duration
	// MaxControlLine is the max_control_line of the NATS server (4096
	// unless its configuration says otherwise). The server closes a
	// connection that publishes a longer protocol line, so every subject a
	// worker publishes to is checked against it first.
	MaxControlLine int
	// StreamMaxMsgs and StreamMaxBytes bound the request stream; a full
	// stream rejects new requests at once (the client sees "overloaded").
	StreamMaxMsgs  int64
	StreamMaxBytes int64
	// StreamMaxPerSubject bounds the requests one application holds in
	// the stream for one shard (every application's shard is a subject of
	// its own); past it that application's new requests for the shard are
	// refused (overloaded) while others' are still taken. One application
	// can hold at most Shards times this, so keep StreamMaxMsgs well above
	// that. Only applies when the stream is created or had no such limit.
	StreamMaxPerSubject int64
	// StreamReplicas is the stream's replication factor (clustered NATS).
	StreamReplicas int
	// StreamMemory keeps the request stream in memory instead of files: a
	// request costs less (no block file is created and removed each time
	// the stream drains), but requests waiting in the stream are lost if a
	// single NATS server restarts. Only applies when the stream is created.
	StreamMemory bool
	// DuplicateWindow is the stream's de-duplication window for request ids.
	DuplicateWindow time.Duration
	// MaxTimeout caps a request's run timeout on this worker.
	MaxTimeout time.Duration
	// ReplyCacheTTL and ReplyCacheBytes bound the cache of recent replies
	// used to answer a redelivered request without running it twice.
	ReplyCacheTTL   time.Duration
	ReplyCacheBytes int
	// Heartbeat is how often a worker announces itself; MemberTTL is how
	// long a silent worker still counts as alive. A dead worker's shards
	// move after about MemberTTL.
	Heartbeat time.Duration
	MemberTTL time.Duration
	// RetryDelay is how long a request waits in the stream before it is
	// offered again when this worker cannot take it now (its tenant's queue
	// is full).
	RetryDelay time.Duration
	// ReplyAckWait is how long a worker waits for a requester to confirm a
	// reply (protocol.HeaderReplyAck) before it hands the request back to
	// the stream to be answered again. At most half of AckWait; zero (the
	// default) means 2s or half of AckWait, whichever is shorter.
	ReplyAckWait time.Duration
	// MaxPendingCalls bounds the plain calls (protocol.CallSubject) this
	// worker has taken and not yet seen stored by the stream; a call over
	// it is answered overloaded at once.
	MaxPendingCalls int

	// OnUsage, when set, is given the usage record of every request this
	// worker answers, when it answers (see protocol.UsageRecord): on the
	// answering goroutine, so it must be quick and must not keep rec.
	OnUsage func(rec *protocol.UsageRecord)
	// Tenants bounds the tenants whose totals a worker keeps by name; the
	// least busy of them is folded into protocol.OtherTenants when a new
	// one comes. StatsTenants is how many, busiest first, its stats list.
	Tenants      int
	StatsTenants int

	Logger zerolog.Logger
}

// DefaultConfig returns the defaults.
func DefaultConfig() Config {
	return Config{
		Prefix:              protocol.DefaultPrefix,
		Shards:              protocol.DefaultShards,
		Capacity:            256,
		AckWait:             5 * time.Second,
		FetchWait:           10 * time.Second,
		PullHeartbeat:       time.Second,
		PullBuffer:          2,
		MaxDeliver:          -1,
		MaxFailures:         3,
		MaxQueueWait:        time.Minute,
		MaxControlLine:      4096,
		StreamMaxMsgs:       100_000,
		StreamMaxPerSubject: 1000,
		StreamMaxBytes:      1 << 30,
		StreamReplicas:      1,
		DuplicateWindow:     2 * time.Minute,
		MaxTimeout:          protocol.MaxTimeout,
		ReplyCacheTTL:       2 * time.Minute,
		ReplyCacheBytes:     8 << 20,
		RetryDelay:          250 * time.Millisecond,
		Heartbeat:           500 * time.Millisecond,
		MemberTTL:           2 * time.Second,
		MaxPendingCalls:     1024,
		Tenants:             1000,
		StatsTenants:        20,
		Logger:              zerolog.Nop(),
	}
}

// Validate returns the first invalid field, wrapping ErrInvalidConfig.
func (c *Config) Validate() error {
	bad := func(field, format string, args ...any) error {
		return fmt.Errorf("%w: %s: %s", ErrInvalidConfig, field, fmt.Sprintf(format, args...))
	}
	switch {
	case c.WorkerID == "":
		return bad("worker id", "must not be empty")
	case c.Prefix == "":
		return bad("prefix", "must not be empty")
	case c.Shards < 1 || c.Shards > 4096:
		return bad("shards", "%d is not in [1, 4096]", c.Shards)
	case c.Capacity < 1:
		return bad("capacity", "%d must be at least 1", c.Capacity)
	case c.AckWait < time.Second:
		return bad("ack wait", "%v must be at least 1s", c.AckWait)
	case c.FetchWait < time.Second:
		return bad("fetch wait", "%v must be at least 1s", c.FetchWait)
	case c.PullHeartbeat <= 0 || c.PullHeartbeat > c.FetchWait/2:
		return bad("pull heartbeat", "%v must be positive and at most half the fetch wait %v", c.PullHeartbeat, c.FetchWait)
	case c.PullBuffer < 1:
		return bad("pull buffer", "%d must be at least 1", c.PullBuffer)
	case c.MaxDeliver < 1 && c.MaxDeliver != -1:
		return bad("max deliver", "%d must be at least 1, or -1 for unlimited", c.MaxDeliver)
	case c.StreamMaxMsgs < 1:
		return bad("stream max msgs", "%d must be at least 1", c.StreamMaxMsgs)
	case c.StreamMaxPerSubject < 1:
		return bad("stream max per subject", "%d must be at least 1", c.StreamMaxPerSubject)
	case c.StreamMaxBytes < protocol.MaxRequestBytes:
		return bad("stream max bytes", "%d must hold at least one request (%d bytes)", c.StreamMaxBytes, protocol.MaxRequestBytes)
	case c.StreamReplicas < 1 || c.StreamReplicas > 5:
		return bad("stream replicas", "%d is not in [1, 5]", c.StreamReplicas)
	case c.MaxTimeout <= 0 || c.MaxTimeout > protocol.MaxTimeout:
		return bad("max timeout", "%v is not in (0, %v]", c.MaxTimeout, protocol.MaxTimeout)
	case c.Heartbeat < 50*time.Millisecond:
		return bad("heartbeat", "%v must be at least 50ms", c.Heartbeat)
	case c.MemberTTL < 2*c.Heartbeat:
		return bad("member ttl", "%v must be at least twice the heartbeat %v", c.MemberTTL, c.Heartbeat)
	case c.ReplyAckWait < 0 || c.ReplyAckWait > c.AckWait/2:
		return bad("reply ack wait", "%v must be at most half the ack wait %v", c.ReplyAckWait, c.AckWait)
	case c.ReplyCacheBytes < 0:
		return bad("reply cache bytes", "must not be negative")
	case c.MaxFailures < 1 || c.MaxFailures > 100:
		return bad("max failures", "%d is not in [1, 100]", c.MaxFailures)
	case c.MaxQueueWait < time.Second || c.MaxQueueWait > 24*time.Hour:
		return bad("max queue wait", "%v is not in [1s, 24h]", c.MaxQueueWait)
	case c.Tenants < 1 || c.Tenants > 100_000:
		return bad("tenants", "%d is not in [1, 100000]", c.Tenants)
	case c.StatsTenants < 0 || c.StatsTenants > c.Tenants:
		return bad("stats tenants", "%d is not in [0, tenants]", c.StatsTenants)
	case c.MaxPendingCalls < 1:
		return bad("max pending calls", "%d must be at least 1", c.MaxPendingCalls)
	case c.MaxControlLine < 512 || c.MaxControlLine > 1<<20:
		return bad("max control line", "%d is not in [512, 1048576]", c.MaxControlLine)
	}
	return nil
}

// requestLifetime is the longest a request can stay in the stream: its
// longest wait, its longest run, and one ack wait for a worker that died
// holding it. It is the stream's MaxAge, which JetStream wants no shorter
// than the duplicate window.
func (c *Config) requestLifetime() time.Duration {
	return max(c.MaxQueueWait+c.MaxTimeout+c.AckWait, c.DuplicateWindow)
}

// replyAckWait returns ReplyAckWait, or its default when zero.
func (c *Config) replyAckWait() time.Duration {
	if c.ReplyAckWait > 0 {
		return c.ReplyAckWait
	}
	return min(2*time.Second, c.AckWait/2)
}
