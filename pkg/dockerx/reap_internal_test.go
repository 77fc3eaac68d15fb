package dockerx

import (
	"context"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/docker/docker/api/types/container"

	"github.com/isode-run/isode/internal/testenv"
)

// TestReaperRules drives the orphan rules of one reaper pass by pass, on
// made-up container lists and times.
func TestReaperRules(t *testing.T) {
	const grace = 10 * time.Second
	t0 := time.Unix(1_000_000, 0)
	dead := map[string]bool{"w-dead": true, "w-other-fleet": true, "w-no-fleet": true, "w-flaky": true}
	var asked []string
	p := &reaper{
		fleet: "f", self: "w-self", grace: grace, missing: map[string]time.Time{},
		alive: func(w string) bool { asked = append(asked, w); return !dead[w] },
	}
	mk := func(id, fleet, worker, state string, created time.Time) container.Summary {
		l := map[string]string{LabelApp: AppName, LabelWorker: worker}
		if fleet != "" {
			l[LabelFleet] = fleet
		}
		return container.Summary{ID: id, Labels: l, State: state, Created: created.Unix()}
	}
	old := t0.Add(-time.Hour)
	list := []container.Summary{
		mk("dead", "f", "w-dead", container.StateRunning, old),
		mk("dead-paused", "f", "w-dead", container.StatePaused, old),
		mk("dead-exited", "f", "w-dead", container.StateExited, old), // Reap's, not the orphan rule's
		mk("alive", "f", "w-alive", container.StateRunning, old),
		mk("self", "f", "w-self", container.StateRunning, old),
		mk("other-fleet", "g", "w-other-fleet", container.StateRunning, old),
		mk("no-fleet", "", "w-no-fleet", container.StateRunning, old),
		mk("flaky", "f", "w-flaky", container.StateRunning, old),
	}
	pass := func(at time.Time, list []container.Summary) []string {
		p.observe(list, at)
		var out []string
		for _, c := range list {
			if p.whyOrphan(c, at) != "" {
				out = append(out, c.ID)
			}
		}
		return out
	}
	eq := func(what string, got []string, want ...string) {
		t.Helper()
		if strings.Join(got, ",") != strings.Join(want, ",") {
			t.Errorf("%s: removed %v, want %v", what, got, want)
		}
	}

	eq("first pass", pass(t0, list))
	if got := strings.Join(asked, ","); got != "w-dead,w-alive,w-flaky" {
		t.Errorf("alive was asked about %s, want only the other workers of the fleet with running containers, once each", got)
	}
	eq("within the grace", pass(t0.Add(grace-time.Second), list))
	dead["w-flaky"] = false // came back: its clock starts again
	eq("just before the grace", pass(t0.Add(grace-time.Millisecond), list))
	dead["w-flaky"] = true
	eq("after the grace", pass(t0.Add(grace), list), "dead", "dead-paused")
	eq("flaky, a grace after it was last seen alive", pass(t0.Add(2*grace), list), "dead", "dead-paused", "flaky")

	// A young container of a worker dead for long stays until it is a grace old.
	young := mk("young", "f", "w-dead", container.StateRunning, t0.Add(2*grace))
	at := t0.Add(2*grace + time.Second)
	eq("young", pass(at, append(list, young)), "dead", "dead-paused", "flaky")
	eq("young, a grace (and the listing's second) later", pass(t0.Add(3*grace+1001*time.Millisecond), append(list, young)), "dead", "dead-paused", "flaky", "young")

	// Workers with no container left are forgotten.
	pass(at, list[3:5])
	if len(p.missing) != 0 {
		t.Errorf("missing still holds %v, whose containers are gone", p.missing)
	}

	// No alive, or no fleet: no orphan rule at all.
	for _, q := range []*reaper{
		{fleet: "f", self: "w-self", grace: 0, missing: map[string]time.Time{}},
		{fleet: "", self: "w-self", grace: 0, missing: map[string]time.Time{}, alive: func(string) bool { return false }},
	} {
		for _, c := range list {
			if q.candidate(c) {
				t.Errorf("reaper with fleet %q and alive %v takes %s as a candidate", q.fleet, q.alive != nil, c.ID)
			}
		}
	}
}

func TestCreatedBeforeIsConservative(t *testing.T) {
	// Listed at second 100: created anywhere in [100, 101).
	c := container.Summary{Created: 100}
	if createdBefore(c, time.Unix(101, 0)) {
		t.Error("a container listed at second 100 may have been created at 100.999: not surely before 101")
	}
	if !createdBefore(c, time.Unix(101, 1)) {
		t.Error("a container listed at second 100 was created before 101.000000001")
	}
}

// TestReaperOutlivesFailedPassesAndStopsOnClose runs the reaper against an
// engine that is not there: every pass fails, is logged and is retried;
// Close stops it; later calls start nothing.
func TestReaperOutlivesFailedPassesAndStopsOnClose(t *testing.T) {
	r := endRuntime(t)
	var logs testenv.SyncBuffer
	r.log = slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	r.cfg.Fleet = "f"
	failed := func() int { return strings.Count(logs.String(), "reaper pass failed") }

	r.StartReaper(10*time.Millisecond, 0, func(string) bool { return false })
	r.StartReaper(10*time.Millisecond, 0, nil)
	if !testenv.Poll(10*time.Second, func() bool { return failed() >= 3 }) {
		t.Fatalf("want at least 3 failed passes logged, got:\n%s", logs.String())
	}
	if !strings.Contains(logs.String(), "StartReaper called again") {
		t.Errorf("a second StartReaper was not reported:\n%s", logs.String())
	}

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := r.Close(ctx); err != nil {
		t.Fatalf("Close: %v", err)
	}
	r.StartReaper(10*time.Millisecond, 0, nil) // after Close: nothing
	after := logs.String()
	if testenv.Poll(300*time.Millisecond, func() bool { return logs.String() != after }) {
		t.Fatalf("the reaper logged after Close returned (30 intervals):\n%s", strings.TrimPrefix(logs.String(), after))
	}
}

func TestStartReaperRejectsBadDurations(t *testing.T) {
	r := endRuntime(t)
	for _, d := range []struct{ every, grace time.Duration }{{0, time.Second}, {-time.Second, time.Second}, {time.Second, -time.Second}} {
		func() {
			defer func() {
				if recover() == nil {
					t.Errorf("StartReaper(%v, %v) did not panic", d.every, d.grace)
				}
			}()
			r.StartReaper(d.every, d.grace, nil)
		}()
	}
}
