package fleet

import (
	"context"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// keepAlive tells JetStream the request is still being worked on (see
// progress) until the returned stop is called.
func (w *Worker) keepAlive(msg jetstream.Msg) (stop func()) {
	t := &tracked{msg: msg, since: time.Now()}
	w.progressMu.Lock()
	w.progress[t] = struct{}{}
	w.progressMu.Unlock()
	return func() {
		w.progressMu.Lock()
		delete(w.progress, t)
		w.progressMu.Unlock()
	}
}

// tracked is a request in progress.
type tracked struct {
	msg   jetstream.Msg
	since time.Time
}

// signalProgress runs until ctx ends: every AckWait/3 it sends a progress
// signal for each request held longer than that, so JetStream does not
// redeliver requests that wait in the pool or run long. One goroutine
// serves every request.
func (w *Worker) signalProgress(ctx context.Context) {
	every := w.cfg.AckWait / 3
	t := time.NewTicker(every)
	defer t.Stop()
	var due []jetstream.Msg
	for {
		select {
		case <-ctx.Done():
			return
		case now := <-t.C:
			due = due[:0]
			w.progressMu.Lock()
			for r := range w.progress {
				if now.Sub(r.since) >= every {
					due = append(due, r.msg)
				}
			}
			w.progressMu.Unlock()
			for _, m := range due {
				if err := m.InProgress(); err != nil {
					w.log.Debug().Err(err).Msg("signal progress")
				}
			}
		}
	}
}
