package dockerx_test

import (
	"bufio"
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/docker/docker/api/types/container"
	"github.com/docker/docker/client"

	"github.com/isode-run/isode/internal/testenv"
	"github.com/isode-run/isode/pkg/dockerx"
)

// The reaper's settings in these tests. A reaper also removes any isode
// container of the engine that is not running, but only past
// Config.CreateTimeout (30 s here), so that the containers other packages'
// tests, running at the same time, have created and not yet started are
// safe from this short grace.
const (
	reapEvery = 200 * time.Millisecond
	reapGrace = time.Second
	// reapBound is how long a removal may take past the grace: a pass, and
	// a force-remove on a busy 2-core engine. Generous; the measured time
	// is logged.
	reapBound = reapGrace + 30*time.Second
)

// reaperEnv is a Runtime of fleet whose log goes to the returned buffer.
func reaperEnv(t *testing.T, fleet string) (*env, *testenv.SyncBuffer) {
	logs := &testenv.SyncBuffer{}
	e := newEnv(t, func(c *dockerx.Config) {
		c.Fleet = fleet
		c.Logger = slog.New(slog.NewTextHandler(logs, nil))
	})
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("reaper's log:\n%s", logs.String())
		}
	})
	return e, logs
}

// runLabelled starts a container of the sandbox image whose process lives
// until it is killed and ignores stdin, with the isode labels given, as a
// worker of that fleet would have left it. It is removed at cleanup.
func runLabelled(t *testing.T, e *env, fleet, worker, tenant string) string {
	t.Helper()
	id := createLabelled(t, e, fleet, worker, tenant)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if err := e.cli.ContainerStart(ctx, id, container.StartOptions{}); err != nil {
		t.Fatalf("start container: %v", err)
	}
	return id
}

// createLabelled is runLabelled without the start.
func createLabelled(t *testing.T, e *env, fleet, worker, tenant string) string {
	t.Helper()
	labels := map[string]string{dockerx.LabelApp: dockerx.AppName, dockerx.LabelWorker: worker}
	if fleet != "" {
		labels[dockerx.LabelFleet] = fleet
	}
	if tenant != "" {
		labels[dockerx.LabelTenant] = tenant
	}
	t.Cleanup(func() { testenv.RemoveByLabel(t, e.cli, dockerx.LabelWorker, worker) })
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	resp, err := e.cli.ContainerCreate(ctx, &container.Config{
		Image:      e.cfg.Image,
		User:       dockerx.SandboxUser,
		Entrypoint: []string{"/usr/bin/node", "-e", "setInterval(() => {}, 1 << 30)"},
		Labels:     labels,
	}, &container.HostConfig{NetworkMode: "none", Resources: container.Resources{Memory: 128 * dockerx.MiB}}, nil, nil, "")
	if err != nil {
		t.Fatalf("create container: %v", err)
	}
	return resp.ID
}

// state returns a container's state ("" when it is gone).
func state(t *testing.T, cli *client.Client, id string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	info, err := cli.ContainerInspect(ctx, id)
	if client.IsErrNotFound(err) {
		return ""
	}
	if err != nil {
		t.Fatalf("inspect %.12s: %v", id, err)
	}
	return info.State.Status
}

// waitGone polls until the container is gone and returns when it saw it
// gone, or fails the test after d.
func waitGone(t *testing.T, cli *client.Client, id, what string, d time.Duration) time.Time {
	t.Helper()
	if !testenv.Poll(d, func() bool { return state(t, cli, id) == "" }) {
		t.Fatalf("%s (%.12s) still there after %v: %s", what, id, d, state(t, cli, id))
	}
	return time.Now()
}

// reapedLine returns the reaper's log line about container id.
func reapedLine(logs *testenv.SyncBuffer, id string) string {
	for _, l := range strings.Split(logs.String(), "\n") {
		if strings.Contains(l, `msg="reaped container"`) && strings.Contains(l, "container="+id) {
			return l
		}
	}
	return ""
}

// TestReaperRemovesDeadWorkersContainers: a reaper removes the running
// containers of a worker of its fleet that alive says is dead, once it has
// been dead for the grace and the container is that old; it keeps the
// containers of a live worker, and those of another fleet or of no fleet
// even though their worker id is the dead one's, and another worker's
// container that is created but not started (its Create may still be
// running) while it is younger than Config.CreateTimeout.
func TestReaperRemovesDeadWorkersContainers(t *testing.T) {
	fleet := "test-fleet-" + randomHex(4)
	e, logs := reaperEnv(t, fleet)
	dead := "test-dead-" + randomHex(4)
	live := "test-live-" + randomHex(4)

	orphan := runLabelled(t, e, fleet, dead, "acme")
	kept := map[string]string{
		runLabelled(t, e, fleet, live, "acme"):                  "a live worker's",
		runLabelled(t, e, "test-fleet-"+randomHex(4), dead, ""): "another fleet's",
		runLabelled(t, e, "", dead, ""):                         "one with no fleet label",
	}
	unstarted := createLabelled(t, e, fleet, live, "")
	var mu sync.Mutex
	asked := map[string]bool{}
	var seenDead time.Time // when alive first said dead is dead
	alive := func(w string) bool {
		mu.Lock()
		defer mu.Unlock()
		asked[w] = true
		if w == dead && seenDead.IsZero() {
			seenDead = time.Now()
		}
		return w != dead
	}

	started := time.Now()
	e.rt.StartReaper(reapEvery, reapGrace, alive)
	e.rt.StartReaper(reapEvery, reapGrace, func(string) bool { return false }) // harmless: ignored
	// A container of the dead worker made half a grace after the reaper
	// first saw the worker dead: the worker's grace runs out before the
	// container's, which is kept until it is itself a grace old.
	testenv.Poll(reapBound, func() bool {
		mu.Lock()
		defer mu.Unlock()
		return !seenDead.IsZero() && time.Since(seenDead) >= reapGrace/2
	})
	youngMade := time.Now()
	young := runLabelled(t, e, fleet, dead, "")

	gone := waitGone(t, e.cli, orphan, "the dead worker's container", reapBound)
	if d := gone.Sub(started); d < reapGrace {
		t.Fatalf("the dead worker's container went %v after the reaper started, within the grace of %v", d, reapGrace)
	}
	t.Logf("dead worker's container removed %v after the reaper started (grace %v)", gone.Sub(started).Round(time.Millisecond), reapGrace)
	if l := reapedLine(logs, orphan); !strings.Contains(l, "worker="+dead) || !strings.Contains(l, "tenant=acme") ||
		!strings.Contains(l, "state=running") || !strings.Contains(l, "not been alive") {
		t.Errorf("the removal is not logged with its container, worker, tenant, state and why: %q", l)
	}

	youngGone := waitGone(t, e.cli, young, "the dead worker's young container", reapBound)
	if d := youngGone.Sub(youngMade); d < reapGrace {
		t.Fatalf("the young container went %v after it was made, within the grace of %v", d, reapGrace)
	}
	t.Logf("young container made %v after the reaper started, removed %v after it was made", youngMade.Sub(started).Round(time.Millisecond), youngGone.Sub(youngMade).Round(time.Millisecond))

	// By now every pass since the grace ran out has seen these.
	for id, what := range kept {
		if s := state(t, e.cli, id); s != "running" {
			t.Errorf("%s container (%.12s) was not kept: %q", what, id, s)
		}
	}
	// Judged by the log: a concurrent test's Reap (TestReap in another
	// checkout: any isode container not running for 4 s) may remove it.
	if l := reapedLine(logs, unstarted); l != "" {
		t.Errorf("a live worker's container not yet started was reaped past the grace, within its CreateTimeout: %s", l)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(asked) != 2 || !asked[dead] || !asked[live] {
		t.Errorf("alive was asked about %v, want only %s and %s (the other workers of the fleet)", asked, dead, live)
	}
}

const holdEnv = "ISODE_TEST_HOLD_STDIN" // fleet/worker[/socket dir] of the helper process

// TestReaperRemovesSandboxThatOutlivesItsWorker shows the weakness of the
// stdin dead-man switch and its remedy. A worker process (runtime A, a
// helper process, so that its end is a real SIGKILL: its attach
// connections close and nothing removes its containers) holds two
// sandboxes; in one a snippet keeps a write end of the agent's stdin open.
// After the kill the other sandbox goes by itself, the held one runs on;
// a second runtime of the same fleet, whose alive says A is dead, removes it.
func TestReaperRemovesSandboxThatOutlivesItsWorker(t *testing.T) {
	if v := os.Getenv(holdEnv); v != "" {
		holdHelper(t, v)
		return
	}
	fleet := "test-fleet-" + randomHex(4)
	workerA := "test-a-" + randomHex(4)
	e, logs := reaperEnv(t, fleet)
	t.Cleanup(func() { testenv.RemoveByLabel(t, e.cli, dockerx.LabelWorker, workerA) })

	held, control, kill := startHolder(t, "^TestReaperRemovesSandboxThatOutlivesItsWorker$", fleet+"/"+workerA)

	// SIGKILL: the worker's attach connections close, nothing else happens.
	kill()
	waitGone(t, e.cli, control, "the control sandbox (the dead-man switch)", 30*time.Second)
	eof := time.Now()
	if s := state(t, e.cli, held); s != "running" {
		t.Fatalf("the held sandbox is %q right after its worker's death, want running", s)
	}
	const outlive = 3 * time.Second
	if testenv.Poll(outlive, func() bool { return state(t, e.cli, held) != "running" }) {
		t.Fatalf("the held sandbox stopped within %v of the dead-man switch: %q; the weakness this test shows is gone", outlive, state(t, e.cli, held))
	}
	t.Logf("the held sandbox still runs %v after its worker's death closed the control's stdin", time.Since(eof).Round(time.Millisecond))

	started := time.Now()
	e.rt.StartReaper(reapEvery, reapGrace, func(w string) bool { return w != workerA })
	gone := waitGone(t, e.cli, held, "the held sandbox", reapBound)
	if d := gone.Sub(started); d < reapGrace {
		t.Fatalf("the held sandbox went %v after the reaper started, within the grace of %v", d, reapGrace)
	}
	t.Logf("the reaper removed the held sandbox %v after it started (grace %v, every %v)", gone.Sub(started).Round(time.Millisecond), reapGrace, reapEvery)
	if l := reapedLine(logs, held); !strings.Contains(l, "worker="+workerA) || !strings.Contains(l, "tenant=hold") {
		t.Errorf("the removal is not logged with its worker and tenant: %q", l)
	}
}

// startHolder runs holdHelper in a process of its own (the test named by
// run, with holdEnv set to v) and returns the ids of its held and control
// sandboxes and a function that SIGKILLs it.
func startHolder(t *testing.T, run, v string) (held, control string, kill func()) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	cmd := exec.CommandContext(ctx, os.Args[0], "-test.run="+run, "-test.count=1", "-test.v")
	cmd.Env = append(os.Environ(), holdEnv+"="+v)
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var once sync.Once
	kill = func() {
		once.Do(func() {
			cmd.Process.Kill()
			cmd.Wait()
			cancel()
		})
	}
	t.Cleanup(kill)
	var out []string
	sc := bufio.NewScanner(stdout)
	for (held == "" || control == "") && sc.Scan() {
		out = append(out, sc.Text())
		if v, ok := strings.CutPrefix(sc.Text(), "held "); ok {
			held, _, _ = strings.Cut(v, " ")
			t.Logf("snippet in %.12s: %s", held, v[len(held)+1:])
		}
		if v, ok := strings.CutPrefix(sc.Text(), "control "); ok {
			control = v
		}
	}
	if held == "" || control == "" {
		t.Fatalf("the helper did not make both sandboxes:\n%s", strings.Join(out, "\n"))
	}
	return held, control, kill
}

// TestSocketDeadManIgnoresHeldStdin: with the unix-socket transport a
// snippet that holds its agent's stdin open cannot keep its sandbox alive
// past its worker: the agent also exits when its socket ends, which no
// descriptor inside the sandbox can hold open (the host's end closes).
func TestSocketDeadManIgnoresHeldStdin(t *testing.T) {
	if v := os.Getenv(holdEnv); v != "" {
		holdHelper(t, v)
		return
	}
	cli := testenv.Docker(t)
	worker := "test-h-" + randomHex(4)
	t.Cleanup(func() { testenv.RemoveByLabel(t, cli, dockerx.LabelWorker, worker) })
	held, control, kill := startHolder(t, "^TestSocketDeadManIgnoresHeldStdin$", "test-fleet-"+randomHex(4)+"/"+worker+"/"+socketDir(t))
	kill()
	waitGone(t, cli, control, "the control sandbox", 30*time.Second)
	waitGone(t, cli, held, "the held sandbox (the socket's dead-man switch)", 30*time.Second)
}

// holdHelper is runtime A of TestReaperRemovesSandboxThatOutlivesItsWorker:
// it makes the held and the control sandbox, says which, and waits to be
// killed.
func holdHelper(t *testing.T, v string) {
	fleet, worker, _ := strings.Cut(v, "/")
	worker, sockets, _ := strings.Cut(worker, "/")
	cli := testenv.Docker(t)
	cfg := dockerx.DefaultConfig()
	cfg.Image = testenv.Image(t, cli)
	cfg.Fleet = fleet
	cfg.WorkerID = worker
	cfg.AgentSocketDir = sockets
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	rt, err := dockerx.New(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	held, err := rt.Create(ctx, "hold")
	if err != nil {
		t.Fatal(err)
	}
	control, err := rt.Create(ctx, "control")
	if err != nil {
		t.Fatal(err)
	}
	what := mustRun(t, held, testenv.HoldStdin, "")
	fmt.Printf("held %s %s\ncontrol %s\n", held.ID(), what, control.ID())
	select { // until killed; should a sandbox end, the test fails on its own
	case <-held.Done():
		t.Fatalf("the held sandbox ended while its worker lived: %v", held.Err())
	case <-control.Done():
		t.Fatalf("the control sandbox ended while its worker lived: %v", control.Err())
	}
}
