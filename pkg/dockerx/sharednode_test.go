package dockerx_test

import (
	"context"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/docker/docker/api/types/volume"
	"github.com/isode-run/isode/internal/testenv"
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

// TestSharedNodePerWorker: workers that start at once on one engine each
// fill a volume of their own, so none rewrites node while another's
// sandboxes start it (one volume per image did: "exec node failed:
// Permission denied").
func TestSharedNodePerWorker(t *testing.T) {
	envs := make([]*env, 3)
	var wg sync.WaitGroup
	for i := range envs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			envs[i] = newEnv(t, nil)
		}()
	}
	wg.Wait()
	names := map[string]bool{}
	for _, e := range envs {
		for range 2 {
			s := e.create("")
			if got := mustRun(t, s, `return function (cb) { cb(null, 1) }`, ""); got != "1" {
				t.Fatalf("got %s", got)
			}
			info, err := e.cli.ContainerInspect(context.Background(), s.ID())
			if err != nil {
				t.Fatal(err)
			}
			for _, m := range info.Mounts {
				if m.Type == "volume" {
					names[m.Name] = true
				}
			}
		}
	}
	if len(names) != len(envs) {
		t.Fatalf("volumes %v, want one per worker", names)
	}
}

// TestReaperRemovesDeadWorkersNodeVolume: the shared node volume of a
// worker of the fleet that is not alive goes; a live one's stays.
func TestReaperRemovesDeadWorkersNodeVolume(t *testing.T) {
	fleet := "test-fleet-" + randomHex(4)
	e, _ := reaperEnv(t, fleet)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	dead, live := "isode-node-test-dead-"+randomHex(4), "isode-node-test-live-"+randomHex(4)
	for name, worker := range map[string]string{dead: "dead", live: "live"} {
		if _, err := e.cli.VolumeCreate(ctx, volume.CreateOptions{Name: name, Labels: map[string]string{
			dockerx.LabelApp: dockerx.AppName, dockerx.LabelWorker: worker, dockerx.LabelFleet: fleet}}); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { e.cli.VolumeRemove(context.Background(), name, true) })
	}
	e.rt.StartReaper(reapEvery, reapGrace, func(w string) bool { return w == "live" })
	exists := func(name string) bool {
		_, err := e.cli.VolumeInspect(ctx, name)
		return err == nil
	}
	if !testenv.Poll(reapBound, func() bool { return !exists(dead) }) {
		t.Fatal("the dead worker's node volume was not removed")
	}
	if !exists(live) {
		t.Fatal("the live worker's node volume was removed")
	}
}
