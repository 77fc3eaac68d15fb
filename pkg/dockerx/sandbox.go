package dockerx

import (
	"bufio"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/isode-run/isode/pkg/protocol"
)

// Sandbox is one container running the agent. It implements pool.Sandbox;
// all methods are safe for concurrent use.
type Sandbox struct {
	rt      *Runtime
	id      string
	name    string
	created time.Time
	tenant  atomic.Pointer[string]
	nextID  atomic.Uint64

	conn net.Conn   // the attach connection: stdin out, multiplexed stdout/stderr in
	wmu  sync.Mutex // serialises frames to stdin

	mu      sync.Mutex
	pending map[uint64]*call
	gone    bool
	err     error // why it is gone; nil after Close
	stderr  tail
	exit    *exitInfo // from the die event
	oom     bool      // an oom event was seen

	done chan struct{} // closed when gone
	died chan struct{} // closed on the die event
	oomc chan struct{} // closed on the oom event
	wg   sync.WaitGroup
}

// call is one request waiting for its reply.
type call struct {
	ch        chan outcome // buffered: the reader never blocks on it
	abandoned bool         // the caller went away; the reply is dropped
	wedge     *time.Timer  // for abandoned calls: fails the sandbox if no reply comes
}

type outcome struct {
	reply *agentReply
	err   error
}

type exitInfo struct{ code int }

func newSandbox(rt *Runtime, id, name, tenant string) *Sandbox {
	s := &Sandbox{
		rt:      rt,
		id:      id,
		name:    name,
		created: time.Now(),
		pending: make(map[uint64]*call),
		stderr:  tail{max: rt.cfg.StderrTailBytes},
		done:    make(chan struct{}),
		died:    make(chan struct{}),
		oomc:    make(chan struct{}),
	}
	s.tenant.Store(&tenant)
	return s
}

// ID returns the container id.
func (s *Sandbox) ID() string { return s.id }

// Name returns the container name.
func (s *Sandbox) Name() string { return s.name }

// Tenant returns the isolate key the sandbox was created for or assigned
// to, or "" while it is free.
func (s *Sandbox) Tenant() string { return *s.tenant.Load() }

// Assign records the tenant a free sandbox now serves. It does not block
// and makes no Docker call: labels cannot change after create, and a rename
// on every assignment would put a Docker call on the pool's hot path for
// the sake of `docker ps`. The tenant a container was created for is in its
// LabelTenant label; the tenant it was assigned to is in Tenant.
func (s *Sandbox) Assign(tenant string) { s.tenant.Store(&tenant) }

// Done is closed when the sandbox has died or been closed.
func (s *Sandbox) Done() <-chan struct{} { return s.done }

// Err says why the sandbox is gone once Done is closed: a *protocol.Error
// with CodeOutOfMemory or CodeSandboxCrashed, or nil after Close.
func (s *Sandbox) Err() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.err
}

// StderrTail returns the last bytes the agent wrote to stderr (bounded by
// Config.StderrTailBytes), for logs.
func (s *Sandbox) StderrTail() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.stderr.String()
}

// Run runs one snippet and returns its result. Errors are *protocol.Error
// values: code_error, timeout, out_of_memory and output_too_large come from
// the snippet; sandbox_crashed when the sandbox died or broke protocol
// meanwhile (Err then says why); bad_request for a request the agent cannot
// take. The returned Result carries console output alongside a snippet's
// error.
//
// The snippet gets min(req.Timeout(), time left before ctx's deadline), less
// Config.RunMargin, measured by the agent. Run waits up to Config.RunGrace
// past that for the agent's answer; a sandbox that does not answer by then
// (paused, wedged) is closed and the run fails with timeout. When ctx is
// cancelled before its deadline, Run returns at once with shutting_down.
func (s *Sandbox) Run(ctx context.Context, req *protocol.Request) (*protocol.Result, error) {
	if req == nil || req.Code == "" {
		return nil, protocol.Errorf(protocol.CodeBadRequest, "no code to run")
	}
	start := time.Now()
	budget := req.Timeout()
	if dl, ok := ctx.Deadline(); ok && dl.Sub(start) < budget {
		budget = dl.Sub(start)
	}
	agentBudget := budget - s.rt.cfg.RunMargin
	if agentBudget < time.Millisecond {
		return nil, protocol.Errorf(protocol.CodeQueueTimeout, "the request's deadline passed before the snippet could start")
	}
	id := s.nextID.Add(1)
	frame, err := encodeFrame(agentRequest{
		ID:              id,
		Op:              "run",
		Code:            req.Code,
		Input:           req.Input,
		TimeoutMs:       int64((agentBudget + time.Millisecond - 1) / time.Millisecond),
		LimitMs:         budget.Milliseconds(),
		MaxResultBytes:  s.rt.cfg.MaxResultBytes,
		MaxConsoleBytes: s.rt.cfg.MaxConsoleBytes,
	})
	if err != nil {
		return nil, protocol.Errorf(protocol.CodeBadRequest, "cannot encode the request: %v", err)
	}
	if len(frame)-4 > s.rt.cfg.MaxRequestBytes {
		return nil, protocol.Errorf(protocol.CodeBadRequest, "request is %d bytes encoded, over the sandbox's limit of %d", len(frame)-4, s.rt.cfg.MaxRequestBytes)
	}
	return s.roundTrip(ctx, id, frame, budget+s.rt.cfg.RunGrace)
}

// roundTrip sends a frame and waits up to wait for its reply.
func (s *Sandbox) roundTrip(ctx context.Context, id uint64, frame []byte, wait time.Duration) (*protocol.Result, error) {
	c := &call{ch: make(chan outcome, 1)}
	if err := s.register(id, c); err != nil {
		return nil, err
	}
	deadline := time.Now().Add(wait)
	s.send(frame, deadline) // on failure the sandbox fails, and c with it

	timer := time.NewTimer(wait)
	defer timer.Stop()
	done := ctx.Done()
	for {
		select {
		case o := <-c.ch:
			return s.result(o)
		case <-timer.C:
			s.wedged(id, wait)
			return s.result(<-c.ch)
		case <-done:
			if errors.Is(ctx.Err(), context.DeadlineExceeded) {
				done = nil // the agent answers at its own deadline: wait for it
				continue
			}
			s.abandon(id, deadline)
			return nil, protocol.Errorf(protocol.CodeShuttingDown, "the run was cancelled: %v", context.Cause(ctx))
		}
	}
}

func (s *Sandbox) register(id uint64, c *call) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.gone {
		return s.goneError()
	}
	s.pending[id] = c
	return nil
}

// goneError is what a run on a gone sandbox returns. s.mu is held.
func (s *Sandbox) goneError() error {
	if pe := protocol.AsError(s.err); pe != nil {
		return pe
	}
	return protocol.Errorf(protocol.CodeSandboxCrashed, "the sandbox was closed")
}

// send writes one frame to the agent. A failed or timed-out write leaves
// the stream in an unknown state: the sandbox is failed.
func (s *Sandbox) send(frame []byte, deadline time.Time) {
	s.wmu.Lock()
	defer s.wmu.Unlock()
	_ = s.conn.SetWriteDeadline(deadline)
	if _, err := s.conn.Write(frame); err != nil {
		s.end(protocol.Errorf(protocol.CodeSandboxCrashed, "writing to the sandbox failed: %v", err), true)
	}
}

// result turns an agent reply into Run's results.
func (s *Sandbox) result(o outcome) (*protocol.Result, error) {
	if o.err != nil {
		return nil, o.err
	}
	r := o.reply
	res := &protocol.Result{Console: r.Console, ConsoleTruncated: r.ConsoleTruncated}
	if u := r.Usage; u != nil {
		if u.CPUNanos != nil {
			res.Usage.CPUMicros, res.Usage.CPUMeasured = *u.CPUNanos/1000, true
		}
		res.Usage.MemoryBytes, res.Usage.MemoryPeakBytes = u.RSS, u.PeakRSS
	}
	if len(res.Console) > s.rt.cfg.MaxConsoleBytes {
		res.Console = truncate(res.Console, s.rt.cfg.MaxConsoleBytes)
		res.ConsoleTruncated = true
	}
	if r.Error != nil {
		return res, r.Error
	}
	if len(r.Result) > s.rt.cfg.MaxResultBytes {
		return res, protocol.Errorf(protocol.CodeOutputTooLarge, "result is %d bytes of JSON, over the limit of %d", len(r.Result), s.rt.cfg.MaxResultBytes)
	}
	res.Value = r.Result
	return res, nil
}

// wedged handles a call whose agent did not answer within its wait: the
// call fails with timeout and the sandbox, which no longer keeps its own
// deadlines, is closed.
func (s *Sandbox) wedged(id uint64, wait time.Duration) {
	s.mu.Lock()
	c, ok := s.pending[id]
	if ok {
		delete(s.pending, id)
	}
	s.mu.Unlock()
	if !ok {
		return // answered meanwhile, or the sandbox ended: c.ch has it
	}
	// Gone first, told second: see end.
	s.end(protocol.Errorf(protocol.CodeSandboxCrashed, "the sandbox stopped answering (paused or wedged) and was closed"), true)
	c.ch <- outcome{err: protocol.Errorf(protocol.CodeTimeout,
		"the sandbox did not answer within %v (it is paused or wedged) and was closed", wait.Round(time.Millisecond))}
}

// abandon leaves a call whose caller went away pending, so that its reply
// is recognised and dropped; if none comes by deadline the sandbox is wedged.
func (s *Sandbox) abandon(id uint64, deadline time.Time) {
	s.mu.Lock()
	defer s.mu.Unlock()
	c, ok := s.pending[id]
	if !ok || s.gone {
		return
	}
	c.abandoned = true
	c.wedge = time.AfterFunc(time.Until(deadline), func() { s.wedged(id, time.Until(deadline)) })
}

// deliver hands a reply to its call. A reply to an id that is not pending
// is a violation: the agent answers each request exactly once.
func (s *Sandbox) deliver(r *agentReply) error {
	s.mu.Lock()
	c, ok := s.pending[*r.ID]
	if ok {
		delete(s.pending, *r.ID)
	}
	gone := s.gone
	s.mu.Unlock()
	if !ok {
		if gone {
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

// end makes the sandbox gone for reason (nil: closed by its owner), fails
// the calls in flight and closes the connection, which ends the reader. It
// removes the container in the background when removeAsync is set. It
// reports whether this call ended it.
func (s *Sandbox) end(reason *protocol.Error, removeAsync bool) bool {
	s.mu.Lock()
	if s.gone {
		s.mu.Unlock()
		return false
	}
	s.gone = true
	runErr := reason
	if reason != nil {
		s.err = reason
	} else {
		runErr = protocol.Errorf(protocol.CodeSandboxCrashed, "the sandbox was closed while the request ran")
	}
	pending := s.pending
	s.pending = nil
	conn := s.conn
	s.mu.Unlock()

	// Done is closed before any caller hears of the end: a caller that
	// learns its run failed must find the sandbox gone, or its owner
	// (the pool) hands the dead sandbox to the tenant's next request.
	close(s.done)
	for _, c := range pending {
		if c.wedge != nil {
			c.wedge.Stop()
		}
		c.ch <- outcome{err: runErr}
	}
	if conn != nil {
		_ = conn.Close()
	}
	if reason != nil {
		s.mu.Lock()
		stderr := lastLine(s.stderr.String(), 300)
		s.mu.Unlock()
		s.rt.log.Warn("sandbox ended", "container", s.id, "tenant", s.Tenant(), "code", reason.Code, "reason", reason.Message, "stderr", stderr)
	}
	if removeAsync {
		s.rt.removeInBackground(s.id)
	}
	s.rt.forget(s)
	return true
}

// Close stops and removes the container. Runs in flight fail with
// sandbox_crashed. It is idempotent; a container that is already gone is
// no error. It waits for the sandbox's reader to stop.
func (s *Sandbox) Close(ctx context.Context) error {
	s.end(nil, false)
	err := s.rt.remove(ctx, s.id)
	s.wg.Wait()
	return err
}

// attach starts the reader of the attach stream.
func (s *Sandbox) attach(conn net.Conn, r *bufio.Reader) {
	s.mu.Lock()
	s.conn = conn
	gone := s.gone
	s.mu.Unlock()
	if gone { // closed while being created
		_ = conn.Close()
	}
	s.wg.Add(1)
	go s.read(r)
}

// read owns the output side of the attach stream until it ends, then
// decides why the sandbox is gone.
func (s *Sandbox) read(r *bufio.Reader) {
	defer s.wg.Done()
	err := s.demux(r)
	s.mu.Lock()
	gone := s.gone
	s.mu.Unlock()
	if gone {
		return
	}
	if errors.Is(err, errViolation) {
		s.end(protocol.Errorf(protocol.CodeSandboxCrashed, "%v", err), true)
		return
	}
	if reason := s.deathReason(err); reason != nil {
		s.end(reason, true)
	}
}

// Docker's stream ids in the multiplexed attach stream.
const (
	streamStdout    = 1
	streamStderr    = 2
	streamSystemErr = 3
)

// demux reads Docker's 8-byte-header frames: stdout goes to the frame
// reader, stderr to the bounded tail.
func (s *Sandbox) demux(r io.Reader) error {
	fr := frameReader{max: s.rt.cfg.MaxFrameBytes}
	var hdr [8]byte
	var chunk [4096]byte
	for {
		if _, err := io.ReadFull(r, hdr[:]); err != nil {
			return err
		}
		n := int(binary.BigEndian.Uint32(hdr[4:]))
		switch hdr[0] {
		case streamStdout:
			if err := fr.readFrom(r, n, s.onFrame); err != nil {
				return err
			}
		case streamStderr:
			for n > 0 {
				k, err := io.ReadFull(r, chunk[:min(n, len(chunk))])
				s.mu.Lock()
				s.stderr.Write(chunk[:k])
				s.mu.Unlock()
				if err != nil {
					return err
				}
				n -= k
			}
		case streamSystemErr:
			k, _ := io.ReadFull(r, chunk[:min(n, len(chunk))])
			return fmt.Errorf("docker reported an error on the attach stream: %s", truncate(string(chunk[:k]), 512))
		default:
			return fmt.Errorf("attach stream has an unknown stream id %d", hdr[0])
		}
	}
}

func (s *Sandbox) onFrame(body []byte) error {
	r, err := decodeReply(body)
	if err != nil {
		return err
	}
	return s.deliver(r)
}

// noteOOM and noteDie record the container's events.
func (s *Sandbox) noteOOM() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.oom {
		s.oom = true
		close(s.oomc)
	}
}

func (s *Sandbox) noteDie(code int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.exit != nil {
		return
	}
	s.exit = &exitInfo{code: code}
	close(s.died)
	if s.conn != nil {
		// The attach stream ends when the container dies; should it not,
		// this wakes the reader so that the death is noticed anyway.
		_ = s.conn.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
	}
}

// Waits of deathReason: for the die event after the stream ended, and for
// an oom event after a die with exit code 137. The oom event can trail the
// die event: on a loaded CI machine 250 ms was not always enough, and an
// out-of-memory death was reported as a plain SIGKILL. Only a SIGKILL from
// outside pays the full wait.
const (
	dieEventWait = 750 * time.Millisecond
	oomEventWait = time.Second
)

// deathReason says why the attach stream ended with err, from the
// container's die and oom events, or by inspecting it when none came. It
// returns nil when the sandbox was closed meanwhile.
func (s *Sandbox) deathReason(streamErr error) *protocol.Error {
	t := time.NewTimer(dieEventWait)
	defer t.Stop()
	select {
	case <-s.died:
	case <-t.C:
	case <-s.done: // closed meanwhile: the reason no longer matters
		return nil
	}
	s.mu.Lock()
	exit, oom, stderr := s.exit, s.oom, s.stderr.String()
	s.mu.Unlock()
	if exit != nil && exit.code == 137 && !oom {
		// The kernel's OOM kill is reported apart from the exit: give it a moment.
		t := time.NewTimer(oomEventWait)
		select {
		case <-s.oomc:
			oom = true
		case <-t.C:
		case <-s.done:
		}
		t.Stop()
	}
	if exit == nil {
		ctx, cancel := context.WithTimeout(s.rt.ctx, s.rt.cfg.CallTimeout)
		info, err := s.rt.cli.ContainerInspect(ctx, s.id)
		cancel()
		switch {
		case err == nil && info.State != nil && !info.State.Running:
			exit = &exitInfo{code: info.State.ExitCode}
			oom = oom || info.State.OOMKilled
		case err == nil:
			return protocol.Errorf(protocol.CodeSandboxCrashed, "lost the connection to the sandbox: %v", streamErr)
		default:
			return protocol.Errorf(protocol.CodeSandboxCrashed, "the sandbox is gone (its output ended: %v)", streamErr)
		}
	}
	return exitReason(exit.code, oom, stderr, s.rt.cfg.Memory)
}

// exitReason classifies a container's exit.
func exitReason(code int, oom bool, stderr string, memory int64) *protocol.Error {
	switch {
	case oom:
		return protocol.Errorf(protocol.CodeOutOfMemory, "the sandbox ran out of memory (limit %d MiB) and was killed", memory/MiB)
	case code == 134 && heapAbort(stderr):
		return protocol.Errorf(protocol.CodeOutOfMemory, "the sandbox's JavaScript heap ran out of memory and the agent aborted")
	case code == 137:
		return protocol.Errorf(protocol.CodeSandboxCrashed, "the sandbox was killed (SIGKILL, exit code 137)")
	case code == 0:
		return protocol.Errorf(protocol.CodeSandboxCrashed, "the sandbox's agent exited")
	}
	msg := fmt.Sprintf("the sandbox exited with code %d", code)
	if code > 128 && code < 160 {
		msg += fmt.Sprintf(" (signal %d)", code-128)
	}
	if l := lastLine(stderr, 200); l != "" {
		msg += ": " + l
	}
	return protocol.Errorf(protocol.CodeSandboxCrashed, "%s", msg)
}

func heapAbort(stderr string) bool {
	for _, m := range []string{"heap out of memory", "Reached heap limit", "Allocation failed"} {
		if strings.Contains(strings.ToLower(stderr), strings.ToLower(m)) {
			return true
		}
	}
	return false
}

// AgentStatus is the agent's answer to a ping.
type AgentStatus struct {
	Ready bool   `json:"ready"`
	Node  string `json:"node"`
	// Modules are the directories snippets may require modules from.
	Modules  []string `json:"modules"`
	Workers  int      `json:"workers"`
	Busy     int      `json:"busy"`
	Queued   int      `json:"queued"`
	Runs     uint64   `json:"runs"`
	Timeouts uint64   `json:"timeouts"`
	Replaced uint64   `json:"replaced"`
	Strays   uint64   `json:"strays"`
}

// Ping asks the agent how it is; ctx bounds the wait (Config.ReadyTimeout
// when it has no deadline). A sandbox that does not answer in time is
// wedged: it is closed.
func (s *Sandbox) Ping(ctx context.Context) (*AgentStatus, error) {
	wait := s.rt.cfg.ReadyTimeout
	if dl, ok := ctx.Deadline(); ok {
		wait = time.Until(dl)
	}
	if wait <= 0 {
		return nil, protocol.Errorf(protocol.CodeTimeout, "no time left to ping the sandbox")
	}
	id := s.nextID.Add(1)
	frame, err := encodeFrame(agentRequest{ID: id, Op: "ping"})
	if err != nil {
		return nil, err
	}
	res, err := s.roundTrip(ctx, id, frame, wait)
	if err != nil {
		return nil, err
	}
	var st AgentStatus
	if err := json.Unmarshal(res.Value, &st); err != nil || !st.Ready {
		s.end(protocol.Errorf(protocol.CodeSandboxCrashed, "the sandbox broke protocol: bad answer to ping"), true)
		return nil, fmt.Errorf("%w: bad answer to ping", errViolation)
	}
	return &st, nil
}
