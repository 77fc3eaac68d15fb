package testenv

import (
	"bytes"
	"sync"
)

// SyncBuffer collects a log written from several goroutines, for
// assertions on what a worker or a Runtime logged.
type SyncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *SyncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *SyncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// PipesJS is JavaScript, for snippets that attack their own sandbox, that
// defines pipes(): the agent's protocol streams as /proc/self/fd shows them
// to a snippet. It returns {in, out}: in is the fd of the only pipe the
// process holds by a single read-only descriptor (the agent's stdin,
// reopened from fd 0); out is the only pipe held by a single write-only
// descriptor (its output, moved off fd 1) or, when the agent speaks over
// its unix socket (ISODE_AGENT_SOCKET), that socket, the process's only
// one. libuv's own pipes come in pairs, stderr is fd 2.
const PipesJS = `function pipes() {
  const fs = require('fs');
  const byPipe = new Map();
  const sockets = [];
  for (const n of fs.readdirSync('/proc/self/fd')) {
    let link, flags;
    try {
      link = fs.readlinkSync('/proc/self/fd/' + n);
      flags = parseInt(/flags:\s*([0-7]+)/.exec(fs.readFileSync('/proc/self/fdinfo/' + n, 'latin1'))[1], 8);
    } catch { continue; }
    if (link.startsWith('socket:')) sockets.push(Number(n));
    if (!link.startsWith('pipe:') || n === '2') continue;
    byPipe.set(link, (byPipe.get(link) || []).concat([{ n: Number(n), flags }]));
  }
  const single = [...byPipe.values()].filter((fds) => fds.length === 1).map((fds) => fds[0]);
  const ins = single.filter((f) => (f.flags & 3) === 0), outs = single.filter((f) => (f.flags & 3) === 1).map((f) => f.n);
  const out = outs.length > 0 ? outs : sockets;
  if (ins.length !== 1 || out.length !== 1) throw new Error('want one protocol stream each way, found pipes ' + JSON.stringify([...byPipe.values()]) + ' and sockets ' + JSON.stringify(sockets));
  return { in: ins[0].n, out: out[0] };
}
`

// HoldStdin is a snippet that opens a write end of its agent's input pipe
// and keeps it open, so that the agent never sees end of input and its
// sandbox outlives its worker: with the attach transport only (with a
// unix socket, the agent also exits when the socket ends). The pipe belongs to the sandbox user
// (Docker gives the container's stdin to its user), so this needs no
// privilege. It answers "held".
const HoldStdin = `return function (cb) {
  ` + PipesJS + `
  require('fs').openSync('/proc/self/fd/' + pipes().in, 'w');
  cb(null, 'held');
}`
