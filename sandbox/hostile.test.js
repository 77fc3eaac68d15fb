'use strict';
// Hostile snippets against the agent as a process, run as in a container
// (the node flags of node-flags.sh, the protocol on stdin and stdout), but
// without Docker:  node --test sandbox/
// A snippet that aborts the whole process must be run out of the test's
// own process, hence a child per agent.
const test = require('node:test');
const assert = require('node:assert/strict');
const fs = require('node:fs');
const path = require('node:path');
const { spawn } = require('node:child_process');
const { FrameDecoder, encodeFrame } = require('./agent.js');

const flags = fs
  .readFileSync(path.join(__dirname, 'node-flags.sh'), 'utf8')
  .match(/^ISODE_NODE_FLAGS=\((.*)\)$/m)[1]
  .trim()
  .split(/\s+/);

// agentProcess starts the agent; call(req) resolves with the reply, or
// rejects when the agent exits first.
function agentProcess(t, env = {}) {
  const p = spawn(process.execPath, [...flags, path.join(__dirname, 'agent.js')], {
    stdio: ['pipe', 'pipe', 'pipe'],
    env: { ...process.env, ...env },
  });
  let stderr = '';
  p.stderr.on('data', (c) => (stderr += c));
  const waiting = new Map();
  let exited = null;
  const dec = new FrameDecoder(16 << 20, (b) => {
    const m = JSON.parse(b.toString('utf8'));
    const w = waiting.get(m.id);
    if (w) {
      waiting.delete(m.id);
      w.resolve(m);
    }
  });
  p.stdout.on('data', (c) => dec.push(c));
  p.on('exit', (code, signal) => {
    exited = { code, signal };
    for (const w of waiting.values()) w.reject(new Error(`the agent exited (${code ?? signal}): ${stderr.split('\n').slice(0, 3).join(' | ')}`));
    waiting.clear();
  });
  t.after(() => {
    if (exited === null) p.kill('SIGKILL');
  });
  let next = 1;
  const call = (req) =>
    new Promise((resolve, reject) => {
      if (exited !== null) return reject(new Error('the agent has exited'));
      const id = next++;
      waiting.set(id, { resolve, reject });
      p.stdin.write(encodeFrame(JSON.stringify({ id, ...req })));
    });
  const run = (code, extra = {}) => call({ op: 'run', code, timeout_ms: 10000, ...extra });
  return { p, call, run, alive: () => exited === null };
}

test('a result far over the limit fails its request, not the sandbox', { timeout: 60000 }, async (t) => {
  const a = agentProcess(t);
  for (const code of [
    'return function (cb) { cb(null, "x".repeat(100 << 20)) }',
    'return function (cb) { cb(null, {a: [1, {b: "y".repeat(80 << 20)}]}) }',
    'return function (cb) { const o = {}; o["k".repeat(1 << 20)] = 1; cb(null, o) }',
  ]) {
    const r = await a.run(code);
    assert.equal(r.error && r.error.code, 'output_too_large', `${code}: ${JSON.stringify(r).slice(0, 300)}`);
    assert.match(r.error.message, /over the limit of 524288/);
  }
  // Exactly at the limit passes; the limit counts bytes of JSON.
  const ok = await a.run('return function (cb) { cb(null, "é".repeat(1000)) }', { max_result_bytes: 2002 });
  assert.equal(ok.result, 'é'.repeat(1000));
  const over = await a.run('return function (cb) { cb(null, "é".repeat(1000)) }', { max_result_bytes: 2001 });
  assert.equal(over.error.code, 'output_too_large');
  // Values left out of the JSON do not count against it.
  const sparse = await a.run('return function (cb) { cb(null, {f: () => 1, u: undefined, ["x".repeat(5000)]: undefined, n: 1}) }', { max_result_bytes: 100 });
  assert.deepEqual(sparse.result, { n: 1 });
  assert.ok(a.alive());
});

test('a huge write to the console is cut without copying it', { timeout: 60000 }, async (t) => {
  const a = agentProcess(t);
  const r = await a.run('return function (cb) { process.stdout.write(Buffer.alloc(100 << 20, 0x41)); process.stderr.write("z".repeat(8 << 20)); cb(null, 1) }');
  assert.equal(r.result, 1, JSON.stringify(r).slice(0, 300));
  assert.equal(r.console_truncated, true);
  assert.equal(r.console, 'A'.repeat(64 << 10));
  const cut = await a.run('return function (cb) { process.stdout.write("ab"); process.stdout.write("☃☃☃"); cb(null, 1) }', { max_console_bytes: 6 });
  assert.equal(cut.console, 'ab☃');
  assert.ok(a.alive());
});

test('console bytes are decoded as a stream: a character split across writes stays whole', { timeout: 60000 }, async (t) => {
  const a = agentProcess(t);
  const r = await a.run(`return function (cb) {
    process.stdout.write(Buffer.from([0xf0, 0x9f]));
    process.stdout.write(new Uint8Array([0x98, 0x80, 0x0a]));
    process.stdout.write(Buffer.from([0xff, 0xe2, 0x98]));
    console.log("after an incomplete character");
    process.stdout.write(Buffer.from([0xc3]));
    cb(null, 1);
  }`);
  assert.equal(r.console, '\u{1F600}\n\ufffd\ufffdafter an incomplete character\n\ufffd');
  assert.ok(a.alive());
});

// sweepingAgent starts an Agent in this process that sweeps with sweep
// after idleSweepMs, and returns it and run(id, code), which resolves to
// the reply of that request.
function sweepingAgent(t, idleSweepMs, sweep) {
  const { Agent } = require('./agent.js');
  const replies = new Map();
  const dec = new FrameDecoder(1 << 20, (b) => {
    const m = JSON.parse(b.toString('utf8'));
    replies.get(m.id)(m);
  });
  const agent = new Agent({ write: (b) => dec.push(b), idleSweepMs, sweep });
  t.after(() => agent.close());
  const run = (id, code) =>
    new Promise((resolve) => {
      replies.set(id, resolve);
      agent.feed(encodeFrame(JSON.stringify({ id, op: 'run', code, timeout_ms: 5000 })));
    });
  return { agent, run };
}

test('leftover processes are swept only while no request is in flight', { timeout: 30000 }, async (t) => {
  const sweeps = [];
  let found = 2; // the first two sweeps find leftovers, so each asks for another
  const { agent, run } = sweepingAgent(t, 50, () => {
    sweeps.push({ at: Date.now(), inFlight: agent.pending.size });
    return found-- > 0;
  });
  const long = run(1, 'return function (cb) { setTimeout(() => cb(null, "long"), 600) }');
  assert.equal((await run(2, 'return function (cb) { cb(null, "short") }')).result, 'short');
  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
  await sleep(300); // several idle periods would have passed, but one request runs
  assert.deepEqual(sweeps, [], 'swept while a request was in flight');
  assert.equal((await long).result, 'long');
  const done = Date.now();
  await sleep(500);
  assert.equal(sweeps.length, 3, JSON.stringify(sweeps)); // two that found leftovers, one that did not
  for (const s of sweeps) assert.equal(s.inFlight, 0);
  assert.ok(sweeps[0].at - done >= 40, 'swept before the agent was idle for idleSweepMs');
});

test('a first request that overtakes the warm-up is swept after', { timeout: 30000 }, async (t) => {
  let sweeps = 0;
  const { run } = sweepingAgent(t, 20, () => {
    sweeps++;
    return false;
  });
  // Sent before the first Worker is ready: it runs before the warm-up.
  const r = await run(1, 'return function (cb) { cb(null, 1) }');
  assert.equal(r.result, 1);
  await new Promise((resolve) => setTimeout(resolve, 1000));
  assert.ok(sweeps >= 1, 'never swept after the first request');
});
