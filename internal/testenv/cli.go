package testenv

import (
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

// NATSCLI returns the path of the official nats CLI (natscli v0.5.0, which
// .ci/run installs with go install): $ISODE_NATS_CLI, else nats on PATH,
// else in $GOBIN or the first $GOPATH's bin (go install's targets). Without
// it the test skips, except under CI, where it fails.
func NATSCLI(t testing.TB) string {
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
