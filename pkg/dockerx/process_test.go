package dockerx_test

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/isode-run/isode/internal/testenv"
	"github.com/isode-run/isode/pkg/dockerx"
)

// TestAgentUnit runs the agent's own tests (sandbox/*.test.js) with the
// host's node, so that `go test ./...` covers them too.
func TestAgentUnit(t *testing.T) {
	node := testenv.Node(t)
	// Bounded, so that a hung agent test fails this one instead of the
	// whole package at go test's timeout.
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, node, "--test", "--test-timeout=60000", "../../sandbox/")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("node --test sandbox/: %v\n%s", err, out)
	}
	if !strings.Contains(string(out), "# fail 0") {
		t.Fatalf("node --test sandbox/ reported failures:\n%s", out)
	}
}

const deadManEnv = "ISODE_TEST_DEADMAN_WORKER"

// TestDeadManSwitch kills a worker process that holds a sandbox (SIGKILL:
// no cleanup runs) and checks that the container goes away by itself: the
// agent sees its stdin close and exits, and AutoRemove deletes it.
func TestDeadManSwitch(t *testing.T) {
	if worker := os.Getenv(deadManEnv); worker != "" {
		deadManHelper(t, worker)
		return
	}
	e := newEnv(t, nil)
	worker := "test-deadman-" + randomHex(4)
	t.Cleanup(func() { removeWorker(t, e, worker) })
	cmd := exec.Command(os.Args[0], "-test.run=^TestDeadManSwitch$", "-test.count=1")
	cmd.Env = append(os.Environ(), deadManEnv+"="+worker)
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var id string
	sc := bufio.NewScanner(stdout)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "sandbox "); ok {
			id = v
			break
		}
	}
	if id == "" {
		cmd.Process.Kill()
		cmd.Wait()
		t.Fatal("the helper made no sandbox")
	}
	killed := time.Now()
	cmd.Process.Kill()
	cmd.Wait()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if !testenv.Poll(15*time.Second, func() bool {
		_, err := e.cli.ContainerInspect(ctx, id)
		return err != nil
	}) {
		t.Fatalf("container %s outlived its worker by 15 s", id[:12])
	}
	t.Logf("container gone %v after its worker was killed", time.Since(killed).Round(time.Millisecond))
}

// deadManHelper is the worker process of TestDeadManSwitch: it makes a
// sandbox, says which, and waits to be killed.
func deadManHelper(t *testing.T, worker string) {
	cli := testenv.Docker(t)
	cfg := dockerx.DefaultConfig()
	cfg.Image = testenv.Image(t, cli)
	cfg.WorkerID = worker
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	rt, err := dockerx.New(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	s, err := rt.Create(ctx, "")
	if err != nil {
		t.Fatal(err)
	}
	fmt.Printf("sandbox %s\n", s.ID())
	<-s.Done() // until killed; should the sandbox end, the test fails on its own
	t.Fatalf("the sandbox ended while its worker lived: %v", s.Err())
}
