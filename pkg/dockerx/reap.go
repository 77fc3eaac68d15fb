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
// Running containers of other workers are left alone: when their worker
// dies, the agent sees its stdin close and exits, and AutoRemove deletes
// them. Reap returns how many containers it removed. Call it at start-up
// and now and then.
func (r *Runtime) Reap(ctx context.Context, grace time.Duration) (int, error) {
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

	removed := 0
	var errs []error
	for _, c := range list {
		if !r.reapable(c, owned, grace) {
			continue
		}
		if err := r.remove(ctx, c.ID); err != nil {
			errs = append(errs, err)
			continue
		}
		r.log.Info("reaped container", "container", c.ID, "worker", c.Labels[LabelWorker], "state", c.State)
		removed++
	}
	return removed, errors.Join(errs...)
}

func (r *Runtime) reapable(c container.Summary, owned map[string]bool, grace time.Duration) bool {
	if c.Labels[LabelWorker] == r.cfg.WorkerID {
		if owned[c.ID] {
			return false
		}
		for _, n := range c.Names {
			if owned[n] || owned["/"+strings.TrimPrefix(n, "/")] {
				return false
			}
		}
		return true
	}
	switch c.State {
	case container.StateCreated, container.StateExited, container.StateDead:
		return time.Since(time.Unix(c.Created, 0)) > grace
	}
	return false
}
