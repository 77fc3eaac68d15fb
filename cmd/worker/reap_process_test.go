package main

import (
	"context"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/docker/docker/api/types/container"
	"github.com/docker/docker/api/types/filters"

	"github.com/isode-run/isode/internal/testenv"
	isode "github.com/isode-run/isode/pkg/client"
	"github.com/isode-run/isode/pkg/dockerx"
	"github.com/isode-run/isode/pkg/protocol"
)

// TestReaperRemovesSandboxOfKilledWorker: a snippet keeps its sandbox
// alive past its worker's SIGKILL (the stdin dead-man switch is defeated);
// another worker of the fleet reaps it once the dead worker has been out
// of the membership for --orphan-grace.
func TestReaperRemovesSandboxOfKilledWorker(t *testing.T) {
	f := newFleet(t)
	// The attach streams: with agent sockets the agent also exits when its
	// socket ends, which no snippet can hold off (pkg/dockerx
	// TestSocketDeadManIgnoresHeldStdin).
	args := []string{"--heartbeat", "250ms", "--member-ttl", "1s", "--reap-interval", "500ms", "--orphan-grace", "3s", "--agent-sockets", "none"}
	victim, reaper := f.start("r1", args...), f.start("r2", args...)
	victim.waitReady(t, 90*time.Second)
	reaper.waitReady(t, 90*time.Second)
	owners := f.steady([]string{victim.id, reaper.id}, 60*time.Second)
	key := ""
	for _, k := range fleetTenants(f.name+"-held", 200) {
		if owners[protocol.Shard(k, protocol.DefaultShards)] == victim.id {
			key = k
			break
		}
	}
	if key == "" {
		t.Fatal("no tenant on the victim's shards")
	}
	c, err := isode.New(f.nats.connect("app-a"))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	res, err := c.Run(ctx, key, testenv.HoldStdin)
	if err != nil || string(res.Value) != `"held"` || res.Worker != victim.id {
		t.Fatalf("hold stdin: %v %+v", err, res)
	}
	res, err = c.Run(ctx, key, "return function (cb) { cb(null, require('os').hostname()); }")
	if err != nil || res.Worker != victim.id {
		t.Fatalf("host name: %v %+v", err, res)
	}
	var short string
	if err := json.Unmarshal(res.Value, &short); err != nil || short == "" {
		t.Fatalf("host name %s: %v", res.Value, err)
	}
	// The held sandbox, running: its host name is its id's first 12 digits.
	held := func() []container.Summary {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		list, err := f.cli.ContainerList(ctx, container.ListOptions{Filters: filters.NewArgs(
			filters.Arg("label", dockerx.LabelWorker+"="+victim.id), filters.Arg("id", short))})
		if err != nil {
			t.Fatal(err)
		}
		return list
	}
	if n := len(held()); n != 1 {
		t.Fatalf("%d running sandboxes of the held tenant, want 1", n)
	}

	victim.kill(t)
	killed := time.Now()
	// The weakness: the dead-man switch alone would have ended it by now
	// (a sandbox whose stdin closes exits within about a second).
	time.Sleep(2 * time.Second) // observing, not synchronising
	if n := len(held()); n != 1 {
		t.Fatalf("the held sandbox is gone 2s after the kill (%d running): the test no longer shows the weakness", n)
	}
	// The fix: gone within member TTL + grace + two passes, with room.
	bound := time.Second + 3*time.Second + 2*500*time.Millisecond + 10*time.Second
	for len(held()) > 0 {
		if time.Since(killed) > bound {
			t.Fatalf("the held sandbox still runs %v after its worker was killed", time.Since(killed).Round(time.Second))
		}
		time.Sleep(200 * time.Millisecond)
	}
	t.Logf("held sandbox reaped %v after its worker's SIGKILL", time.Since(killed).Round(100*time.Millisecond))
	// The reaper logs once the engine has confirmed the removal, which the
	// list above may show first.
	if !testenv.Poll(10*time.Second, func() bool { return strings.Contains(reaper.log(), "reaped container") }) {
		t.Errorf("the reaper did not log the removal:\n%s", reaper.tail(20))
	}
}
