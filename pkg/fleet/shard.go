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

// pull fetches requests of one shard while there is room for them (see
// gate). An idle shard keeps a pull for one message open; a shard whose
// last batch came back full doubles its next batch, up to MaxBatch and the
// room left.
func (w *Worker) pull(ctx context.Context, shard int, cons jetstream.Consumer) {
	log := w.log.With().Int("shard", shard).Logger()
	backoff := newBackoff(100*time.Millisecond, 5*time.Second)
	batch := 1
	for ctx.Err() == nil {
		extra, err := w.gate.wait(ctx, min(batch, w.cfg.MaxBatch)-1)
		if err != nil {
			return
		}
		n := 1 + extra
		fctx, cancel := context.WithTimeout(ctx, w.cfg.FetchWait)
		msgs, err := cons.Fetch(n, jetstream.FetchContext(fctx))
		if err != nil {
			cancel()
			w.gate.unreserve(extra)
			log.Warn().Err(err).Msg("pull requests")
			backoff.sleep(ctx)
			continue
		}
		got := 0
		for msg := range msgs.Messages() {
			w.gate.take(got > 0 && got <= extra)
			got++
			w.handlers.Add(1)
			go w.handle(msg, shard)
		}
		cancel()
		w.gate.unreserve(max(0, extra-max(0, got-1)))
		if err := msgs.Error(); err != nil && !errors.Is(err, context.DeadlineExceeded) && !errors.Is(err, context.Canceled) {
			log.Warn().Err(err).Msg("pull requests")
			backoff.sleep(ctx)
			continue
		}
		backoff.reset()
		// A batch filled to the brim means more is waiting: ask for more next time.
		if got == n {
			batch = min(batch*2, w.cfg.MaxBatch)
		} else {
			batch = max(1, got)
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
