package fleet_test

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// natsCLI returns the path of the official nats CLI (natscli v0.5.0, which
// .ci/run installs with go install): $ISODE_NATS_CLI, else nats on PATH,
// else in $GOBIN or the first $GOPATH's bin (go install's targets). Without
// it the test skips, except under CI, where it fails.
func natsCLI(t *testing.T) string {
	t.Helper()
	if p := os.Getenv("ISODE_NATS_CLI"); p != "" {
		return p
	}
	if p, err := exec.LookPath("nats"); err == nil {
		return p
	}
	var dirs []string
	if d := os.Getenv("GOBIN"); d != "" {
		dirs = append(dirs, d)
	}
	gopath := os.Getenv("GOPATH")
	if gopath == "" {
		if home, err := os.UserHomeDir(); err == nil {
			gopath = filepath.Join(home, "go")
		}
	}
	if gopath != "" {
		dirs = append(dirs, filepath.Join(filepath.SplitList(gopath)[0], "bin"))
	}
	for _, d := range dirs {
		p := filepath.Join(d, "nats")
		if fi, err := os.Stat(p); err == nil && !fi.IsDir() {
			return p
		}
	}
	msg := "no nats CLI (go install github.com/nats-io/natscli/nats@v0.5.0) on PATH, in $GOBIN or in $GOPATH/bin"
	if os.Getenv("CI") != "" {
		t.Fatal(msg)
	}
	t.Skip(msg)
	return ""
}

// TestNATSCLI calls the fleet with the official nats CLI, as the README
// tells a new user to: nats req isode.call, nats micro ls/info/stats.
func TestNATSCLI(t *testing.T) {
	cli := natsCLI(t)
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
