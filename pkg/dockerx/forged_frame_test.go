package dockerx_test

import (
	"context"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/isode-run/isode/internal/testenv"
	"github.com/isode-run/isode/pkg/protocol"
)

// forgeCode is a snippet that writes a frame of its own to the protocol
// output, which the agent moved off fd 1 but /proc/self/fd still shows:
// the only pipe of which the process holds one end, opened write-only
// (libuv's own pipes come in pairs). It says on stderr that it runs, waits
// until the victim run has written /tmp/victim, then writes ctx.data.frame
// with its 4-byte big-endian length.
const forgeCode = `return function (ctx, cb) {
	` + testenv.PipesJS + `
	const fs = require("fs");
	fs.writeSync(2, "forger running\n");
	const until = Date.now() + 30000;
	(function wait() {
		if (!fs.existsSync("/tmp/victim")) {
			if (Date.now() < until) return setTimeout(wait, 10);
			return cb(null, "the victim never ran");
		}
		const body = Buffer.from(ctx.data.frame, "utf8");
		const head = Buffer.alloc(4);
		head.writeUInt32BE(body.length);
		fs.writeSync(pipes().out, Buffer.concat([head, body]));
		setTimeout(() => cb(null, "frame written, sandbox still up"), 10000);
	})();
}`

const victimCode = `return function (cb) {
	require("fs").writeFileSync("/tmp/victim", "");
	setTimeout(() => cb(null, "genuine"), 30000);
}`

// TestForgedFrame: a snippet that reaches the protocol pipe and writes a
// frame of its own ends its sandbox as a protocol violation, whatever the
// frame says: both runs in flight fail with sandbox_crashed, the container
// is removed, and the Runtime and its other sandboxes serve on.
//
// Run ids are per sandbox, from 1: Create's readiness ping takes 1, the
// forger's run 2 and the victim's run 3 (the test starts the victim only
// once the forger runs). The frames aim at the victim; were an id guessed
// wrong, the frame would be just as much a violation.
func TestForgedFrame(t *testing.T) {
	e := newEnv(t, nil)
	bystander := e.create("bystander")
	tests := []struct {
		name  string
		frame string
		want  string // in the sandbox's Err
	}{
		// encoding/json alone would take these as the victim's answer.
		{"duplicate id", `{"id":2,"result":"forged","id":3}`, `duplicate key "id"`},
		{"case-folded id", `{"id":2,"result":"forged","ID":3}`, `unknown field "ID"`},
		{"duplicate error code", `{"id":3,"error":{"code":"timeout","message":"","code":"code_error"}}`, `duplicate key "code"`},
		// Well-formed, but no such request is in flight.
		{"unknown id", `{"id":999,"result":"forged"}`, "not in flight"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := e.create("forger")
			forger := make(chan runOutcome, 1)
			go func() {
				res, err := run(t, s, forgeCode, jsonOf(map[string]string{"frame": tt.frame}), 40*time.Second)
				forger <- runOutcome{res, err}
			}()
			if !testenv.Poll(20*time.Second, func() bool { return strings.Contains(s.StderrTail(), "forger running") }) {
				t.Fatalf("the forger never ran; stderr %q", s.StderrTail())
			}
			victim := make(chan runOutcome, 1)
			go func() {
				res, err := run(t, s, victimCode, "", 40*time.Second)
				victim <- runOutcome{res, err}
			}()

			for who, ch := range map[string]chan runOutcome{"victim": victim, "forger": forger} {
				select {
				case o := <-ch:
					if pe := protocol.AsError(o.err); pe == nil || pe.Code != protocol.CodeSandboxCrashed || !strings.Contains(pe.Message, "broke protocol") {
						t.Fatalf("the %s's run: got result %s, error %v; want sandbox_crashed, broke protocol", who, valueOf(o.res), o.err)
					}
				case <-time.After(45 * time.Second):
					t.Fatalf("the %s's run did not end", who)
				}
			}
			waitDone(t, s, 5*time.Second, protocol.CodeSandboxCrashed)
			if msg := s.Err().Error(); !strings.Contains(msg, "broke protocol") || !strings.Contains(msg, tt.want) {
				t.Fatalf("Err() = %q, want it to say the sandbox broke protocol: %s", msg, tt.want)
			}
			// The Runtime forgets it last of all, after telling the runs.
			if !testenv.Poll(5*time.Second, func() bool { return !slices.Contains(e.rt.Sandboxes(), s) }) {
				t.Fatal("the Runtime still tracks the ended sandbox")
			}
			if !testenv.Poll(15*time.Second, func() bool {
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				defer cancel()
				_, err := e.cli.ContainerInspect(ctx, s.ID())
				return err != nil
			}) {
				t.Fatalf("container %s outlived its violation by 15 s", s.ID()[:12])
			}

			// Only that sandbox ended.
			select {
			case <-bystander.Done():
				t.Fatalf("the bystander sandbox ended: %v", bystander.Err())
			default:
			}
			if got := mustRun(t, bystander, `return function (cb) { cb(null, "still here") }`, ""); got != `"still here"` {
				t.Fatalf("the bystander: got %s", got)
			}
		})
	}
	// And the Runtime still makes sandboxes.
	fresh := e.create("")
	if got := mustRun(t, fresh, `return function (cb) { cb(null, 1) }`, ""); got != "1" {
		t.Fatalf("a new sandbox: got %s", got)
	}
	if n := len(e.rt.Sandboxes()); n != 2 {
		t.Fatalf("the Runtime tracks %d sandboxes, want the bystander and the new one", n)
	}
}

func valueOf(res *protocol.Result) string {
	if res == nil {
		return "none"
	}
	return string(res.Value)
}

type runOutcome struct {
	res *protocol.Result
	err error
}
