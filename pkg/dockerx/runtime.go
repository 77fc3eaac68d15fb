package dockerx

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"sync"
	"time"

	cerrdefs "github.com/containerd/errdefs"
	"github.com/docker/docker/api/types/container"
	"github.com/docker/docker/api/types/image"
	"github.com/docker/docker/client"
	"github.com/isode-run/isode/pkg/protocol"
)

// DefaultSocketPath is the engine's socket when neither DOCKER_HOST nor
// ISODE_SOCKET_PATH says otherwise.
const DefaultSocketPath = "/var/run/docker.sock"

// Runtime makes and tracks the sandboxes of one worker. It owns an event
// watcher goroutine, background removals and, once started, the reaper
// (StartReaper); Close ends them.
type Runtime struct {
	cfg Config
	cli *client.Client
	log *slog.Logger

	ctx    context.Context // cancelled by Close
	cancel context.CancelFunc
	wg     sync.WaitGroup

	creates sync.WaitGroup // Creates in flight; Close waits for them

	mu        sync.Mutex
	closed    bool
	sandboxes map[string]*Sandbox // by container id
	creating  map[string]bool     // names of containers being created
	reaping   bool                // StartReaper has started the reaper
	sockBase  string              // this Runtime's directory of agent sockets; "": the attach transport
	sockLock  *os.File            // holds the lock on sockBase (openSocketBase) until releaseShared
	nodeVol   *nodeVolume         // the shared node (Config.ShareNode); nil: the image's own

	nodeArgs []string // node's arguments; nil: sandbox.Args() (tests compare others)
	// sockHook, when set (tests), is called with a sandbox's socket
	// directory before its container is created.
	sockHook func(dir string)
}

// New connects to the engine and checks that it can run sandboxes as cfg
// asks: the image is there and the OCI runtime, when one is named, is
// installed (ErrUnavailable otherwise; isolation is never silently
// weakened). The client honours DOCKER_HOST and the other DOCKER_*
// variables; without DOCKER_HOST it uses ISODE_SOCKET_PATH, then
// DefaultSocketPath. The API version is negotiated with the engine.
func New(ctx context.Context, cfg Config) (*Runtime, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	opts := []client.Opt{client.FromEnv, client.WithAPIVersionNegotiation()}
	if os.Getenv("DOCKER_HOST") == "" {
		p := os.Getenv("ISODE_SOCKET_PATH")
		if p == "" {
			p = DefaultSocketPath
		}
		opts = append(opts, client.WithHost("unix://"+p))
	}
	cli, err := client.NewClientWithOpts(opts...)
	if err != nil {
		return nil, fmt.Errorf("docker client: %w", err)
	}
	r := &Runtime{
		cfg:       cfg,
		cli:       cli,
		log:       cfg.Logger,
		sandboxes: make(map[string]*Sandbox),
		creating:  make(map[string]bool),
	}
	if r.log == nil {
		r.log = slog.New(slog.DiscardHandler)
	}
	r.ctx, r.cancel = context.WithCancel(context.Background())
	img, err := r.check(ctx)
	if err != nil {
		r.cancel()
		cli.Close()
		return nil, err
	}
	if cfg.ShareNode {
		if r.nodeVol, err = r.openNodeVolume(ctx, img); err != nil {
			r.log.Warn("sandboxes run the image's own node files, unshared", "err", err)
		}
	}
	if cfg.AgentSocketDir != "" {
		// Without it the attach streams still work: slower, never less safe.
		if r.sockBase, r.sockLock, err = openSocketBase(cfg.AgentSocketDir); err != nil {
			r.log.Warn(noSocketsWarning, "why", err)
		}
	}
	subscribed := make(chan error, 1)
	r.wg.Add(1)
	go r.watch(subscribed)
	t := time.NewTimer(cfg.CallTimeout)
	defer t.Stop()
	select {
	case err = <-subscribed:
	case <-t.C:
		err = errors.New("timed out")
	case <-ctx.Done():
		err = ctx.Err()
	}
	if err != nil {
		r.cancel()
		r.wg.Wait()
		_ = r.releaseShared(ctx)
		cli.Close()
		return nil, fmt.Errorf("subscribe to docker events: %w", err)
	}
	return r, nil
}

// check pings the engine and checks the image and the OCI runtime. It
// returns the image's inspection.
func (r *Runtime) check(ctx context.Context) (image.InspectResponse, error) {
	cctx, cancel := r.callCtx(ctx)
	defer cancel()
	if _, err := r.cli.Ping(cctx); err != nil {
		return image.InspectResponse{}, fmt.Errorf("ping docker engine at %s: %w", r.cli.DaemonHost(), err)
	}
	if r.cfg.Runtime != "" {
		info, err := r.cli.Info(cctx)
		if err != nil {
			return image.InspectResponse{}, fmt.Errorf("docker info: %w", err)
		}
		if _, ok := info.Runtimes[r.cfg.Runtime]; !ok {
			have := make([]string, 0, len(info.Runtimes))
			for name := range info.Runtimes {
				have = append(have, name)
			}
			return image.InspectResponse{}, fmt.Errorf("%w: the engine has no OCI runtime %q (it has %s)", ErrUnavailable, r.cfg.Runtime, strings.Join(have, ", "))
		}
	}
	img, err := r.cli.ImageInspect(cctx, r.cfg.Image)
	if err != nil {
		if cerrdefs.IsNotFound(err) {
			return img, fmt.Errorf("%w: image %s is not on the engine; %s", ErrUnavailable, r.cfg.Image, imageHowTo)
		}
		return img, fmt.Errorf("inspect image %s: %w", r.cfg.Image, err)
	}
	return img, nil
}

// Config returns the configuration the Runtime runs with.
func (r *Runtime) Config() Config { return r.cfg }

// callCtx bounds one Docker call by Config.CallTimeout.
func (r *Runtime) callCtx(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(ctx, r.cfg.CallTimeout)
}

// Create makes a sandbox ready to run code: created hardened, attached,
// started, and its agent has answered. tenant is the tenant it is for
// (protocol.TenantKey: the isolate key within its application)
// ("" for a free sandbox; it then carries no LabelTenant). ctx bounds the
// whole of it (Config.CreateTimeout when ctx has no deadline), every Docker
// call also by Config.CallTimeout. Any failure after the container was
// created removes it before Create returns. It returns ErrClosed after
// Close, and an error wrapping ErrNotReady when the agent did not answer.
func (r *Runtime) Create(ctx context.Context, tenant string) (*Sandbox, error) {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, r.cfg.CreateTimeout)
		defer cancel()
	}
	if tenant != "" {
		if err := protocol.ValidateTenantKey(tenant); err != nil {
			return nil, fmt.Errorf("create sandbox: %w", err)
		}
	}
	name := "isode-" + randomHex(8)
	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		return nil, ErrClosed
	}
	r.creating[name] = true
	r.creates.Add(1)
	r.mu.Unlock()
	defer r.creates.Done()

	s, err := r.create(ctx, name, tenant)
	if errors.Is(err, errSocketUnreachable) {
		// The Runtime went back to the attach transport: once more with it.
		s, err = r.create(ctx, name, tenant)
	}

	r.mu.Lock()
	delete(r.creating, name)
	r.mu.Unlock()
	return s, err
}

func (r *Runtime) create(ctx context.Context, name, tenant string) (_ *Sandbox, err error) {
	sock, err := r.listenAgent(name)
	if err != nil {
		return nil, err
	}
	if sock != nil {
		defer sock.close()
		if r.sockHook != nil {
			r.sockHook(sock.dir)
		}
	}
	cfg, host := containerSpec(&r.cfg, tenant, sock.hostDir(), r.nodeVol)
	if r.nodeArgs != nil {
		cfg.Cmd = r.nodeArgs
	}
	// Not cancelled with ctx, only bounded: a create cancelled half-way
	// (the pool closing) can still be completed by the engine after our
	// remove by name found nothing, leaving a container nobody tracks.
	// Once created, the steps below fail on ctx and remove it by id.
	cctx, cancel := r.callCtx(context.WithoutCancel(ctx))
	resp, err := r.cli.ContainerCreate(cctx, cfg, host, nil, nil, name)
	cancel()
	if err != nil && sock != nil && bindSourceMissing(err) {
		return nil, r.socketsUnreachable(err.Error())
	}
	if err != nil {
		// The engine may have made it even though the call failed (a
		// timeout): remove it by name.
		if rerr := r.remove(context.Background(), name); rerr != nil {
			r.log.Warn("remove after failed create", "name", name, "err", rerr)
		}
		return nil, fmt.Errorf("create container: %w", err)
	}
	s := newSandbox(r, resp.ID, name, tenant)
	defer func() {
		if err != nil {
			s.end(protocol.Errorf(protocol.CodeSandboxCrashed, "the sandbox failed to start"), false)
			if rerr := r.remove(context.Background(), resp.ID); rerr != nil {
				r.log.Warn("remove after failed start", "container", resp.ID, "err", rerr)
			}
			s.wg.Wait()
		}
	}()
	if !r.track(s) {
		return nil, ErrClosed
	}

	// Attach before start, or the agent's first output is lost.
	cctx, cancel = r.callCtx(ctx)
	hr, err := r.cli.ContainerAttach(cctx, resp.ID, container.AttachOptions{Stream: true, Stdin: true, Stdout: true, Stderr: true})
	cancel()
	if err != nil {
		return nil, fmt.Errorf("attach container: %w", err)
	}
	s.attach(hr.Conn, hr.Reader, sock != nil)

	cctx, cancel = r.callCtx(ctx)
	err = r.cli.ContainerStart(cctx, resp.ID, container.StartOptions{})
	cancel()
	if err != nil {
		return nil, fmt.Errorf("start container: %w", err)
	}
	if sock != nil {
		actx, cancel := context.WithTimeout(ctx, r.cfg.ReadyTimeout)
		conn, err := sock.accept(actx, s)
		cancel()
		if err != nil {
			return nil, r.socketFailed(s, err)
		}
		s.connect(conn)
	}

	pctx, cancel := context.WithTimeout(ctx, r.cfg.ReadyTimeout)
	defer cancel()
	if _, err := s.Ping(pctx); err != nil {
		msg := err.Error()
		if t := lastLine(s.StderrTail(), 300); t != "" {
			msg += "; agent stderr: " + t
		}
		return nil, fmt.Errorf("%w: %s", ErrNotReady, msg)
	}
	return s, nil
}

// track records a new sandbox; false after Close.
func (r *Runtime) track(s *Sandbox) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return false
	}
	r.sandboxes[s.id] = s
	return true
}

// forget drops a sandbox that is gone.
func (r *Runtime) forget(s *Sandbox) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.sandboxes[s.id] == s {
		delete(r.sandboxes, s.id)
	}
}

// lookup returns the tracked sandbox of a container id.
func (r *Runtime) lookup(id string) *Sandbox {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.sandboxes[id]
}

// Sandboxes returns the live sandboxes this Runtime tracks.
func (r *Runtime) Sandboxes() []*Sandbox {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := make([]*Sandbox, 0, len(r.sandboxes))
	for _, s := range r.sandboxes {
		out = append(out, s)
	}
	return out
}

// remove force-removes a container (id or name). A container that is gone
// or already being removed is no error.
func (r *Runtime) remove(ctx context.Context, ref string) error {
	ctx, cancel := r.callCtx(context.WithoutCancel(ctx))
	defer cancel()
	err := r.cli.ContainerRemove(ctx, ref, container.RemoveOptions{Force: true})
	switch {
	case err == nil || cerrdefs.IsNotFound(err):
		return nil
	case cerrdefs.IsConflict(err):
		// "Removal already in progress" (AutoRemove, or a concurrent
		// remove): wait until it is done, so that a caller told the
		// container is removed can rely on it.
		return r.waitRemoved(ctx, ref)
	}
	return fmt.Errorf("remove container %s: %w", ref, err)
}

// waitRemoved waits until a container being removed is gone.
func (r *Runtime) waitRemoved(ctx context.Context, ref string) error {
	okc, errc := r.cli.ContainerWait(ctx, ref, container.WaitConditionRemoved)
	select {
	case <-okc:
		return nil
	case err := <-errc:
		if cerrdefs.IsNotFound(err) {
			return nil
		}
		return fmt.Errorf("wait for removal of container %s: %w", ref, err)
	}
}

// removeInBackground removes a container without blocking the caller;
// Close waits for it.
func (r *Runtime) removeInBackground(id string) {
	r.mu.Lock()
	if r.ctx.Err() != nil {
		r.mu.Unlock()
		_ = r.remove(context.Background(), id) // Close is waiting: do it now
		return
	}
	r.wg.Add(1)
	r.mu.Unlock()
	go func() {
		defer r.wg.Done()
		if err := r.remove(context.Background(), id); err != nil {
			r.log.Warn("remove ended sandbox", "container", id, "err", err)
		}
	}()
}

// Close closes every sandbox (removing its container), stops the event
// watcher, the reaper and background work, waits for them, and closes the
// client. ctx bounds the
// removals. It is idempotent.
func (r *Runtime) Close(ctx context.Context) error {
	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		return nil
	}
	r.closed = true // from now on track refuses: the list below is complete
	list := make([]*Sandbox, 0, len(r.sandboxes))
	for _, s := range r.sandboxes {
		list = append(list, s)
	}
	r.mu.Unlock()

	errs := make([]error, len(list))
	var wg sync.WaitGroup
	sem := make(chan struct{}, 8)
	for i, s := range list {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer func() { <-sem; wg.Done() }()
			errs[i] = s.Close(ctx)
		}()
	}
	wg.Wait()
	// A Create in flight fails now (its sandbox was closed above, or track
	// refuses it) and removes its container: wait for that.
	r.creates.Wait()

	r.mu.Lock()
	r.cancel()
	r.mu.Unlock()
	r.wg.Wait()
	errs = append(errs, r.releaseShared(ctx))
	return errors.Join(append(errs, r.cli.Close())...)
}

// releaseShared removes what the Runtime keeps for all its sandboxes: the
// directory of their sockets and the shared node's volume. Their
// sandboxes must be gone.
func (r *Runtime) releaseShared(ctx context.Context) error {
	r.mu.Lock()
	base, lock := r.sockBase, r.sockLock
	r.sockBase, r.sockLock = "", nil
	r.mu.Unlock()
	var err error
	if base != "" {
		err = os.RemoveAll(base)
	}
	if lock != nil {
		lock.Close() // after the removal: nobody takes a live directory for a dead one
	}
	if r.nodeVol != nil {
		r.closeNodeVolume(ctx, r.nodeVol)
	}
	return err
}
