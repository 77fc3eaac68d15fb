package dockerx

import (
	"context"
	"errors"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/isode-run/isode/internal/testenv"
	"github.com/isode-run/isode/pkg/protocol"
)

// The agent connection against the real sandbox/agent.js, run by the
// host's node without Docker, over both transports: the agent's stdin and
// stdout (as the attach stream carries them) and a unix socket it connects
// to (ISODE_AGENT_SOCKET).

// agentProc is one agent process and the host's end of its protocol.
type agentProc struct {
	cmd    *exec.Cmd
	conn   *agentConn
	stdin  io.WriteCloser // the dead-man switch
	stderr *testenv.SyncBuffer
	read   chan error // readStream's end
	exited chan struct{}

	mu     sync.Mutex
	broken []*protocol.Error
}

func startAgent(t testing.TB, viaSocket bool) *agentProc {
	t.Helper()
	node := testenv.Node(t)
	p := &agentProc{stderr: &testenv.SyncBuffer{}, read: make(chan error, 1), exited: make(chan struct{})}
	p.cmd = exec.Command(node, filepath.Join("..", "..", "sandbox", "agent.js"))
	p.cmd.Stderr = p.stderr
	p.cmd.Env = append(os.Environ(), "ISODE_CONCURRENCY=2")
	stdin, err := p.cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	p.stdin = stdin
	var rwc io.ReadWriteCloser
	var ln *net.UnixListener
	if viaSocket {
		dir, err := os.MkdirTemp("", "isode-ac-") // short: socket paths are limited
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { os.RemoveAll(dir) })
		path := filepath.Join(dir, "a")
		if ln, err = net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"}); err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		p.cmd.Env = append(p.cmd.Env, "ISODE_AGENT_SOCKET="+path)
	} else {
		stdout, err := p.cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		rwc = struct {
			io.Reader
			io.WriteCloser
		}{stdout, stdin}
	}
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { _ = p.cmd.Wait(); close(p.exited) }()
	t.Cleanup(func() {
		_ = p.cmd.Process.Kill()
		<-p.exited
	})
	if viaSocket {
		_ = ln.SetDeadline(time.Now().Add(10 * time.Second))
		c, err := ln.AcceptUnix()
		if err != nil {
			t.Fatalf("the agent did not connect: %v; stderr: %s", err, p.stderr)
		}
		rwc = c
	}
	p.conn = newAgentConn(rwc, 2*MiB, 4*MiB, func(e *protocol.Error) {
		p.mu.Lock()
		p.broken = append(p.broken, e)
		p.mu.Unlock()
		p.conn.fail(e)
	})
	go func() { p.read <- p.conn.readStream(rwc) }()
	return p
}

func (p *agentProc) run(ctx context.Context, code string, timeout time.Duration) (*agentReply, error) {
	return p.conn.do(ctx, &agentRequest{Op: "run", Code: code, TimeoutMs: timeout.Milliseconds()}, timeout+2*time.Second)
}

func (p *agentProc) waitExit(t testing.TB, why string) {
	t.Helper()
	select {
	case <-p.exited:
	case <-time.After(10 * time.Second):
		t.Fatalf("the agent did not exit %s", why)
	}
}

func forTransports(t *testing.T, f func(t *testing.T, viaSocket bool)) {
	for _, tr := range []struct {
		name   string
		socket bool
	}{{"stdio", false}, {"socket", true}} {
		t.Run(tr.name, func(t *testing.T) { f(t, tr.socket) })
	}
}

func TestAgentConnServes(t *testing.T) {
	forTransports(t, func(t *testing.T, viaSocket bool) {
		p := startAgent(t, viaSocket)
		ctx := context.Background()
		ping, err := p.conn.do(ctx, &agentRequest{Op: "ping"}, 10*time.Second)
		if err != nil || !strings.Contains(string(ping.Result), `"ready":true`) {
			t.Fatalf("ping: %v %s; stderr: %s", err, ping.Result, p.stderr)
		}

		// Runs at once, answered out of order, each matched to its caller.
		var wg sync.WaitGroup
		for i, d := range []int{300, 1, 150, 0, 50} {
			wg.Add(1)
			go func() {
				defer wg.Done()
				code := `return function (cb) { setTimeout(() => cb(null, ` + strconv.Itoa(i) + `), ` + strconv.Itoa(d) + `) }`
				r, err := p.run(ctx, code, 5*time.Second)
				if err != nil || string(r.Result) != strconv.Itoa(i) {
					t.Errorf("run %d: %v, result %s", i, err, r.Result)
				}
			}()
		}
		wg.Wait()

		r, err := p.run(ctx, `return function (cb) { cb(new Error("nope")) }`, 5*time.Second)
		if err != nil || r.Error == nil || r.Error.Code != protocol.CodeCodeError {
			t.Fatalf("a snippet's error: %v, %+v", err, r)
		}
		r, err = p.run(ctx, `return function (cb) {}`, 200*time.Millisecond)
		if err != nil || r.Error == nil || r.Error.Code != protocol.CodeTimeout {
			t.Fatalf("a snippet that never answers: %v, %+v", err, r)
		}

		// A caller that goes away: its late reply is dropped, the
		// connection serves on.
		cctx, cancel := context.WithCancel(ctx)
		go func() { time.Sleep(50 * time.Millisecond); cancel() }()
		if _, err := p.run(cctx, `return function (cb) { setTimeout(() => cb(null, 1), 300) }`, 5*time.Second); protocol.CodeOf(err) != protocol.CodeShuttingDown {
			t.Fatalf("cancelled run: %v", err)
		}
		time.Sleep(400 * time.Millisecond)
		if r, err := p.run(ctx, `return function (cb) { cb(null, "after") }`, 5*time.Second); err != nil || string(r.Result) != `"after"` {
			t.Fatalf("after an abandoned run: %v %+v", err, r)
		}
		p.mu.Lock()
		broken := p.broken
		p.mu.Unlock()
		if len(broken) != 0 {
			t.Fatalf("the connection broke: %v", broken)
		}

		// The host goes away (the dead-man switch): closing the protocol
		// stream (and, with the socket, stdin) makes the agent exit.
		p.conn.fail(nil)
		if viaSocket {
			p.stdin.Close()
		}
		p.waitExit(t, "when the host went away")
		if _, err := p.run(ctx, `return function (cb) { cb(null, 1) }`, time.Second); protocol.CodeOf(err) != protocol.CodeSandboxCrashed {
			t.Fatalf("a run after the end: %v", err)
		}
	})
}

// Replies larger than a socket's buffer, between small ones: every reply
// arrives whole, to its own caller. (Also a check for any writer of the
// agent's that would write what it can at once and queue the rest.)
func TestAgentConnLargeRepliesKeepTheirBytes(t *testing.T) {
	forTransports(t, func(t *testing.T, viaSocket bool) {
		p := startAgent(t, viaSocket)
		ctx := context.Background()
		var wg sync.WaitGroup
		for i := range 16 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				n := 1
				if i%2 == 0 {
					n = 300_000 + i // over a unix socket's buffer, each its own length
				}
				code := `return function (cb) { cb(null, "` + strconv.Itoa(i%10) + `".repeat(` + strconv.Itoa(n) + `)) }`
				r, err := p.run(ctx, code, 10*time.Second)
				want := `"` + strings.Repeat(strconv.Itoa(i%10), n) + `"`
				if err != nil || string(r.Result) != want {
					got := ""
					if r != nil {
						got = string(r.Result)
					}
					t.Errorf("run %d: %v, a result of %d bytes, want %d", i, err, len(got), len(want))
				}
			}()
		}
		wg.Wait()
		p.mu.Lock()
		defer p.mu.Unlock()
		if len(p.broken) != 0 {
			t.Fatalf("the connection broke: %v", p.broken)
		}
	})
}

// The agent dies with runs in flight: the reader ends, and the owner's
// fail hands its reason to every call.
func TestAgentConnAgentDies(t *testing.T) {
	forTransports(t, func(t *testing.T, viaSocket bool) {
		p := startAgent(t, viaSocket)
		errs := make(chan error, 2)
		for range 2 {
			go func() {
				_, err := p.run(context.Background(), `return function (cb) { setTimeout(() => cb(null, 1), 5000) }`, 10*time.Second)
				errs <- err
			}()
		}
		time.Sleep(300 * time.Millisecond)
		_ = p.cmd.Process.Kill()
		var err error
		select {
		case err = <-p.read:
		case <-time.After(5 * time.Second):
			t.Fatal("the reader did not end when the agent died")
		}
		if errors.Is(err, errViolation) {
			t.Fatalf("a death read as a violation: %v", err)
		}
		p.conn.fail(protocol.Errorf(protocol.CodeSandboxCrashed, "killed"))
		for range 2 {
			if err := <-errs; protocol.CodeOf(err) != protocol.CodeSandboxCrashed || !strings.Contains(err.Error(), "killed") {
				t.Fatalf("a run in flight: %v", err)
			}
		}
	})
}

// With the socket, stdin's end alone also ends the agent.
func TestAgentSocketDeadManOnStdin(t *testing.T) {
	p := startAgent(t, true)
	if _, err := p.conn.do(context.Background(), &agentRequest{Op: "ping"}, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	p.stdin.Close()
	p.waitExit(t, "when its stdin ended")
}

// An agent that cannot reach its socket says so and exits with the code
// the Runtime recognises.
func TestAgentSocketUnreachable(t *testing.T) {
	node := testenv.Node(t)
	cmd := exec.Command(node, filepath.Join("..", "..", "sandbox", "agent.js"))
	cmd.Env = append(os.Environ(), "ISODE_AGENT_SOCKET=/nonexistent/isode/a")
	cmd.Stdin = strings.NewReader("")
	out, err := cmd.CombinedOutput()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != exitNoSocket {
		t.Fatalf("exit: %v, want code %d; output: %s", err, exitNoSocket, out)
	}
	if !strings.Contains(string(out), "cannot reach the host's socket") {
		t.Fatalf("stderr does not say why: %s", out)
	}
}

// The socket directory must be the worker's own: whoever may rename
// entries in it could swap a sandbox's directory for theirs.
func TestSocketBaseRefusesSharedDirectory(t *testing.T) {
	dir := t.TempDir()
	if err := os.Chmod(dir, 0o777); err != nil {
		t.Fatal(err)
	}
	if _, _, err := openSocketBase(dir); !errors.Is(err, ErrInvalidConfig) {
		t.Fatalf("a directory anyone may write to: %v, want ErrInvalidConfig", err)
	}
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	base, lock, err := openSocketBase(filepath.Join(dir, "made"))
	if err != nil {
		t.Fatal(err)
	}
	defer lock.Close()
	if fi, err := os.Stat(base); err != nil || fi.Mode().Perm() != 0o700 {
		t.Fatalf("the worker's own directory: %v %v, want mode 0700", fi.Mode(), err)
	}
}

// A worker killed leaves its socket directory, with the sockets of
// sandboxes that had not connected: the next Runtime to start removes it,
// and only it. Live Runtimes hold a lock on theirs; a directory just made
// is not yet locked; a worker from before the lock named its own w...; and
// a directory the operator chose may hold others of its own.
func TestSocketBaseRemovesDeadRuntimesDirectories(t *testing.T) {
	dir := t.TempDir()
	old := time.Now().Add(-time.Minute)
	mk := func(name string, age time.Time) string {
		p := filepath.Join(dir, name)
		if err := os.MkdirAll(filepath.Join(p, "isode-0123456789abcdef"), 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.Chtimes(p, age, age); err != nil {
			t.Fatal(err)
		}
		return p
	}
	dead := mk(socketBasePrefix+"101", old)
	live := mk(socketBasePrefix+"102", old)
	young := mk(socketBasePrefix+"103", time.Now())
	before := mk("w123", old)
	other := mk("lost+found", old) // not a Runtime's, though it starts like one
	held, err := lockDir(live)     // as a live Runtime holds its own
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close()

	base, lock, err := openSocketBase(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer lock.Close()
	if _, err := os.Stat(dead); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("a dead Runtime's directory is still there: %v", err)
	}
	for _, p := range []string{live, young, before, other, base} {
		if _, err := os.Stat(p); err != nil {
			t.Errorf("%s was removed: %v", filepath.Base(p), err)
		}
	}
	// This Runtime's own directory is locked: another one starting later
	// (here, once the directory is old enough) leaves it alone.
	if err := os.Chtimes(base, old, old); err != nil {
		t.Fatal(err)
	}
	_, lock2, err := openSocketBase(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer lock2.Close()
	if _, err := os.Stat(base); err != nil {
		t.Errorf("a live Runtime's directory was removed by the next: %v", err)
	}
}

// BenchmarkAgentConn: warm runs, one at a time, through the real agent run
// by the host's node, without Docker, over each transport; it reports the
// agent process's CPU per run (user+system, from /proc).
//
//	go test -run '^$' -bench AgentConn -benchtime 5000x ./pkg/dockerx/
func BenchmarkAgentConn(b *testing.B) {
	for _, tr := range []struct {
		name   string
		socket bool
	}{{"stdio", false}, {"socket", true}} {
		b.Run(tr.name, func(b *testing.B) {
			p := startAgent(b, tr.socket)
			ctx := context.Background()
			code := `return function (ctx, cb) { cb(null, ctx.data) }`
			for range 200 { // warm: compiled, JIT-ed
				if _, err := p.conn.do(ctx, &agentRequest{Op: "run", Code: code, Input: []byte(`{"n":1}`), TimeoutMs: 5000}, 10*time.Second); err != nil {
					b.Fatal(err)
				}
			}
			cpu0 := procCPU(b, p.cmd.Process.Pid)
			b.ResetTimer()
			for range b.N {
				r, err := p.conn.do(ctx, &agentRequest{Op: "run", Code: code, Input: []byte(`{"n":1}`), TimeoutMs: 5000}, 10*time.Second)
				if err != nil || r.Error != nil {
					b.Fatal(err, r.Error)
				}
			}
			b.StopTimer()
			b.ReportMetric(float64((procCPU(b, p.cmd.Process.Pid)-cpu0).Microseconds())/float64(b.N), "agent-cpu-us/run")
		})
	}
}

// procCPU is a process's user and system CPU time so far.
func procCPU(tb testing.TB, pid int) time.Duration {
	tb.Helper()
	data, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		tb.Fatal(err)
	}
	f := strings.Fields(string(data[strings.LastIndexByte(string(data), ')')+2:]))
	utime, _ := strconv.ParseInt(f[11], 10, 64)
	stime, _ := strconv.ParseInt(f[12], 10, 64)
	return time.Duration(utime+stime) * 10 * time.Millisecond // USER_HZ is 100 on Linux
}
