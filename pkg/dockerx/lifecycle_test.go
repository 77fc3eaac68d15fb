package dockerx_test

import (
	"context"
	"errors"
	"log/slog"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/docker/docker/api/types/container"

	"github.com/isode-run/isode/internal/testenv"
	"github.com/isode-run/isode/pkg/dockerx"
	"github.com/isode-run/isode/pkg/protocol"
)

// startLongRun starts a run that waits 30 s and returns its outcome channel.
func startLongRun(t *testing.T, s *dockerx.Sandbox) <-chan error {
	t.Helper()
	ch := make(chan error, 1)
	go func() {
		_, err := run(t, s, `return function (cb) { setTimeout(() => cb(null, 1), 30000) }`, "", 40*time.Second)
		ch <- err
	}()
	// The run is in flight once the agent reports a busy Worker.
	if !testenv.Poll(5*time.Second, func() bool {
		st, err := s.Ping(context.Background())
		return err == nil && st.Busy == 1
	}) {
		t.Fatal("the long run never started")
	}
	return ch
}

// waitDone waits for the sandbox to end and checks Err's code.
func waitDone(t *testing.T, s *dockerx.Sandbox, within time.Duration, want protocol.Code) {
	t.Helper()
	select {
	case <-s.Done():
	case <-time.After(within):
		t.Fatalf("the sandbox was not noticed gone within %v", within)
	}
	if got := protocol.CodeOf(s.Err()); got != want {
		t.Fatalf("Err() = %v, want code %s", s.Err(), want)
	}
}

func wantRunErr(t *testing.T, ch <-chan error, within time.Duration, want protocol.Code) {
	t.Helper()
	select {
	case err := <-ch:
		if got := protocol.CodeOf(err); got != want {
			t.Fatalf("the run in flight failed with %v, want %s", err, want)
		}
	case <-time.After(within):
		t.Fatalf("the run in flight did not fail within %v", within)
	}
}

func TestKilledFromOutside(t *testing.T) {
	e := newEnv(t, nil)
	s := e.create("")
	runErr := startLongRun(t, s)
	killed := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := e.cli.ContainerKill(ctx, s.ID(), "KILL"); err != nil {
		t.Fatal(err)
	}
	// Noticed at once; the reason waits up to a second for an oom event.
	waitDone(t, s, 3*time.Second, protocol.CodeSandboxCrashed)
	wantRunErr(t, runErr, time.Second, protocol.CodeSandboxCrashed)
	t.Logf("death noticed after %v: %v", time.Since(killed).Round(time.Millisecond), s.Err())
	if _, err := run(t, s, `return function (cb) { cb(null, 1) }`, "", time.Second); protocol.CodeOf(err) != protocol.CodeSandboxCrashed {
		t.Fatalf("run on a dead sandbox: %v", err)
	}
	if err := s.Close(ctx); err != nil {
		t.Fatalf("Close of a dead sandbox: %v", err)
	}
	e.waitNoContainers(10 * time.Second)
}

// TestBufferBomb: memory outside the V8 heap (Buffers) is bounded by the
// container's limit: the kernel kills it and the runs fail out_of_memory.
func TestBufferBomb(t *testing.T) {
	e := newEnv(t, nil)
	s := e.create("")
	wantCode(t, s, `return function (cb) { const bufs = []; for (let i = 0; i < 64; i++) bufs.push(Buffer.alloc(8 << 20, 1)); cb(null, bufs.length) }`,
		10*time.Second, protocol.CodeOutOfMemory, "ran out of memory")
	waitDone(t, s, 2*time.Second, protocol.CodeOutOfMemory)
}

// TestPausedSandboxTimesOut: a container that stops answering (here paused
// from outside) makes the run fail with timeout instead of hanging, and the
// sandbox is closed.
func TestPausedSandboxTimesOut(t *testing.T) {
	e := newEnv(t, nil)
	s := e.create("")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := e.cli.ContainerPause(ctx, s.ID()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_ = e.cli.ContainerUnpause(ctx, s.ID()) // usually gone already
	})
	start := time.Now()
	_, err := run(t, s, `return function (cb) { cb(null, 1) }`, "", 500*time.Millisecond)
	took := time.Since(start)
	if protocol.CodeOf(err) != protocol.CodeTimeout {
		t.Fatalf("run on a paused sandbox: %v, want timeout", err)
	}
	if limit := 500*time.Millisecond + e.cfg.RunGrace + 3*time.Second; took > limit {
		t.Fatalf("the run took %v, over %v", took, limit)
	}
	waitDone(t, s, 5*time.Second, protocol.CodeSandboxCrashed)
	e.waitNoContainers(15 * time.Second)
}

// TestProtocolViolation: a snippet that finds the protocol stream (the
// pipe of the attach transport, or the agent's unix socket) and writes
// garbage to it breaks its own sandbox, which is failed as such.
func TestProtocolViolation(t *testing.T) {
	for _, tr := range []struct {
		name string
		mod  func(*dockerx.Config)
	}{{"socket", nil}, {"attach", attachTransport}} {
		t.Run(tr.name, func(t *testing.T) {
			e := newEnv(t, tr.mod)
			s := e.create("")
			code := `return function (cb) {
				` + testenv.PipesJS + `
				require("fs").writeSync(pipes().out, Buffer.from([0, 0, 0, 5, 104, 101, 108, 108, 111]));
				setTimeout(() => cb(null, 1), 5000);
			}`
			_, err := run(t, s, code, "", 10*time.Second)
			if pe := protocol.AsError(err); pe == nil || pe.Code != protocol.CodeSandboxCrashed {
				t.Fatalf("got %v, want sandbox_crashed", err)
			}
			// Noticed at once; the reason waits up to a second for an oom event.
			waitDone(t, s, 3*time.Second, protocol.CodeSandboxCrashed)
			if msg := s.Err().Error(); !contains(msg, "broke protocol") {
				t.Fatalf("Err() = %q, want it to say the sandbox broke protocol", msg)
			}
			e.waitNoContainers(10 * time.Second)
		})
	}
}

func TestCloseSandbox(t *testing.T) {
	e := newEnv(t, nil)
	s := e.create("")
	runErr := startLongRun(t, s)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := s.Close(ctx); err != nil {
		t.Fatalf("Close: %v", err)
	}
	wantRunErr(t, runErr, time.Second, protocol.CodeSandboxCrashed)
	select {
	case <-s.Done():
	default:
		t.Fatal("Done is open after Close")
	}
	if err := s.Err(); err != nil {
		t.Fatalf("Err() after Close = %v, want nil", err)
	}
	if err := s.Close(ctx); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if len(e.containers()) != 0 {
		t.Fatal("the container is still there after Close returned")
	}
}

func TestRunCancelled(t *testing.T) {
	e := newEnv(t, nil)
	s := e.create("")
	ctx, cancel := context.WithCancel(context.Background())
	ch := make(chan error, 1)
	go func() {
		_, err := s.Run(ctx, &protocol.Request{Code: `return function (cb) { setTimeout(() => cb(null, 1), 300) }`, TimeoutMs: 5000})
		ch <- err
	}()
	time.AfterFunc(50*time.Millisecond, cancel)
	if err := <-ch; !errors.Is(err, protocol.ErrShuttingDown) {
		t.Fatalf("cancelled run: %v", err)
	}
	// The abandoned request's late reply is dropped, and the sandbox serves on.
	if got := mustRun(t, s, `return function (cb) { setTimeout(() => cb(null, "next"), 400) }`, ""); got != `"next"` {
		t.Fatalf("got %s", got)
	}
	select {
	case <-s.Done():
		t.Fatalf("sandbox ended: %v", s.Err())
	default:
	}
}

func TestCreateFailureLeavesNothing(t *testing.T) {
	e := newEnv(t, func(c *dockerx.Config) { c.ReadyTimeout = time.Millisecond })
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	_, err := e.rt.Create(ctx, "")
	if !errors.Is(err, dockerx.ErrNotReady) {
		t.Fatalf("Create with no time to get ready: %v, want ErrNotReady", err)
	}
	if n := len(e.containers()); n != 0 {
		t.Fatalf("%d containers left after a failed Create", n)
	}
}

func TestNewRefusesMissingRuntime(t *testing.T) {
	cfgEnv := newEnv(t, nil) // for the image name and the daemon check
	cfg := cfgEnv.cfg
	cfg.Runtime = "no-such-runtime-" + randomHex(3)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	rt, err := dockerx.New(ctx, cfg)
	if err == nil {
		rt.Close(ctx)
		t.Fatal("New accepted an OCI runtime the engine does not have")
	}
	if !errors.Is(err, dockerx.ErrUnavailable) {
		t.Fatalf("got %v, want ErrUnavailable", err)
	}
	cfg.Runtime = ""
	cfg.Image = "isode-no-such-image:" + randomHex(3)
	if _, err := dockerx.New(ctx, cfg); !errors.Is(err, dockerx.ErrUnavailable) {
		t.Fatalf("missing image: got %v, want ErrUnavailable", err)
	}
}

func TestReap(t *testing.T) {
	e := newEnv(t, nil)
	kept := e.create("")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	other := "test-other-" + randomHex(4)
	t.Cleanup(func() { removeWorker(t, e, other) })
	mk := func(worker string) string {
		resp, err := e.cli.ContainerCreate(ctx, &container.Config{
			Image:  e.cfg.Image,
			Labels: map[string]string{dockerx.LabelApp: dockerx.AppName, dockerx.LabelWorker: worker},
		}, &container.HostConfig{NetworkMode: "none"}, nil, nil, "")
		if err != nil {
			t.Fatal(err)
		}
		return resp.ID
	}
	orphan := mk(e.cfg.WorkerID) // ours, untracked: a previous life's
	stale := mk(other)           // another worker's, never started
	// Grace zero would also reap the containers other test packages,
	// running at the same time, have just created and not yet started
	// (a CI run lost sandboxes that way): let the stale one age instead.
	const grace = 4 * time.Second
	time.Sleep(grace + time.Second)
	n, err := e.rt.Reap(ctx, grace)
	if err != nil {
		t.Fatal(err)
	}
	if n < 2 {
		t.Fatalf("Reap removed %d containers, want at least 2", n)
	}
	for _, id := range []string{orphan, stale} {
		if _, err := e.cli.ContainerInspect(ctx, id); err == nil {
			t.Errorf("container %s survived Reap", id[:12])
		}
	}
	if got := mustRun(t, kept, `return function (cb) { cb(null, 1) }`, ""); got != "1" {
		t.Fatalf("the tracked sandbox did not survive Reap: %s", got)
	}
	// A young container of another worker is left alone within the grace.
	young := mk(other)
	if _, err := e.rt.Reap(ctx, time.Hour); err != nil {
		t.Fatal(err)
	}
	if _, err := e.cli.ContainerInspect(ctx, young); err != nil {
		t.Fatalf("Reap removed another worker's container within the grace: %v", err)
	}
}

func removeWorker(t *testing.T, e *env, worker string) {
	testenv.RemoveByLabel(t, e.cli, dockerx.LabelWorker, worker) // its containers and its node volume
}

// TestRuntimeCloseDuringCreate: Close while Creates are in flight leaves
// no container behind and makes no more.
func TestRuntimeCloseDuringCreate(t *testing.T) {
	e := newEnv(t, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	keep := e.create("")
	errs := make(chan error, 3)
	for range 3 {
		go func() {
			s, err := e.rt.Create(ctx, "")
			if err == nil {
				<-s.Done() // closed by the Runtime's Close
			}
			errs <- err
		}()
	}
	// Close as soon as the engine has at least one more container.
	testenv.Poll(10*time.Second, func() bool { return len(e.containers()) > 1 })
	if err := e.rt.Close(ctx); err != nil {
		t.Fatalf("Close: %v", err)
	}
	for range 3 {
		if err := <-errs; err != nil && !errors.Is(err, dockerx.ErrClosed) && !errors.Is(err, dockerx.ErrNotReady) && !strings.Contains(err.Error(), "container") {
			t.Errorf("Create during Close: %v", err)
		}
	}
	select {
	case <-keep.Done():
	default:
		t.Fatal("a sandbox survived its Runtime's Close")
	}
	if n := len(e.containers()); n != 0 {
		t.Fatalf("%d containers left right after Close", n)
	}
	if _, err := e.rt.Create(ctx, ""); !errors.Is(err, dockerx.ErrClosed) {
		t.Fatalf("Create after Close: %v, want ErrClosed", err)
	}
}

// TestSocketFallback: when the engine does not see the socket directory
// (a worker in a container without it shared) or the agent cannot reach
// its socket, Create still returns a working sandbox, over the attach
// stream, and so does every later one, with one warning logged.
func TestSocketFallback(t *testing.T) {
	for _, c := range []struct {
		name  string
		spoil func(dir string)
		why   string // in the warning
	}{
		{"the engine does not see the directory", func(dir string) { os.RemoveAll(dir) }, "bind source path does not exist"},
		{"the agent cannot reach its socket", func(dir string) { os.Chmod(dir, 0o700) }, "cannot reach the host's socket"},
	} {
		t.Run(c.name, func(t *testing.T) {
			var logs testenv.SyncBuffer
			e := newEnv(t, func(cfg *dockerx.Config) {
				cfg.Logger = slog.New(slog.NewTextHandler(&logs, nil))
			})
			dockerx.SetSocketHook(e.rt, c.spoil)
			for i := range 2 {
				s := e.create("")
				if got := mustRun(t, s, `return function (cb) { cb(null, require("fs").existsSync("/run/isode")) }`, ""); got != "false" {
					t.Fatalf("sandbox %d: the socket directory is mounted (%s), want the attach stream", i, got)
				}
			}
			if n := strings.Count(logs.String(), "cannot reach their sockets"); n != 1 || !strings.Contains(logs.String(), c.why) {
				t.Fatalf("%d warnings, want 1 saying %q:\n%s", n, c.why, logs.String())
			}
		})
	}
}

// TestSocketDirectoryUnusable: a socket directory that cannot be made (a
// worker in a read-only container) leaves the Runtime on the attach
// streams, logged, rather than failing it.
func TestSocketDirectoryUnusable(t *testing.T) {
	var logs testenv.SyncBuffer
	e := newEnv(t, func(cfg *dockerx.Config) {
		cfg.AgentSocketDir = "/proc/isode-agents"
		cfg.Logger = slog.New(slog.NewTextHandler(&logs, nil))
	})
	s := e.create("")
	if got := mustRun(t, s, `return function (cb) { cb(null, require("fs").existsSync("/run/isode")) }`, ""); got != "false" {
		t.Fatalf("the socket directory is mounted (%s), want the attach stream", got)
	}
	if !strings.Contains(logs.String(), "cannot reach their sockets") {
		t.Fatalf("no warning:\n%s", logs.String())
	}
}
