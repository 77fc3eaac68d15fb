'use strict';
// isode sandbox agent: the only process of a sandbox container (under
// Docker's init). It reads requests from the container's stdin and writes
// replies to its stdout, or does both on a unix socket the host listens on
// (ISODE_AGENT_SOCKET), and runs tenants' snippets in worker_threads
// Workers (worker.js), so this main thread only routes frames and owns the
// deadlines. It exits when stdin (or the socket) ends: the worker that
// attached it is gone.
//
// Framing, both ways: a 4-byte big-endian length, then that many bytes of a
// UTF-8 JSON object.
//   host -> agent: {"id":N,"op":"ping"}
//                  {"id":N,"op":"run","code":"...","input":<json>,"timeout_ms":N,
//                   "limit_ms":N,"max_result_bytes":N,"max_console_bytes":N}
//   agent -> host: {"id":N,"result":<json>,"console":"...","console_truncated":false}
//                  {"id":N,"error":{"code":"...","message":"..."},"console":"...",...}
// A ping is answered once a Worker is ready: {"id":N,"result":{"ready":true,...}}.
// A run's reply also carries "usage":{"cpu_ns":N|null,"rss":N,"peak_rss":N}:
// measured by this main thread, never by the worker thread the snippet
// shares (see usageOf).
// Every reply is one object given to JSON.stringify whole: no text that came
// from a worker thread is ever spliced into a frame, so a snippet that posts
// to its thread's parentPort cannot add keys (a second "id") to a reply. A
// result nests at most MAX_RESULT_DEPTH levels. The host decodes each frame
// strictly all the same (pkg/dockerx/wire.go): a snippet can also find the
// protocol descriptor and write frames of its own.
//
// The worker does not rely on the image for any of this: it passes the
// agent's source, with worker.js inside it, on node's command line (see
// sandbox/program.go), so any image with a Node.js runtime will do. The
// agent can also run from a file (node agent.js), as its tests do.
//
// Snippets may require Node.js built-in modules and, by name, the modules
// the image installed globally (see moduleDirs).
//
// Settings come from the environment (set by the host at container create):
//   ISODE_CONCURRENCY       Workers at most, so snippets at once (default 4)
//   ISODE_WORKER_HEAP_MB    V8 old-space limit of each Worker (default 64)
//   ISODE_MAX_FRAME_BYTES   largest frame this agent writes (default 2 MiB)
//   ISODE_MAX_REQUEST_BYTES largest frame this agent accepts (default 4 MiB)
//   ISODE_IDLE_TRIM_MS      idle time after which extra Workers end (default 30000)
//   ISODE_SPAWN_DELAY_MS    wait behind busy Workers before another starts (default 50),
//                           and then only if it would help (anotherWorkerHelps)
//   ISODE_AGENT_SOCKET      a unix socket to connect to: the protocol runs
//                           over it instead of stdin and stdout (exit 76
//                           when it cannot be reached); stdin's end still
//                           ends the agent
//   ISODE_KILL_LEFTOVERS    1: kill processes snippets left running, once
//                           no request is in flight (set in containers only)
// stderr carries the agent's own diagnostics, one line each.

const fs = require('node:fs');
const net = require('node:net');
const path = require('node:path');
const { Worker } = require('node:worker_threads');
const { performance } = require('node:perf_hooks');

const DEFAULTS = {
  concurrency: 4,
  workerHeapMb: 64,
  workerYoungMb: 4,
  maxFrameBytes: 2 << 20,
  maxRequestBytes: 4 << 20,
  idleTrimMs: 30000,
  // spawnDelayMs is how long a request waits behind busy Workers before
  // another Worker is started for it (at once when there is none).
  spawnDelayMs: 50,
  maxResultBytes: 512 << 10,
  maxConsoleBytes: 64 << 10,
  workerFile: path.join(__dirname, 'worker.js'),
  // workerSource, when set, is worker.js's text: Workers are started from
  // it (eval) rather than from workerFile.
  workerSource: null,
  // modulePaths are the directories snippets may require modules from
  // (moduleDirs); worker.js gets them as workerData.
  modulePaths: [],
  stuckMs: 5000,
  onStuck: () => {},
  // sweep, when set, is called once the agent has had no request in flight
  // for idleSweepMs, and again after each call that returns true: it kills
  // what snippets left running (see killLeftovers).
  sweep: null,
  idleSweepMs: 100,
  // threadOnCpu(tid) tells whether a Worker's thread is on a CPU or waiting
  // for one (see anotherWorkerHelps); tests replace it.
  threadOnCpu,
};

// --- framing ---------------------------------------------------------------

// FrameDecoder cuts a byte stream into length-prefixed frames of at most max
// bytes. A longer length is an error: the stream can no longer be trusted.
class FrameDecoder {
  constructor(max, onFrame) {
    this.max = max;
    this.onFrame = onFrame;
    this.chunks = [];
    this.size = 0;
    this.need = -1; // body length once the header is read
  }

  // push takes the next bytes. borrowed says chunk's memory is reused for
  // the next read once push returns (a socket's onread buffer): what push
  // keeps of it, the start of a frame not complete yet, is copied.
  push(chunk, borrowed = false) {
    this.chunks.push(chunk);
    this.size += chunk.length;
    try {
      this.drain();
    } finally {
      if (borrowed && this.size > 0) {
        // Only the last chunk can still be in chunk's memory: earlier ones
        // were copied by earlier pushes, or by take.
        const last = this.chunks.length - 1;
        this.chunks[last] = Buffer.from(this.chunks[last]);
      }
    }
  }

  drain() {
    for (;;) {
      if (this.need < 0) {
        if (this.size < 4) return;
        const head = this.take(4);
        this.need = head.readUInt32BE(0);
        if (this.need > this.max) throw new Error(`frame of ${this.need} bytes is over the limit of ${this.max}`);
      }
      if (this.size < this.need) return;
      const body = this.take(this.need);
      this.need = -1;
      this.onFrame(body);
    }
  }

  take(n) {
    let out;
    if (this.chunks[0].length >= n) {
      out = this.chunks[0].subarray(0, n);
    } else {
      out = Buffer.concat(this.chunks, this.size).subarray(0, n);
      this.chunks = [Buffer.concat(this.chunks, this.size)];
    }
    const first = this.chunks[0];
    if (first.length === n) this.chunks.shift();
    else this.chunks[0] = first.subarray(n);
    this.size -= n;
    return out;
  }
}

function encodeFrame(json) {
  const body = Buffer.from(json, 'utf8');
  const head = Buffer.allocUnsafe(4);
  head.writeUInt32BE(body.length, 0);
  return Buffer.concat([head, body], 4 + body.length);
}

// --- the agent -------------------------------------------------------------

// WARMUP_CODE is run once through the first Worker before the agent answers
// its readiness ping (see Agent.becomeReady).
const WARMUP_CODE = 'return function (ctx, cb) { console.log("warm"); cb(null, ctx.data); }';

// MAX_RESULT_DEPTH bounds how deeply a result's arrays and objects nest.
// The main thread re-encodes every result with JSON.stringify, whose
// recursion overflows this thread's stack at about 4000 levels; the host's
// decoder (Go's encoding/json) stops at 10000. A deeper result is the
// snippet's error, refused before it reaches either.
const MAX_RESULT_DEPTH = 1000;

// The error codes a worker thread may report (worker.js); any other is a
// forgery and answered as a malformed result.
const WORKER_ERROR_CODES = new Set(['code_error', 'output_too_large']);

// openThreadStat opens the schedstat file of thread tid of this process
// (/proc/self/task/<tid>/schedstat), or returns null when it cannot. The
// file stays open for the thread's life: reading an open file again at
// offset 0 costs a fifth of opening it each time.
function openThreadStat(tid) {
  if (tid === null) return null;
  try {
    return fs.openSync(`/proc/self/task/${tid}/schedstat`, 'r');
  } catch {
    return null;
  }
}

const procBuf = Buffer.alloc(256);

// readProc reads the whole (short) /proc file open as fd again, or returns
// null.
function readProc(fd) {
  try {
    const n = fs.readSync(fd, procBuf, 0, procBuf.length, 0);
    return procBuf.latin1Slice(0, n);
  } catch {
    return null; // the thread is gone, say
  }
}

// threadCpuNs returns the CPU time (user and system, ns) the kernel has
// accounted to the thread whose schedstat file is open as fd, or null when
// it cannot be read. Its first field is the thread's sum_exec_runtime.
// Read by the main thread: a snippet runs in another thread and cannot
// change what the kernel counted.
function threadCpuNs(fd) {
  if (fd === null) return null;
  const s = readProc(fd);
  const i = s === null ? -1 : s.indexOf(' ');
  if (i <= 0) return null;
  const n = Number(s.slice(0, i));
  return Number.isSafeInteger(n) && n >= 0 ? n : null;
}

// threadOnCpu reports whether thread tid of this process is on a CPU or
// waiting for one (state R in /proc/self/task/<tid>/stat), or null when it
// cannot tell. Read only when a request has waited behind busy Workers.
function threadOnCpu(tid) {
  if (tid === null) return null;
  let fd;
  try {
    fd = fs.openSync(`/proc/self/task/${tid}/stat`, 'r');
  } catch {
    return null;
  }
  const s = readProc(fd);
  fs.closeSync(fd);
  // "pid (comm) S ...": the state follows the last ')' (comm may hold one).
  const i = s === null ? -1 : s.lastIndexOf(')');
  if (i < 0 || i + 2 >= s.length) return null;
  return s[i + 2] === 'R';
}

// anotherWorkerHelps decides whether a request that has waited spawnDelayMs
// behind busy Workers should get a new Worker, from what each busy Worker's
// thread is doing: {inRun: its snippet has begun and not yet answered,
// onCpu: the thread is on a CPU or waiting for one (true|false|null),
// cpuMs: CPU the thread has used since it was handed the request (or null),
// heldMs: time since then}. A new thread costs tens of milliseconds of CPU
// and thousands of page faults. It helps when a busy thread
//  - has computed for spawnDelayMs: another core may be free;
//  - is in its run but asleep: the snippet waits on a timer or I/O;
//  - has held its request for STUCK_BEFORE_RUN_MS without beginning it: a
//    leftover of an earlier snippet blocks the thread.
// It does not when the busy threads are short runs on a CPU or queued for
// one, or have answered and their results wait for this thread to read
// them: that is a saturated machine, where another thread only competes for
// the same CPUs (and is made again and again as bursts come and go). What
// cannot be read counts as helping, as before this rule.
const STUCK_BEFORE_RUN_MS = 1000;
function anotherWorkerHelps(busy, spawnDelayMs) {
  for (const b of busy) {
    if (b.cpuMs === null || b.cpuMs >= spawnDelayMs) return true;
    if (b.inRun && b.onCpu !== true) return true;
    if (!b.inRun && b.heldMs >= STUCK_BEFORE_RUN_MS) return true;
  }
  return busy.length === 0;
}

// residentBytes returns the process's resident memory, from
// /proc/self/statm (kept open) when it can, else from process.memoryUsage.
let statmFd; // undefined until first used, null when unavailable
let pageBytes = 4096;
function residentBytes() {
  if (statmFd === undefined) {
    try {
      statmFd = fs.openSync('/proc/self/statm', 'r');
      // statm counts pages: the page size is the power of two nearest to
      // node's own figure over it.
      const pages = Number((readProc(statmFd) || '').split(' ')[1]);
      if (pages > 0) pageBytes = 2 ** Math.round(Math.log2(process.memoryUsage.rss() / pages));
    } catch {
      statmFd = null;
    }
  }
  const pages = statmFd === null ? NaN : Number((readProc(statmFd) || '').split(' ')[1]);
  return Number.isSafeInteger(pages) && pages > 0 ? pages * pageBytes : process.memoryUsage.rss();
}

// usageOf is the usage of a finished run: the CPU time of the thread that
// ran it while it ran (null when either reading failed, or it never ran),
// and the process's resident memory now and at its peak (getrusage), in
// bytes.
function usageOf(req) {
  let cpu = null;
  if (req.cpu0 !== null && req.cpu1 !== null && req.cpu1 >= req.cpu0) cpu = req.cpu1 - req.cpu0;
  let rss = 0;
  let peak = 0;
  try {
    rss = residentBytes();
    // ru_maxrss (KiB); the kernel updates it lazily, so it can trail the
    // resident figure just read.
    peak = Math.max(process.resourceUsage().maxRSS * 1024, rss);
  } catch {
    // left at zero: not measured
  }
  return { cpu_ns: cpu, rss, peak_rss: peak };
}

// errorReply is the reply object of an error. Replies are objects until
// send encodes them whole.
function errorReply(id, code, message, consoleText, truncated) {
  return { id, error: { code, message }, console: consoleText || '', console_truncated: truncated === true };
}

// nestingDepth returns how deeply the JSON text s nests, counting no
// further than limit + 1. s is valid JSON: only brackets outside strings
// count, and a string ends at a quote no backslash escapes.
function nestingDepth(s, limit) {
  let depth = 0;
  let max = 0;
  let inString = false;
  for (let i = 0; i < s.length; i++) {
    const c = s.charCodeAt(i);
    if (inString) {
      if (c === 0x5c) i++; // backslash: skip the escaped character
      else if (c === 0x22) inString = false;
    } else if (c === 0x22) {
      inString = true;
    } else if (c === 0x5b || c === 0x7b) {
      if (++depth > max && (max = depth) > limit) return max;
    } else if (c === 0x5d || c === 0x7d) {
      depth--;
    }
  }
  return max;
}

// Agent routes requests to Workers. write(buf) sends bytes to the host; log
// writes one diagnostic line. It is separate from the process's streams so
// that tests can drive it in memory.
class Agent {
  constructor(opts) {
    this.o = { ...DEFAULTS, ...opts };
    this.write = this.o.write;
    this.log = this.o.log || (() => {});
    this.decoder = new FrameDecoder(this.o.maxRequestBytes, (b) => this.onFrame(b));
    this.pending = new Map(); // id -> request
    this.queue = []; // requests waiting for a Worker
    this.slots = new Set(); // every Worker, in any state
    this.pings = []; // ping ids waiting for the first ready Worker
    this.ready = false;
    this.warming = false;
    this.closed = false;
    this.spawnFailures = 0;
    this.stats = { runs: 0, timeouts: 0, replaced: 0, strays: 0, spawned: 0 };
    this.trimTimer = setInterval(() => this.trim(), Math.max(1000, this.o.idleTrimMs / 2));
    this.trimTimer.unref();
    this.sweepTimer = null;
    this.spawnTimer = null;
    this.deadlineTimer = null;
    this.deadlineAt = 0;
    this.spawn();
  }

  // Deadlines: one timer serves every pending request, armed for the
  // earliest deadline it must see. A request whose deadline comes after
  // the armed one arms nothing, so runs shorter than their timeout (nearly
  // all) cost no timer of their own; when the timer fires it answers the
  // requests due and arms itself for the next.
  armDeadline(at) {
    if (this.closed || (this.deadlineTimer !== null && this.deadlineAt <= at)) return;
    clearTimeout(this.deadlineTimer);
    this.deadlineAt = at;
    this.deadlineTimer = setTimeout(() => this.expireDue(), Math.max(0, Math.ceil(at - performance.now())));
  }

  expireDue() {
    this.deadlineTimer = null;
    const now = performance.now();
    let next = Infinity;
    for (const req of [...this.pending.values()]) {
      if (req.deadline <= now) this.expire(req);
      else if (req.deadline < next) next = req.deadline;
    }
    if (next !== Infinity) this.armDeadline(next);
  }

  // feed takes bytes from the host (borrowed: see FrameDecoder.push). It
  // throws when the stream is corrupt.
  feed(chunk, borrowed = false) {
    this.decoder.push(chunk, borrowed);
  }

  onFrame(body) {
    let m;
    try {
      m = JSON.parse(body.toString('utf8'));
    } catch (e) {
      throw new Error('request frame is not JSON: ' + e.message);
    }
    if (m === null || typeof m !== 'object' || !Number.isSafeInteger(m.id) || m.id < 0) {
      throw new Error('request frame has no valid id');
    }
    if (this.pending.has(m.id)) {
      this.send(errorReply(m.id, 'bad_request', `request id ${m.id} is already in flight`));
      return;
    }
    switch (m.op) {
      case 'ping':
        if (this.ready) this.pong(m.id);
        else this.pings.push(m.id);
        return;
      case 'run':
        return this.run(m);
      default:
        this.send(errorReply(m.id, 'bad_request', `unknown op ${JSON.stringify(String(m.op))}`));
    }
  }

  pong(id) {
    let busy = 0;
    for (const s of this.slots) if (s.req) busy++;
    this.send({ id, result: { ready: true, node: process.versions.node, modules: this.o.modulePaths, workers: this.slots.size, busy, queued: this.queue.length, ...this.stats } });
  }

  run(m) {
    if (typeof m.code !== 'string' || m.code === '') {
      this.send(errorReply(m.id, 'bad_request', 'run without code'));
      return;
    }
    const timeoutMs = Number.isFinite(m.timeout_ms) && m.timeout_ms > 0 ? Math.min(m.timeout_ms, 2 ** 31 - 1) : 10000;
    const req = {
      id: m.id,
      code: m.code,
      input: m.input,
      timeoutMs,
      // The limit the caller knows, for messages (timeout_ms is that less
      // the host's margin for the reply's trip).
      limitMs: Number.isSafeInteger(m.limit_ms) && m.limit_ms > 0 ? m.limit_ms : timeoutMs,
      maxResult: Number.isSafeInteger(m.max_result_bytes) && m.max_result_bytes > 0 ? m.max_result_bytes : this.o.maxResultBytes,
      maxConsole: Number.isSafeInteger(m.max_console_bytes) && m.max_console_bytes >= 0 ? m.max_console_bytes : this.o.maxConsoleBytes,
      slot: null,
      queuedAt: Date.now(),
      deadline: 0, // monotonic (performance.now()) time past which it is answered with a timeout
      cpu0: null, // the snippet thread's CPU time (ns) when it was handed the request
      cpu1: null, // and when it answered or overran
      internal: m.id < 0, // the agent's own warm-up (hosts' ids are never negative): no reply
    };
    req.deadline = performance.now() + timeoutMs;
    this.armDeadline(req.deadline);
    this.pending.set(req.id, req);
    this.stats.runs++;
    this.queue.push(req);
    this.dispatch();
  }

  // dispatch gives queued requests to idle Workers and starts Workers when
  // requests wait and there is room.
  dispatch() {
    while (this.queue.length > 0) {
      let idle = null;
      for (const s of this.slots) {
        if (s.state === 'idle') {
          idle = s;
          break;
        }
      }
      if (idle === null) break;
      const req = this.queue.shift();
      idle.state = 'busy';
      idle.req = req;
      req.slot = idle;
      idle.handedAt = Date.now();
      req.cpu0 = threadCpuNs(idle.statFd);
      idle.worker.postMessage({ t: 'run', id: req.id, code: req.code, input: req.input, maxResult: req.maxResult, maxConsole: req.maxConsole });
    }
    if (this.queue.length === 0) {
      if (this.spawnTimer !== null) {
        clearTimeout(this.spawnTimer);
        this.spawnTimer = null;
      }
      return;
    }
    let starting = 0;
    for (const s of this.slots) if (s.state === 'starting') starting++;
    // After repeated start failures only a request finding no Worker at all
    // retries, so a pids limit cannot turn this into a spawn loop.
    const mayStart = this.spawnFailures < 3 || this.slots.size === 0;
    if (this.queue.length <= starting || this.slots.size >= this.o.concurrency || !mayStart) return;
    // A Worker costs tens of milliseconds of CPU to start and megabytes to
    // keep: a request that finds the Workers busy waits spawnDelayMs for
    // one of them first. Most runs take far less, and a tenant whose
    // requests overlap now and then no longer grows a Worker for each.
    // Past that wait, a Worker starts only when it would help (see
    // anotherWorkerHelps); if not, the question comes again a delay later.
    const waited = Date.now() - this.queue[0].queuedAt;
    if (this.slots.size === 0 || (waited >= this.o.spawnDelayMs && this.anotherWorkerHelps())) {
      this.spawn();
    } else if (this.spawnTimer === null) {
      this.spawnTimer = setTimeout(() => {
        this.spawnTimer = null;
        this.dispatch();
      }, waited < this.o.spawnDelayMs ? this.o.spawnDelayMs - waited : this.o.spawnDelayMs);
    }
  }

  anotherWorkerHelps() {
    const busy = [];
    for (const s of this.slots) {
      if (s.state !== 'busy' || s.req === null) continue;
      const cpu = threadCpuNs(s.statFd);
      busy.push({
        inRun: Atomics.load(s.runState, 0) === 1,
        onCpu: this.o.threadOnCpu(s.tid),
        cpuMs: cpu === null || s.req.cpu0 === null ? null : (cpu - s.req.cpu0) / 1e6,
        heldMs: Date.now() - s.handedAt,
      });
    }
    return anotherWorkerHelps(busy, this.o.spawnDelayMs);
  }

  spawn() {
    if (this.closed) return;
    const slot = { worker: null, state: 'starting', req: null, idleSince: 0, error: null, tid: null, statFd: null, handedAt: 0, runState: new Int32Array(new SharedArrayBuffer(4)) };
    this.stats.spawned++;
    let w;
    try {
      const fromSource = typeof this.o.workerSource === 'string';
      w = new Worker(fromSource ? this.o.workerSource : this.o.workerFile, {
        eval: fromSource,
        // Not the agent's own arguments: with an eval'd agent they hold its source.
        execArgv: [],
        // runState: worker.js sets it to 1 while a snippet runs (see
        // anotherWorkerHelps). A snippet can reach it through workerData and
        // lie about its own thread: that only changes how many threads its
        // own sandbox starts, within the concurrency.
        workerData: { modulePaths: this.o.modulePaths, runState: slot.runState },
        stdout: true,
        stderr: true,
        resourceLimits: { maxOldGenerationSizeMb: this.o.workerHeapMb, maxYoungGenerationSizeMb: this.o.workerYoungMb },
      });
    } catch (e) {
      this.log(`cannot start a worker thread: ${e.message}`);
      this.spawnFailed(e);
      return;
    }
    slot.worker = w;
    this.slots.add(slot);
    // Output that bypassed the Worker's own capture: discard, never buffer.
    w.stdout.resume();
    w.stderr.resume();
    w.on('message', (m) => this.onWorkerMessage(slot, m));
    w.on('error', (e) => {
      slot.error = e;
    });
    w.on('exit', (code) => this.onWorkerExit(slot, code));
  }

  spawnFailed(e) {
    this.spawnFailures++;
    if (this.slots.size > 0) return; // the live Workers will serve the queue
    const msg = 'the sandbox could not start a worker thread: ' + (e && e.message);
    for (const id of this.pings.splice(0)) this.send(errorReply(id, 'internal', msg));
    for (const req of this.queue.splice(0)) this.finish(req, errorReply(req.id, 'internal', msg));
  }

  onWorkerMessage(slot, m) {
    if (m === null || typeof m !== 'object') return;
    switch (m.t) {
      case 'ready':
        if (slot.state !== 'starting') return;
        // The thread's id comes with 'ready', before any snippet ran in it.
        if (Number.isSafeInteger(m.tid) && m.tid > 0 && slot.statFd === null) {
          slot.tid = m.tid;
          slot.statFd = openThreadStat(m.tid);
        }
        this.spawnFailures = 0;
        slot.state = 'idle';
        slot.idleSince = Date.now();
        if (!this.ready && !this.warming) {
          // One run through this thread's own paths before the sandbox
          // counts as ready, so a new tenant's first request is a warm one.
          this.warming = true;
          this.run({ id: -1, code: WARMUP_CODE, input: { warm: [1, 'up'] }, timeout_ms: 5000 });
        }
        this.dispatch();
        return;
      case 'result': {
        const req = slot.req;
        if (req === null || m.id !== req.id || slot.state !== 'busy') return; // stale or forged
        req.cpu1 = threadCpuNs(slot.statFd);
        slot.req = null;
        req.slot = null;
        this.finish(req, resultReply(req, m));
        if (m.recycle === true) {
          this.retire(slot);
        } else {
          slot.state = 'idle';
          slot.idleSince = Date.now();
        }
        this.dispatch();
        return;
      }
      case 'stray':
        this.stats.strays++;
        if (this.stats.strays <= 10 || this.stats.strays % 1000 === 0) this.log(`request ${Number(m.id)}: ${String(m.what).slice(0, 200)}`);
        return;
    }
  }

  onWorkerExit(slot, code) {
    this.slots.delete(slot);
    if (slot.statFd !== null) {
      try {
        fs.closeSync(slot.statFd);
      } catch {
        // closed already
      }
      slot.statFd = null;
    }
    const req = slot.req;
    if (req !== null && slot.state !== 'dying') {
      slot.req = null;
      req.slot = null;
      const e = slot.error;
      if (e && e.code === 'ERR_WORKER_OUT_OF_MEMORY') {
        this.finish(req, errorReply(req.id, 'out_of_memory', `the snippet ran out of memory: its JavaScript heap is limited to ${this.o.workerHeapMb} MiB`));
      } else if (e) {
        this.finish(req, errorReply(req.id, 'code_error', uncaught(e)));
      } else {
        this.finish(req, errorReply(req.id, 'code_error', `the snippet ended its worker thread (exit code ${code})`));
      }
    } else if (slot.error && slot.state !== 'dying') {
      this.log(`idle worker thread failed: ${uncaught(slot.error).split('\n')[0]}`);
    }
    if (slot.state === 'starting') {
      this.log(`worker thread ended while starting (exit code ${code})`);
      this.spawnFailed(slot.error || new Error(`exit code ${code}`));
    }
    if (slot.state !== 'starting' || this.spawnFailures < 3) this.replace();
  }

  // replace keeps one Worker warm and starts more when requests wait.
  replace() {
    if (this.closed) return;
    this.stats.replaced++;
    let live = 0;
    for (const s of this.slots) if (s.state !== 'dying') live++;
    if (live === 0) this.spawn();
    this.dispatch();
  }

  retire(slot) {
    if (slot.state === 'dying') return;
    slot.state = 'dying';
    slot.worker.terminate().catch(() => {});
    // A Worker stuck where termination cannot reach it would hold its slot
    // for ever: past a while the whole agent gives up, and the host makes a
    // new sandbox.
    const t = setTimeout(() => {
      if (this.slots.has(slot) && !this.closed) this.o.onStuck(`a worker thread did not stop within ${this.o.stuckMs} ms of being terminated`);
    }, this.o.stuckMs);
    t.unref();
  }

  expire(req) {
    if (!this.pending.has(req.id)) return;
    this.stats.timeouts++;
    const msg = `the snippet did not finish within ${req.limitMs} ms (it never called back, or it loops)`;
    if (req.slot !== null) {
      const slot = req.slot;
      req.cpu1 = threadCpuNs(slot.statFd); // before the thread is terminated
      slot.req = null;
      req.slot = null;
      this.retire(slot);
    } else {
      const i = this.queue.indexOf(req);
      if (i >= 0) this.queue.splice(i, 1);
    }
    this.finish(req, errorReply(req.id, 'timeout', msg));
  }

  // finish answers req with the reply object r, once.
  finish(req, r) {
    if (!this.pending.delete(req.id)) return;
    if (req.internal) {
      this.becomeReady();
    } else {
      r.usage = usageOf(req);
      this.send(r);
    }
    // Also after the warm-up: a first request that overtook it left the
    // agent idle only now.
    if (this.pending.size === 0) this.idle();
  }

  // idle arranges a sweep: processes a snippet started and left running
  // must not run on while their tenant has no request in flight. Only then
  // is every process but the agent's surely a leftover; a sweep that found
  // some arranges another, for children forked meanwhile.
  idle() {
    if (this.o.sweep === null || this.sweepTimer !== null || this.closed) return;
    this.sweepTimer = setTimeout(() => {
      this.sweepTimer = null;
      if (this.pending.size === 0 && !this.closed && this.o.sweep()) this.idle();
    }, this.o.idleSweepMs);
  }

  // becomeReady answers the pings that waited for the first warm Worker.
  becomeReady() {
    if (this.ready) return;
    this.ready = true;
    for (const id of this.pings.splice(0)) this.pong(id);
  }

  // send encodes the reply object r whole, as one frame. A reply over the
  // frame limit is replaced by an output_too_large error of the same id.
  send(r) {
    let json;
    try {
      json = JSON.stringify(r);
    } catch (e) {
      // Not reached by what the agent builds (results are depth-checked):
      // a last resort, so that the request is still answered.
      json = JSON.stringify(errorReply(r.id, 'internal', `the reply could not be encoded: ${e && e.message}`));
    }
    let frame = encodeFrame(json);
    if (frame.length - 4 > this.o.maxFrameBytes) {
      frame = encodeFrame(JSON.stringify(errorReply(r.id, 'output_too_large', `the reply is ${frame.length - 4} bytes, over the frame limit of ${this.o.maxFrameBytes}`)));
    }
    this.write(frame);
  }

  trim() {
    const now = Date.now();
    let idle = 0;
    for (const s of this.slots) if (s.state === 'idle') idle++;
    for (const s of this.slots) {
      if (idle <= 1 || this.slots.size <= 1) return;
      if (s.state === 'idle' && now - s.idleSince >= this.o.idleTrimMs) {
        idle--;
        this.retire(s);
      }
    }
  }

  async close() {
    this.closed = true;
    clearInterval(this.trimTimer);
    clearTimeout(this.sweepTimer);
    clearTimeout(this.spawnTimer);
    clearTimeout(this.deadlineTimer);
    await Promise.all([...this.slots].map((s) => s.worker.terminate().catch(() => {})));
  }
}

// resultReply turns a worker thread's result message m for req into the
// reply object. m is untrusted: a snippet can post to its thread's
// parentPort. Its json must be the text of exactly one JSON value within
// req's limits, and is parsed here so that send encodes the reply whole;
// an error must carry a code a worker thread reports and a string message.
// Anything else is answered as an internal error.
function resultReply(req, m) {
  const consoleText = typeof m.console === 'string' ? m.console : '';
  const truncated = m.truncated === true;
  const malformed = () => errorReply(req.id, 'internal', 'worker sent a malformed result', consoleText, truncated);
  if (m.error !== undefined) {
    const e = m.error;
    if (e === null || typeof e !== 'object' || !WORKER_ERROR_CODES.has(e.code) || typeof e.message !== 'string') return malformed();
    return errorReply(req.id, e.code, e.message, consoleText, truncated);
  }
  if (typeof m.json !== 'string') return malformed();
  // The worker thread checks the limit before it posts; checked again so a
  // forged result is not parsed, whatever its size.
  const n = Buffer.byteLength(m.json, 'utf8');
  if (n > req.maxResult) return errorReply(req.id, 'output_too_large', `result is ${n} bytes of JSON, over the limit of ${req.maxResult}`, consoleText, truncated);
  let value;
  try {
    value = JSON.parse(m.json); // throws unless the text is exactly one JSON value
  } catch {
    return malformed();
  }
  // A value nests at most half its text's length deep: most results skip the scan.
  if (m.json.length > 2 * MAX_RESULT_DEPTH && nestingDepth(m.json, MAX_RESULT_DEPTH) > MAX_RESULT_DEPTH) {
    return errorReply(req.id, 'code_error', `the result nests deeper than ${MAX_RESULT_DEPTH} levels of arrays and objects`, consoleText, truncated);
  }
  return { id: req.id, result: value, console: consoleText, console_truncated: truncated };
}

// uncaught describes an error that ended a Worker.
function uncaught(e) {
  let s;
  try {
    s = e && e.name === 'UnhandledRejection' ? String(e.message) : 'uncaught exception: ' + (e && e.name ? e.name + ': ' : '') + (e && e.message !== undefined ? e.message : String(e));
  } catch {
    s = 'uncaught exception';
  }
  return s.length > 4096 ? s.slice(0, 4093) + '...' : s;
}

// --- process wiring --------------------------------------------------------

function envInt(name, def, min, max) {
  const v = process.env[name];
  if (v === undefined || v === '') return def;
  const n = Number(v);
  if (!Number.isSafeInteger(n) || n < min || n > max) {
    throw new Error(`${name}=${v} is not an integer in [${min}, ${max}]`);
  }
  return n;
}

// privateStdio gives the protocol descriptors of its own and points fds 0
// and 1 at /dev/null, so that a snippet writing to fd 1 (fs.writeSync(1))
// or reading fd 0 does not reach the protocol stream by accident. It is no
// defence against a snippet that looks for the new descriptors: the host
// treats the stream as hostile whatever happens here.
function privateStdio(log) {
  try {
    const inFd = fs.openSync('/proc/self/fd/0', 'r');
    const outFd = fs.openSync('/proc/self/fd/1', 'w');
    fs.closeSync(0);
    const z = fs.openSync('/dev/null', 'r');
    fs.closeSync(1);
    const o = fs.openSync('/dev/null', 'w');
    if (z !== 0 || o !== 1) log(`stdio not moved as expected (fds ${z}, ${o})`);
    return { inFd, outFd };
  } catch (e) {
    log(`keeping stdio on fds 0 and 1: ${e.message}`);
    return { inFd: 0, outFd: 1 };
  }
}

// killLeftovers kills every process of the container but Docker's init
// (PID 1) and this agent, and reports whether it found any. The agent
// starts no process of its own, and it is called only while no request is
// in flight: any other process is one a snippet left running. A child of
// this process whose worker thread was terminated can no longer be reaped
// and stays a zombie, holding a pid of the container's limit: past
// maxZombies the agent exits, idle, and the host makes a new sandbox.
function killLeftovers(log, maxZombies) {
  let names;
  try {
    names = fs.readdirSync('/proc');
  } catch {
    return false;
  }
  let killed = 0;
  let zombies = 0;
  for (const name of names) {
    const pid = Number(name);
    if (!/^[0-9]+$/.test(name) || pid === 1 || pid === process.pid) continue;
    let stat;
    try {
      stat = fs.readFileSync(`/proc/${name}/stat`, 'latin1');
    } catch {
      continue; // gone meanwhile
    }
    const state = stat.charAt(stat.lastIndexOf(')') + 2);
    if (state === 'Z' || state === 'X') {
      zombies++;
      continue;
    }
    try {
      process.kill(pid, 'SIGKILL');
      killed++;
    } catch {
      // gone meanwhile
    }
  }
  if (killed > 0) log(`killed ${killed} processes left running by snippets`);
  if (killed === 0 && zombies > maxZombies) {
    log(`${zombies} zombie processes hold the sandbox's pids: exiting`);
    process.exit(75);
  }
  return killed > 0;
}

// MIN_NODE_MAJOR is the oldest Node.js major version the agent runs on
// (it needs module.isBuiltin and process.getActiveResourcesInfo).
const MIN_NODE_MAJOR = 18;

// moduleDirs returns the directories snippets may require modules from,
// in lookup order: the image's NODE_PATH, npm's global folder
// (<prefix>/lib/node_modules, where `npm install -g` puts modules), then
// node's own global folders ($HOME/.node_modules, $HOME/.node_libraries,
// <prefix>/lib/node), where <prefix> is two levels above the node binary.
// Each is kept only if it exists, as its real path, and only if neither it
// nor any directory above it is writable by this process: the tenant's
// /tmp (and a $HOME in it) is never a module path. writable(dir) reports
// whether this process may write to dir.
function moduleDirs(env, execPath, writable) {
  const prefix = path.resolve(execPath, '..', '..');
  const home = env.HOME;
  const candidates = [
    ...(env.NODE_PATH || '').split(path.delimiter),
    path.join(prefix, 'lib', 'node_modules'),
    ...(home ? [path.resolve(home, '.node_modules'), path.resolve(home, '.node_libraries')] : []),
    path.join(prefix, 'lib', 'node'),
  ];
  const out = [];
  for (const c of candidates) {
    if (c === '' || !path.isAbsolute(c)) continue; // node would read a relative entry from the working directory: /tmp
    let real;
    try {
      real = fs.realpathSync(c);
      if (!fs.statSync(real).isDirectory()) continue;
    } catch {
      continue; // missing: the read-only root cannot gain it later
    }
    if (!out.includes(real) && !underWritable(real, writable)) out.push(real);
  }
  return out;
}

// underWritable reports whether dir or any directory above it is writable.
function underWritable(dir, writable) {
  for (let d = dir; ; d = path.dirname(d)) {
    if (writable(d)) return true;
    if (d === path.dirname(d)) return false;
  }
}

function isWritable(dir) {
  try {
    fs.accessSync(dir, fs.constants.W_OK);
    return true;
  } catch {
    return false;
  }
}

function streamOf(fd, readable) {
  const st = fs.fstatSync(fd);
  if (st.isFIFO() || st.isSocket()) return new net.Socket({ fd, readable, writable: !readable });
  return readable ? fs.createReadStream(null, { fd }) : fs.createWriteStream(null, { fd });
}

// main runs the agent on the process's stdin and stdout. extra may set
// workerSource (the eval'd agent of sandbox/program.go does).
function main(extra) {
  const log = (line) => {
    try {
      fs.writeSync(2, `isode-agent: ${line}\n`);
    } catch {
      // stderr is gone: nothing to tell
    }
  };
  const major = Number(process.versions.node.split('.')[0]);
  if (!(major >= MIN_NODE_MAJOR)) {
    log(`node ${process.version} is not supported: the sandbox needs Node.js ${MIN_NODE_MAJOR} or later`);
    process.exit(78);
  }
  let opts;
  try {
    opts = {
      concurrency: envInt('ISODE_CONCURRENCY', DEFAULTS.concurrency, 1, 256),
      workerHeapMb: envInt('ISODE_WORKER_HEAP_MB', DEFAULTS.workerHeapMb, 8, 1 << 16),
      maxFrameBytes: envInt('ISODE_MAX_FRAME_BYTES', DEFAULTS.maxFrameBytes, 4096, 1 << 30),
      maxRequestBytes: envInt('ISODE_MAX_REQUEST_BYTES', DEFAULTS.maxRequestBytes, 4096, 1 << 30),
      idleTrimMs: envInt('ISODE_IDLE_TRIM_MS', DEFAULTS.idleTrimMs, 1000, 1 << 30),
      spawnDelayMs: envInt('ISODE_SPAWN_DELAY_MS', DEFAULTS.spawnDelayMs, 0, 60000),
      modulePaths: moduleDirs(process.env, process.execPath, isWritable),
      ...extra,
    };
  } catch (e) {
    log(e.message);
    process.exit(2);
  }
  const { inFd, outFd } = privateStdio(log);
  const stdin = streamOf(inFd, true);
  let input = stdin;
  let output;
  const socketPath = process.env.ISODE_AGENT_SOCKET;
  if (socketPath) {
    // The host listens on a socket mounted for this sandbox alone: the
    // protocol runs over it, and stdin only tells when the host is gone.
    fs.closeSync(outFd);
    // onread: each read lands in one buffer and goes straight to the
    // decoder, without a readable stream's work per chunk (about a quarter
    // of this thread's CPU per run went to it with many tenants).
    const sock = net.createConnection({
      path: socketPath,
      onread: { buffer: Buffer.allocUnsafe(64 << 10), callback: (n, buf) => feed(buf.subarray(0, n), true) },
    });
    let connected = false;
    sock.once('connect', () => {
      connected = true;
    });
    sock.on('error', (e) => {
      if (connected) {
        log(`protocol socket failed: ${e.message}`);
        process.exit(1);
      }
      log(`cannot reach the host's socket ${socketPath}: ${e.message}`);
      process.exit(76);
    });
    stdin.on('data', () => {}); // nothing comes this way: only its end
    stdin.on('end', () => process.exit(0));
    stdin.on('error', () => process.exit(0));
    input = output = sock;
  } else {
    output = streamOf(outFd, false);
    output.on('error', (e) => {
      log(`protocol output failed: ${e.message}`);
      process.exit(1);
    });
  }
  const onStuck = (why) => {
    log(`${why}: exiting`);
    process.exit(70);
  };
  // Only in a container (the host sets the variable, Docker's init is the
  // parent): anywhere else, /proc lists processes that are not ours to kill.
  const sweep = process.env.ISODE_KILL_LEFTOVERS === '1' && process.ppid === 1 ? () => killLeftovers(log, 8) : null;
  const agent = new Agent({ ...opts, write: (b) => output.write(b), log, onStuck, sweep });
  function feed(chunk, borrowed) {
    try {
      agent.feed(chunk, borrowed);
    } catch (e) {
      log(`protocol error: ${e.message}`);
      process.exit(2);
    }
  }
  // On the socket, reads come through onread (above).
  if (!socketPath) input.on('data', (chunk) => feed(chunk, false));
  input.on('end', () => process.exit(0));
  input.on('error', (e) => {
    log(`protocol input failed: ${e.message}`);
    process.exit(1);
  });
}

if (require.main === module) main();

module.exports = { Agent, anotherWorkerHelps, FrameDecoder, encodeFrame, DEFAULTS, MAX_RESULT_DEPTH, MIN_NODE_MAJOR, moduleDirs, main };
