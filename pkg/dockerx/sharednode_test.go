package dockerx_test

import (
	"context"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/isode-run/isode/pkg/dockerx"
)

// nodeMapping returns the device and inode the agent's node process of s
// maps its code from, from /proc on the engine's host (this machine).
func nodeMapping(t *testing.T, e *env, s *dockerx.Sandbox) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	info, err := e.cli.ContainerInspect(ctx, s.ID())
	if err != nil || info.State == nil || info.State.Pid == 0 {
		t.Fatalf("inspect: %v", err)
	}
	init := strconv.Itoa(info.State.Pid) // Docker's init; the agent is its child
	children, err := os.ReadFile("/proc/" + init + "/task/" + init + "/children")
	if err != nil {
		t.Skipf("the engine's processes are not visible here: %v", err)
	}
	f := strings.Fields(string(children))
	if len(f) != 1 {
		t.Fatalf("Docker's init has children %q, want the agent", children)
	}
	maps, err := os.ReadFile("/proc/" + f[0] + "/maps")
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(maps), "\n") {
		if x := strings.Fields(l); len(x) == 6 && x[1] == "r-xp" && strings.HasSuffix(x[5], "/node") {
			return x[3] + " " + x[4] // device, inode
		}
	}
	t.Fatalf("no executable mapping of node in:\n%s", maps)
	return ""
}

// TestSharedNode: with ShareNode the sandboxes' node processes run their
// code from one file (the volume's), so its pages are shared between them
// whatever the storage driver.
func TestSharedNode(t *testing.T) {
	e := newEnv(t, nil)
	a, b := e.create("a"), e.create("b")
	ma, mb := nodeMapping(t, e, a), nodeMapping(t, e, b)
	if ma != mb {
		t.Fatalf("the sandboxes map node from different files (%s and %s): nothing is shared", ma, mb)
	}
	t.Logf("both sandboxes run node from device and inode %s", ma)
	if got := mustRun(t, a, `return function (cb) { cb(null, process.execPath) }`, ""); got != `"/usr/bin/node"` {
		t.Errorf("node runs as %s", got)
	}

	// Without it, each runs the image's own (on this engine's storage
	// driver, maybe a file of its own each: not asserted).
	plain := newEnv(t, func(c *dockerx.Config) { c.ShareNode = false })
	p := plain.create("p")
	if mp := nodeMapping(t, plain, p); mp == ma {
		t.Errorf("with ShareNode off the sandbox still maps the shared file %s", mp)
	}
}
