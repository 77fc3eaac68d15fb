package fleet_test

import (
	"context"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/isode-run/isode/internal/testenv"
)

// TestNATSCLI calls the fleet with the official nats CLI, as the README
// tells a new user to: nats req isode.call, nats micro ls/info/stats.
func TestNATSCLI(t *testing.T) {
	cli := testenv.NATSCLI(t)
	e := newEnv(t)
	startWorker(t, e, echo, testConfig("cli-worker"))
	home := t.TempDir() // no user's contexts
	nats := func(args ...string) string {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		cmd := exec.CommandContext(ctx, cli, append([]string{"--server", e.url, "--timeout", "10s"}, args...)...)
		cmd.Env = append(os.Environ(), "HOME="+home, "XDG_CONFIG_HOME="+home, "NATS_CONTEXT=", "NO_COLOR=1")
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("nats %s: %v\n%s", strings.Join(args, " "), err, out)
		}
		t.Logf("nats %s:\n%s", strings.Join(args, " "), out)
		return string(out)
	}
	mustHave := func(out string, want ...string) {
		t.Helper()
		for _, w := range want {
			if !strings.Contains(out, w) {
				t.Errorf("output lacks %q:\n%s", w, out)
			}
		}
	}

	out := nats("req", "isode.call", `{"v":1,"isolate_key":"acme","code":"return function (ctx, cb) { cb(null, ctx.data); }","input":{"n":1}}`)
	mustHave(out, `"result":{"n":1}`, `"worker":"cli-worker"`, `Isode-Request-Id`)

	out = nats("req", "isode.call", `{"v":1,"isolate_key":"acme"}`)
	mustHave(out, "Nats-Service-Error-Code: 400", "Nats-Service-Error: ", `"code":"bad_request"`)
	out = nats("req", "isode.call", `not json`)
	mustHave(out, "Nats-Service-Error-Code: 400", `"code":"bad_request"`)

	out = nats("micro", "ls")
	mustHave(out, "isode", "0.0.0-dev", "isode.call")
	out = nats("micro", "info", "isode")
	mustHave(out, "isode.call", "cli-worker")
	out = nats("micro", "stats", "isode", "--json")
	mustHave(out, `"num_requests": 3`, `"calls": 3`)
}
