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
// all methods are safe for concurrent use. It owns the container's
// streams and its death diagnosis; the agent protocol itself is an
// agentConn, over the container's unix socket (Config.AgentSocketDir) or
// over its attach stream.
type Sandbox struct {
	rt      *Runtime
	id      string
	name    string
	created time.Time
	tenant  atomic.Pointer[string]

	mu         sync.Mutex
	conn       *agentConn // nil until the protocol stream is there
	attachConn net.Conn   // the attach stream: stdin in, multiplexed stdout/stderr out
	sock       net.Conn   // the agent's unix socket; nil with the attach transport
	gone       bool
	err        error // why it is gone; nil after Close
	stderr     tail
	exit       *exitInfo // from the die event
	oom        bool      // an oom event was seen

	done       chan struct{} // closed when gone
	died       chan struct{} // closed on the die event
	oomc       chan struct{} // closed on the oom event
	stderrDone chan struct{} // closed when the attach stream has ended
	wg         sync.WaitGroup
}

type exitInfo struct{ code int }

func newSandbox(rt *Runtime, id, name, tenant string) *Sandbox {
	s := &Sandbox{
		rt:         rt,
		id:         id,
		name:       name,
		created:    time.Now(),
		stderr:     tail{max: rt.cfg.StderrTailBytes},
		done:       make(chan struct{}),
		died:       make(chan struct{}),
		oomc:       make(chan struct{}),
		stderrDone: make(chan struct{}),
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
	reply, err := s.call(ctx, &agentRequest{
		Op:              "run",
		Code:            req.Code,
		Input:           req.Input,
		TimeoutMs:       int64((agentBudget + time.Millisecond - 1) / time.Millisecond),
		LimitMs:         budget.Milliseconds(),
		MaxResultBytes:  s.rt.cfg.MaxResultBytes,
		MaxConsoleBytes: s.rt.cfg.MaxConsoleBytes,
	}, budget+s.rt.cfg.RunGrace)
	if err != nil {
		return nil, err
	}
	return s.result(reply)
}

// call sends req to the agent and waits up to wait for its reply.
func (s *Sandbox) call(ctx context.Context, req *agentRequest, wait time.Duration) (*agentReply, error) {
	s.mu.Lock()
	conn := s.conn
	s.mu.Unlock()
	if conn == nil {
		return nil, protocol.Errorf(protocol.CodeSandboxCrashed, "the sandbox is not started")
	}
	return conn.do(ctx, req, wait)
}

// newConn is the agent protocol over rwc, with this sandbox's limits.
func (s *Sandbox) newConn(rwc io.WriteCloser) *agentConn {
	return newAgentConn(rwc, s.rt.cfg.MaxFrameBytes, s.rt.cfg.MaxRequestBytes, s.broken)
}

// result turns an agent reply into Run's results.
func (s *Sandbox) result(r *agentReply) (*protocol.Result, error) {
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

// end makes the sandbox gone for reason (nil: closed by its owner), fails
// the calls in flight and closes its streams, which ends the readers. It
// removes the container in the background when removeAsync is set. It
// reports whether this call ended it.
func (s *Sandbox) end(reason *protocol.Error, removeAsync bool) bool {
	s.mu.Lock()
	if s.gone {
		s.mu.Unlock()
		return false
	}
	s.gone = true
	if reason != nil {
		s.err = reason
	}
	conn, attachConn, sock := s.conn, s.attachConn, s.sock
	s.mu.Unlock()

	// Done is closed before any caller hears of the end: a caller that
	// learns its run failed must find the sandbox gone, or its owner
	// (the pool) hands the dead sandbox to the tenant's next request.
	close(s.done)
	if conn != nil {
		conn.fail(reason)
	}
	for _, c := range []net.Conn{attachConn, sock} {
		if c != nil {
			_ = c.Close()
		}
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

// broken ends a sandbox whose agent connection failed on its own.
func (s *Sandbox) broken(reason *protocol.Error) { s.end(reason, true) }

// Close stops and removes the container. Runs in flight fail with
// sandbox_crashed. It is idempotent; a container that is already gone is
// no error. It waits for the sandbox's readers to stop.
func (s *Sandbox) Close(ctx context.Context) error {
	s.end(nil, false)
	err := s.rt.remove(ctx, s.id)
	s.wg.Wait()
	return err
}

// attach takes the container's attach stream and starts its reader. With
// the attach transport (viaSocket false) the stream also carries the
// protocol: stdin the requests, stdout the replies. Otherwise the agent's
// unix socket carries it (connect), and the attach stream is kept for
// stderr and as the agent's dead-man switch (StdinOnce).
func (s *Sandbox) attach(conn net.Conn, r *bufio.Reader, viaSocket bool) {
	var ac *agentConn
	if !viaSocket {
		ac = s.newConn(conn)
	}
	s.mu.Lock()
	s.attachConn = conn
	s.conn = ac
	gone := s.gone
	s.mu.Unlock()
	if gone { // closed while being created
		_ = conn.Close()
	}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		err := s.demux(r, ac)
		close(s.stderrDone)
		if ac != nil {
			s.ended(err)
		}
	}()
}

// connect takes the agent's connection on its unix socket and starts its
// reader.
func (s *Sandbox) connect(sock net.Conn) {
	ac := s.newConn(sock)
	s.mu.Lock()
	s.sock = sock
	s.conn = ac
	gone := s.gone
	s.mu.Unlock()
	if gone {
		ac.fail(nil)
	}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		s.ended(ac.readStream(sock))
	}()
}

// ended decides why the protocol stream ended with err.
func (s *Sandbox) ended(err error) {
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

// demux reads Docker's 8-byte-header frames: stdout goes to the agent
// connection (nil: discarded; the protocol has a socket of its own), stderr
// to the bounded tail.
func (s *Sandbox) demux(r io.Reader, conn *agentConn) error {
	var hdr [8]byte
	var chunk [4096]byte
	for {
		if _, err := io.ReadFull(r, hdr[:]); err != nil {
			return err
		}
		n := int(binary.BigEndian.Uint32(hdr[4:]))
		switch hdr[0] {
		case streamStdout:
			if conn != nil {
				if err := conn.readChunk(r, n); err != nil {
					return err
				}
				continue
			}
			if _, err := io.CopyN(io.Discard, r, int64(n)); err != nil {
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
	// The streams end when the container dies; should they not, this
	// wakes the readers so that the death is noticed anyway.
	for _, c := range []net.Conn{s.attachConn, s.sock} {
		if c != nil {
			_ = c.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
		}
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
	// stderrWait bounds the wait for the rest of the agent's stderr once
	// its protocol socket has ended (with the attach transport the two end
	// together).
	stderrWait = 500 * time.Millisecond
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
	// The agent's last words (a V8 heap abort) may still be on their way
	// through the attach stream, which ends with the container.
	t2 := time.NewTimer(stderrWait)
	defer t2.Stop()
	select {
	case <-s.stderrDone:
	case <-t2.C:
	case <-s.done:
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
	reply, err := s.call(ctx, &agentRequest{Op: "ping"}, wait)
	if err != nil {
		return nil, err
	}
	if reply.Error != nil {
		return nil, reply.Error
	}
	var st AgentStatus
	if err := json.Unmarshal(reply.Result, &st); err != nil || !st.Ready {
		s.end(protocol.Errorf(protocol.CodeSandboxCrashed, "the sandbox broke protocol: bad answer to ping"), true)
		return nil, fmt.Errorf("%w: bad answer to ping", errViolation)
	}
	return &st, nil
}
