package fleet

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"strconv"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/isode-run/isode/pkg/protocol"
)

// handle answers one delivered request. Everything it reads from the
// message is checked at the boundary first (reply subject, id, deadline,
// body); the delivery value then ends the message exactly one way.
func (w *Worker) handle(msg jetstream.Msg, shard int) {
	defer w.handlers.Done()
	defer w.gate.release()
	d := w.newDelivery(msg, shard)

	// The application comes from the subject, which the server set (the
	// application's import maps its requests there), never from a header.
	route, ok := protocol.ParseStreamSubject(w.cfg.Prefix, msg.Subject())
	if !ok || route.Shard != shard {
		d.deadLetter("the request's subject " + strconv.Quote(truncate(msg.Subject(), 200)) + " is not one of shard " + strconv.Itoa(shard) + "'s request subjects")
		return
	}
	d.app = route.App
	replyTo, err := w.replyTarget(route, msg.Headers().Get(protocol.HeaderReplyTo))
	if err != nil {
		// Nobody can be told; the request can never be answered.
		d.deadLetter(err.Error())
		return
	}
	d.replyTo = replyTo
	if err := protocol.ValidateRequestID(msg.Headers().Get(protocol.HeaderMsgID)); err != nil {
		d.answer(err, nil, 0)
		return
	}
	d.id = msg.Headers().Get(protocol.HeaderMsgID)
	d.key = messageKey(msg, route.App, d.id)

	// A redelivery of a request this worker answered already: answer again.
	if c, ok := w.cache.get(d.key, time.Now()); ok {
		d.deadline = c.deadline
		d.send(c.header, c.reply, "replayed")
		return
	}
	// A redelivery of a request still running here: wait for it.
	if done, running := w.joinInflight(d.key); running {
		stop := w.keepAlive(msg)
		select {
		case <-done:
		case <-w.runCtx.Done():
			stop()
			return
		}
		stop()
		c, ok := w.cache.get(d.key, time.Now())
		if !ok {
			// The first delivery was handed back unanswered: so is this one.
			d.handBack(w.cfg.RetryDelay, "joined a run that was handed back")
			return
		}
		d.deadline = c.deadline
		d.send(c.header, c.reply, "joined")
		return
	}
	defer w.leaveInflight(d.key)

	if n := d.failures(); n >= uint64(w.cfg.MaxFailures) {
		err := protocol.Errorf(protocol.CodeDeadLettered,
			"the request was delivered %d times and %d ended without an answer (a worker died while it ran, or its reply could not be published): it is not run again and was copied to %s",
			d.md.NumDelivered, n, protocol.DeadSubject(w.cfg.Prefix, shard))
		d.answer(err, nil, 0)
		return
	}

	req, err := protocol.DecodeRequest(msg.Data())
	if err != nil {
		d.answer(err, nil, 0)
		return
	}
	d.tenant = protocol.TenantKey(route.App, req.IsolateKey)
	if want := protocol.Shard(req.IsolateKey, w.cfg.Shards); want != shard {
		d.answer(protocol.Errorf(protocol.CodeBadRequest,
			"isolate key %q belongs to shard %d (FNV-1a 32 mod %d) but was published to shard %d", req.IsolateKey, want, w.cfg.Shards, shard), nil, 0)
		return
	}
	b, err := w.budgetOf(d, req)
	if err != nil {
		d.answer(err, nil, 0)
		return
	}
	d.deadline = b.deadline
	if !time.Now().Before(b.deadline) {
		d.answer(protocol.Errorf(protocol.CodeQueueTimeout,
			"the request's deadline passed %v before a worker took it; it was not run", time.Since(b.deadline).Round(time.Millisecond)), nil, 0)
		return
	}

	ctx, cancel := context.WithDeadline(w.runCtx, b.deadline)
	stop := w.keepAlive(msg)
	runStart := time.Now()
	res, err := w.run.Run(ctx, b.request(req, d.tenant))
	runTime := time.Since(runStart)
	stop()
	cancel()

	switch {
	case w.runCtx.Err() != nil:
		// Aborted: leave the message for redelivery elsewhere.
		return
	case errors.Is(err, protocol.ErrShuttingDown):
		d.handBack(0, "handed back")
		return
	case errors.Is(err, protocol.ErrOverloaded):
		// This tenant's queue here is full: let the stream hold the request
		// and offer it again shortly, so other tenants keep flowing.
		d.handBack(w.retryDelay(msg), "deferred")
		return
	case errors.Is(err, context.DeadlineExceeded):
		err = protocol.Errorf(protocol.CodeQueueTimeout, "the request's deadline passed before it could run")
	case err != nil && errors.Is(err, context.Canceled):
		err = protocol.Errorf(protocol.CodeShuttingDown, "the worker stopped while the request ran")
	}
	d.answer(err, res, runTime)
}

// replyTarget is the subject a stored request's reply is published to,
// from its HeaderReplyTo, checked. The implicit application's replies and
// calls' go to that subject as it is (a call's is the reply subject the
// server gave the call); another application's go under its ReplySubject,
// which only that application imports: whatever a request names, its
// reply stays in the namespace of the application that sent it.
func (w *Worker) replyTarget(r protocol.Route, replyTo string) (string, error) {
	if err := protocol.ValidateReplyTo(replyTo, w.cfg.Prefix); err != nil {
		return "", err
	}
	if r.App != protocol.DefaultApplication && !r.Called {
		replyTo = protocol.ReplySubject(w.cfg.Prefix, r.App, replyTo)
	}
	if err := w.out.replyFits(replyTo); err != nil {
		return "", err
	}
	return replyTo, nil
}

// checkReplyTo checks a reply subject from outside (a request's, a stats
// request's): the protocol's rules, and the server's limits.
func (w *Worker) checkReplyTo(s string) error {
	if err := protocol.ValidateReplyTo(s, w.cfg.Prefix); err != nil {
		return err
	}
	return w.out.replyFits(s)
}

// budget is a request's time on this worker, computed once when it is
// taken and passed down: every later decision reads it.
type budget struct {
	// deadline ends the request, run or not: the deadline it asked for,
	// but never later than the time the stream stored it plus the longest
	// queue wait and its run timeout.
	deadline time.Time
	// run is the snippet's timeout: what it asked for, at most MaxTimeout.
	run time.Duration
}

// budgetOf computes the budget of a decoded request from its
// HeaderDeadline, counted from when the stream stored it.
func (w *Worker) budgetOf(d *delivery, req *protocol.Request) (budget, error) {
	return w.cfg.budget(req, d.stored, d.msg.Headers().Get(protocol.HeaderDeadline))
}

// budget is the one rule for a request's time: its run timeout is what it
// asks for, at most MaxTimeout; its deadline is the one it asks for
// (header, Unix ms; refused with bad_request when not a time) but never
// later than from + MaxQueueWait + the run timeout. from is when the
// stream stored it (or, for a call not yet stored, when it arrived).
func (c *Config) budget(req *protocol.Request, from time.Time, header string) (budget, error) {
	asked, err := protocol.ParseDeadline(header)
	if err != nil {
		return budget{}, err
	}
	b := budget{run: min(req.Timeout(), c.MaxTimeout)}
	b.deadline = from.Add(c.MaxQueueWait + b.run)
	if !asked.IsZero() && asked.Before(b.deadline) {
		b.deadline = asked
	}
	return b, nil
}

// request returns req as the runner gets it: the budget's run timeout,
// and the tenant (protocol.TenantKey) as its isolate key, so that two
// applications' equal keys are two tenants.
func (b budget) request(req *protocol.Request, tenant string) *protocol.Request {
	if req.Timeout() == b.run && req.IsolateKey == tenant {
		return req
	}
	r := *req
	r.TimeoutMs = b.run.Milliseconds()
	r.IsolateKey = tenant
	return &r
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

// encodeReply builds the reply to a request and its headers. A reply that
// would not fit in one NATS message becomes an output_too_large error.
//
// u, when set, is the request's usage: it is added to the reply, and its
// BytesOut set to the size of the reply without it.
func (w *Worker) encodeReply(id string, runErr error, res *protocol.Result, runTime time.Duration, u *protocol.Usage) (nats.Header, []byte) {
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
	if err != nil {
		rep = protocol.Reply{V: protocol.Version, ID: id, Worker: w.cfg.WorkerID,
			Error: protocol.Errorf(protocol.CodeInternal, "encode reply: %v", err)}
		data, _ = json.Marshal(&rep)
	}
	data = withUsage(data, u)
	hdr := replyHeader(id, rep.Error)
	if room := w.out.room(hdr); len(data) > room {
		size := len(data)
		rep.Result, rep.Console, rep.ConsoleTruncated = nil, "", false
		rep.Error = protocol.Errorf(protocol.CodeOutputTooLarge, "the reply is %d bytes, over this NATS server's message limit", size)
		data, _ = json.Marshal(&rep)
		data = withUsage(data, u)
		hdr = replyHeader(id, rep.Error)
	}
	return hdr, data
}

// replyHeader returns a reply's headers, already clean (see headerValue):
// a cached reply's headers are published again, concurrently, and must
// not need changing.
func replyHeader(id string, e *protocol.Error) nats.Header {
	hdr := nats.Header{}
	if id != "" {
		hdr.Set(protocol.HeaderRequestID, id)
	}
	if e != nil {
		hdr.Set(protocol.HeaderErrorCode, string(e.Code))
		hdr.Set(protocol.HeaderServiceError, headerValue(e.Message))
		hdr.Set(protocol.HeaderServiceErrorCode, e.Code.StatusString())
	}
	return hdr
}

// messageKey names a request for the reply cache and the runs in flight:
// its id and a digest of its body. A redelivery, or a client's retry of
// the same request, has both and is answered with the first reply. A
// different request that reuses an id (another tenant's, once the
// stream's duplicate window has passed) has another body, and must never
// be answered with the reply meant for the first. A body that matches
// carries the same isolate key, which already grants running code in
// that tenant's sandbox: the cache gives away nothing more. The
// application is part of the key: another application's request with the
// same id and body is another tenant's and never gets this reply.
func messageKey(msg jetstream.Msg, app, id string) string {
	sum := sha256.Sum256(msg.Data())
	return app + "/" + id + "@" + hex.EncodeToString(sum[:16])
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
