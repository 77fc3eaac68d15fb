package dockerx

import (
	"bufio"
	"context"
	"errors"
	"io"
	"sync"
	"sync/atomic"
	"time"

	"github.com/isode-run/isode/pkg/protocol"
)

// agentConn is the host's end of the agent protocol (sandbox/agent.js)
// over one byte stream: it numbers requests, writes their frames, matches
// the agent's replies to them, and fails every call in flight when the
// connection ends. It knows nothing of Docker: its owner (Sandbox) hands
// it the stream (the container's unix socket, or the attach stream's stdin
// with the stdout part of its output), runs its reader, and decides why
// the stream ended. All methods are safe for concurrent use; one goroutine
// at a time reads (readStream or readChunk).
type agentConn struct {
	w          io.Writer // frames to the agent
	c          io.Closer
	maxRequest int // largest request body the agent takes
	// broken is told, once, when the connection fails on its own: a write
	// failed or timed out, or the agent did not answer in time. The owner
	// then ends everything (fail included).
	broken func(*protocol.Error)

	nextID atomic.Uint64
	wmu    sync.Mutex // serialises frames to the agent
	fr     frameReader

	mu      sync.Mutex
	pending map[uint64]*call
	ended   bool
	endErr  *protocol.Error // what calls made after the end get
}

// call is one request waiting for its reply.
type call struct {
	ch        chan outcome // buffered: the reader never blocks on it
	abandoned bool         // the caller went away; the reply is dropped
	wedge     *time.Timer  // for abandoned calls: fails the connection if no reply comes
}

type outcome struct {
	reply *agentReply
	err   error
}

// newAgentConn returns the protocol over rwc: frames are written to rwc
// (with a write deadline when rwc has SetWriteDeadline), replies are read
// by readStream or fed by readChunk, bodies at most maxFrame bytes.
func newAgentConn(rwc io.WriteCloser, maxFrame, maxRequest int, broken func(*protocol.Error)) *agentConn {
	return &agentConn{
		w:          rwc,
		c:          rwc,
		maxRequest: maxRequest,
		broken:     broken,
		fr:         frameReader{max: maxFrame},
		pending:    make(map[uint64]*call),
	}
}

// do sends req (its ID set here) and waits up to wait for the reply.
// When ctx is cancelled before its deadline do returns at once with
// shutting_down, leaving the call to be answered into nothing (or to wedge
// the connection if no answer comes within wait). A connection that ends
// fails the call with the reason given to fail.
func (a *agentConn) do(ctx context.Context, req *agentRequest, wait time.Duration) (*agentReply, error) {
	id := a.nextID.Add(1)
	req.ID = id
	frame, err := encodeFrame(req)
	if err != nil {
		return nil, protocol.Errorf(protocol.CodeBadRequest, "cannot encode the request: %v", err)
	}
	if len(frame)-4 > a.maxRequest {
		return nil, protocol.Errorf(protocol.CodeBadRequest, "request is %d bytes encoded, over the sandbox's limit of %d", len(frame)-4, a.maxRequest)
	}
	c := &call{ch: make(chan outcome, 1)}
	if err := a.register(id, c); err != nil {
		return nil, err
	}
	deadline := time.Now().Add(wait)
	a.send(frame, deadline) // on failure the connection fails, and c with it

	timer := time.NewTimer(wait)
	defer timer.Stop()
	done := ctx.Done()
	for {
		select {
		case o := <-c.ch:
			return o.reply, o.err
		case <-timer.C:
			a.wedged(id, wait)
			o := <-c.ch
			return o.reply, o.err
		case <-done:
			if errors.Is(ctx.Err(), context.DeadlineExceeded) {
				done = nil // the agent answers at its own deadline: wait for it
				continue
			}
			a.abandon(id, deadline)
			return nil, protocol.Errorf(protocol.CodeShuttingDown, "the run was cancelled: %v", context.Cause(ctx))
		}
	}
}

func (a *agentConn) register(id uint64, c *call) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.ended {
		return a.endErr
	}
	a.pending[id] = c
	return nil
}

// send writes one frame. A failed or timed-out write leaves the stream in
// an unknown state: the connection is broken.
func (a *agentConn) send(frame []byte, deadline time.Time) {
	a.wmu.Lock()
	defer a.wmu.Unlock()
	if d, ok := a.w.(interface{ SetWriteDeadline(time.Time) error }); ok {
		_ = d.SetWriteDeadline(deadline)
	}
	if _, err := a.w.Write(frame); err != nil {
		a.broken(protocol.Errorf(protocol.CodeSandboxCrashed, "writing to the sandbox failed: %v", err))
	}
}

// wedged handles a call whose agent did not answer within its wait: the
// connection, which no longer keeps its own deadlines, is broken (its
// owner is told first), then the call fails with timeout.
func (a *agentConn) wedged(id uint64, wait time.Duration) {
	a.mu.Lock()
	c, ok := a.pending[id]
	if ok {
		delete(a.pending, id)
	}
	a.mu.Unlock()
	if !ok {
		return // answered meanwhile, or the connection ended: c.ch has it
	}
	a.broken(protocol.Errorf(protocol.CodeSandboxCrashed, "the sandbox stopped answering (paused or wedged) and was closed"))
	c.ch <- outcome{err: protocol.Errorf(protocol.CodeTimeout,
		"the sandbox did not answer within %v (it is paused or wedged) and was closed", wait.Round(time.Millisecond))}
}

// abandon leaves a call whose caller went away pending, so that its reply
// is recognised and dropped; if none comes by deadline the agent is wedged.
func (a *agentConn) abandon(id uint64, deadline time.Time) {
	a.mu.Lock()
	defer a.mu.Unlock()
	c, ok := a.pending[id]
	if !ok || a.ended {
		return
	}
	c.abandoned = true
	c.wedge = time.AfterFunc(time.Until(deadline), func() { a.wedged(id, time.Until(deadline)) })
}

// fail ends the connection: calls in flight fail with reason (nil: the
// owner closed it, and they fail with sandbox_crashed), later calls get
// reason, and the stream is closed, which ends the reader. It reports
// whether this call ended it.
func (a *agentConn) fail(reason *protocol.Error) bool {
	a.mu.Lock()
	if a.ended {
		a.mu.Unlock()
		return false
	}
	a.ended = true
	runErr := reason
	if reason == nil {
		a.endErr = protocol.Errorf(protocol.CodeSandboxCrashed, "the sandbox was closed")
		runErr = protocol.Errorf(protocol.CodeSandboxCrashed, "the sandbox was closed while the request ran")
	} else {
		a.endErr = reason
	}
	pending := a.pending
	a.pending = nil
	a.mu.Unlock()
	for _, c := range pending {
		if c.wedge != nil {
			c.wedge.Stop()
		}
		c.ch <- outcome{err: runErr}
	}
	_ = a.c.Close()
	return true
}

// readStream reads frames from r, which carries nothing else, until it
// ends or a frame breaks the protocol (an error wrapping errViolation).
func (a *agentConn) readStream(r io.Reader) error {
	br := bufio.NewReaderSize(r, 64<<10)
	for {
		if _, err := br.Peek(1); err != nil {
			return err
		}
		// Exactly what is buffered: readChunk never blocks mid-frame here.
		if err := a.readChunk(br, br.Buffered()); err != nil {
			return err
		}
	}
}

// readChunk consumes exactly n bytes of the agent's output from r (a
// chunk of a multiplexed stream, whose boundaries are not the frames')
// and delivers every reply completed in them.
func (a *agentConn) readChunk(r io.Reader, n int) error {
	return a.fr.readFrom(r, n, a.onFrame)
}

func (a *agentConn) onFrame(body []byte) error {
	r, err := decodeReply(body)
	if err != nil {
		return err
	}
	return a.deliver(r)
}

// deliver hands a reply to its call. A reply to an id that is not pending
// is a violation: the agent answers each request exactly once.
func (a *agentConn) deliver(r *agentReply) error {
	a.mu.Lock()
	c, ok := a.pending[*r.ID]
	if ok {
		delete(a.pending, *r.ID)
	}
	ended := a.ended
	a.mu.Unlock()
	if !ok {
		if ended {
			return nil
		}
		return violation("reply to request %d, which is not in flight", *r.ID)
	}
	if c.wedge != nil {
		c.wedge.Stop()
	}
	c.ch <- outcome{reply: r}
	return nil
}
