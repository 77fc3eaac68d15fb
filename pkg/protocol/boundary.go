package protocol

import (
	"strconv"
	"strings"
	"time"
)

// The message boundary: limits and validators for the values of a request's
// headers. Everything a worker turns into a subject, a header or a time
// comes through one of these first; a value that fails is refused with
// CodeBadRequest and never used.
const (
	// MaxReplySubjectBytes bounds HeaderReplyTo. A NATS inbox with a
	// per-request suffix is well under 100 bytes; a reply subject long
	// enough to push a worker's publish past the server's control-line
	// limit (4096 bytes by default) would close the worker's connection.
	MaxReplySubjectBytes = 512
	// MaxRequestIDBytes bounds HeaderMsgID.
	MaxRequestIDBytes = 128
)

// Reserved subject prefixes a reply may never be published to: the NATS
// system, JetStream and service APIs ($...), the workers' inboxes, and the
// subjects requesters confirm replies on (a reply published there would
// forge a confirmation).
var reservedReplyPrefixes = []string{"$", WorkerInboxPrefix + ".", ReplyAckPrefix + "."}

// WorkerInboxPrefix is the inbox prefix of workers' own connections, so a
// NATS permission can give applications _INBOX.> without letting them read
// what workers receive.
const WorkerInboxPrefix = "_ISODE_WORKER"

// ValidateSubject checks that s is a plain NATS subject a message can be
// published to: 1 to max bytes of printable ASCII without spaces, tokens
// separated by single dots, no empty token and no wildcard token.
func ValidateSubject(s string, max int) error {
	if s == "" {
		return Errorf(CodeBadRequest, "subject is empty")
	}
	if len(s) > max {
		return Errorf(CodeBadRequest, "subject is %d bytes, over the limit of %d", len(s), max)
	}
	start := 0
	for i := 0; i <= len(s); i++ {
		if i < len(s) {
			c := s[i]
			if c <= ' ' || c >= 0x7f {
				return Errorf(CodeBadRequest, "subject has a byte that is not printable ASCII (%q at byte %d)", c, i)
			}
			if c != '.' {
				continue
			}
		}
		tok := s[start:i]
		switch tok {
		case "":
			return Errorf(CodeBadRequest, "subject has an empty token at byte %d", i)
		case "*", ">":
			return Errorf(CodeBadRequest, "subject has the wildcard token %q: a reply goes to one plain subject", tok)
		}
		start = i + 1
	}
	return nil
}

// ValidateReplyTo checks HeaderReplyTo: a plain subject of at most
// MaxReplySubjectBytes outside the reserved prefixes and outside the
// fleet's own subjects under prefix (a reply must never become a request).
func ValidateReplyTo(s, prefix string) error {
	if s == "" {
		return Errorf(CodeBadRequest, "header %s is missing: name the subject the reply goes to", HeaderReplyTo)
	}
	if err := ValidateSubject(s, MaxReplySubjectBytes); err != nil {
		return Errorf(CodeBadRequest, "header %s: %s", HeaderReplyTo, err.(*Error).Message)
	}
	for _, p := range reservedReplyPrefixes {
		if strings.HasPrefix(s, p) {
			return Errorf(CodeBadRequest, "header %s names a reserved subject (under %q)", HeaderReplyTo, p)
		}
	}
	if prefix != "" && (s == prefix || strings.HasPrefix(s, prefix+".")) {
		return Errorf(CodeBadRequest, "header %s names a subject of the fleet itself (under %q)", HeaderReplyTo, prefix)
	}
	return nil
}

// ValidateRequestID checks HeaderMsgID: 1 to MaxRequestIDBytes bytes of
// printable ASCII without spaces.
func ValidateRequestID(id string) error {
	if id == "" {
		return Errorf(CodeBadRequest, "header %s (the request id) is missing", HeaderMsgID)
	}
	if len(id) > MaxRequestIDBytes {
		return Errorf(CodeBadRequest, "header %s is %d bytes, over the limit of %d", HeaderMsgID, len(id), MaxRequestIDBytes)
	}
	for i := 0; i < len(id); i++ {
		if c := id[i]; c <= ' ' || c >= 0x7f {
			return Errorf(CodeBadRequest, "header %s has a byte that is not printable ASCII at byte %d", HeaderMsgID, i)
		}
	}
	return nil
}

// maxDeadlineMillis is 9999-12-31: a deadline past it is not a time.
const maxDeadlineMillis = 253402300799999

// ParseDeadline reads HeaderDeadline: Unix milliseconds, positive. An empty
// value returns the zero time and no error (the request has no deadline of
// its own). Workers bound a far-future deadline themselves; this only
// refuses what is not a time.
func ParseDeadline(v string) (time.Time, error) {
	if v == "" {
		return time.Time{}, nil
	}
	ms, err := strconv.ParseInt(v, 10, 64)
	if err != nil || ms <= 0 || ms > maxDeadlineMillis {
		if len(v) > 32 {
			v = v[:32] + "..."
		}
		return time.Time{}, Errorf(CodeBadRequest, "header %s is %q, want a positive time in Unix milliseconds", HeaderDeadline, v)
	}
	return time.UnixMilli(ms), nil
}

// DeadSubject returns the subject a worker copies a request to when it
// gives up on it (a poison request, or one that can never be answered):
// "<prefix>.dead.<shard>". It is outside the request stream; an operator
// captures it with a stream of its own or watches it with `nats sub`.
func DeadSubject(prefix string, shard int) string {
	return prefix + ".dead." + strconv.Itoa(shard)
}

// Headers a worker adds to a request it copies to DeadSubject.
const (
	// HeaderDeadReason says why the request was given up on.
	HeaderDeadReason = "Isode-Dead-Reason"
	// HeaderDeadDeliveries is how many times the stream delivered it.
	HeaderDeadDeliveries = "Isode-Dead-Deliveries"
	// HeaderDeadWorker is the worker that gave up on it.
	HeaderDeadWorker = "Isode-Dead-Worker"
)
