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
// defines pipes(): the agent's protocol pipes as /proc/self/fd shows them
// to a snippet. Each is {in, out}: the fd of the only pipe the process
// holds by a single read-only descriptor (the agent's input, reopened from
// fd 0) and the only one held by a single write-only descriptor (its
// output, moved off fd 1); libuv's own pipes come in pairs, stderr is fd 2.
const PipesJS = `function pipes() {
  const fs = require('fs');
  const byPipe = new Map();
  for (const n of fs.readdirSync('/proc/self/fd')) {
    let link, flags;
    try {
      link = fs.readlinkSync('/proc/self/fd/' + n);
      flags = parseInt(/flags:\s*([0-7]+)/.exec(fs.readFileSync('/proc/self/fdinfo/' + n, 'latin1'))[1], 8);
    } catch { continue; }
    if (!link.startsWith('pipe:') || n === '2') continue;
    byPipe.set(link, (byPipe.get(link) || []).concat([{ n: Number(n), flags }]));
  }
  const single = [...byPipe.values()].filter((fds) => fds.length === 1).map((fds) => fds[0]);
  const ins = single.filter((f) => (f.flags & 3) === 0), outs = single.filter((f) => (f.flags & 3) === 1);
  if (ins.length !== 1 || outs.length !== 1) throw new Error('want one protocol pipe each way, found ' + JSON.stringify([...byPipe.values()]));
  return { in: ins[0].n, out: outs[0].n };
}
`

// HoldStdin is a snippet that opens a write end of its agent's input pipe
// and keeps it open, so that the agent never sees end of input and its
// sandbox outlives its worker. The pipe belongs to the sandbox user
// (Docker gives the container's stdin to its user), so this needs no
// privilege. It answers "held".
const HoldStdin = `return function (cb) {
  ` + PipesJS + `
  require('fs').openSync('/proc/self/fd/' + pipes().in, 'w');
  cb(null, 'held');
}`
