package main

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/isode-run/isode/internal/testenv"
	isode "github.com/isode-run/isode/pkg/client"
	"github.com/isode-run/isode/pkg/dockerx"
	"github.com/isode-run/isode/pkg/protocol"
)

// TestBringYourOwnImage runs the whole path, NATS to sandbox and back, with
// an image of the test's own as ISODE_IMAGE: node and a global module, no
// agent, an entrypoint, user and working directory of its own.
func TestBringYourOwnImage(t *testing.T) {
	e := newE2E(t)
	img, modules := testenv.ModuleImage(t, e.cli)
	w := e.start("--image", img, "--low", "0")
	if l := w.log.String(); !strings.Contains(l, `"message":"sandbox image checked"`) || !strings.Contains(l, `"modules":["`+strings.Join(modules, `","`)+`"]`) {
		t.Fatalf("the start-up log does not show the image check with modules %v:\n%s", modules, l)
	}

	ok := func(name, code, input, want string) {
		t.Run(name, func(t *testing.T) {
			var opts []isode.RunOption
			if input != "" {
				opts = append(opts, isode.WithInput([]byte(input)))
			}
			res, err := e.run("byoi", code, opts...)
			if err != nil {
				t.Fatalf("run: %v", err)
			}
			if string(res.Value) != want {
				t.Fatalf("got %s, want %s", res.Value, want)
			}
		})
	}
	ok("a module of the image", `return function (ctx, cb) { cb(null, require("isode-pad")(ctx.data.s, ctx.data.n)) }`, `{"s":"ab","n":6}`, `"**abab"`)
	ok("no network", `return function (cb) {
		const sock = require("net").connect({host: "1.1.1.1", port: 53});
		sock.on("connect", () => cb(null, "connected"));
		sock.on("error", (e) => cb(null, e.code));
	}`, "", `"ENETUNREACH"`)
	ok("read-only root", `return function (cb) {
		const out = [];
		for (const p of ["/x", "/usr/local/lib/node_modules/isode-pad/lib/pad.js", "/usr/local/bin/node"]) {
			try { require("fs").writeFileSync(p, "x"); out.push("wrote " + p) } catch (e) { out.push(e.code) }
		}
		cb(null, out.every(c => c === "EROFS" || c === "EACCES") ? "refused" : out)
	}`, "", `"refused"`)
	ok("not root, not the image's user", `return function (cb) { cb(null, [process.getuid(), process.getgid()]) }`, "", `[10001,10001]`)
	ok("memory limit", `return function (cb) {
		const fs = require("fs");
		const v1 = "/sys/fs/cgroup/memory/memory.limit_in_bytes", v2 = "/sys/fs/cgroup/memory.max";
		cb(null, Number(fs.readFileSync(fs.existsSync(v1) ? v1 : v2, "utf8")))
	}`, "", "134217728")

	for _, tc := range []struct{ name, code, msg string }{
		{"a file of /tmp", `require("fs").writeFileSync("/tmp/evil.js", "module.exports = 1"); return function (cb) { cb(null, require("/tmp/evil.js")) }`, `cannot require "/tmp/evil.js"`},
		{"a missing module", `return function (cb) { cb(null, require("leftpad")) }`, `cannot require "leftpad": no such module`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := e.run("byoi", tc.code)
			var pe *protocol.Error
			if !errors.As(err, &pe) || pe.Code != protocol.CodeCodeError || !strings.Contains(pe.Message, tc.msg) {
				t.Fatalf("got %v, want code_error containing %q", err, tc.msg)
			}
		})
	}
}

// TestImageWithoutNodeStopsTheWorker: a worker whose image has no node
// stops at start with an error that names the image and says how to build
// or pull one, and leaves no container behind.
func TestImageWithoutNodeStopsTheWorker(t *testing.T) {
	e := newE2E(t)
	img := testenv.NoNodeImage(t, e.cli)
	id := "e2e-" + randomHex(4)
	t.Cleanup(func() { testenv.RemoveByLabel(t, e.cli, dockerx.LabelWorker, id) })
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	log := &testenv.SyncBuffer{}
	err := run(ctx, ctx, []string{"--nats", e.url, "--id", id, "--image", img, "--log-format", "json"}, log, log)
	if err == nil || ctx.Err() != nil {
		t.Fatalf("run with an image without node: %v (ctx %v)\n%s", err, ctx.Err(), log.String())
	}
	if !errors.Is(err, dockerx.ErrUnavailable) || !strings.Contains(err.Error(), img) || !strings.Contains(err.Error(), "make sandbox-image") || !strings.Contains(err.Error(), "docker pull") {
		t.Fatalf("run: %v; want an error naming %s and how to build or pull an image", err, img)
	}
	if strings.Contains(log.String(), "worker ready") {
		t.Fatalf("the worker said it was ready:\n%s", log.String())
	}
	if n := e.containers(id); n != 0 {
		t.Fatalf("%d containers left behind", n)
	}
	t.Logf("refused: %v", err)
}
