package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
)

// Tests that need the worker as a separate process (to SIGKILL it, or to
// run several) build it once per test binary with workerBinary.
var (
	buildOnce sync.Once
	buildPath string
	buildErr  error
	buildOut  []byte
)

// TestMain removes the binaries built for the tests once they end.
func TestMain(m *testing.M) {
	code := m.Run()
	for _, p := range []string{buildPath, submitPath} {
		if p != "" {
			os.RemoveAll(filepath.Dir(p))
		}
	}
	os.Exit(code)
}

// workerBinary returns the path of a freshly built worker binary.
func workerBinary(t testing.TB) string {
	t.Helper()
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "isode-worker-bin-")
		if err != nil {
			buildErr = err
			return
		}
		buildPath = filepath.Join(dir, "worker")
		cmd := exec.Command("go", "build", "-o", buildPath, ".")
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		buildOut, buildErr = cmd.CombinedOutput()
	})
	if buildErr != nil {
		t.Fatalf("build worker: %v\n%s", buildErr, buildOut)
	}
	return buildPath
}
