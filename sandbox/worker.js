'use strict';
// One snippet runner: the script of every worker_threads Worker the agent
// (agent.js) keeps. A Worker runs one snippet at a time; the agent's main
// thread owns the deadline and terminate()s a Worker whose snippet overruns.
//
// Messages from the agent: {t: 'run', id, code, input, maxResult, maxConsole}.
// Messages to the agent:
//   {t: 'ready', tid}                                 once, when loaded; tid is
//                                                     this thread's id in /proc
//   {t: 'result', id, json, console, truncated, recycle}
//   {t: 'result', id, error: {code, message}, console, truncated, recycle}
//   {t: 'stray', id, what}                            a late callback, for the log
// recycle asks the agent to replace this Worker: the snippet left timers or
// other handles behind that would otherwise run during the next request.

const { parentPort, workerData } = require('node:worker_threads');
const { Console } = require('node:console');
const Module = require('node:module');
const { isBuiltin } = Module;
const fs = require('node:fs');
const pathJoin = require('node:path').join;
const pathDirname = require('node:path').dirname;
const EventEmitter = require('node:events');
const { StringDecoder } = require('node:string_decoder');

// Everything the runner needs, taken before any user code runs: a snippet
// may overwrite globals of its Worker, and must then only break itself.
const post = parentPort.postMessage.bind(parentPort);
const stringify = JSON.stringify;
const byteLength = Buffer.byteLength;
const bufferFrom = Buffer.from;
const isBuffer = Buffer.isBuffer;
const isArray = Array.isArray;
const later = setImmediate;
const activeResources = process.getActiveResourcesInfo.bind(process);
const AsyncFunction = Object.getPrototypeOf(async function () {}).constructor;
const nodeRequire = require;

const MAX_MESSAGE_BYTES = 4096;
const STACK_LINES = 5;
const CACHE_ENTRIES = 64;
const CACHE_BYTES = 4 << 20;

let current = null; // the request being run, or null
// runState[0] is 1 from a run's start to its result, 0 otherwise: the agent
// reads it to tell a snippet waiting on a timer or I/O from a finished one
// whose result is on its way (agent.js, anotherWorkerHelps).
const runState = workerData !== null && typeof workerData === 'object' && workerData.runState instanceof Int32Array ? workerData.runState : new Int32Array(1);

// --- console capture -------------------------------------------------------

// capture appends output to the current request, bounded by its maxConsole;
// output with no request running (a stray timer) is dropped. Nothing larger
// than the room left is copied or decoded: a snippet may write a chunk of
// any size, and a copy of it could take the whole sandbox's memory.
function capture(chunk) {
  const req = current;
  if (req === null || req.truncated) return;
  let s;
  try {
    if (isBuffer(chunk) || chunk instanceof Uint8Array) {
      // Bytes go through a decoder of the request's, so that a character
      // split across two writes comes out whole.
      const room = req.maxConsole - req.consoleBytes;
      if (req.decoder === null) req.decoder = new StringDecoder('utf8');
      s = req.decoder.write(bufferFrom(chunk.buffer, chunk.byteOffset, Math.min(chunk.length, room + 4)));
    } else {
      s = pendingBytes(req) + (typeof chunk === 'string' ? chunk : String(chunk));
    }
  } catch {
    return;
  }
  append(req, s);
}

// pendingBytes ends a character left incomplete by the last byte chunk
// (as U+FFFD) before text written another way.
function pendingBytes(req) {
  return req.decoder === null ? '' : req.decoder.end();
}

function append(req, s) {
  const room = req.maxConsole - req.consoleBytes;
  // A UTF-16 code unit is at least one byte of UTF-8: a string longer than
  // the room is cut to it before it is measured or encoded.
  const n = s.length <= room ? byteLength(s, 'utf8') : room + 1;
  if (n <= room) {
    req.console.push(s);
    req.consoleBytes += n;
    return;
  }
  if (room > 0) {
    const b = bufferFrom(s.length > room ? s.slice(0, room) : s, 'utf8');
    let end = Math.min(room, b.length);
    while (end > 0 && end < b.length && (b[end] & 0xc0) === 0x80) end--; // cut at a character boundary
    const part = b.subarray(0, end).toString('utf8');
    req.console.push(part);
    req.consoleBytes += byteLength(part, 'utf8');
  }
  req.truncated = true;
}

// sink is the stream behind the snippet's console: Console wants an emitter
// with write(); every write is attributed to the running request at once.
const sink = new EventEmitter();
sink.write = function write(chunk, encoding, cb) {
  capture(chunk);
  if (typeof encoding === 'function') encoding();
  else if (typeof cb === 'function') cb();
  return true;
};

Object.defineProperty(globalThis, 'console', {
  value: new Console({ stdout: sink, stderr: sink, colorMode: false }),
  writable: true,
  configurable: true,
  enumerable: false,
});
process.stdout.write = sink.write;
process.stderr.write = sink.write;

// --- errors ----------------------------------------------------------------

function trim(s, max) {
  if (byteLength(s, 'utf8') <= max) return s;
  const b = bufferFrom(s, 'utf8');
  let end = max - 3;
  while (end > 0 && (b[end] & 0xc0) === 0x80) end--;
  return b.subarray(0, end).toString('utf8') + '...';
}

// describe turns anything thrown or passed as an error into one line of text
// (plus the snippet's own stack frames). It never throws: a hostile error
// object whose getters throw is described as such.
function describe(e) {
  try {
    if (e !== null && typeof e === 'object' && typeof e.message === 'string') {
      const name = typeof e.name === 'string' && e.name ? e.name : 'Error';
      let s = e.message ? name + ': ' + e.message : name;
      if (typeof e.stack === 'string') {
        // Only the snippet's own frames, with its own line numbers: the
        // Function constructor puts two lines before the code.
        const frames = e.stack
          .split('\n')
          .filter((l) => /^\s+at /.test(l) && /<anonymous>:\d+:\d+/.test(l))
          .slice(0, STACK_LINES)
          .map((l) => l.trim().replace(/\(?eval at compile \([^)]*\), /, '(').replace(/<anonymous>:(\d+):(\d+)/, (_, n, c) => `snippet:${Math.max(1, n - 2)}:${c}`));
        if (frames.length > 0) s += '\n    ' + frames.join('\n    ');
      }
      return trim(s, MAX_MESSAGE_BYTES);
    }
    if (typeof e === 'string') return trim(e, MAX_MESSAGE_BYTES);
    if (e === undefined) return 'undefined';
    const j = stringify(e);
    return trim(j === undefined ? String(e) : j, MAX_MESSAGE_BYTES);
  } catch {
    return '(an error value that could not be described)';
  }
}

// --- compilation -----------------------------------------------------------

const cache = new Map(); // code -> factory, oldest first
let cacheBytes = 0;

function compile(code) {
  let f = cache.get(code);
  if (f !== undefined) return f;
  f = new Function('require', code); // throws SyntaxError
  const n = code.length * 2;
  if (n <= CACHE_BYTES) {
    cache.set(code, f);
    cacheBytes += n;
    for (const k of cache.keys()) {
      if (cache.size <= CACHE_ENTRIES && cacheBytes <= CACHE_BYTES) break;
      cache.delete(k);
      cacheBytes -= k.length * 2;
    }
  }
  return f;
}

// --- modules ---------------------------------------------------------------

// modulePaths are the directories the agent found for modules the image
// installed (agent.js moduleDirs): none of them is writable by the tenant.
// They become this thread's only global folders, so that a module's own
// require() of its dependencies searches them too and never $HOME (which
// may be /tmp); the thread must not start if that did not hold.
const modulePaths = workerData !== null && typeof workerData === 'object' && isArray(workerData.modulePaths) ? workerData.modulePaths.filter((p) => typeof p === 'string') : [];
(function useModulePaths() {
  // The environment snippets see stays as the image set it.
  const saved = { HOME: process.env.HOME, NODE_PATH: process.env.NODE_PATH };
  delete process.env.HOME;
  process.env.NODE_PATH = modulePaths.join(require('node:path').delimiter);
  Module._initPaths(); // reads HOME and NODE_PATH again
  for (const [k, v] of Object.entries(saved)) {
    if (v === undefined) delete process.env[k];
    else process.env[k] = v;
  }
  for (const p of Module.globalPaths) {
    if (!modulePaths.includes(p) && p !== pathJoin(process.execPath, '..', '..', 'lib', 'node')) {
      throw new Error(`unexpected global module path ${p}`);
    }
  }
})();

const safeDirs = new Map(); // directory -> whether no tenant can write to it or above it

function safeDir(dir) {
  let ok = safeDirs.get(dir);
  if (ok !== undefined) return ok;
  ok = true;
  try {
    fs.accessSync(dir, fs.constants.W_OK);
    ok = false;
  } catch {
    // not writable (a read-only root, or not ours)
  }
  if (ok && pathDirname(dir) !== dir) ok = safeDir(pathDirname(dir));
  safeDirs.set(dir, ok);
  return ok;
}

// bareName reports whether name names a module (a package, optionally
// scoped, optionally with a subpath), not a file: no absolute or relative
// path, no URL, no "." or ".." segment.
function bareName(name) {
  if (name === '' || name.includes('\\') || name.includes('\0') || name.includes(':')) return false;
  if (name[0] === '/' || name[0] === '.') return false;
  return name.split('/').every((s) => s !== '' && s !== '.' && s !== '..');
}

// sandboxRequire is the snippet's require: Node.js built-ins, and modules
// installed in the image, by name. A path (such as a file in /tmp) is
// refused, and so is a module whose file resolves into a place a tenant can
// write. The container is the security boundary, not this: a snippet can
// read and eval what it likes; this keeps the tenant's files out of module
// resolution.
function sandboxRequire(name) {
  if (typeof name === 'string' && isBuiltin(name)) return nodeRequire(name);
  const shown = stringify(String(name));
  if (typeof name !== 'string' || !bareName(name)) {
    throw new Error(`cannot require ${shown}: only Node.js built-in modules and modules installed in the sandbox image can be required, by name (not by path)`);
  }
  let file;
  try {
    file = nodeRequire.resolve(name, { paths: modulePaths });
  } catch (e) {
    if (e && e.code === 'MODULE_NOT_FOUND') {
      const where = modulePaths.length > 0 ? `installed in the sandbox image (${modulePaths.join(', ')})` : 'installed in the sandbox image (it has none)';
      throw new Error(`cannot require ${shown}: no such module: only Node.js built-in modules and the modules ${where} are available`);
    }
    throw e;
  }
  if (!safeDir(pathDirname(file))) throw new Error(`cannot require ${shown}: it resolves to ${file}, a place the sandbox can write to`);
  return nodeRequire(file);
}

// --- running ---------------------------------------------------------------

function codeError(message) {
  return { error: { code: 'code_error', message } };
}

// valueOutcome serialises a result now, so a later mutation of the value by
// the snippet does not change what was returned.
//
// A result far over the limit is refused before it is serialised: V8 does
// not fail a thread whose single allocation overshoots its heap limit, it
// aborts the whole process (every request of the sandbox would fail). The
// replacer keeps a lower bound of the JSON's size (a string is at least
// its length plus quotes, anything else at least one byte, a property at
// least its key) and stops the serialiser as soon as it passes the limit.
const tooLarge = new Error('result over the limit');

function valueOutcome(req, value) {
  let json;
  let budget = req.maxResult;
  const bound = function (key, v) {
    const t = typeof v;
    if (t === 'string') budget -= v.length + 2;
    else if (t === 'undefined' || t === 'function' || t === 'symbol') return v; // left out, or null in an array
    else budget -= 1;
    if (!isArray(this)) budget -= key.length;
    if (budget < 0) throw tooLarge;
    return v;
  };
  try {
    json = stringify(value, bound);
  } catch (e) {
    if (e === tooLarge) return { error: { code: 'output_too_large', message: `result is over the limit of ${req.maxResult} bytes of JSON` } };
    return codeError('result is not JSON-serialisable: ' + describe(e));
  }
  if (json === undefined) json = 'null'; // undefined, a function, a symbol
  const n = byteLength(json, 'utf8');
  if (n > req.maxResult) {
    return { error: { code: 'output_too_large', message: `result is ${n} bytes of JSON, over the limit of ${req.maxResult}` } };
  }
  return { json };
}

function settle(req, outcome) {
  if (req.settled) return;
  req.settled = true;
  req.outcome = outcome;
  // Sending waits for the next turn of the event loop, so a callback called
  // twice in the same tick is reported as such instead of being half-sent.
  later(send, req);
}

function send(req) {
  if (req.sent) return;
  req.sent = true;
  if (!req.truncated && req.decoder !== null) append(req, pendingBytes(req));
  current = null;
  const msg = req.outcome;
  msg.t = 'result';
  msg.id = req.id;
  msg.console = req.console.join('');
  msg.truncated = req.truncated;
  msg.recycle = leftovers();
  runState[0] = 0; // a plain store: a snippet may have replaced Atomics
  post(msg);
}

let baseline = null; // resource type -> count in an idle Worker

function countResources() {
  const m = new Map();
  for (const r of activeResources()) m.set(r, (m.get(r) || 0) + 1);
  return m;
}

// leftovers reports whether the finished snippet left timers, handles or
// requests behind that an idle Worker does not have.
function leftovers() {
  try {
    for (const [k, n] of countResources()) if (n > (baseline.get(k) || 0)) return true;
    return false;
  } catch {
    return true;
  }
}

function isThenable(v) {
  try {
    return v !== null && (typeof v === 'object' || typeof v === 'function') && typeof v.then === 'function';
  } catch {
    return false;
  }
}

function run(m) {
  const req = {
    id: m.id,
    maxResult: m.maxResult,
    maxConsole: m.maxConsole,
    console: [],
    consoleBytes: 0,
    decoder: null, // for console output written as bytes
    truncated: false,
    settled: false,
    sent: false,
    calls: 0,
    outcome: null,
  };
  current = req;
  runState[0] = 1;

  let fn;
  try {
    fn = compile(m.code)(sandboxRequire);
  } catch (e) {
    const what = e instanceof SyntaxError ? 'syntax error in the code: ' : 'the code threw before returning its function: ';
    return settle(req, codeError(what + describe(e)));
  }
  if (typeof fn !== 'function') {
    return settle(req, codeError(`the code must return a function, e.g. \`return function (cb) { cb(null, 1); }\`, but it returned ${fn === null ? 'null' : typeof fn}`));
  }

  const isAsync = fn instanceof AsyncFunction;
  const arity = fn.length;
  // A function that declares a callback settles through it; the promise it
  // may also return then settles only by rejecting or by resolving to a
  // value other than undefined.
  const takesCallback = isAsync ? arity >= 2 : arity >= 1;
  const ctx = { data: m.input === undefined ? null : m.input };

  const cb = function (err, value) {
    req.calls++;
    if (req.calls === 1) {
      if (req.settled) return; // a promise settled first: first wins
      return settle(req, err !== null && err !== undefined ? codeError(describe(err)) : valueOutcome(req, value));
    }
    if (!req.sent) {
      req.outcome = codeError('callback called more than once');
      return;
    }
    post({ t: 'stray', id: req.id, what: 'callback called again after the result was sent' });
  };

  let ret;
  try {
    ret = !isAsync && arity === 1 ? fn(cb) : fn(ctx, cb);
  } catch (e) {
    return settle(req, codeError('the function threw: ' + describe(e)));
  }
  if (isThenable(ret)) {
    Promise.resolve(ret).then(
      (v) => {
        if (v === undefined && takesCallback) return;
        settle(req, valueOutcome(req, v));
      },
      (e) => settle(req, codeError('the promise was rejected: ' + describe(e))),
    );
  } else if (!isAsync && arity === 0 && ret !== undefined) {
    // A function of no parameters may return its result directly.
    settle(req, valueOutcome(req, ret));
  }
  // Otherwise wait for the callback; the agent's deadline ends the wait.
}

process.on('unhandledRejection', (reason) => {
  const e = new Error('unhandled promise rejection: ' + describe(reason));
  e.name = 'UnhandledRejection';
  throw e; // the Worker ends with an 'error' event; the agent replaces it
});

parentPort.on('message', (m) => {
  if (m && m.t === 'run') run(m);
});

// Warm the run path before the first real request: compile and call a
// snippet through the same functions (console capture and JSON included),
// so the first request of a new tenant does not pay V8's first-execution
// costs. Its result (id -1) reaches the agent before 'ready' and is ignored.
run({ t: 'run', id: -1, code: 'return function (ctx, cb) { console.log("warm"); cb(null, ctx.data); }', input: { warm: [1, 'up'] }, maxResult: 4096, maxConsole: 4096 });

// threadId is this thread's id as the kernel knows it (/proc/thread-self
// names /proc/<pid>/task/<tid>), or null: the agent reads the thread's CPU
// time around each run with it.
function threadId() {
  try {
    const n = Number(fs.readlinkSync('/proc/thread-self').split('/').pop());
    return Number.isSafeInteger(n) && n > 0 ? n : null;
  } catch {
    return null;
  }
}

later(() => {
  baseline = countResources();
  post({ t: 'ready', tid: threadId() });
});
