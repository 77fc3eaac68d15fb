package dockerx_test

import (
	"encoding/json"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/isode-run/isode/pkg/dockerx"
	"github.com/isode-run/isode/pkg/protocol"
)

func TestSeedSnippets(t *testing.T) {
	e := newEnv(t, nil)
	s := e.create("tenant1")
	if got := mustRun(t, s, `return function (cb) { cb(null, "Hello, world!"); }`, ""); got != `"Hello, world!"` {
		t.Errorf("hello: got %s", got)
	}
	got := mustRun(t, s, `return function (cb) { cb(null, process.versions); }`, "")
	var versions map[string]string
	if err := json.Unmarshal([]byte(got), &versions); err != nil || !strings.HasPrefix(versions["node"], "20.") || versions["v8"] == "" {
		t.Errorf("process.versions: got %s (%v)", got, err)
	}
	if s.Tenant() != "tenant1" {
		t.Errorf("Tenant() = %q", s.Tenant())
	}
}

// TestSnippetForms runs every accepted form of snippet in one container.
func TestSnippetForms(t *testing.T) {
	e := newEnv(t, nil)
	s := e.create("")
	tests := []struct {
		name  string
		code  string
		input string
		want  string
	}{
		{"zero", `return function (cb) { cb(null, 0) }`, "", `0`},
		{"false", `return function (cb) { cb(null, false) }`, "", `false`},
		{"empty string", `return function (cb) { cb(null, "") }`, "", `""`},
		{"null", `return function (cb) { cb(null, null) }`, "", `null`},
		{"undefined is null", `return function (cb) { cb() }`, "", `null`},
		{"ctx and cb with input", `return function (ctx, cb) { cb(null, ctx.data.a + ctx.data.b) }`, `{"a":40,"b":2}`, `42`},
		{"no input is null", `return function (ctx, cb) { cb(null, ctx.data) }`, "", `null`},
		{"falsy input", `return function (ctx, cb) { cb(null, ctx.data) }`, `0`, `0`},
		{"async function", `return async function (ctx) { await new Promise(r => setTimeout(r, 10)); return ctx.data * 2 }`, `21`, `42`},
		{"async arrow resolving undefined", `return async () => {}`, "", `null`},
		{"returns a promise", `return function () { return Promise.resolve([1, "two"]) }`, "", `[1,"two"]`},
		{"no parameters returns a value", `return function () { return {ok: true} }`, "", `{"ok":true}`},
		{"cb later", `return function (cb) { setTimeout(() => cb(null, "late"), 20) }`, "", `"late"`},
		{"async with cb", `return async function (ctx, cb) { setTimeout(() => cb(null, "via cb"), 10) }`, "", `"via cb"`},
		{"built-in require", `return function (cb) { cb(null, require("crypto").createHash("sha256").update("x").digest("hex").length) }`, "", `64`},
		{"unicode", `return function (cb) { cb(null, "héllo ☃ 😀") }`, "", `"héllo ☃ 😀"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := mustRun(t, s, tt.code, tt.input); got != tt.want {
				t.Fatalf("got %s, want %s", got, tt.want)
			}
		})
	}

	t.Run("console", func(t *testing.T) {
		res, err := run(t, s, `return function (cb) { console.log("a", {b: 1}); console.error("err"); process.stdout.write("raw\n"); cb(null, 1) }`, "", 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		if res.Console != "a { b: 1 }\nerr\nraw\n" || res.ConsoleTruncated {
			t.Fatalf("console %q truncated %v", res.Console, res.ConsoleTruncated)
		}
	})
	t.Run("console is bounded", func(t *testing.T) {
		res, err := run(t, s, `return function (cb) { for (let i = 0; i < 20000; i++) console.log("line " + i + " ☃"); cb(null, "done") }`, "", 10*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		if !res.ConsoleTruncated || len(res.Console) > protocol.MaxConsoleBytes || len(res.Console) < protocol.MaxConsoleBytes-8 {
			t.Fatalf("console of %d bytes, truncated %v", len(res.Console), res.ConsoleTruncated)
		}
		if string(res.Value) != `"done"` {
			t.Fatalf("result %s", res.Value)
		}
	})
	t.Run("console with an error", func(t *testing.T) {
		res := wantCode(t, s, `return function (cb) { console.log("before"); cb(new Error("nope")) }`, 5*time.Second, protocol.CodeCodeError, "Error: nope")
		if res == nil || res.Console != "before\n" {
			t.Fatalf("console with the error: %+v", res)
		}
	})
	t.Run("no npm modules", func(t *testing.T) {
		wantCode(t, s, `return function (cb) { require("left-pad") }`, 5*time.Second, protocol.CodeCodeError, "only Node.js built-in modules")
	})
	t.Run("writes to fd 1 do not reach the protocol", func(t *testing.T) {
		if got := mustRun(t, s, `return function (cb) { require("fs").writeSync(1, "garbage"); cb(null, "still fine") }`, ""); got != `"still fine"` {
			t.Fatalf("got %s", got)
		}
	})
}

// TestConcurrentRunsOverlap proves that one container runs several
// snippets at once, without relying on timing: each snippet announces itself
// in a directory of /tmp and waits until all have, which can only happen if
// they run at the same time.
func TestConcurrentRunsOverlap(t *testing.T) {
	e := newEnv(t, func(c *dockerx.Config) { c.Concurrency = 4 })
	s := e.create("")
	const n = 4
	code := `return function (ctx, cb) {
		const fs = require("fs"), dir = "/tmp/" + ctx.data.dir;
		fs.mkdirSync(dir, {recursive: true});
		fs.writeFileSync(dir + "/" + Math.random(), "");
		const until = Date.now() + 8000;
		(function wait() {
			const seen = fs.readdirSync(dir).length;
			if (seen >= ctx.data.n || Date.now() > until) return cb(null, seen);
			setTimeout(wait, 5);
		})();
	}`
	input := `{"dir":"barrier-` + randomHex(4) + `","n":4}`
	seen := make([]string, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			res, err := run(t, s, code, input, 20*time.Second)
			if err != nil {
				errs[i] = err
				return
			}
			seen[i] = string(res.Value)
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		t.Fatal(err)
	}
	for i, v := range seen {
		if v != "4" {
			t.Fatalf("run %d saw %s of the %d runs at once: they did not overlap (all: %v)", i, v, n, seen)
		}
	}
}

// TestFailureModes checks that each way a snippet can fail gives its own
// error, and that the same container then still serves.
func TestFailureModes(t *testing.T) {
	e := newEnv(t, func(c *dockerx.Config) { c.Concurrency = 2; c.WorkerHeapMB = 48 })
	s := e.create("")
	// Only the cases that must time out get a short timeout; the others
	// get room on a loaded machine.
	tests := []struct {
		name string
		code string
		want protocol.Code
		msg  string
	}{
		{"syntax error", `return function (cb) { cb(null, 1 }`, protocol.CodeCodeError, "syntax error"},
		{"not a function", `return 42`, protocol.CodeCodeError, "must return a function"},
		{"nothing returned", `var x = 1`, protocol.CodeCodeError, "returned undefined"},
		{"throws before returning", `throw new Error("early")`, protocol.CodeCodeError, "Error: early"},
		{"sync throw", `return function (cb) { null.x }`, protocol.CodeCodeError, "TypeError"},
		{"error to callback", `return function (cb) { cb(new RangeError("bad range")) }`, protocol.CodeCodeError, "RangeError: bad range"},
		{"async throw", `return function (cb) { setTimeout(() => { throw new Error("later") }, 5) }`, protocol.CodeCodeError, "uncaught exception: Error: later"},
		{"unhandled rejection", `return function (cb) { Promise.reject(new Error("nobody")) }`, protocol.CodeCodeError, "unhandled promise rejection: Error: nobody"},
		{"rejected promise", `return async function () { throw new Error("async fail") }`, protocol.CodeCodeError, "rejected: Error: async fail"},
		{"callback twice", `return function (cb) { cb(null, 1); cb(null, 2) }`, protocol.CodeCodeError, "callback called more than once"},
		{"circular result", `return function (cb) { const a = {}; a.self = a; cb(null, a) }`, protocol.CodeCodeError, "not JSON-serialisable"},
		{"bigint result", `return function (cb) { cb(null, 10n) }`, protocol.CodeCodeError, "not JSON-serialisable"},
		{"result too large", `return function (cb) { cb(null, "x".repeat(600 * 1024)) }`, protocol.CodeOutputTooLarge, "over the limit"},
		{"never calls back", `return function (cb) { }`, protocol.CodeTimeout, "did not finish within"},
		{"sync infinite loop", `return function (cb) { for (;;) {} }`, protocol.CodeTimeout, "did not finish within"},
		{"promise loop", `return function (cb) { (async () => { for (;;) await null })() }`, protocol.CodeTimeout, "did not finish within"},
		{"timer loop", `return function (cb) { (function again() { setTimeout(again, 0) })() }`, protocol.CodeTimeout, "did not finish within"},
		{"endless printing", `return function (cb) { for (;;) console.log("spam spam spam") }`, protocol.CodeTimeout, "did not finish within"},
		{"heap exhaustion", `return function (cb) { const a = []; for (;;) a.push(new Array(1e5).fill(1.5)) }`, protocol.CodeOutOfMemory, "heap is limited to 48 MiB"},
		{"exits its thread", `return function (cb) { process.exit(3) }`, protocol.CodeCodeError, "exit code 3"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			timeout := 10 * time.Second
			if tt.want == protocol.CodeTimeout {
				timeout = time.Second
			}
			wantCode(t, s, tt.code, timeout, tt.want, tt.msg)
			if got := mustRun(t, s, `return function (cb) { cb(null, "alive") }`, ""); got != `"alive"` {
				t.Fatalf("after %s: got %s", tt.name, got)
			}
		})
	}
	select {
	case <-s.Done():
		t.Fatalf("the sandbox ended: %v", s.Err())
	default:
	}
	st, err := s.Ping(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	if st.Timeouts < 5 || st.Workers < 1 || st.Workers > 2 {
		t.Errorf("agent status after the failures: %+v", st)
	}
}
