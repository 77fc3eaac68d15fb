package fleet

import (
	"context"
	"errors"
	"strconv"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"

	"github.com/isode-run/isode/pkg/protocol"
)

// delivery is one delivery of a request to this worker. It owns the ways
// the delivery can end, each in one place:
//
//   - answered: the reply is published (and confirmed, when the requester
//     asked for that), then the request is acked;
//   - terminated: a bad request is answered and never offered again;
//   - dead-lettered: a request that can never be answered, or that failed
//     MaxFailures times, is copied to protocol.DeadSubject and terminated;
//   - handed back: this worker cannot take it now (its tenant's queue is
//     full, the worker is shutting down, a reply waits to be confirmed);
//     the hand-back is recorded in the ledger, then the request is naked;
//   - failed: the reply could not be published; it is naked without a
//     record, so it counts towards MaxFailures.
//
// A delivery left without any of these (the worker aborted, or died) is
// redelivered by JetStream after the ack wait, and counts as failed too.
type delivery struct {
	w      *Worker
	msg    jetstream.Msg
	shard  int
	md     *jetstream.MsgMetadata // nil when the message has none
	stored time.Time              // when the stream stored it (now, without metadata)
	began  time.Time

	// Set by handle as each is validated.
	replyTo string
	id      string
	key     string // reply cache and runs in flight: see messageKey
	app     string // the application that sent it (protocol.Route.App)
	tenant  string // protocol.TenantKey
	// deadline is the request's budgeted deadline (zero before it is
	// known): replies are offered again until it passes.
	deadline time.Time
	runTime  time.Duration
	// traceparent is the request's W3C trace context (empty without a
	// valid one): on its log lines, its reply and its usage record.
	traceparent string
}

func (w *Worker) newDelivery(msg jetstream.Msg, shard int) *delivery {
	d := &delivery{w: w, msg: msg, shard: shard, began: time.Now()}
	d.traceparent = protocol.Traceparent(msg.Headers().Get(protocol.HeaderTraceparent))
	d.stored = d.began
	if md, err := msg.Metadata(); err == nil {
		d.md = md
		d.stored = md.Timestamp
	}
	return d
}

// answer builds the reply to the request, caches it for redeliveries and
// sends it.
//
// Every answer made here (not a copy sent again from the reply cache) is
// metered once: its usage goes on the reply and in a usage record.
func (d *delivery) answer(runErr error, res *protocol.Result, runTime time.Duration) {
	d.runTime = runTime
	var u *protocol.Usage
	if d.tenant != "" {
		u = d.usageOf(res, runTime)
	}
	hdr, data := d.w.encodeReply(d.id, runErr, res, runTime, u)
	if d.traceparent != "" {
		hdr.Set(protocol.HeaderTraceparent, d.traceparent)
	}
	outcome := protocol.CodeOK
	if code := hdr.Get(protocol.HeaderErrorCode); code != "" {
		outcome = code
	}
	d.meter(outcome, u)
	if outcome == string(protocol.CodeDeadLettered) {
		// Not cached: a redelivery must find the ledger, not a reply.
		d.send(hdr, data, outcome)
		return
	}
	if d.key != "" {
		d.w.cache.put(&cached{id: d.key, reply: data, header: hdr, deadline: d.deadline}, time.Now())
	}
	d.send(hdr, data, outcome)
}

// send publishes a reply and ends the delivery as the reply's code says:
// a bad request is terminated, a dead-lettered one copied and terminated,
// any other acked once the reply is out (confirmed, when the requester
// asked for protocol.HeaderReplyAck).
func (d *delivery) send(hdr nats.Header, data []byte, outcome string) {
	d.log(outcome)
	out := &nats.Msg{Subject: d.replyTo, Header: hdr, Data: data}
	switch protocol.Code(hdr.Get(protocol.HeaderErrorCode)) {
	case protocol.CodeBadRequest:
		// Told once; it can never succeed, whether or not this reached.
		d.publishBestEffort(out)
		d.term(hdr.Get(protocol.HeaderServiceError))
		return
	case protocol.CodeDeadLettered:
		d.publishBestEffort(out)
		d.deadLetter(hdr.Get(protocol.HeaderServiceError))
		return
	}
	if d.msg.Headers().Get(protocol.HeaderReplyAck) == "" || d.deadline.IsZero() {
		if err := d.w.out.publish(out); err != nil {
			d.publishFailed(err)
			return
		}
		d.ack()
		return
	}
	d.sendConfirmed(out)
}

// sendConfirmed publishes a reply whose requester confirms it, and ends
// the delivery when the confirmation comes, without holding a goroutine or
// the worker's capacity meanwhile. Core NATS delivers a reply only to
// whoever listens at that moment: if nobody did (the requester's connection
// was being re-established after a NATS restart, say) or no confirmation
// comes within ReplyAckWait, the request is handed back to the stream, and
// its redelivery publishes the reply again from the reply cache, until it
// is confirmed or the request's deadline passes.
func (d *delivery) sendConfirmed(out *nats.Msg) {
	w := d.w
	w.handlers.Add(1) // Wait waits for the confirmation too
	subject, cancel := w.confirm.expect(func(delivered bool) {
		switch {
		case w.runCtx.Err() != nil:
			// Aborted: leave the request for redelivery elsewhere.
		case delivered:
			d.ack()
		case !time.Now().Before(d.deadline):
			d.logger().Warn().Str("id", d.id).Str("subject", d.replyTo).
				Msg("reply never confirmed by the requester before the request's deadline; giving up")
			d.ack()
		default:
			// The ledger is a round trip: not on the confirmations'
			// subscription goroutine.
			go func() {
				defer w.handlers.Done()
				d.handBack(w.retryDelay(d.msg), "reply not confirmed")
			}()
			return
		}
		w.handlers.Done()
	})
	out.Reply = subject
	if err := w.out.publish(out); err != nil && cancel() {
		w.handlers.Done()
		d.publishFailed(err)
	}
}

// publishBestEffort publishes a reply that is sent once whatever happens.
func (d *delivery) publishBestEffort(out *nats.Msg) {
	if err := d.w.out.publish(out); err != nil {
		d.logger().Warn().Err(err).Str("id", d.id).Int("shard", d.shard).Msg("publish reply")
	}
}

// publishFailed ends a delivery whose reply could not be published. A
// reply the server would refuse can never be sent: the request is
// dead-lettered. Anything else (the connection is down) is a failure: the
// request is offered again and its reply, cached, published again.
func (d *delivery) publishFailed(err error) {
	if errors.Is(err, ErrUnpublishable) {
		d.deadLetter("the reply cannot be published: " + err.Error())
		return
	}
	d.logger().Warn().Err(err).Str("id", d.id).Int("shard", d.shard).Msg("publish reply; the request will be offered again")
	d.nak(d.w.retryDelay(d.msg))
}

// failures returns how many earlier deliveries of the request ended
// without an answer: deliveries so far, less this one, less the hand-backs
// the ledger recorded. A first delivery costs nothing; when the ledger
// cannot be read the request is not held against it (its bounded deadline
// still ends it).
func (d *delivery) failures() uint64 {
	if d.md == nil || d.md.NumDelivered <= 1 || d.w.ledger == nil {
		return 0
	}
	ctx, cancel := context.WithTimeout(context.Background(), ledgerTimeout)
	defer cancel()
	h, err := d.w.ledger.handBacks(ctx, d.md.Sequence.Stream)
	if err != nil {
		d.logger().Warn().Err(err).Str("id", d.id).Msg("read the deliveries ledger")
		return 0
	}
	if unanswered := d.md.NumDelivered - 1; unanswered > h {
		return unanswered - h
	}
	return 0
}

// handBack gives the request back to the stream on purpose, recorded in
// the ledger so that it does not count as a failure.
func (d *delivery) handBack(delay time.Duration, outcome string) {
	if d.md != nil && d.w.ledger != nil {
		ctx, cancel := context.WithTimeout(context.Background(), ledgerTimeout)
		err := d.w.ledger.recordHandBack(ctx, d.md.Sequence.Stream)
		cancel()
		if err != nil {
			d.logger().Warn().Err(err).Str("id", d.id).Msg("record a hand-back in the deliveries ledger")
		}
	}
	d.nak(delay)
	d.log(outcome)
}

// deadLetter copies the request to the dead-letter subject with the reason,
// and terminates it.
func (d *delivery) deadLetter(reason string) {
	w := d.w
	var n uint64
	if d.md != nil {
		n = d.md.NumDelivered
	}
	d.logger().Warn().Str("id", d.id).Int("shard", d.shard).Str("app", d.app).Str("tenant", d.tenant).Uint64("deliveries", n).
		Str("reason", reason).Msg("request dead-lettered")
	ours := nats.Header{}
	ours.Set(protocol.HeaderDeadReason, reason)
	ours.Set(protocol.HeaderDeadDeliveries, strconv.FormatUint(n, 10))
	ours.Set(protocol.HeaderDeadWorker, w.cfg.WorkerID)
	// The request's own headers come along, but none that a stream
	// capturing the dead letters would act on (Nats-TTL, Nats-Expected-*)
	// except the id, which lets such a stream keep one copy of each.
	hdr := nats.Header{}
	for k, vs := range d.msg.Headers() {
		if strings.HasPrefix(k, "Nats-") && k != protocol.HeaderMsgID {
			continue
		}
		hdr[k] = append([]string(nil), vs...)
	}
	for k, vs := range ours {
		hdr[k] = vs
	}
	subject := protocol.DeadSubject(w.cfg.Prefix, d.shard)
	err := w.out.publish(&nats.Msg{Subject: subject, Header: hdr, Data: d.msg.Data()})
	if errors.Is(err, ErrUnpublishable) {
		// The request's headers cannot travel: ours can.
		err = w.out.publish(&nats.Msg{Subject: subject, Header: ours, Data: d.msg.Data()})
	}
	if err != nil {
		d.logger().Warn().Err(err).Str("id", d.id).Msg("publish a dead letter")
	}
	d.term(reason)
}

func (d *delivery) ack() {
	if err := d.msg.Ack(); err != nil {
		d.logger().Warn().Err(err).Msg("ack request")
	}
}

func (d *delivery) term(reason string) {
	if err := d.msg.TermWithReason(truncate(headerValue(reason), 200)); err != nil {
		d.logger().Warn().Err(err).Msg("terminate request")
	}
}

func (d *delivery) nak(delay time.Duration) {
	var err error
	if delay > 0 {
		err = d.msg.NakWithDelay(delay)
	} else {
		err = d.msg.Nak()
	}
	if err != nil {
		d.logger().Warn().Err(err).Msg("hand back request")
	}
}

func (d *delivery) log(outcome string) {
	d.logger().Debug().Str("id", d.id).Int("shard", d.shard).Str("app", d.app).Str("tenant", d.tenant).Str("outcome", outcome).
		Dur("run", d.runTime).Dur("took", time.Since(d.began)).Msg("request")
}

// logger is the worker's logger, with the request's trace context when it
// has one, so that every line about this delivery carries it.
func (d *delivery) logger() *zerolog.Logger {
	if d.traceparent == "" {
		return &d.w.log
	}
	l := d.w.log.With().Str("traceparent", d.traceparent).Logger()
	return &l
}
