package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
)

// Tests that need the worker (or submit) as a separate process (to SIGKILL
// it, or to run several) build it once per test binary.
var (
	workerBin = &testBinary{name: "worker", pkg: "."}
	submitBin = &testBinary{name: "submit", pkg: "../submit"}
)

// TestMain removes the binaries built for the tests once they end.
func TestMain(m *testing.M) {
	code := m.Run()
	for _, b := range []*testBinary{workerBin, submitBin} {
		if b.path != "" {
			os.RemoveAll(filepath.Dir(b.path))
		}
	}
	os.Exit(code)
}

// workerBinary returns the path of a freshly built worker binary.
func workerBinary(t testing.TB) string { return workerBin.build(t) }

// submitBinary returns the path of a freshly built submit binary.
func submitBinary(t testing.TB) string { return submitBin.build(t) }

// testBinary is a static binary of package pkg, built on first use.
type testBinary struct {
	name, pkg string

	once sync.Once
	path string
	err  error
	out  []byte
}

func (b *testBinary) build(t testing.TB) string {
	t.Helper()
	b.once.Do(func() {
		dir, err := os.MkdirTemp("", "isode-"+b.name+"-bin-")
		if err != nil {
			b.err = err
			return
		}
		b.path = filepath.Join(dir, b.name)
		cmd := exec.Command("go", "build", "-o", b.path, b.pkg)
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		b.out, b.err = cmd.CombinedOutput()
	})
	if b.err != nil {
		t.Fatalf("build %s: %v\n%s", b.name, b.err, b.out)
	}
	return b.path
}
