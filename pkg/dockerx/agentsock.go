package dockerx

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

// The unix-socket transport (Config.AgentSocketDir). Frames on the attach
// stream go through dockerd and the container's containerd shim both ways,
// which cost more CPU than the run itself with many busy tenants. With a
// socket directory the worker listens, for each sandbox, on a socket in a
// directory of its own that is bind-mounted into that sandbox alone; the
// agent connects to it at start and the protocol runs over that
// connection, host to container, with nothing in between. The attach
// stream stays, for the agent's stderr and as its dead-man switch, and the
// agent also exits when the socket closes.

// Where the agent finds its socket: the per-sandbox directory is mounted
// read-only there (connecting needs no write access to the mount).
const (
	agentSocketMount = "/run/isode"
	agentSocketName  = "a"
	// exitNoSocket is the agent's exit code when it cannot reach its socket
	// (sandbox/agent.js): the directory is not what the engine sees.
	exitNoSocket = 76
)

// maxSocketPath is the longest unix socket path Linux takes (sun_path less
// its terminating NUL).
const maxSocketPath = 107

// noSocketsWarning is logged, once, when a Runtime goes back to the
// attach transport.
const noSocketsWarning = "the sandboxes cannot reach their sockets: using the attach streams instead (slower)"

// errSocketUnreachable is why a create failed when the engine did not
// mount the socket directory or the agent could not reach its socket.
var errSocketUnreachable = errors.New("the sandbox could not reach its socket: the socket directory is not at the same path on the Docker engine's host")

// socketBasePrefix starts the name of each Runtime's directory under the
// socket directory. A Runtime holds an exclusive flock on its directory
// for its life, and the kernel drops it when the process dies, so a
// directory nobody holds is a dead Runtime's and the next Runtime to start
// removes it (removeDeadSocketBases). Directories of workers from before
// the lock (named w...) are left alone: their owner may still be alive.
const socketBasePrefix = "l"

// deadSocketBaseAge is how long a directory must have been unchanged before
// it may be taken for a dead Runtime's: a Runtime locks its own within
// microseconds of making it, and adds to it as sandboxes come.
const deadSocketBaseAge = 10 * time.Second

// openSocketBase makes this Runtime's private directory under dir, where
// each sandbox gets a directory of its own, and locks it (the returned
// file holds the lock: close it when the directory is removed). Only the
// engine (root) needs to reach into it: it is the bind mounts' source.
// dir must be this user's and writable by nobody else: whoever may rename
// entries in it could swap a sandbox's directory for one of their own.
func openSocketBase(dir string) (string, *os.File, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", nil, fmt.Errorf("agent socket directory: %w", err)
	}
	fi, err := os.Lstat(dir)
	if err != nil {
		return "", nil, fmt.Errorf("agent socket directory: %w", err)
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !fi.IsDir() || fi.Mode().Perm()&0o022 != 0 || (ok && int(st.Uid) != os.Getuid()) {
		return "", nil, fmt.Errorf("%w: agent socket directory %s must be a directory of this user's that nobody else may write to", ErrInvalidConfig, dir)
	}
	removeDeadSocketBases(dir)
	base, err := os.MkdirTemp(dir, socketBasePrefix)
	if err != nil {
		return "", nil, fmt.Errorf("agent socket directory: %w", err)
	}
	lock, err := lockDir(base)
	if err != nil {
		_ = os.RemoveAll(base)
		return "", nil, fmt.Errorf("agent socket directory: lock %s: %w", base, err)
	}
	return base, lock, nil
}

// lockDir opens dir and takes an exclusive flock on it, without waiting:
// it fails when another open file holds one.
func lockDir(dir string) (*os.File, error) {
	f, err := os.Open(dir)
	if err != nil {
		return nil, err
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		f.Close()
		return nil, err
	}
	return f, nil
}

// isSocketBaseName reports whether name has the shape of a Runtime's
// directory as openSocketBase makes it (the prefix, then MkdirTemp's
// decimal digits): a socket directory the operator chose may hold other
// directories (lost+found, say), never to be taken for a dead Runtime's.
func isSocketBaseName(name string) bool {
	digits, ok := strings.CutPrefix(name, socketBasePrefix)
	if !ok || digits == "" {
		return false
	}
	for _, c := range digits {
		if c < '0' || c > '9' {
			return false
		}
	}
	return true
}

// removeDeadSocketBases removes, under dir, the directories of Runtimes
// that are gone without removing theirs (a worker killed or crashed): each
// holds the sockets of sandboxes that had not connected yet. Those of live
// Runtimes are locked.
func removeDeadSocketBases(dir string) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return
	}
	for _, e := range entries {
		if !e.IsDir() || !isSocketBaseName(e.Name()) {
			continue
		}
		if fi, err := e.Info(); err != nil || time.Since(fi.ModTime()) < deadSocketBaseAge {
			continue
		}
		p := filepath.Join(dir, e.Name())
		lock, err := lockDir(p)
		if err != nil {
			continue // held: its Runtime is alive
		}
		_ = os.RemoveAll(p)
		lock.Close()
	}
}

// agentSocket is the listening end of one sandbox's socket.
type agentSocket struct {
	dir string // on this machine and, at the same path, on the engine's host
	ln  *net.UnixListener
}

// listenAgent makes the socket of sandbox name; nil with the attach
// transport.
func (r *Runtime) listenAgent(name string) (*agentSocket, error) {
	r.mu.Lock()
	base := r.sockBase
	r.mu.Unlock()
	if base == "" {
		return nil, nil
	}
	dir := filepath.Join(base, name)
	if err := os.Mkdir(dir, 0o700); err != nil {
		return nil, fmt.Errorf("agent socket: %w", err)
	}
	// The agent runs as SandboxUser: it must be able to reach the socket
	// in the directory mounted for it, and connect (write) to it.
	path := filepath.Join(dir, agentSocketName)
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err == nil {
		err = errors.Join(os.Chmod(path, 0o666), os.Chmod(dir, 0o711))
	}
	if err != nil {
		if ln != nil {
			ln.Close()
		}
		os.RemoveAll(dir)
		return nil, fmt.Errorf("agent socket: %w", err)
	}
	return &agentSocket{dir: dir, ln: ln}, nil
}

// hostDir is the directory to mount into the sandbox, "" for none.
func (a *agentSocket) hostDir() string {
	if a == nil {
		return ""
	}
	return a.dir
}

// accept waits for the agent of s to connect, until ctx ends or s dies.
// The listener takes one connection only: a snippet that later tries to
// connect finds no socket.
func (a *agentSocket) accept(ctx context.Context, s *Sandbox) (net.Conn, error) {
	stop := make(chan struct{})
	defer close(stop)
	go func() {
		select {
		case <-ctx.Done():
		case <-s.died:
		case <-s.done:
		case <-stop:
			return
		}
		_ = a.ln.SetDeadline(time.Now()) // wakes the Accept below
	}()
	c, err := a.ln.AcceptUnix()
	if err != nil {
		return nil, fmt.Errorf("waiting for the agent to connect: %w", err)
	}
	return c, nil
}

// close removes the socket and its directory: the connection, once made,
// needs neither. A directory still mounted somewhere may refuse; Runtime
// Close removes what is left.
func (a *agentSocket) close() {
	_ = a.ln.Close() // unlinks the socket
	_ = os.Remove(a.dir)
}

// socketFailed turns a failed wait for the agent's connection into
// Create's error. An agent that said it cannot reach its socket means the
// engine sees another directory at that path (a worker in a container
// without the directory shared at the same path, a remote engine): the
// Runtime then goes back to the attach transport, logged once, so that
// the worker serves on, slower.
func (r *Runtime) socketFailed(s *Sandbox, err error) error {
	t := time.NewTimer(dieEventWait)
	defer t.Stop()
	select {
	case <-s.died:
	case <-t.C:
	}
	s.mu.Lock()
	exit := s.exit
	stderr := lastLine(s.stderr.String(), 300)
	s.mu.Unlock()
	if exit == nil || exit.code != exitNoSocket {
		if stderr != "" {
			err = fmt.Errorf("%w; agent stderr: %s", err, stderr)
		}
		return fmt.Errorf("%w: %w", ErrNotReady, err)
	}
	return fmt.Errorf("%w: %w", ErrNotReady, r.socketsUnreachable(stderr))
}

// socketsUnreachable makes the Runtime go back to the attach transport,
// logged once, and returns errSocketUnreachable (Create then tries again).
func (r *Runtime) socketsUnreachable(why string) error {
	r.mu.Lock()
	base := r.sockBase
	r.sockBase = ""
	r.mu.Unlock()
	if base != "" {
		r.log.Warn(noSocketsWarning+"; share the socket directory at the same path with the Docker engine's host, or set it to none",
			"dir", filepath.Dir(base), "why", why)
		_ = os.RemoveAll(base)
	}
	return errSocketUnreachable
}

// bindSourceMissing reports whether the engine refused a container because
// a bind mount's source does not exist on its host: it does not see the
// worker's directory (a worker in a container without it shared, or a
// remote engine).
func bindSourceMissing(err error) bool {
	return strings.Contains(err.Error(), "bind source path does not exist")
}
