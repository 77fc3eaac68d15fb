package dockerx_test

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/docker/docker/api/types/container"
	"github.com/docker/docker/api/types/filters"
	"github.com/docker/docker/client"
	"github.com/isode-run/isode/internal/testenv"
	"github.com/isode-run/isode/pkg/dockerx"
	"github.com/isode-run/isode/pkg/pool"
	"github.com/isode-run/isode/pkg/protocol"
)

var _ pool.Sandbox = (*dockerx.Sandbox)(nil)

// env is one test's engine, runtime and unique worker id.
type env struct {
	t   testing.TB
	cli *client.Client
	rt  *dockerx.Runtime
	cfg dockerx.Config
}

// newEnv starts a Runtime with a worker id unique to the test. At cleanup
// it closes the Runtime, checks that no container of the worker is left,
// and removes any that is.
func newEnv(t testing.TB, mod func(*dockerx.Config)) *env {
	t.Helper()
	cli := testenv.Docker(t)
	cfg := dockerx.DefaultConfig()
	cfg.Image = testenv.Image(t, cli)
	cfg.WorkerID = "test-" + randomHex(6)
	cfg.AgentSocketDir = socketDir(t) // what the worker does on the engine's host
	if mod != nil {
		mod(&cfg)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	rt, err := dockerx.New(ctx, cfg)
	if err != nil {
		t.Fatalf("dockerx.New: %v", err)
	}
	e := &env{t: t, cli: cli, rt: rt, cfg: cfg}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		defer cancel()
		if err := rt.Close(ctx); err != nil {
			t.Errorf("Runtime.Close: %v", err)
		}
		e.waitNoContainers(10 * time.Second)
		testenv.RemoveByLabel(t, cli, dockerx.LabelWorker, cfg.WorkerID)
	})
	return e
}

// containers lists the worker's containers, running or not.
func (e *env) containers() []container.Summary {
	e.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	list, err := e.cli.ContainerList(ctx, container.ListOptions{
		All:     true,
		Filters: filters.NewArgs(filters.Arg("label", dockerx.LabelWorker+"="+e.cfg.WorkerID)),
	})
	if err != nil {
		e.t.Fatalf("list containers: %v", err)
	}
	return list
}

// waitNoContainers fails the test when containers of the worker remain
// after d (AutoRemove finishes asynchronously).
func (e *env) waitNoContainers(d time.Duration) {
	e.t.Helper()
	var left []container.Summary
	ok := testenv.Poll(d, func() bool {
		left = e.containers()
		return len(left) == 0
	})
	if !ok {
		for _, c := range left {
			e.t.Errorf("container left behind: %s %v %s", c.ID[:12], c.Names, c.State)
		}
	}
}

// create makes a sandbox with a test deadline.
func (e *env) create(tenant string) *dockerx.Sandbox {
	e.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	s, err := e.rt.Create(ctx, tenant)
	if err != nil {
		e.t.Fatalf("Create: %v", err)
	}
	return s
}

func randomHex(n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// run runs code with input (may be "") and a timeout in a sandbox.
func run(t testing.TB, s *dockerx.Sandbox, code, input string, timeout time.Duration) (*protocol.Result, error) {
	t.Helper()
	req := &protocol.Request{V: protocol.Version, IsolateKey: "t", Code: code, TimeoutMs: timeout.Milliseconds()}
	if input != "" {
		req.Input = json.RawMessage(input)
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout+5*time.Second)
	defer cancel()
	return s.Run(ctx, req)
}

// mustRun runs code and returns its result's JSON.
func mustRun(t testing.TB, s *dockerx.Sandbox, code, input string) string {
	t.Helper()
	res, err := run(t, s, code, input, 10*time.Second)
	if err != nil {
		t.Fatalf("run %q: %v", code, err)
	}
	return string(res.Value)
}

// wantCode runs code and checks it fails with code and a message
// containing msg.
func wantCode(t testing.TB, s *dockerx.Sandbox, code string, timeout time.Duration, want protocol.Code, msg string) *protocol.Result {
	t.Helper()
	res, err := run(t, s, code, "", timeout)
	var pe *protocol.Error
	if !errors.As(err, &pe) {
		t.Fatalf("run %q: got %v (result %v), want a *protocol.Error %s", code, err, res, want)
	}
	if pe.Code != want || !strings.Contains(pe.Message, msg) {
		t.Fatalf("run %q: got %s %q, want %s containing %q", code, pe.Code, pe.Message, want, msg)
	}
	return res
}

func contains(s, sub string) bool { return strings.Contains(s, sub) }

// socketDir returns a directory for agent sockets, short enough for their
// paths, removed at cleanup.
func socketDir(t testing.TB) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "isode-s")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// attachTransport makes a Runtime's sandboxes speak over their attach
// streams, as with a remote engine.
func attachTransport(c *dockerx.Config) { c.AgentSocketDir = "" }
