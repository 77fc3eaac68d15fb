package dockerx

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/docker/docker/api/types/container"
	"github.com/docker/docker/api/types/filters"
)

// Reap removes isode containers that no live owner tracks:
//   - this worker's containers (LabelWorker == Config.WorkerID) that this
//     Runtime neither tracks nor is creating, left by an earlier process
//     with the same id or by a failed removal;
//   - any worker's isode containers that are not running (created, exited,
//     dead) and were created more than grace ago: a crash between create
//     and start, or a container AutoRemove did not get to.
//
// Running containers of other workers are left alone: Reap cannot tell a
// live worker's from a dead one's. Most die with their worker (the agent
// sees its stdin close and exits, and AutoRemove deletes the container),
// but a snippet can keep its agent from ever seeing that end of input:
// StartReaper, given the fleet's membership, removes those. Reap returns
// how many containers it removed. Call it at start-up; StartReaper runs
// the same pass periodically.
func (r *Runtime) Reap(ctx context.Context, grace time.Duration) (int, error) {
	return r.reap(ctx, grace, nil)
}

// StartReaper starts the Runtime's reconciler: a goroutine that, every
// `every` until Close, makes the pass of Reap with grace (but see below for
// containers that are not running) and, when alive is not nil and
// Config.Fleet is not empty, also removes the containers of
// dead workers of this fleet: containers in any running state (running,
// paused, restarting) whose LabelFleet is Config.Fleet and whose
// LabelWorker is another worker's, when
//   - alive(worker) has returned false at every pass for at least grace,
//     as observed by this reaper (a new reaper observes for a full grace
//     before it removes anything), and
//   - the container was created more than grace ago.
//
// It never touches running containers of another fleet, or with no
// LabelFleet, or of its own worker id (those are Reap's). Other workers'
// containers that are not running are given at least Config.CreateTimeout
// instead of grace, when that is longer: a live worker may be between
// creating one and starting it for that long, and the rule applies to every
// isode container on the engine, whatever its fleet.
//
// alive reports whether the worker with that id (a LabelWorker value) is a
// live member of this fleet. It is called only from the reaper's goroutine,
// once per pass for each other worker that has running containers of this
// fleet; it must not block, and it must be safe to call while the caller
// updates what it reads. It must answer true whenever it cannot tell: before
// this process has heard the fleet's membership once, and while it is cut
// off from the fleet or its view may be stale (disconnected from NATS, its
// own heartbeat failing, a membership watch being re-established after a
// reconnect). Otherwise the reaper removes live workers' sandboxes one
// grace later: their tenants' runs fail with sandbox_crashed. grace must
// exceed the time membership takes to notice a worker (from the moment it
// creates its first container to the moment every member lists it) and the
// time a live worker may go unlisted (a missed heartbeat), with room to
// spare: a wrong removal kills a live tenant's sandbox, a late one only
// costs a container's resources for a while.
//
// Each Docker call gets its own deadline (Config.CallTimeout). A pass that
// fails is logged at Warn and the next one tries again; nothing the reaper
// meets is fatal. Every removal is logged at Info ("reaped container", with
// the container, its name, worker, tenant, fleet and state, and why), each
// pass at Debug.
//
// The first pass runs at once. StartReaper panics when every is not
// positive or grace is negative (as time.NewTicker does). A second call, or
// a call after Close, does nothing. Close stops the reaper and waits for it.
func (r *Runtime) StartReaper(every, grace time.Duration, alive func(workerID string) bool) {
	if every <= 0 {
		panic(fmt.Sprintf("dockerx: StartReaper interval %v is not positive", every))
	}
	if grace < 0 {
		panic(fmt.Sprintf("dockerx: StartReaper grace %v is negative", grace))
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed || r.ctx.Err() != nil {
		return
	}
	if r.reaping {
		r.log.Warn("StartReaper called again; the first reaper keeps its settings")
		return
	}
	r.reaping = true
	p := &reaper{
		fleet:   r.cfg.Fleet,
		self:    r.cfg.WorkerID,
		grace:   grace,
		stopped: max(grace, r.cfg.CreateTimeout),
		alive:   alive,
		missing: make(map[string]time.Time),
	}
	if p.fleet == "" && alive != nil {
		r.log.Warn("reaper: Config.Fleet is empty, so dead workers' running containers are not removed")
	}
	r.wg.Add(1)
	go r.reapEvery(every, p)
}

// reapEvery runs reaper passes until Close.
func (r *Runtime) reapEvery(every time.Duration, p *reaper) {
	defer r.wg.Done()
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		if r.isClosed() {
			return
		}
		start := time.Now()
		n, err := r.reap(r.ctx, p.stopped, p)
		if err != nil && r.ctx.Err() == nil {
			r.log.Warn("reaper pass failed; retrying at the next", "removed", n, "err", err)
		} else {
			r.log.Debug("reaper pass", "removed", n, "missing_workers", len(p.missing), "took", time.Since(start))
		}
		select {
		case <-r.ctx.Done():
			return
		case <-t.C:
		}
	}
}

func (r *Runtime) isClosed() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.closed
}

// reap makes one pass: Reap's rules, with grace for containers that are
// not running, and p's when p is not nil.
func (r *Runtime) reap(ctx context.Context, grace time.Duration, p *reaper) (int, error) {
	cctx, cancel := r.callCtx(ctx)
	list, err := r.cli.ContainerList(cctx, container.ListOptions{
		All:     true,
		Filters: filters.NewArgs(filters.Arg("label", LabelApp+"="+AppName)),
	})
	cancel()
	if err != nil {
		return 0, fmt.Errorf("list isode containers: %w", err)
	}
	// The snapshot is taken after the list: a container in the list is
	// either tracked or being created by now, or nobody's.
	r.mu.Lock()
	owned := make(map[string]bool, len(r.sandboxes)+len(r.creating))
	for id := range r.sandboxes {
		owned[id] = true
	}
	for name := range r.creating {
		owned["/"+name] = true
	}
	r.mu.Unlock()

	now := time.Now()
	if p != nil {
		p.observe(list, now)
	}
	removed := 0
	var errs []error
	for _, c := range list {
		why := r.whyReap(c, owned, grace, now)
		if why == "" && p != nil {
			why = p.whyOrphan(c, now)
		}
		if why == "" {
			continue
		}
		if err := r.remove(ctx, c.ID); err != nil {
			errs = append(errs, err)
			continue
		}
		r.log.Info("reaped container", "container", c.ID, "name", strings.TrimPrefix(firstName(c), "/"),
			"worker", c.Labels[LabelWorker], "tenant", c.Labels[LabelTenant], "fleet", c.Labels[LabelFleet],
			"state", c.State, "why", why)
		removed++
	}
	if err := r.reapNodeVolumes(ctx, p, now); err != nil {
		errs = append(errs, err)
	}
	return removed, errors.Join(errs...)
}

// whyReap says why Reap's rules remove c, or "" when they keep it.
func (r *Runtime) whyReap(c container.Summary, owned map[string]bool, grace time.Duration, now time.Time) string {
	if c.Labels[LabelWorker] == r.cfg.WorkerID {
		if owned[c.ID] {
			return ""
		}
		for _, n := range c.Names {
			if owned[n] || owned["/"+strings.TrimPrefix(n, "/")] {
				return ""
			}
		}
		return "this worker's container, which it does not track"
	}
	switch c.State {
	case container.StateCreated, container.StateExited, container.StateDead:
		if createdBefore(c, now.Add(-grace)) {
			return fmt.Sprintf("not running (%s) and created more than %v ago", c.State, grace)
		}
	}
	return ""
}

// createdBefore reports whether c was surely created before t. The engine
// lists creation times in whole seconds: a container is taken to be as
// young as that second allows, so that none is reaped inside its grace.
func createdBefore(c container.Summary, t time.Time) bool {
	return time.Unix(c.Created+1, 0).Before(t)
}

func firstName(c container.Summary) string {
	if len(c.Names) == 0 {
		return ""
	}
	return c.Names[0]
}

// reaper is the state of StartReaper's goroutine: which other workers of
// the fleet have been seen dead, since when.
type reaper struct {
	fleet, self string
	grace       time.Duration              // for dead workers' running containers
	stopped     time.Duration              // for Reap's rule on containers not running
	alive       func(workerID string) bool // nil: no orphans are removed
	missing     map[string]time.Time       // worker id -> first pass that found it not alive
}

// candidate reports whether c is a running container of another worker of
// this fleet: one that is removed if its worker is dead.
func (p *reaper) candidate(c container.Summary) bool {
	if p.alive == nil || p.fleet == "" || c.Labels[LabelFleet] != p.fleet {
		return false
	}
	if w := c.Labels[LabelWorker]; w == "" || w == p.self {
		return false
	}
	switch c.State {
	case container.StateRunning, container.StatePaused, container.StateRestarting:
		return true
	}
	return false
}

// observe asks alive about every worker with candidate containers in list
// and records since when each has been dead. A worker found alive, or with
// no candidate container left, is forgotten, which keeps missing as small
// as the fleet's dead workers with containers.
func (p *reaper) observe(list []container.Summary, now time.Time) {
	seen := make(map[string]bool)
	for _, c := range list {
		if !p.candidate(c) {
			continue
		}
		w := c.Labels[LabelWorker]
		if seen[w] {
			continue
		}
		seen[w] = true
		if p.alive(w) {
			delete(p.missing, w)
		} else if _, ok := p.missing[w]; !ok {
			p.missing[w] = now
		}
	}
	for w := range p.missing {
		if !seen[w] {
			delete(p.missing, w)
		}
	}
}

// whyOrphan says why c goes as a dead worker's container, or "".
func (p *reaper) whyOrphan(c container.Summary, now time.Time) string {
	if !p.candidate(c) {
		return ""
	}
	w := c.Labels[LabelWorker]
	since, ok := p.missing[w]
	if !ok || now.Sub(since) < p.grace || !createdBefore(c, now.Add(-p.grace)) {
		return ""
	}
	return fmt.Sprintf("its worker %s has not been alive for %v (grace %v)", w, now.Sub(since).Round(time.Millisecond), p.grace)
}
