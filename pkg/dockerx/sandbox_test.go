package dockerx_test

import (
	"strings"
	"testing"
)

func TestSeedSnippets(t *testing.T) {
	e := newEnv(t, nil)
	s := e.create("tenant1")
	if got := mustRun(t, s, `return function (cb) { cb(null, "Hello, world!"); }`, ""); got != `"Hello, world!"` {
		t.Errorf("hello: got %s", got)
	}
	got := mustRun(t, s, `return function (cb) { cb(null, process.versions); }`, "")
	if !strings.Contains(got, `"node":"20.`) || !strings.Contains(got, `"v8":`) {
		t.Errorf("process.versions: got %s", got)
	}
}
