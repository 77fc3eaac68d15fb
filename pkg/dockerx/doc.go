// Package dockerx runs isode sandboxes as hardened Docker containers.
//
// A Runtime makes sandboxes for one worker: each is a container of the
// sandbox image (any image with Node.js; the default is built in sandbox/)
// whose only process, the agent, runs tenants' snippets in worker threads.
// The image supplies node only: the agent's source (package sandbox) is
// passed to it on its command line, and Runtime.CheckImage checks once
// that this works with the configured image. The Runtime creates every
// container hardened (no network, read-only root, a small tmpfs /tmp, no
// capabilities, no-new-privileges, the default seccomp profile, a non-root
// user, an init, no IPC namespace sharing, memory without swap, CPU, pids and
// nofile limits, no logging, no mounts), labels it, and removes it on any
// failure after create.
//
// # Transport
//
// The host talks to the agent over the container's attached stdin and
// stdout (Tty off), through the Docker API only: it works unchanged when the
// worker itself runs in a container with the Docker socket mounted, and with
// a remote daemon, and the container needs neither network nor mounts.
// Docker multiplexes stdout and stderr with 8-byte headers; one goroutine
// per sandbox reads them and feeds stdout to the frame parser and stderr to
// a bounded tail. Frames, both ways, are a 4-byte big-endian length and a
// JSON object; requests carry ids. Everything that comes out of a container
// is treated as hostile: an oversize length, a frame that is not the JSON
// the agent sends, an unknown id or a stray byte means the stream can no
// longer be trusted, and the sandbox is failed (its runs get
// sandbox_crashed). stdin is opened with StdinOnce: when the worker dies,
// its connections close, the agent sees end of input and exits, and
// AutoRemove deletes the container: a dead-man switch.
//
// # Reaping
//
// The dead-man switch is not enough on its own: a snippet can open another
// write end of its agent's stdin pipe (through /proc/self/fd; the pipe
// belongs to the sandbox user), and that agent never sees end of input.
// Every container is labelled with its worker (LabelWorker), the tenant it
// was made for (LabelTenant) and, when Config.Fleet is set, its fleet
// (LabelFleet). Reap, at start-up, removes this worker's untracked
// containers and any isode container that is not running past a grace.
// StartReaper repeats that periodically and, told by the caller which
// workers are alive, removes running containers of this fleet whose worker
// has been dead for the grace. It never removes another fleet's running
// containers.
//
// # Deaths and deadlines
//
// A Runtime watches the engine's event stream (die and oom events of its
// own containers); together with the end of a sandbox's stdout this notices
// a death within a second and fails its runs with out_of_memory or
// sandbox_crashed. Every Docker call has a deadline. A run whose agent does
// not even answer its own timeout (a paused or wedged container) fails with
// timeout and closes the sandbox instead of hanging.
package dockerx
