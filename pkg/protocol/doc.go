// Package protocol is the wire contract between programs that submit
// JavaScript to an isode fleet and the workers that run it.
//
// It is what other programs import: it carries the subject layout, the shard
// function, the header names, the versioned wire types with their validators
// and the stable error codes. It depends on the standard library only, so a
// client in another language can be written from this package's
// documentation alone.
//
// # Submitting a run
//
//  1. Compute the shard of the isolate key: FNV-1a 32 of the key's bytes,
//     modulo the deployment's shard count (DefaultShards unless configured).
//  2. Publish a JSON Request to RunSubject(prefix, shard), a subject bound to
//     a JetStream work-queue stream, with the headers
//     HeaderReplyTo (an inbox the caller listens on), HeaderMsgID (a unique
//     request id, also used by JetStream for de-duplication) and
//     HeaderDeadline (Unix milliseconds after which the result is useless).
//     The publish's own reply subject receives the stream's PubAck; an error
//     in it (for example a full stream) means the request was not accepted.
//     A PubAck with "duplicate": true means a request with this id was
//     accepted earlier within the stream's duplicate window: this copy was
//     not queued and no Reply will come to this inbox (report
//     CodeDuplicateRequest). Header values are checked by ValidateReplyTo,
//     ValidateRequestID and ParseDeadline; a request whose HeaderReplyTo
//     fails is never answered (it is copied to DeadSubject).
//  3. Wait on the inbox for one Reply. Either Result is set or Error is,
//     never both. Error replies also carry the nats.go micro headers
//     HeaderServiceError and HeaderServiceErrorCode.
//  4. With HeaderReplyAck set on the request, answer every Reply that has a
//     NATS reply subject (publish anything to it), including late and
//     duplicate ones: the worker keeps the request until then, and sends
//     the reply again if nobody received it.
//
// A request accepted by the stream is delivered at least once: a worker
// that dies before it acknowledged it leaves it for another worker. A reply
// may therefore arrive twice; callers keep the first. Replies travel over
// core NATS, which delivers to whoever listens at that moment: a requester
// that was not listening (its connection was re-established after a NATS
// restart) loses a reply unless it asked for confirmed replies with
// HeaderReplyAck, as github.com/isode-run/isode/pkg/client does.
//
// A request's life is bounded by the workers: whatever HeaderDeadline asks,
// one that has not started within the workers' maximum queue wait of the
// stream storing it is answered CodeQueueTimeout. A request whose
// deliveries keep ending without an answer (a worker died running it) is
// answered CodeDeadLettered and copied to DeadSubject.
//
// # Applications
//
// Where several applications share a fleet, each is a NATS account and
// publishes exactly as above in its own account; the server's imports map
// its subjects into the fleet's account (AppRunSubject, AppCallSubject) and
// its replies back from ReplySubject to its own inboxes. A client needs
// nothing of this: see app.go. A tenant is then an isolate key within an
// application (TenantKey).
package protocol
