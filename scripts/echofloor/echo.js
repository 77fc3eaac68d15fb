// The echo process of scripts/echofloor: node echo.js SOCKET MODE.
// direct answers each 64-byte frame on the main thread; hop passes it to a
// worker thread and back (JSON in and out), as isode's agent does.
'use strict';
const net = require('net');
const { Worker } = require('worker_threads');

const [path, mode] = process.argv.slice(2);
let worker = null;
const pending = new Map();
let seq = 0;
if (mode === 'hop') {
  worker = new Worker(
    `const { parentPort } = require('worker_threads');
     parentPort.on('message', (m) => parentPort.postMessage({ id: m.id, r: JSON.stringify({ ok: JSON.parse(m.b).x }) }));`,
    { eval: true },
  );
  worker.on('message', (m) => {
    const s = pending.get(m.id);
    pending.delete(m.id);
    if (s && !s.destroyed) s.write(m.r.padEnd(64));
  });
}
net
  .createServer((s) => {
    s.on('error', () => {});
    s.on('data', (b) => {
      if (worker === null) {
        s.write(b);
        return;
      }
      const id = ++seq;
      pending.set(id, s);
      worker.postMessage({ id, b: b.toString('latin1').trim() });
    });
  })
  .listen(path);
