package dockerx_test

import (
	"context"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/isode-run/isode/pkg/dockerx"
)

// TestHardeningFromInside checks the isolation from a snippet's point of
// view, in one container.
func TestHardeningFromInside(t *testing.T) {
	e := newEnv(t, nil)
	s := e.create("")
	check := func(name, code, want string) {
		t.Run(name, func(t *testing.T) {
			if got := mustRun(t, s, code, ""); got != want {
				t.Fatalf("got %s, want %s", got, want)
			}
		})
	}
	check("only loopback", `return function (cb) { cb(null, Object.keys(require("os").networkInterfaces())) }`, `["lo"]`)
	check("no outside connection", `return function (cb) {
		const sock = require("net").connect({host: "1.1.1.1", port: 53});
		sock.on("connect", () => cb(null, "connected"));
		sock.on("error", (e) => cb(null, e.code));
	}`, `"ENETUNREACH"`)
	check("read-only root", `return function (cb) {
		const out = [];
		for (const p of ["/x", "/etc/passwd", "/etc/group", "/usr/bin/node"]) {
			try { require("fs").writeFileSync(p, "x"); out.push("wrote " + p) } catch (e) { out.push(e.code) }
		}
		cb(null, out.every(c => c === "EROFS" || c === "EACCES") ? "refused" : out)
	}`, `"refused"`)
	check("writable /tmp", `return function (cb) { const fs = require("fs"); fs.writeFileSync("/tmp/f", "ok"); cb(null, fs.readFileSync("/tmp/f", "utf8")) }`, `"ok"`)
	check("/tmp is noexec", `return function (cb) {
		const fs = require("fs");
		fs.copyFileSync("/sbin/docker-init", "/tmp/init"); fs.chmodSync("/tmp/init", 0o755);
		try { require("child_process").execFileSync("/tmp/init", ["--version"]); cb(null, "executed") } catch (e) { cb(null, e.code) }
	}`, `"EACCES"`)
	check("not root", `return function (cb) { cb(null, [process.getuid(), process.getgid(), process.geteuid()]) }`, `[10001,10001,10001]`)
	check("no capabilities, no new privileges, seccomp", `return function (cb) {
		const st = require("fs").readFileSync("/proc/self/status", "utf8");
		const f = (k) => st.match(new RegExp("^" + k + ":\\s*(\\S+)", "m"))[1];
		cb(null, [f("CapEff"), f("CapPrm"), f("CapBnd"), f("NoNewPrivs"), f("Seccomp")])
	}`, `["0000000000000000","0000000000000000","0000000000000000","1","2"]`)
	check("no /dev/shm", `return function (cb) { try { require("fs").writeFileSync("/dev/shm/x", "x"); cb(null, "wrote") } catch (e) { cb(null, "refused") } }`, `"refused"`)
	check("no docker socket", `return function (cb) { cb(null, ["/var/run/docker.sock", "/run/docker.sock"].some(p => require("fs").existsSync(p))) }`, `false`)
	check("memory limit", `return function (cb) {
		const fs = require("fs");
		const v1 = "/sys/fs/cgroup/memory/memory.limit_in_bytes", v2 = "/sys/fs/cgroup/memory.max";
		cb(null, Number(fs.readFileSync(fs.existsSync(v1) ? v1 : v2, "utf8")))
	}`, jsonOf(e.cfg.Memory))
	check("no swap", `return function (cb) {
		const fs = require("fs");
		const v1 = "/sys/fs/cgroup/memory/memory.memsw.limit_in_bytes", v2 = "/sys/fs/cgroup/memory.swap.max";
		if (fs.existsSync(v2)) return cb(null, fs.readFileSync(v2, "utf8").trim() === "0");
		if (fs.existsSync(v1)) return cb(null, Number(fs.readFileSync(v1, "utf8")) === `+jsonOf(e.cfg.Memory)+`);
		cb(null, true) // the kernel has no swap accounting, and the host no swap
	}`, `true`)

	// Hardening the engine reports, for what a snippet cannot see.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	info, err := e.cli.ContainerInspect(ctx, s.ID())
	if err != nil {
		t.Fatal(err)
	}
	hc := info.HostConfig
	// The mounts are the agent's socket directory and the shared node's
	// volume (over the image's /usr/bin), both read-only.
	for _, m := range info.Mounts {
		socket := m.Destination == "/run/isode" && string(m.Type) == "bind" && strings.HasPrefix(m.Source, e.cfg.AgentSocketDir+"/")
		node := m.Destination == "/usr/bin" && string(m.Type) == "volume" && strings.HasPrefix(m.Name, "isode-node-")
		if m.RW || !socket && !node {
			t.Errorf("mount %+v: want only the agent socket's directory and the shared node, read-only", m)
		}
	}
	if len(info.Mounts) != 2 || hc.Privileged || string(hc.NetworkMode) != "none" || !hc.ReadonlyRootfs || hc.PidsLimit == nil || *hc.PidsLimit != e.cfg.PidsLimit || hc.LogConfig.Type != "none" {
		t.Errorf("container is not hardened as configured: mounts %v, host config %+v", info.Mounts, hc)
	}
	for _, opt := range hc.SecurityOpt {
		if strings.Contains(opt, "unconfined") {
			t.Errorf("security option %q", opt)
		}
	}
}

// TestPidsLimitHolds: with a small pids limit, a snippet cannot start
// processes without end.
func TestPidsLimitHolds(t *testing.T) {
	e := newEnv(t, func(c *dockerx.Config) { c.PidsLimit = 24; c.Memory = 256 * dockerx.MiB })
	s := e.create("")
	got := mustRun(t, s, `return function (cb) {
		const cp = require("child_process");
		const kids = [];
		let refused = null;
		for (let i = 0; i < 40 && !refused; i++) {
			try {
				const k = cp.spawn("/usr/bin/node", ["-e", "setTimeout(() => {}, 20000)"], {stdio: "ignore"});
				k.on("error", (e) => { refused = refused || e.code });
				kids.push(k);
			} catch (e) { refused = e.code }
		}
		setTimeout(() => {
			let alive = 0;
			for (const k of kids) { if (k.pid && k.exitCode === null && k.signalCode === null) alive++; try { k.kill("SIGKILL") } catch {} }
			cb(null, {refused: refused !== null || alive < kids.length, alive});
		}, 1500);
	}`, "")
	var v struct {
		Refused bool
		Alive   int
	}
	if err := json.Unmarshal([]byte(got), &v); err != nil {
		t.Fatal(err)
	}
	if !v.Refused || v.Alive >= 40 {
		t.Fatalf("the pids limit did not hold: %s", got)
	}
	t.Logf("with PidsLimit 24: %s", got)
}

func jsonOf(v any) string {
	b, _ := json.Marshal(v)
	return string(b)
}

// TestIdleMemory: an idle sandbox stays within 40 MiB of working set (the
// cgroup's usage less reclaimable page cache, as `docker stats` shows it).
func TestIdleMemory(t *testing.T) {
	e := newEnv(t, nil)
	s := e.create("")
	mustRun(t, s, `return function (cb) { cb(null, 1) }`, "")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	m, err := s.Memory(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("idle sandbox: working set %.1f MiB, cgroup usage %.1f MiB (with page cache), limit %d MiB",
		float64(m.WorkingSet)/dockerx.MiB, float64(m.Usage)/dockerx.MiB, m.Limit/dockerx.MiB)
	if m.WorkingSet == 0 || m.WorkingSet > 40*dockerx.MiB {
		t.Fatalf("idle working set %d bytes, want (0, 40 MiB]", m.WorkingSet)
	}
	if m.Limit != uint64(e.cfg.Memory) {
		t.Fatalf("memory limit %d, want %d", m.Limit, e.cfg.Memory)
	}
}
