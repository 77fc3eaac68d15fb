package fleet

import (
	"context"
	"errors"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// shardLoop pulls one shard's consumer while the worker owns it.
type shardLoop struct {
	shard  int
	cancel context.CancelFunc
	done   chan struct{}
}

func (l *shardLoop) stop() { l.cancel() }

func (w *Worker) startShard(shard int, cons jetstream.Consumer) *shardLoop {
	ctx, cancel := context.WithCancel(context.Background())
	l := &shardLoop{shard: shard, cancel: cancel, done: make(chan struct{})}
	go func() {
		defer close(l.done)
		w.pull(ctx, shard, cons)
	}()
	return l
}

// pull takes requests of one shard while there is room for them. It keeps
// one long-lived pull subscription (the client library refills it in the
// background, PullBuffer messages at a time), so the warm path costs no
// subscription or pull request of its own. When ctx ends it drains: the
// messages already delivered to this worker are handled, not dropped.
func (w *Worker) pull(ctx context.Context, shard int, cons jetstream.Consumer) {
	log := w.log.With().Int("shard", shard).Logger()
	backoff := newBackoff(100*time.Millisecond, 5*time.Second)
	for ctx.Err() == nil {
		it, err := cons.Messages(
			jetstream.PullMaxMessages(w.cfg.PullBuffer),
			jetstream.PullExpiry(w.cfg.FetchWait),
			// When many requests are handed back (nak), the iterator can
			// believe a pull is still open after the server has finished it,
			// and takes nothing more until a heartbeat is missed: with the
			// default (half the expiry) a flooded shard stalled for 10 s.
			// A short heartbeat bounds such a stall to about two of them.
			jetstream.PullHeartbeat(w.cfg.PullHeartbeat),
		)
		if err != nil {
			log.Warn().Err(err).Msg("pull requests")
			backoff.sleep(ctx)
			continue
		}
		stopDrain := context.AfterFunc(ctx, it.Drain)
		for {
			if ctx.Err() == nil {
				// At capacity: stop taking; what is buffered waits.
				_ = w.gate.wait(ctx)
			}
			msg, err := it.Next()
			if errors.Is(err, jetstream.ErrMsgIteratorClosed) {
				break
			}
			if err != nil {
				log.Debug().Err(err).Msg("pull requests")
				continue
			}
			backoff.reset()
			w.gate.take()
			w.handlers.Add(1)
			go w.handle(msg, shard)
		}
		stopDrain()
		if ctx.Err() == nil {
			// The iterator ended on its own (connection closed): start over.
			backoff.sleep(ctx)
		}
	}
}

// backoff is a capped exponential delay.
type backoff struct {
	min, max, cur time.Duration
}

func newBackoff(min, max time.Duration) *backoff { return &backoff{min: min, max: max, cur: min} }

func (b *backoff) reset() { b.cur = b.min }

func (b *backoff) sleep(ctx context.Context) {
	t := time.NewTimer(b.cur)
	defer t.Stop()
	select {
	case <-t.C:
	case <-ctx.Done():
	}
	b.cur = min(b.cur*2, b.max)
}
