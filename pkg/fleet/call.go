package fleet

import (
	"context"
	"errors"
	"strconv"
	"time"

	"github.com/google/uuid"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nats.go/micro"

	"github.com/isode-run/isode/pkg/client"
	"github.com/isode-run/isode/pkg/protocol"
)

// callAckTimeout bounds the wait for the stream's acknowledgement of a
// call put on the stream; past it the caller is told overloaded.
const callAckTimeout = 5 * time.Second

// callTTLSlack is how long past its deadline a call's request may stay in
// the stream (Nats-TTL), as pkg/client allows.
const callTTLSlack = 5 * time.Second

// call takes one plain request on protocol.CallSubject. It runs on the
// endpoint's subscription goroutine, so it never waits: it checks the
// call at the boundary, answers what is wrong at once, and hands the
// publish to the stream to a goroutine (at most MaxPendingCalls of them).
//
// The request then takes the stream's path like any other (shard,
// backpressure, at-least-once, fairness, the reply cache), and whichever
// worker runs it answers on the call's reply subject. The window this door
// adds: a worker that dies after taking a call and before the stream
// stored it loses the call; its caller sees a timeout, and may retry.
//
// Applications as NATS accounts: an application's CallSubject arrives on
// protocol.AppCallSubject (its import maps it there; a token the caller
// cannot forge); its request is stored on protocol.CalledSubject, which
// only workers publish to, so the reply goes to the call's reply subject
// as it is: the response subject the server made for this call.
func (w *Worker) call(req micro.Request) {
	taken := time.Now()
	c := &w.calls
	c.calls.Add(1)
	app, ok := protocol.ParseCallSubject(w.cfg.Prefix, req.Subject())
	if !ok {
		c.dropped.Add(1)
		w.log.Debug().Str("subject", req.Subject()).Msg("call on a subject that names no valid application: dropped")
		return
	}
	replyTo := req.Reply()
	if replyTo == "" {
		// Nobody to tell: a publish, not a request.
		c.dropped.Add(1)
		w.log.Debug().Str("subject", req.Subject()).Msg("call without a reply subject: dropped")
		return
	}
	if err := w.checkReplyTo(replyTo); err != nil {
		// Not a subject the worker may publish to: nobody can be told.
		c.dropped.Add(1)
		w.log.Debug().Err(err).Msg("call with an unusable reply subject: dropped")
		return
	}
	r, err := protocol.DecodeRequest(req.Data())
	if err != nil {
		w.answerCall(replyTo, "", err)
		return
	}
	b, err := w.cfg.budget(r, taken, req.Headers().Get(protocol.HeaderDeadline))
	if err != nil {
		w.answerCall(replyTo, "", err)
		return
	}
	deadline := b.deadline

	w.callMu.Lock()
	closed := w.callsClosed
	if !closed {
		select {
		case w.callSlots <- struct{}{}:
		default:
			w.callMu.Unlock()
			w.answerCall(replyTo, "", protocol.Errorf(protocol.CodeOverloaded,
				"worker %s has %d calls waiting for the request stream: retry later with backoff", w.cfg.WorkerID, cap(w.callSlots)))
			return
		}
		w.callers.Add(1)
	}
	w.callMu.Unlock()
	if closed {
		// Taken from the subscription after the service stopped.
		w.answerCall(replyTo, "", protocol.Errorf(protocol.CodeShuttingDown, "worker %s is stopping: retry", w.cfg.WorkerID))
		return
	}
	traceparent := protocol.Traceparent(req.Headers().Get(protocol.HeaderTraceparent))
	c.pending.Add(1)
	go func() {
		defer w.callers.Done()
		defer func() { <-w.callSlots; c.pending.Add(-1) }()
		w.queueCall(app, r, req.Data(), replyTo, deadline, taken, traceparent)
	}()
}

// callSubject is where a call of app is stored in the request stream.
func (w *Worker) callSubject(app string, shard int) string {
	if app == protocol.DefaultApplication {
		return protocol.RunSubject(w.cfg.Prefix, shard)
	}
	return protocol.CalledSubject(w.cfg.Prefix, app, shard)
}

// queueCall publishes a call's request to the stream and answers the
// caller at once when the stream does not take it.
func (w *Worker) queueCall(app string, r *protocol.Request, body []byte, replyTo string, deadline, taken time.Time, traceparent string) {
	id := uuid.NewString()
	m := nats.NewMsg(w.callSubject(app, protocol.Shard(r.IsolateKey, w.cfg.Shards)))
	m.Data = body
	m.Header.Set(protocol.HeaderMsgID, id)
	m.Header.Set(protocol.HeaderReplyTo, replyTo)
	m.Header.Set(protocol.HeaderDeadline, strconv.FormatInt(deadline.UnixMilli(), 10))
	if traceparent != "" {
		m.Header.Set(protocol.HeaderTraceparent, traceparent)
	}
	// No Isode-Reply-Ack: a plain caller does not confirm replies.

	ctx, cancel := context.WithTimeout(context.Background(), callAckTimeout)
	ack, err := w.js.PublishMsg(ctx, m, jetstream.WithExpectStream(protocol.StreamName(w.cfg.Prefix)),
		// Let the stream drop the request by itself once nobody waits for it.
		jetstream.WithMsgTTL(time.Until(deadline)+callTTLSlack))
	cancel()
	w.calls.accept(time.Since(taken))
	switch {
	case err != nil:
		w.answerCall(replyTo, id, callRefusal(id, w.cfg.Prefix, err))
	case ack.Duplicate:
		// A fresh random id: cannot happen unless the stream is not ours.
		w.answerCall(replyTo, id, protocol.Errorf(protocol.CodeInternal, "the request stream took request id %s as a duplicate", id))
	default:
		w.calls.queued.Add(1)
	}
}

// callRefusal maps the error of a call's publish to the stream to the
// error its caller gets.
func callRefusal(id, prefix string, err error) *protocol.Error {
	var api *jetstream.APIError
	if errors.As(err, &api) {
		return client.StreamRefusal(id, protocol.StreamName(prefix), api)
	}
	if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, nats.ErrTimeout) {
		return protocol.Errorf(protocol.CodeOverloaded, "the request stream did not acknowledge the request within %v: retry later with backoff", callAckTimeout)
	}
	return protocol.Errorf(protocol.CodeInternal, "queue the request: %v", err)
}

// answerCall answers a call that will not run, through the outbox, with
// the same reply JSON and headers as the stream's path.
func (w *Worker) answerCall(replyTo, id string, err error) {
	w.calls.fail(protocol.CodeOf(err))
	hdr, data := w.encodeReply(id, err, nil, 0, nil)
	if err := w.out.publish(&nats.Msg{Subject: replyTo, Header: hdr, Data: data}); err != nil {
		w.log.Debug().Err(err).Msg("answer a call")
	}
}

// stopService stops the micro service: no call is taken after it returns,
// calls still arriving are answered shutting_down, and calls on their way
// to the stream are published (or refused) before it returns.
func (w *Worker) stopService() {
	w.mu.Lock()
	svc := w.svc
	w.svc = nil
	w.mu.Unlock()
	if svc != nil {
		if err := svc.Stop(); err != nil {
			w.log.Warn().Err(err).Msg("stop the micro service")
		}
	}
	w.callMu.Lock()
	w.callsClosed = true
	w.callMu.Unlock()
	w.callers.Wait()
}
