'use strict';
// Unit tests of the agent, without Docker:  node --test sandbox/
const test = require('node:test');
const assert = require('node:assert/strict');
const fs = require('node:fs');
const path = require('node:path');
const { spawn } = require('node:child_process');
const { Agent, FrameDecoder, encodeFrame } = require('./agent.js');

// harness drives an in-memory Agent: call(req) resolves with the reply.
function harness(opts = {}) {
  const waiting = new Map();
  const logs = [];
  const dec = new FrameDecoder(16 << 20, (b) => {
    const m = JSON.parse(b.toString('utf8'));
    const w = waiting.get(m.id);
    assert.ok(w, `reply to unknown id ${m.id}`);
    waiting.delete(m.id);
    w(m);
  });
  const agent = new Agent({ write: (buf) => dec.push(buf), log: (l) => logs.push(l), ...opts });
  let next = 1;
  const call = (req) =>
    new Promise((resolve) => {
      const id = next++;
      waiting.set(id, resolve);
      agent.feed(encodeFrame(JSON.stringify({ id, ...req })));
    });
  const runCode = (code, extra = {}) => call({ op: 'run', code, timeout_ms: 2000, ...extra });
  return { agent, call, runCode, logs };
}

test('ping is answered once a Worker is ready', async (t) => {
  const h = harness();
  t.after(() => h.agent.close());
  const r = await h.call({ op: 'ping' });
  assert.equal(r.result.ready, true);
  assert.equal(r.result.node, process.versions.node);
  assert.equal(r.result.workers, 1);
});

test('results of every form come back as themselves', async (t) => {
  const h = harness();
  t.after(() => h.agent.close());
  const cases = [
    ['return function (cb) { cb(null, "Hello, world!"); }', undefined, 'Hello, world!'],
    ['return function (cb) { cb(null, 0) }', undefined, 0],
    ['return function (cb) { cb(null, false) }', undefined, false],
    ['return function (cb) { cb(null, "") }', undefined, ''],
    ['return function (cb) { cb(null, undefined) }', undefined, null],
    ['return function (ctx, cb) { cb(null, ctx.data.n + 1) }', { n: 41 }, 42],
    ['return async (ctx) => ctx.data', [1, 2], [1, 2]],
    ['return function () { return Promise.resolve("p") }', undefined, 'p'],
    ['return function () { return 7 }', undefined, 7],
    ['return async function (ctx, cb) { setTimeout(() => cb(null, "cb"), 5) }', undefined, 'cb'],
  ];
  const replies = await Promise.all(cases.map(([code, input]) => h.runCode(code, input === undefined ? {} : { input })));
  replies.forEach((r, i) => {
    assert.equal(r.error, undefined, `case ${i}: ${JSON.stringify(r.error)}`);
    assert.deepEqual(r.result, cases[i][2], `case ${i}`);
  });
});

test('each failure has its own error and the agent keeps serving', async (t) => {
  const h = harness({ concurrency: 2, workerHeapMb: 32 });
  t.after(() => h.agent.close());
  const cases = [
    ['return function (cb) {', 'code_error', /syntax error/],
    ['return 1', 'code_error', /must return a function/],
    ['return function (cb) { throw new TypeError("t") }', 'code_error', /threw: TypeError: t/],
    ['return function (cb) { setImmediate(() => { throw new Error("a") }) }', 'code_error', /uncaught exception: Error: a/],
    ['return function (cb) { Promise.reject(7) }', 'code_error', /unhandled promise rejection: 7/],
    ['return function (cb) { cb(null, 1); cb(null, 2) }', 'code_error', /more than once/],
    ['return function (cb) { cb(null, 1n) }', 'code_error', /not JSON-serialisable/],
    ['return function (cb) { cb(null, "x".repeat(2000)) }', 'output_too_large', /over the limit of 1000/],
    ['return function (cb) { for (;;) {} }', 'timeout', /did not finish within 300 ms/],
    ['return function (cb) { const a = []; for (;;) a.push(new Array(1e5).fill(0.5)) }', 'out_of_memory', /heap is limited to 32 MiB/],
    ['return function (cb) { process.exit(5) }', 'code_error', /exit code 5/],
  ];
  for (const [code, want, msg] of cases) {
    const r = await h.runCode(code, { timeout_ms: code.includes('for (;;) {}') ? 300 : 5000, max_result_bytes: 1000 });
    assert.equal(r.error && r.error.code, want, `${code}: ${JSON.stringify(r)}`);
    assert.match(r.error.message, msg);
    const ok = await h.runCode('return function (cb) { cb(null, "ok") }');
    assert.equal(ok.result, 'ok', `after ${code}`);
  }
  const st = await h.call({ op: 'ping' });
  assert.ok(st.result.workers <= 2, JSON.stringify(st.result));
});

// BURN_CPU loops until its own thread has used ctx.data.ms of CPU, by the
// kernel's count (/proc/thread-self/schedstat).
const BURN_CPU = `return function (ctx, cb) {
  const fs = require('node:fs');
  const cpu = () => Number(fs.readFileSync('/proc/thread-self/schedstat', 'latin1').split(' ')[0]);
  const end = cpu() + ctx.data.ms * 1e6;
  while (cpu() < end);
  cb(null, 1);
}`;

test('usage: the snippet thread\'s CPU time, measured outside the snippet', async (t) => {
  const h = harness();
  t.after(() => h.agent.close());
  // A busy loop that burns 200 ms of its own thread's CPU (as the kernel
  // counts it: the machine may be shared, so wall time would not do) is
  // reported as about that.
  const busy = await h.runCode(BURN_CPU, { input: { ms: 200 }, timeout_ms: 10000 });
  assert.equal(busy.result, 1);
  assert.ok(Number.isSafeInteger(busy.usage.cpu_ns), JSON.stringify(busy.usage));
  const busyMs = busy.usage.cpu_ns / 1e6;
  assert.ok(busyMs >= 200 && busyMs <= 230, `a loop that burnt 200 ms of CPU reported ${busyMs} ms`);
  // Waiting on a timer costs wall time, not CPU.
  const idle = await h.runCode('return function (cb) { setTimeout(() => cb(null, 2), 200) }');
  assert.equal(idle.result, 2);
  assert.ok(idle.usage.cpu_ns / 1e6 < 30, `an idle 200 ms timer reported ${idle.usage.cpu_ns / 1e6} ms of CPU`);
  // Memory is the process's, from the kernel: resident now, and its peak.
  assert.ok(idle.usage.rss > 1 << 20 && idle.usage.peak_rss >= idle.usage.rss, JSON.stringify(idle.usage));
  // A snippet that burns 50 ms of CPU and then posts a result of its own
  // (this is run 3) claiming none does not change the figure: usage is not
  // read from its thread's messages.
  const forged = await h.runCode(`return function (cb) {
    const fs = require('node:fs');
    const cpu = () => Number(fs.readFileSync('/proc/thread-self/schedstat', 'latin1').split(' ')[0]);
    const end = cpu() + 50e6;
    while (cpu() < end);
    const { parentPort } = require('node:worker_threads');
    for (let id = 1; id <= 3; id++) parentPort.postMessage({ t: 'result', id, json: '"forged"', usage: { cpu_ns: 0, rss: 0, peak_rss: 0 }, cpu_ns: 0, console: '', truncated: false, recycle: false });
  }`, { timeout_ms: 10000 });
  assert.equal(forged.result, 'forged'); // its own result, as before
  assert.deepEqual(Object.keys(forged.usage).sort(), ['cpu_ns', 'peak_rss', 'rss']);
  assert.ok(forged.usage.cpu_ns >= 50e6 && forged.usage.rss > 0, JSON.stringify(forged.usage));
  // A timeout still reports the CPU the thread burnt until then.
  const loop = await h.runCode('return function (cb) { for (;;) {} }', { timeout_ms: 300 });
  assert.equal(loop.error.code, 'timeout');
  assert.ok(loop.usage.cpu_ns > 0 && loop.usage.cpu_ns / 1e6 <= 400, `a loop stopped at 300 ms reported ${loop.usage.cpu_ns / 1e6} ms of CPU`);
});

test('console is captured per request and bounded', async (t) => {
  const h = harness();
  t.after(() => h.agent.close());
  const r = await h.runCode('return function (cb) { console.log("a"); console.warn("b"); process.stdout.write("c"); cb(null, 1) }');
  assert.equal(r.console, 'a\nb\nc');
  assert.equal(r.console_truncated, false);
  const big = await h.runCode('return function (cb) { for (let i = 0; i < 1000; i++) console.log("☃".repeat(10)); cb(null, 1) }', { max_console_bytes: 100 });
  assert.equal(big.console_truncated, true);
  assert.ok(Buffer.byteLength(big.console) <= 100, `${Buffer.byteLength(big.console)} bytes`);
  assert.ok(!big.console.includes('\ufffd'), 'cut inside a character');
});

test('a snippet that leaves timers behind does not leak into the next request', async (t) => {
  const h = harness({ concurrency: 1 });
  t.after(() => h.agent.close());
  const first = await h.runCode('return function (cb) { setInterval(() => console.log("leak"), 1); cb(null, 1) }');
  assert.equal(first.result, 1);
  const second = await h.runCode('return function (cb) { setTimeout(() => cb(null, 2), 30) }');
  assert.equal(second.result, 2);
  assert.equal(second.console, '');
});

test('requests beyond the concurrency wait for a Worker', async (t) => {
  const h = harness({ concurrency: 2 });
  t.after(() => h.agent.close());
  // A barrier in a directory: a run waits until two runs have arrived, which
  // only happens when two run at once. The third finds the barrier passed.
  const dir = fs.mkdtempSync(path.join(require('node:os').tmpdir(), 'isode-barrier-'));
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  const code = `return function (ctx, cb) {
    const fs = require("fs");
    fs.writeFileSync(ctx.data + "/" + Math.random(), "");
    const until = Date.now() + 8000;
    (function wait() {
      const seen = fs.readdirSync(ctx.data).length;
      if (seen >= 2 || Date.now() > until) return cb(null, seen);
      setTimeout(wait, 5);
    })();
  }`;
  const rs = await Promise.all([1, 2, 3].map(() => h.runCode(code, { input: dir, timeout_ms: 10000 })));
  for (const r of rs) assert.ok(r.result >= 2, JSON.stringify(r));
  const st = await h.call({ op: 'ping' });
  assert.equal(st.result.workers, 2);
});

test('a Worker that termination cannot reach makes the agent give up', { timeout: 30000 }, async (t) => {
  let stuck = null;
  const h = harness({ stuckMs: 300, onStuck: (why) => (stuck = why) });
  t.after(() => h.agent.close());
  // A synchronous child process blocks the thread in native code. The
  // deadline leaves the thread time to get there even on a loaded machine
  // (terminated earlier, it would stop normally and nothing would be stuck),
  // and the child outlives the deadline plus stuckMs by far.
  const r = await h.runCode('return function (cb) { require("child_process").execFileSync(process.execPath, ["-e", "setTimeout(() => {}, 8000)"]) }', { timeout_ms: 1500 });
  assert.equal(r.error.code, 'timeout');
  await new Promise((resolve) => {
    const check = () => (stuck !== null ? resolve() : setTimeout(check, 20));
    check();
  });
  assert.match(stuck, /did not stop/);
});

test('bad requests are answered, not fatal', async (t) => {
  const h = harness();
  t.after(() => h.agent.close());
  assert.equal((await h.call({ op: 'dance' })).error.code, 'bad_request');
  assert.equal((await h.call({ op: 'run' })).error.code, 'bad_request');
  assert.throws(() => h.agent.feed(Buffer.from([0xff, 0xff, 0xff, 0xff])), /over the limit/);
});

test('each request times out at its own deadline, whatever the order they came in', async (t) => {
  const h = harness({ concurrency: 4, spawnDelayMs: 0 });
  t.after(() => h.agent.close());
  await h.call({ op: 'ping' });
  const never = 'return function (cb) {}';
  const t0 = Date.now();
  const at = (p) => p.then((r) => ({ code: r.error && r.error.code, ms: Date.now() - t0 }));
  // The long one arms the deadline timer first; the shorter ones that come
  // after must still be answered on time, and a quick run in between (its
  // deadline later than the long one's: it arms nothing) changes nothing.
  // Bounds are loose for a loaded machine: a short one answered at the
  // long one's deadline is what they catch.
  const long = at(h.runCode(never, { timeout_ms: 2500 }));
  const quick = await h.runCode('return function (cb) { cb(null, 1) }', { timeout_ms: 10000 });
  assert.equal(quick.result, 1);
  const short = at(h.runCode(never, { timeout_ms: 300 }));
  const middle = at(h.runCode(never, { timeout_ms: 900 }));
  const [s, m, l] = await Promise.all([short, middle, long]);
  for (const r of [s, m, l]) assert.equal(r.code, 'timeout');
  assert.ok(s.ms >= 280 && s.ms < 2000, `the 300 ms run timed out after ${s.ms} ms`);
  assert.ok(m.ms >= 880 && m.ms < 2450, `the 900 ms run timed out after ${m.ms} ms`);
  assert.ok(l.ms >= 2480, `the 2500 ms run timed out after ${l.ms} ms`);
  assert.ok(s.ms < m.ms && m.ms < l.ms, `order: ${s.ms}, ${m.ms}, ${l.ms}`);
});

test('FrameDecoder reassembles frames split anywhere', () => {
  const frames = ['{"a":1}', 'x'.repeat(5000), '{}'];
  const stream = Buffer.concat(frames.map((f) => encodeFrame(f)));
  for (let step = 1; step < 12; step++) {
    const got = [];
    const d = new FrameDecoder(1 << 20, (b) => got.push(b.toString()));
    for (let i = 0; i < stream.length; i += step) d.push(stream.subarray(i, i + step));
    assert.deepEqual(got, frames, `step ${step}`);
  }
});

test('FrameDecoder keeps its own copy of what it holds from a borrowed buffer', () => {
  // As with a socket's onread: every read lands in the same buffer, which
  // is overwritten after push returns.
  const frames = ['{"a":1}', 'y'.repeat(70000), '{"b":[2,3]}', 'z'.repeat(9)];
  const stream = Buffer.concat(frames.map((f) => encodeFrame(f)));
  for (const step of [1, 3, 7, 4096, 65536]) {
    const got = [];
    const d = new FrameDecoder(1 << 20, (b) => got.push(b.toString()));
    const shared = Buffer.alloc(step);
    for (let i = 0; i < stream.length; i += step) {
      const n = stream.copy(shared, 0, i, i + step);
      d.push(shared.subarray(0, n), true);
      shared.fill(0x21); // what the next read would leave there
    }
    assert.deepEqual(got, frames, `step ${step}`);
  }
});

test('the process exits on stdin EOF and keeps fd 1 writes off the protocol', { timeout: 20000 }, async () => {
  // Through a shell so the agent's stdin and stdout are real pipes, as in
  // a container (node's own spawn would give it sockets).
  const agent = path.join(__dirname, 'agent.js');
  const p = spawn('/bin/sh', ['-c', `cat | "${process.execPath}" "${agent}" | cat`], { stdio: ['pipe', 'pipe', 'pipe'] });
  let out = Buffer.alloc(0);
  let err = '';
  p.stdout.on('data', (c) => (out = Buffer.concat([out, c])));
  p.stderr.on('data', (c) => (err += c));
  p.stdin.write(encodeFrame(JSON.stringify({ id: 1, op: 'run', code: 'return function (cb) { require("fs").writeSync(1, "garbage"); cb(null, "clean") }', timeout_ms: 5000 })));
  await new Promise((resolve) => {
    const check = () => (out.length >= 4 && out.length >= 4 + out.readUInt32BE(0) ? resolve() : setTimeout(check, 10));
    check();
  });
  p.stdin.end();
  const code = await new Promise((resolve) => p.on('exit', resolve));
  assert.equal(code, 0, err);
  const n = out.readUInt32BE(0);
  assert.equal(out.length, 4 + n, `extra bytes on the protocol stream: ${out.subarray(4 + n)}`);
  assert.equal(JSON.parse(out.subarray(4).toString()).result, 'clean');
  assert.equal(err, '');
});

test('moduleDirs keeps existing directories nobody can write to, in node\'s order', () => {
  const { moduleDirs } = require('./agent.js');
  const os = require('node:os');
  const root = fs.realpathSync(fs.mkdtempSync(path.join(os.tmpdir(), 'isode-dirs-')));
  const mk = (p) => (fs.mkdirSync(path.join(root, p), { recursive: true }), path.join(root, p));
  const prefix = mk('usr/local');
  const npmGlobal = mk('usr/local/lib/node_modules');
  const fromEnv = mk('opt/mods');
  const tenant = mk('tmp/mods');
  const home = mk('tmp/home/.node_modules');
  fs.symlinkSync(tenant, path.join(root, 'opt/link'));
  try {
    const writable = (d) => d === path.join(root, 'tmp');
    const env = { NODE_PATH: [fromEnv, 'relative', tenant, path.join(root, 'opt/link'), path.join(root, 'missing')].join(':'), HOME: path.join(root, 'tmp/home') };
    const got = moduleDirs(env, path.join(prefix, 'bin/node'), writable);
    assert.deepEqual(got, [fromEnv, npmGlobal]);
    void home;
  } finally {
    fs.rmSync(root, { recursive: true, force: true });
  }
});

test('anotherWorkerHelps: a new Worker only for runs that wait on something or compute long', () => {
  const { anotherWorkerHelps } = require('./agent.js');
  const short = { inRun: true, onCpu: true, cpuMs: 3, heldMs: 60 };
  const answered = { inRun: false, onCpu: false, cpuMs: 3, heldMs: 60 };
  // Saturated machine: short runs on a CPU or queued for one, or answered
  // with their results not read yet.
  assert.equal(anotherWorkerHelps([short], 50), false);
  assert.equal(anotherWorkerHelps([short, answered], 50), false);
  assert.equal(anotherWorkerHelps([{ ...answered, onCpu: true }], 50), false);
  // A run asleep (a timer, I/O), one computing for the whole delay, a
  // request held for a second without its run beginning.
  assert.equal(anotherWorkerHelps([short, { ...short, onCpu: false }], 50), true);
  assert.equal(anotherWorkerHelps([{ ...short, cpuMs: 50 }], 50), true);
  assert.equal(anotherWorkerHelps([{ ...answered, cpuMs: 50 }], 50), true);
  assert.equal(anotherWorkerHelps([{ ...answered, heldMs: 1000 }], 50), true);
  // What cannot be read counts as helping.
  assert.equal(anotherWorkerHelps([{ ...short, onCpu: null }], 50), true);
  assert.equal(anotherWorkerHelps([{ ...short, cpuMs: null }], 50), true);
  assert.equal(anotherWorkerHelps([], 50), true);
});

test('a request behind a thread that is on a CPU with a short run gets no new Worker', async (t) => {
  // threadOnCpu says R for every thread, as on a saturated machine: the slow
  // run below, though it sleeps, looks like one waiting for a CPU, and its
  // CPU time stays short, so the quick run waits for it.
  const h = harness({ concurrency: 4, spawnDelayMs: 100, threadOnCpu: () => true });
  t.after(() => h.agent.close());
  await h.call({ op: 'ping' });
  const slow = h.runCode('return function (cb) { setTimeout(() => cb(null, "slow"), 1500) }', { timeout_ms: 10000 });
  const t0 = Date.now();
  const quick = await h.runCode('return function (cb) { cb(null, "quick") }', { timeout_ms: 10000 });
  const waited = Date.now() - t0;
  assert.equal(quick.result, 'quick');
  assert.equal((await slow).result, 'slow');
  assert.ok(waited >= 1300, `the quick run waited only ${waited} ms: a Worker was started for it`);
  assert.equal((await h.call({ op: 'ping' })).result.workers, 1);
});

test('a request behind a run that computes gets a new Worker once that run has used the delay in CPU', async (t) => {
  const h = harness({ concurrency: 4, spawnDelayMs: 100, threadOnCpu: () => true });
  t.after(() => h.agent.close());
  await h.call({ op: 'ping' });
  const busy = h.runCode('return function (cb) { const end = Date.now() + 6000; while (Date.now() < end); cb(null, "busy") }', { timeout_ms: 10000 });
  await new Promise((r) => setTimeout(r, 20));
  const t0 = Date.now();
  const quick = await h.runCode('return function (cb) { cb(null, "quick") }', { timeout_ms: 10000 });
  const waited = Date.now() - t0;
  assert.equal(quick.result, 'quick');
  assert.ok(waited < 5800, `the quick run waited ${waited} ms: no Worker was started for it`);
  assert.equal((await h.call({ op: 'ping' })).result.workers, 2);
  assert.equal((await busy).result, 'busy');
});

test('a request that finds the Workers busy waits for one before another is started', async (t) => {
  const h = harness({ concurrency: 4, spawnDelayMs: 1000 });
  t.after(() => h.agent.close());
  await h.call({ op: 'ping' });
  // Short runs that overlap: each waits for the one Worker.
  const rs = await Promise.all([1, 2, 3, 4, 5, 6].map((i) => h.runCode('return function (ctx, cb) { cb(null, ctx.data) }', { input: i })));
  assert.deepEqual(rs.map((r) => r.result), [1, 2, 3, 4, 5, 6]);
  assert.equal((await h.call({ op: 'ping' })).result.workers, 1);
  // A run stuck behind a slow one gets a Worker of its own after the delay.
  const slow = h.runCode('return function (cb) { setTimeout(() => cb(null, "slow"), 5000) }', { timeout_ms: 10000 });
  const t0 = Date.now();
  const quick = await h.runCode('return function (cb) { cb(null, "quick") }', { timeout_ms: 10000 });
  const waited = Date.now() - t0;
  assert.equal(quick.result, 'quick');
  assert.ok(waited >= 950 && waited < 4900, `the quick run waited ${waited} ms`);
  assert.equal((await h.call({ op: 'ping' })).result.workers, 2);
  assert.equal((await slow).result, 'slow');
});
