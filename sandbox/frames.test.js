'use strict';
// Reply frames are built whole, whatever a worker thread posts:
// node --test sandbox/
// A snippet can reach its thread's parentPort (require("worker_threads"))
// and post result messages of its own; none may change a frame's keys.
const test = require('node:test');
const assert = require('node:assert/strict');
const { Agent, FrameDecoder, encodeFrame, MAX_RESULT_DEPTH } = require('./agent.js');

// harness drives an in-memory Agent and keeps every frame's raw text.
function harness(t, opts = {}) {
  const waiting = new Map();
  const raw = new Map(); // id -> the frame's text
  const dec = new FrameDecoder(16 << 20, (b) => {
    const text = b.toString('utf8');
    const m = JSON.parse(text);
    const w = waiting.get(m.id);
    assert.ok(w, `reply to id ${m.id}, which is not in flight: ${text.slice(0, 200)}`);
    waiting.delete(m.id);
    raw.set(m.id, text);
    w(m);
  });
  const agent = new Agent({ write: (buf) => dec.push(buf), ...opts });
  t.after(() => agent.close());
  const call = (id, req) =>
    new Promise((resolve) => {
      waiting.set(id, resolve);
      agent.feed(encodeFrame(JSON.stringify({ id, ...req })));
    });
  const run = (id, code, extra = {}) => call(id, { op: 'run', code, timeout_ms: 10000, input: { id }, ...extra });
  return { agent, call, run, raw };
}

// canonical asserts that a frame's text is what JSON.stringify makes of
// its own parse: a text with a duplicate key is not (the parse keeps one).
function canonical(text) {
  assert.equal(JSON.stringify(JSON.parse(text)), text, `frame is not one object encoded whole: ${text.slice(0, 300)}`);
}

// forge is a snippet that posts msg (ID stands for its own request id)
// to the agent as its thread's result, then answers normally later.
function forge(msg) {
  return `return function (ctx, cb) {
    const m = ${msg};
    require("worker_threads").parentPort.postMessage(JSON.parse(JSON.stringify(m).replaceAll('"ID"', String(ctx.data.id))));
    setTimeout(() => cb(null, "genuine"), 50);
  }`;
}

test('a forged result cannot answer another request', async (t) => {
  const h = harness(t, { concurrency: 2 });
  // Request 7 is in flight while request 3 forges an answer to it.
  const victim = h.run(7, 'return function (cb) { setTimeout(() => cb(null, "mine"), 300) }');
  const r = await h.run(3, forge(`{t: "result", id: "ID", json: '1,"id":7', console: "", truncated: false}`));
  assert.equal(r.id, 3);
  assert.equal(r.error && r.error.code, 'internal', JSON.stringify(r));
  assert.match(r.error.message, /malformed result/);
  canonical(h.raw.get(3));
  assert.equal(h.raw.get(3).match(/"id":/g).length, 1, h.raw.get(3));
  const v = await victim;
  assert.equal(v.id, 7);
  assert.equal(v.result, 'mine');
  canonical(h.raw.get(7));
});

test('every forged result is answered with the request\'s own id', async (t) => {
  const h = harness(t);
  const forgeries = [
    // Text that is not exactly one JSON value.
    [`{t: "result", id: "ID", json: '1} {"id":7,"result":2'}`, 'internal'],
    [`{t: "result", id: "ID", json: '"a", "b"'}`, 'internal'],
    [`{t: "result", id: "ID", json: ''}`, 'internal'],
    [`{t: "result", id: "ID", json: 5}`, 'internal'],
    [`{t: "result", id: "ID"}`, 'internal'],
    // Errors the host would take as the sandbox's own.
    [`{t: "result", id: "ID", error: {code: "sandbox_crashed", message: "x"}}`, 'internal'],
    [`{t: "result", id: "ID", error: {code: "code_error", message: {toString: 1}}}`, 'internal'],
    [`{t: "result", id: "ID", error: null}`, 'internal'],
    // Over the request's limit, whatever the thread says.
    [`{t: "result", id: "ID", json: JSON.stringify("x".repeat(2000))}`, 'output_too_large'],
    // Keys that are not the frame's own stay inside the result.
    [`{t: "result", id: "ID", json: '{"id":7,"error":{"code":"timeout"}}', console: "c", truncated: "yes"}`, null],
  ];
  let id = 100;
  for (const [msg, want] of forgeries) {
    id++;
    const r = await h.run(id, forge(msg), { max_result_bytes: 1000 });
    assert.equal(r.id, id, msg);
    canonical(h.raw.get(id));
    if (want === null) {
      assert.deepEqual(r.result, { id: 7, error: { code: 'timeout' } }, msg);
      assert.equal(r.console, 'c');
      assert.equal(r.console_truncated, false);
    } else {
      assert.equal(r.error && r.error.code, want, `${msg}: ${JSON.stringify(r)}`);
    }
  }
  // The sandbox still serves genuine results.
  const ok = await h.run(1, 'return function (cb) { cb(null, {"id": 9, "a": [1, "2"]}) }');
  assert.deepEqual(ok.result, { id: 9, a: [1, '2'] });
  canonical(h.raw.get(1));
});

test('results of every kind come back in a frame encoded whole', async (t) => {
  const h = harness(t);
  const values = [0, -1.5e-7, 'é\u2028"\\</script>', null, true, [1, [2, [3]]], { __proto__: null, b: 1, 2: 'two', '': [] }, '\ud800'];
  let id = 200;
  for (const v of values) {
    id++;
    const r = await h.run(id, 'return function (ctx, cb) { cb(null, ctx.data.v) }', { input: { v } });
    assert.deepEqual(r.result, JSON.parse(JSON.stringify(v)));
    canonical(h.raw.get(id));
  }
  const p = await h.call(1, { op: 'ping' });
  assert.equal(p.result.ready, true);
  canonical(h.raw.get(1));
});

test(`a result nested deeper than ${MAX_RESULT_DEPTH} levels is the snippet's error`, async (t) => {
  const h = harness(t);
  const nest = (n) => `return function (cb) { let a = "x"; for (let i = 0; i < ${n}; i++) a = i % 2 ? [a] : {k: a}; cb(null, a) }`;
  const ok = await h.run(1, nest(MAX_RESULT_DEPTH));
  assert.equal(ok.error, undefined, JSON.stringify(ok.error));
  canonical(h.raw.get(1));
  const deep = await h.run(2, nest(MAX_RESULT_DEPTH + 1));
  assert.equal(deep.error && deep.error.code, 'code_error');
  assert.match(deep.error.message, /nests deeper than 1000 levels/);
  // Brackets inside strings do not count.
  const text = await h.run(3, `return function (cb) { cb(null, ["[".repeat(5000), "\\\\\\"{".repeat(3000)]) }`);
  assert.equal(text.result[0].length, 5000);
  // Deeper than the main thread's stack could encode: refused, not thrown.
  const deeper = await h.run(4, nest(12000));
  assert.equal(deeper.error && deeper.error.code, 'code_error', JSON.stringify(deeper).slice(0, 200));
});
