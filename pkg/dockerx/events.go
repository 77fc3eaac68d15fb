package dockerx

import (
	"context"
	"fmt"
	"strconv"
	"time"

	"github.com/docker/docker/api/types/events"
	"github.com/docker/docker/api/types/filters"
)

// watch follows the engine's die and oom events of this worker's containers
// and hands them to their sandboxes, until Close. After a stream error it
// resubscribes from the last event seen, so none is lost. The first
// subscription's outcome goes to subscribed.
func (r *Runtime) watch(subscribed chan<- error) {
	defer r.wg.Done()
	since := time.Now()
	backoff := 50 * time.Millisecond
	for first := true; ; first = false {
		f := filters.NewArgs(
			filters.Arg("type", string(events.ContainerEventType)),
			filters.Arg("event", string(events.ActionDie)),
			filters.Arg("event", string(events.ActionOOM)),
			filters.Arg("label", LabelWorker+"="+r.cfg.WorkerID),
		)
		opts := events.ListOptions{Filters: f}
		if !first {
			opts.Since = fmt.Sprintf("%d.%09d", since.Unix(), since.Nanosecond())
		}
		msgs, errs := r.cli.Events(r.ctx, opts)
		if first {
			// Events returns once the engine answered the subscription, or
			// with the error already queued.
			select {
			case err := <-errs:
				subscribed <- err
				return
			default:
				subscribed <- nil
			}
		}
		err := r.follow(msgs, errs, &since)
		if r.ctx.Err() != nil {
			return
		}
		r.log.Warn("docker event stream ended; resubscribing", "err", err, "backoff", backoff)
		select {
		case <-r.ctx.Done():
			return
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 2*time.Second)
	}
}

// follow handles events until the stream fails.
func (r *Runtime) follow(msgs <-chan events.Message, errs <-chan error, since *time.Time) error {
	for {
		select {
		case m := <-msgs:
			if m.TimeNano > 0 {
				*since = time.Unix(0, m.TimeNano)
			}
			r.onEvent(m)
		case err := <-errs:
			return err
		case <-r.ctx.Done():
			return context.Cause(r.ctx)
		}
	}
}

func (r *Runtime) onEvent(m events.Message) {
	s := r.lookup(m.Actor.ID)
	if s == nil {
		return
	}
	switch m.Action {
	case events.ActionOOM:
		s.noteOOM()
	case events.ActionDie:
		code, err := strconv.Atoi(m.Actor.Attributes["exitCode"])
		if err != nil {
			code = -1
		}
		s.noteDie(code)
	}
}
