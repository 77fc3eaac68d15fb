package protocol

import (
	"hash/fnv"
	"strconv"
	"strings"
)

// Version is the version of the wire types in this package. Requests carry
// it in Request.V; a worker rejects versions it does not know with CodeBadRequest.
const Version = 1

// Deployment defaults. The shard count is fixed for the life of a
// deployment: changing it moves tenants between shards.
const (
	DefaultPrefix = "isode"
	DefaultShards = 64
)

// Header names.
const (
	// HeaderReplyTo names the subject the worker publishes the Reply to.
	// JetStream does not keep a publisher's reply subject, so it travels here.
	HeaderReplyTo = "Isode-Reply-To"
	// HeaderMsgID carries the request id; JetStream de-duplicates on it.
	HeaderMsgID = "Nats-Msg-Id"
	// HeaderDeadline is the request's deadline in Unix milliseconds (UTC).
	// A worker that takes the request after it does not run it. Clocks of
	// clients and workers are assumed to be synchronised (NTP).
	HeaderDeadline = "Isode-Deadline"
	// HeaderRequestID is set on every Reply to the request id it answers.
	HeaderRequestID = "Isode-Request-Id"
	// HeaderErrorCode is set on error replies to the stable Code.
	HeaderErrorCode = "Isode-Error-Code"
	// HeaderServiceError and HeaderServiceErrorCode are set on error replies
	// as github.com/nats-io/nats.go/micro does: the message and a numeric
	// (HTTP-like) status, so generic NATS tooling shows them.
	HeaderServiceError     = "Nats-Service-Error"
	HeaderServiceErrorCode = "Nats-Service-Error-Code"
	// HeaderReplyAck, set to "1" on a request, asks the worker to keep the
	// request in the stream until the requester confirms its reply: the
	// Reply then carries a NATS reply subject (under ReplyAckPrefix) and the
	// requester publishes anything to it on receipt. A reply nobody received
	// (the requester was reconnecting after a NATS restart, say) is
	// published again until it is confirmed or the request's deadline
	// passes. Requests without it get their reply published once.
	HeaderReplyAck = "Isode-Reply-Ack"
)

// ReplyAckPrefix starts the subjects requesters confirm replies on (see
// HeaderReplyAck). Requesters need permission to publish under it, workers
// to subscribe under it.
const ReplyAckPrefix = "_ISODE_ACK"

// Shard returns the shard of an isolate key: the FNV-1a 32-bit hash of the
// key's bytes modulo shards. It is the same function the NATS server's
// partition() subject mapping uses, so any language can compute it.
// shards must be positive.
func Shard(isolateKey string, shards int) int {
	h := fnv.New32a()
	h.Write([]byte(isolateKey))
	return int(h.Sum32() % uint32(shards))
}

// RunSubject returns the subject requests for a shard are published to:
// "<prefix>.run.<shard>".
func RunSubject(prefix string, shard int) string {
	return prefix + ".run." + strconv.Itoa(shard)
}

// RunWildcard returns the subject filter that covers every shard.
func RunWildcard(prefix string) string { return prefix + ".run.*" }

// ParseRunSubject returns the shard of a run subject, or false when the
// subject is not a run subject under prefix.
func ParseRunSubject(prefix, subject string) (int, bool) {
	rest, ok := strings.CutPrefix(subject, prefix+".run.")
	if !ok || rest == "" || len(rest) > 6 {
		return 0, false
	}
	n, err := strconv.Atoi(rest)
	if err != nil || n < 0 || strconv.Itoa(n) != rest {
		return 0, false
	}
	return n, true
}

// StatsSubject is a core NATS subject every worker answers with a
// WorkerStats document; a caller gathers the replies for a short while.
func StatsSubject(prefix string) string { return prefix + ".stats" }

// StreamName returns the JetStream stream that holds requests.
func StreamName(prefix string) string { return strings.ToUpper(token(prefix)) }

// ConsumerName returns the durable pull consumer of one shard.
func ConsumerName(prefix string, shard int) string {
	return token(prefix) + "-shard-" + strconv.Itoa(shard)
}

// MembersBucket returns the key-value bucket in which workers announce
// themselves.
func MembersBucket(prefix string) string { return token(prefix) + "_workers" }

// DeliveriesBucket returns the key-value bucket in which workers record the
// requests they hand back on purpose, to tell a poison request (one whose
// deliveries keep ending without an answer) from a busy one.
func DeliveriesBucket(prefix string) string { return token(prefix) + "_deliveries" }

// token makes a prefix usable where NATS names forbid dots and wildcards.
func token(prefix string) string {
	return strings.Map(func(r rune) rune {
		switch r {
		case '.', '*', '>', ' ', '\t':
			return '_'
		}
		return r
	}, prefix)
}
