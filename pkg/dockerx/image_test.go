package dockerx_test

import (
	"context"
	"errors"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/isode-run/isode/internal/testenv"
	"github.com/isode-run/isode/pkg/dockerx"
	"github.com/isode-run/isode/pkg/protocol"
)

// TestOwnImage: an image with node and a global module, no agent, and an
// entrypoint, user and working directory of its own works as the sandbox
// image; snippets require its modules, never a file of /tmp, and the
// hardening holds in it.
func TestOwnImage(t *testing.T) {
	cli := testenv.Docker(t)
	img, modules := testenv.ModuleImage(t, cli)
	e := newEnv(t, func(c *dockerx.Config) { c.Image = img })

	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	info, err := e.rt.CheckImage(ctx)
	if err != nil {
		t.Fatalf("CheckImage: %v", err)
	}
	if info.Image != img || info.Node == "" || !reflect.DeepEqual(info.Modules, modules) {
		t.Fatalf("CheckImage = %+v, want node and modules %v", info, modules)
	}
	t.Logf("image %s: node %s, modules %v", info.Image, info.Node, info.Modules)

	s := e.create("")
	check := func(name, code, want string) {
		t.Run(name, func(t *testing.T) {
			if got := mustRun(t, s, code, ""); got != want {
				t.Fatalf("got %s, want %s", got, want)
			}
		})
	}
	check("requires the image's module", `return function (cb) { cb(null, require("isode-pad")("ab", 6)) }`, `"**abab"`)
	check("and one of NODE_PATH", `return function (cb) { cb(null, require("isode-twice")("x")) }`, `"xx"`)
	check("built-ins as before", `return function (cb) { cb(null, require("node:path").join("a", "b")) }`, `"a/b"`)
	check("the sandbox's user, not the image's", `return function (cb) { cb(null, [process.getuid(), process.getgid(), process.cwd()]) }`, `[10001,10001,"/tmp"]`)
	check("only loopback", `return function (cb) { cb(null, Object.keys(require("os").networkInterfaces())) }`, `["lo"]`)
	check("read-only root", `return function (cb) {
		const out = [];
		for (const p of ["/x", "/usr/local/lib/node_modules/isode-pad/lib/pad.js", "/opt/mods/isode-evil.js", "/usr/local/bin/node"]) {
			try { require("fs").writeFileSync(p, "x"); out.push("wrote " + p) } catch (e) { out.push(e.code) }
		}
		cb(null, out.every(c => c === "EROFS" || c === "EACCES") ? "refused" : out)
	}`, `"refused"`)
	check("memory limit", `return function (cb) {
		const fs = require("fs");
		const v1 = "/sys/fs/cgroup/memory/memory.limit_in_bytes", v2 = "/sys/fs/cgroup/memory.max";
		cb(null, Number(fs.readFileSync(fs.existsSync(v1) ? v1 : v2, "utf8")))
	}`, jsonOf(e.cfg.Memory))

	// The tenant's files are no modules: not by path, not through the
	// image's NODE_PATH entry in /tmp, not through $HOME.
	const plant = `const fs = require("fs");
		for (const d of ["/tmp/mods/isode-evil", "/tmp/.node_modules/isode-evil", "/tmp/node_modules/isode-evil"]) {
			fs.mkdirSync(d, { recursive: true }); fs.writeFileSync(d + "/index.js", "module.exports = 'evil'");
		}
		fs.writeFileSync("/tmp/evil.js", "module.exports = 'evil'");`
	mustRun(t, s, `return function (cb) { `+plant+` cb(null, true) }`, "")
	for _, tc := range []struct{ name, code, msg string }{
		{"a file of /tmp", `return function (cb) { cb(null, require("/tmp/evil.js")) }`, `cannot require "/tmp/evil.js"`},
		{"a relative path", `return function (cb) { cb(null, require("./evil.js")) }`, `cannot require "./evil.js"`},
		{"an escape by ..", `return function (cb) { cb(null, require("isode-pad/../../../../../tmp/evil.js")) }`, `cannot require`},
		{"a module planted in /tmp", `return function (cb) { cb(null, require("isode-evil")) }`, `cannot require "isode-evil": no such module`},
		{"a missing module", `return function (cb) { cb(null, require("leftpad")) }`, `cannot require "leftpad": no such module`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			wantCode(t, s, tc.code, 10*time.Second, protocol.CodeCodeError, tc.msg)
		})
	}
}

// TestImageWithoutNode: CheckImage refuses an image without node, naming
// it and saying how to get one; New refuses a missing image the same way.
func TestImageWithoutNode(t *testing.T) {
	cli := testenv.Docker(t)
	img := testenv.NoNodeImage(t, cli)
	e := newEnv(t, func(c *dockerx.Config) { c.Image = img })
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	_, err := e.rt.CheckImage(ctx)
	if !errors.Is(err, dockerx.ErrUnavailable) || !strings.Contains(err.Error(), img) || !strings.Contains(err.Error(), "make sandbox-image") {
		t.Fatalf("CheckImage of an image without node: %v, want ErrUnavailable naming %s and how to build one", err, img)
	}
	t.Logf("refused: %v", err)

	cfg := dockerx.DefaultConfig()
	cfg.Image = "isode-test-missing:" + randomHex(6)
	rt, err := dockerx.New(ctx, cfg)
	if err == nil {
		rt.Close(ctx)
		t.Fatal("New with a missing image succeeded")
	}
	if !errors.Is(err, dockerx.ErrUnavailable) || !strings.Contains(err.Error(), cfg.Image) || !strings.Contains(err.Error(), "docker pull") {
		t.Fatalf("New with a missing image: %v, want ErrUnavailable naming it and how to pull one", err)
	}
}
