package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/isode-run/isode/internal/testenv"
	"github.com/isode-run/isode/pkg/fleet"
	"github.com/isode-run/isode/pkg/protocol"
)

// runner answers from the code: "fail" is a code error, anything else
// echoes the input (or the code) and prints a line.
type runner struct{}

func (runner) Run(ctx context.Context, req *protocol.Request) (*protocol.Result, error) {
	if req.Code == "fail" {
		return &protocol.Result{Console: "about to fail\n"}, protocol.Errorf(protocol.CodeCodeError, "Error: boom")
	}
	v := req.Input
	if len(v) == 0 {
		v, _ = json.Marshal(req.Code)
	}
	return &protocol.Result{Value: v, Console: "hello from " + req.IsolateKey + "\n"}, nil
}

// fleetURL starts a NATS server and a fleet worker with the fake runner.
func fleetURL(t *testing.T) string {
	t.Helper()
	return startFleet(t, "submit-test", runner{}, nil)
}

// startFleet starts a NATS server and one fleet worker, id, that runs with
// r and reports stats (nil: none); it returns the server's URL. Both are
// stopped at cleanup.
func startFleet(t *testing.T, id string, r fleet.Runner, stats fleet.StatsFunc) string {
	t.Helper()
	s := testenv.NATS(t)
	nc, err := nats.Connect(s.ClientURL())
	if err != nil {
		t.Fatal(err)
	}
	cfg := fleet.DefaultConfig()
	cfg.WorkerID = id
	w, err := fleet.New(nc, r, stats, cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := w.Start(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		w.StopPulling()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		w.Wait(ctx)
		nc.Close()
	})
	return s.ClientURL()
}

func submit(t *testing.T, stdin string, args ...string) (stdout, stderr string, err error) {
	t.Helper()
	var out, errb bytes.Buffer
	err = run(context.Background(), args, strings.NewReader(stdin), &out, &errb)
	return out.String(), errb.String(), err
}

func exitCode(err error) int {
	var ee *exitError
	if errors.As(err, &ee) {
		return ee.code
	}
	if err != nil {
		return 1
	}
	return 0
}

func TestRun(t *testing.T) {
	url := fleetURL(t)
	out, errOut, err := submit(t, "", "run", "--nats", url, "--tenant", "t1", "--input", `{"n":0}`, "return function (ctx, cb) { cb(null, ctx.data); }")
	if err != nil {
		t.Fatal(err)
	}
	if out != "{\"n\":0}\n" || errOut != "hello from t1\n" {
		t.Fatalf("stdout %q stderr %q", out, errOut)
	}

	// The code from stdin.
	out, _, err = submit(t, "from stdin", "run", "--nats", url, "--tenant", "t1", "-")
	if err != nil || out != "\"from stdin\"\n" {
		t.Fatalf("stdin: %q %v", out, err)
	}

	// A failed run: status 1, the code and message on stderr, console too.
	out, errOut, err = submit(t, "", "run", "--nats", url, "--tenant", "t1", "fail")
	if exitCode(err) != 1 || out != "" || !strings.Contains(err.Error(), "error code_error: Error: boom") || !strings.Contains(errOut, "about to fail") {
		t.Fatalf("failed run: stdout %q stderr %q err %v", out, errOut, err)
	}
}

func TestUsageErrors(t *testing.T) {
	for _, args := range [][]string{
		{},
		{"nope"},
		{"run", "--tenant", "t"},
		{"run", "code"},
		{"run", "--tenant", "t", "--input", "{bad", "code"},
		{"run", "--tenant", "t", "a", "b"},
	} {
		_, _, err := submit(t, "", args...)
		if exitCode(err) != 2 {
			t.Errorf("submit %q: err %v, want exit status 2", args, err)
		}
	}
	// An unreachable server is an error that says what to do.
	_, _, err := submit(t, "", "run", "--nats", "nats://127.0.0.1:1", "--tenant", "t", "code")
	if err == nil || !strings.Contains(err.Error(), "is a worker running?") {
		t.Errorf("unreachable server: %v", err)
	}
}

func TestInvalidKeyIsRefusedBeforeSending(t *testing.T) {
	url := fleetURL(t)
	_, _, err := submit(t, "", "run", "--nats", url, "--tenant", "bad key*", "code")
	if exitCode(err) != 1 || !strings.Contains(err.Error(), "error bad_request: isolate_key") {
		t.Fatalf("err %v", err)
	}
}

func TestStats(t *testing.T) {
	url := fleetURL(t)
	out, _, err := submit(t, "", "stats", "--nats", url)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out, "submit-test") || !strings.Contains(out, "64 [0-63]") {
		t.Fatalf("stats:\n%s", out)
	}
	out, _, err = submit(t, "", "stats", "--nats", url, "--json")
	if err != nil {
		t.Fatal(err)
	}
	var all []protocol.WorkerStats
	if err := json.Unmarshal([]byte(out), &all); err != nil || len(all) != 1 || len(all[0].Shards) != 64 {
		t.Fatalf("stats --json: %v %s", err, out)
	}

	out, _, err = submit(t, "", "stats", "--nats", url, "--tenants")
	if err != nil || strings.TrimSpace(out) != "no runs yet" {
		t.Fatalf("stats --tenants before any run: %v %q", err, out)
	}
	for _, tenant := range []string{"acme", "acme", "globex"} {
		if _, _, err := submit(t, "", "run", "--nats", url, "--tenant", tenant, "x"); err != nil {
			t.Fatal(err)
		}
	}
	if _, _, err := submit(t, "", "run", "--nats", url, "--tenant", "acme", "fail"); err == nil {
		t.Fatal("the failing run succeeded")
	}
	out, _, err = submit(t, "", "stats", "--nats", url, "--tenants")
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) != 3 || !strings.HasPrefix(lines[0], "TENANT") {
		t.Fatalf("stats --tenants:\n%s", out)
	}
	rows := map[string][]string{}
	for _, l := range lines[1:] {
		f := strings.Fields(l)
		rows[f[0]] = f
	}
	if a := rows["acme"]; len(a) != 6 || a[1] != "3" || a[2] != "1" || a[5] != "code_error:1" {
		t.Errorf("acme: %q", a)
	}
	if g := rows["globex"]; len(g) != 5 || g[1] != "1" || g[2] != "0" {
		t.Errorf("globex: %q", g)
	}
}

func TestBenchJSON(t *testing.T) {
	url := fleetURL(t)
	out, _, err := submit(t, "", "bench", "--nats", url, "--tenants", "3", "--concurrency", "2", "--count", "50", "--json", "--quiet")
	if err != nil {
		t.Fatal(err)
	}
	var rep benchReport
	if err := json.Unmarshal([]byte(out), &rep); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	if len(rep.Results) != 2 || rep.Results[0].Name != "core NATS echo" || rep.Results[1].Runs != 50 || rep.Results[1].Latency["p50"] <= 0 {
		t.Fatalf("report %+v", rep)
	}
	if rep.Ratios["warm_p50_over_echo_p50"] <= 0 {
		t.Fatalf("ratios %+v", rep.Ratios)
	}
}

func TestShardRanges(t *testing.T) {
	for _, tt := range []struct {
		give []int
		want string
	}{
		{nil, "[]"},
		{[]int{3}, "[3]"},
		{[]int{0, 1, 2, 5, 7, 8}, "[0-2,5,7-8]"},
	} {
		if got := shardRanges(tt.give); got != tt.want {
			t.Errorf("shardRanges(%v) = %q, want %q", tt.give, got, tt.want)
		}
	}
}

// The new-tenant scenario spaces its runs so the pool refills; the pause
// must not count as latency (it once did: every new tenant took "1s").
func TestBenchNewScenarioLeavesPausesOffTheClock(t *testing.T) {
	url := fleetURL(t)
	const pause = 2 * time.Second
	out, _, err := submit(t, "", "bench", "--nats", url, "--scenario", "new", "--count", "3", "--interval", pause.String(),
		"--no-baseline", "--json", "--quiet")
	if err != nil {
		t.Fatal(err)
	}
	var rep benchReport
	if err := json.Unmarshal([]byte(out), &rep); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	var fresh *benchResult
	for i := range rep.Results {
		if rep.Results[i].Name == "new tenant" {
			fresh = &rep.Results[i]
		}
	}
	if fresh == nil || fresh.Runs != 3 {
		t.Fatalf("no new-tenant result of 3 runs in %+v", rep)
	}
	if max := time.Duration(fresh.Latency["max"]) * time.Microsecond; max >= pause {
		t.Fatalf("a new tenant's run took %v with %v pauses between runs: the pause is on the clock", max, pause)
	}
}

// On a pipe, top prints one snapshot (the workers, and the runs of one
// interval) and exits.
func TestTopSnapshotOnAPipe(t *testing.T) {
	url := fleetURL(t)
	done := make(chan struct{})
	var out string
	var err error
	go func() {
		defer close(done)
		out, _, err = submit(t, "", "top", "--nats", url, "--interval", "1s")
	}()
	// Runs until top has printed: some of them fall in its interval.
	for running := true; running; {
		select {
		case <-done:
			running = false
		default:
			if _, _, err := submit(t, "", "run", "--nats", url, "--tenant", "acme", "x"); err != nil {
				t.Error(err)
			}
		}
	}
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(out, "\x1b") {
		t.Errorf("terminal sequences on a pipe: %q", out)
	}
	for _, want := range []string{"1 workers", "submit-test", "runs/s", "busiest tenants", "acme"} {
		if !strings.Contains(out, want) {
			t.Errorf("top's snapshot lacks %q:\n%s", want, out)
		}
	}
}
