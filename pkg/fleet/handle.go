package fleet

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"strconv"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"

	"github.com/isode-run/isode/pkg/protocol"
)

// handle answers one delivered request. It always ends the message's
// delivery one way: acked after a reply, terminated when it can never
// succeed, or given back (nak) when this worker cannot take it now.
func (w *Worker) handle(msg jetstream.Msg, shard int) {
	defer w.handlers.Done()
	defer w.gate.release()
	began := time.Now()

	h := msg.Headers()
	id := h.Get(protocol.HeaderMsgID)
	replyTo := h.Get(protocol.HeaderReplyTo)
	ev := w.log.Debug().Str("id", id).Int("shard", shard)

	if err := w.checkReplyTo(replyTo); err != nil {
		// Nobody can be told; the request can never be answered.
		w.log.Warn().Str("id", id).Int("shard", shard).Err(err).Msg("dropping request without a usable reply subject")
		w.term(msg, err.Error())
		return
	}
	if id == "" {
		w.answer(msg, replyTo, "", protocol.Errorf(protocol.CodeBadRequest, "header %s (the request id) is missing", protocol.HeaderMsgID), nil, 0, ev, began)
		return
	}

	// A redelivery of a request this worker answered already: answer again.
	key := messageKey(msg, id)
	if c, ok := w.cache.get(key, time.Now()); ok {
		w.reply(msg, replyTo, c.header, c.reply, w.ack)
		ev.Str("outcome", "replayed").Dur("took", time.Since(began)).Msg("request")
		return
	}
	// A redelivery of a request still running here: wait for it.
	if done, running := w.joinInflight(key); running {
		stop := w.keepAlive(msg)
		select {
		case <-done:
		case <-w.runCtx.Done():
			stop()
			return
		}
		stop()
		c, ok := w.cache.get(key, time.Now())
		if !ok {
			// The first delivery was handed back unanswered: so is this one.
			w.nak(msg, w.cfg.RetryDelay)
			return
		}
		w.reply(msg, replyTo, c.header, c.reply, w.ack)
		ev.Str("outcome", "joined").Dur("took", time.Since(began)).Msg("request")
		return
	}
	defer w.leaveInflight(key)

	req, err := protocol.DecodeRequest(msg.Data())
	if err != nil {
		w.answer(msg, replyTo, id, err, nil, 0, ev, began)
		return
	}
	ev = ev.Str("tenant", req.IsolateKey)
	if want := protocol.Shard(req.IsolateKey, w.cfg.Shards); want != shard {
		w.answer(msg, replyTo, id, protocol.Errorf(protocol.CodeBadRequest,
			"isolate key %q belongs to shard %d (FNV-1a 32 mod %d) but was published to shard %d", req.IsolateKey, want, w.cfg.Shards, shard), nil, 0, ev, began)
		return
	}
	deadline, err := w.deadline(msg, req.Timeout())
	if err != nil {
		w.answer(msg, replyTo, id, err, nil, 0, ev, began)
		return
	}
	if !time.Now().Before(deadline) {
		w.answer(msg, replyTo, id, protocol.Errorf(protocol.CodeQueueTimeout,
			"the request's deadline passed %v before a worker took it; it was not run", time.Since(deadline).Round(time.Millisecond)), nil, 0, ev, began)
		return
	}
	if req.Timeout() > w.cfg.MaxTimeout {
		req.TimeoutMs = w.cfg.MaxTimeout.Milliseconds()
	}

	ctx, cancel := context.WithDeadline(w.runCtx, deadline)
	stop := w.keepAlive(msg)
	runStart := time.Now()
	res, err := w.run.Run(ctx, req)
	runTime := time.Since(runStart)
	stop()
	cancel()

	switch {
	case w.runCtx.Err() != nil:
		// Aborted: leave the message for redelivery elsewhere.
		return
	case errors.Is(err, protocol.ErrShuttingDown):
		w.nak(msg, 0)
		ev.Str("outcome", "handed back").Msg("request")
		return
	case errors.Is(err, protocol.ErrOverloaded):
		// This tenant's queue here is full: let the stream hold the request
		// and offer it again shortly, so other tenants keep flowing.
		w.nak(msg, w.retryDelay(msg))
		ev.Str("outcome", "deferred").Msg("request")
		return
	case errors.Is(err, context.DeadlineExceeded):
		err = protocol.Errorf(protocol.CodeQueueTimeout, "the request's deadline passed before it could run")
	case err != nil && errors.Is(err, context.Canceled):
		err = protocol.Errorf(protocol.CodeShuttingDown, "the worker stopped while the request ran")
	}
	w.answer(msg, replyTo, id, err, res, runTime, ev, began)
}

// answer builds, caches and publishes the reply, then acks (or terminates a
// request that can never succeed).
func (w *Worker) answer(msg jetstream.Msg, replyTo, id string, runErr error, res *protocol.Result, runTime time.Duration, ev *zerolog.Event, began time.Time) {
	rep := protocol.Reply{V: protocol.Version, ID: id, Worker: w.cfg.WorkerID, RunMicros: runTime.Microseconds()}
	if res != nil {
		rep.Console, rep.ConsoleTruncated = res.Console, res.ConsoleTruncated
	}
	if runErr != nil {
		rep.Error = protocol.AsError(runErr)
	} else if res == nil || len(res.Value) == 0 {
		rep.Result = json.RawMessage("null")
	} else {
		rep.Result = res.Value
	}
	data, err := json.Marshal(&rep)
	if err == nil && len(data) > int(w.nc.MaxPayload())-4096 {
		rep.Result, rep.Console = nil, ""
		rep.Error = protocol.Errorf(protocol.CodeOutputTooLarge, "the reply is %d bytes, over this NATS server's message limit", len(data))
		data, err = json.Marshal(&rep)
	}
	if err != nil {
		rep = protocol.Reply{V: protocol.Version, ID: id, Worker: w.cfg.WorkerID,
			Error: protocol.Errorf(protocol.CodeInternal, "encode reply: %v", err)}
		data, _ = json.Marshal(&rep)
	}
	hdr := nats.Header{}
	hdr.Set(protocol.HeaderRequestID, id)
	if rep.Error != nil {
		hdr.Set(protocol.HeaderErrorCode, string(rep.Error.Code))
		hdr.Set(protocol.HeaderServiceError, rep.Error.Message)
		hdr.Set(protocol.HeaderServiceErrorCode, rep.Error.Code.StatusString())
	}
	if id != "" {
		w.cache.put(&cached{id: messageKey(msg, id), reply: data, header: hdr}, time.Now())
	}
	finish := w.ack
	outcome := "ok"
	if rep.Error != nil {
		outcome = string(rep.Error.Code)
		if rep.Error.Code == protocol.CodeBadRequest {
			reason := rep.Error.Message
			finish = func(msg jetstream.Msg) { w.term(msg, reason) }
		}
	}
	w.reply(msg, replyTo, hdr, data, finish)
	ev.Str("outcome", outcome).Dur("run", runTime).Dur("took", time.Since(began)).Msg("request")
}

// retryDelay is how long a handed-back request waits before it is offered
// again: RetryDelay, doubling with each delivery up to 8 times that, so a
// flooding tenant's surplus does not churn through the stream.
func (w *Worker) retryDelay(msg jetstream.Msg) time.Duration {
	n := uint64(1)
	if md, err := msg.Metadata(); err == nil && md.NumDelivered > 0 {
		n = md.NumDelivered
	}
	return w.cfg.RetryDelay << min(n-1, 3)
}

// reply publishes a reply, then ends the request's delivery with finish
// (ack, or term for a request that can never succeed).
//
// When the requester asked for confirmed replies (protocol.HeaderReplyAck),
// finish waits for its confirmation, without holding a goroutine or the
// worker's capacity. Core NATS delivers a reply only to whoever listens at
// that moment: if nobody did (the requester's connection was being
// re-established after a NATS restart, say) or no confirmation comes within
// ReplyAckWait, the request is handed back to the stream, and its
// redelivery publishes the reply again from the reply cache, until it is
// confirmed or the request's deadline passes.
func (w *Worker) reply(msg jetstream.Msg, replyTo string, hdr nats.Header, data []byte, finish func(jetstream.Msg)) {
	out := &nats.Msg{Subject: replyTo, Header: hdr, Data: data}
	if msg.Headers().Get(protocol.HeaderReplyAck) == "" {
		w.publishReply(out)
		finish(msg)
		return
	}
	deadline := w.replyDeadline(msg)
	w.handlers.Add(1) // Wait waits for the confirmation too
	out.Reply = w.confirm.expect(func(delivered bool) {
		defer w.handlers.Done()
		switch {
		case w.runCtx.Err() != nil:
			// Aborted: leave the request for redelivery elsewhere.
		case delivered:
			finish(msg)
		case !time.Now().Before(deadline):
			w.log.Warn().Str("id", hdr.Get(protocol.HeaderRequestID)).Str("subject", replyTo).
				Msg("reply never confirmed by the requester before the request's deadline; giving up")
			finish(msg)
		default:
			w.log.Debug().Str("id", hdr.Get(protocol.HeaderRequestID)).Msg("reply not confirmed; the request goes back to the stream to be answered again")
			w.nak(msg, w.retryDelay(msg))
		}
	})
	w.publishReply(out)
}

func (w *Worker) publishReply(m *nats.Msg) {
	if err := w.nc.PublishMsg(m); err != nil {
		w.log.Warn().Err(err).Str("subject", m.Subject).Msg("publish reply")
	}
}

func (w *Worker) ack(msg jetstream.Msg) {
	if err := msg.Ack(); err != nil {
		w.log.Warn().Err(err).Msg("ack request")
	}
}

func (w *Worker) term(msg jetstream.Msg, reason string) {
	if len(reason) > 200 {
		reason = reason[:200]
	}
	if err := msg.TermWithReason(reason); err != nil {
		w.log.Warn().Err(err).Msg("terminate request")
	}
}

func (w *Worker) nak(msg jetstream.Msg, delay time.Duration) {
	var err error
	if delay > 0 {
		err = msg.NakWithDelay(delay)
	} else {
		err = msg.Nak()
	}
	if err != nil {
		w.log.Warn().Err(err).Msg("hand back request")
	}
}

// keepAlive tells JetStream the request is still being worked on (see
// progress) until the returned stop is called.
func (w *Worker) keepAlive(msg jetstream.Msg) (stop func()) {
	t := &tracked{msg: msg, since: time.Now()}
	w.progressMu.Lock()
	w.progress[t] = struct{}{}
	w.progressMu.Unlock()
	return func() {
		w.progressMu.Lock()
		delete(w.progress, t)
		w.progressMu.Unlock()
	}
}

// tracked is a request in progress.
type tracked struct {
	msg   jetstream.Msg
	since time.Time
}

// signalProgress runs until ctx ends: every AckWait/3 it sends a progress
// signal for each request held longer than that, so JetStream does not
// redeliver requests that wait in the pool or run long. One goroutine
// serves every request.
func (w *Worker) signalProgress(ctx context.Context) {
	every := w.cfg.AckWait / 3
	t := time.NewTicker(every)
	defer t.Stop()
	var due []jetstream.Msg
	for {
		select {
		case <-ctx.Done():
			return
		case now := <-t.C:
			due = due[:0]
			w.progressMu.Lock()
			for r := range w.progress {
				if now.Sub(r.since) >= every {
					due = append(due, r.msg)
				}
			}
			w.progressMu.Unlock()
			for _, m := range due {
				if err := m.InProgress(); err != nil {
					w.log.Debug().Err(err).Msg("signal progress")
				}
			}
		}
	}
}

// checkReplyTo refuses reply subjects a worker must never publish to: empty
// or wildcard subjects, the NATS system and JetStream API ($...), and this
// fleet's own subjects (a reply must not become a request).
func (w *Worker) checkReplyTo(s string) error {
	switch {
	case s == "":
		return errors.New("header " + protocol.HeaderReplyTo + " is missing")
	case strings.ContainsAny(s, " \t\r\n*>"):
		return errors.New("reply subject " + strconv.Quote(s) + " is not a plain subject")
	case strings.HasPrefix(s, "$"):
		return errors.New("reply subject " + strconv.Quote(s) + " is reserved for the system")
	case strings.HasPrefix(s, w.cfg.Prefix+"."):
		return errors.New("reply subject " + strconv.Quote(s) + " is inside the fleet's own subjects")
	}
	return nil
}

// deadline returns the request's deadline: the header, or (for clients that
// do not send one) the time the stream stored it plus the run timeout and a
// queueing allowance.
func (w *Worker) deadline(msg jetstream.Msg, run time.Duration) (time.Time, error) {
	v := msg.Headers().Get(protocol.HeaderDeadline)
	if v == "" {
		return storedDeadline(msg, run), nil
	}
	ms, err := strconv.ParseInt(v, 10, 64)
	if err != nil || ms <= 0 {
		return time.Time{}, protocol.Errorf(protocol.CodeBadRequest, "header %s is %q, want Unix milliseconds", protocol.HeaderDeadline, v)
	}
	return time.UnixMilli(ms), nil
}

// replyDeadline is how long a reply is worth sending again: until the
// request's deadline, taking the longest run for its own when the header
// is missing or unusable.
func (w *Worker) replyDeadline(msg jetstream.Msg) time.Time {
	if d, err := w.deadline(msg, w.cfg.MaxTimeout); err == nil {
		return d
	}
	return storedDeadline(msg, w.cfg.MaxTimeout)
}

// storedDeadline is the deadline of a request without one: the time the
// stream stored it plus its run timeout and a queueing allowance.
func storedDeadline(msg jetstream.Msg, run time.Duration) time.Time {
	stored := time.Now()
	if md, err := msg.Metadata(); err == nil {
		stored = md.Timestamp
	}
	return stored.Add(run + 30*time.Second)
}

// messageKey names a request for the reply cache and the runs in flight:
// its id and a digest of its body. A redelivery, or a client's retry of
// the same request, has both and is answered with the first reply. A
// different request that reuses an id (another tenant's, once the
// stream's duplicate window has passed) has another body, and must never
// be answered with the reply meant for the first. A body that matches
// carries the same isolate key, which already grants running code in
// that tenant's sandbox: the cache gives away nothing more.
func messageKey(msg jetstream.Msg, id string) string {
	sum := sha256.Sum256(msg.Data())
	return id + "@" + hex.EncodeToString(sum[:16])
}

// joinInflight registers id as running here, or returns the channel of the
// run already in progress.
func (w *Worker) joinInflight(id string) (<-chan struct{}, bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if ch, ok := w.inflight[id]; ok {
		return ch, true
	}
	w.inflight[id] = make(chan struct{})
	return nil, false
}

func (w *Worker) leaveInflight(id string) {
	w.mu.Lock()
	ch := w.inflight[id]
	delete(w.inflight, id)
	w.mu.Unlock()
	if ch != nil {
		close(ch)
	}
}
