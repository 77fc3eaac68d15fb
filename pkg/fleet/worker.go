// Package fleet is the NATS side of an isode worker: it sets up the request
// stream, owns shards, pulls requests as capacity allows, hands them to a
// Runner (the container pool), replies to the requester's inbox and acks.
//
// It knows nothing of Docker or of the pool's insides: its Runner is an
// interface declared here.
package fleet

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nats.go/micro"
	"github.com/rs/zerolog"

	"github.com/isode-run/isode/pkg/protocol"
)

// Runner runs one request; *pool.Pool satisfies it. Errors are
// *protocol.Error values; CodeShuttingDown means the runner is closing and
// the request should be left for another worker.
type Runner interface {
	Run(ctx context.Context, req *protocol.Request) (*protocol.Result, error)
}

// StatsFunc reports the runner's pool counters for WorkerStats.
type StatsFunc func() protocol.PoolStats

// ErrStopped is returned by Start after Stop.
var ErrStopped = errors.New("fleet worker stopped")

// Worker consumes the shards it owns and answers requests.
type Worker struct {
	cfg   Config
	nc    *nats.Conn
	js    jetstream.JetStream
	run   Runner
	stats StatsFunc
	log   zerolog.Logger
	start time.Time

	gate    *gate
	cache   *replyCache
	confirm *confirmations
	out     *outbox
	ledger  *ledger // set by Start
	tenants *tenantTable

	// runCtx bounds handlers; cancelled only by Abort.
	runCtx    context.Context
	runCancel context.CancelFunc
	handlers  sync.WaitGroup

	// progress signals for requests held (handle.go)
	progressMu sync.Mutex
	progress   map[*tracked]struct{}
	bgCancel   context.CancelFunc
	bg         sync.WaitGroup

	// membership loop
	view         atomic.Pointer[memberView]
	memberKV     jetstream.KeyValue
	memberCancel context.CancelFunc
	memberDone   chan struct{}

	mu     sync.Mutex
	stream jetstream.Stream
	shards map[int]*shardLoop
	// consumers made (or found) by this worker, by shard: a shard that
	// comes back is pulled again without a JetStream API call, which
	// may hang while a consumer's leader is being elected.
	consumers map[int]jetstream.Consumer
	stopped   bool
	statsSub  *nats.Subscription
	inflight  map[string]chan struct{} // request id -> closed when answered
	svc       micro.Service            // the micro service; nil once stopped

	// the plain request/reply door (call.go)
	calls       callCounters
	callSlots   chan struct{} // a slot per call on its way to the stream
	callMu      sync.Mutex
	callsClosed bool
	callers     sync.WaitGroup
}

// New returns a Worker; nothing happens on NATS until Start.
func New(nc *nats.Conn, run Runner, stats StatsFunc, cfg Config) (*Worker, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	js, err := jetstream.New(nc)
	if err != nil {
		return nil, fmt.Errorf("jetstream: %w", err)
	}
	if stats == nil {
		stats = func() protocol.PoolStats { return protocol.PoolStats{} }
	}
	w := &Worker{
		cfg:       cfg,
		nc:        nc,
		js:        js,
		run:       run,
		stats:     stats,
		log:       cfg.Logger,
		start:     time.Now(),
		gate:      newGate(cfg.Capacity),
		cache:     newReplyCache(cfg.ReplyCacheTTL, cfg.ReplyCacheBytes),
		confirm:   newConfirmations(cfg.replyAckWait()),
		out:       &outbox{nc: nc, maxControlLine: cfg.MaxControlLine},
		shards:    make(map[int]*shardLoop),
		consumers: make(map[int]jetstream.Consumer),
		inflight:  make(map[string]chan struct{}),
		progress:  make(map[*tracked]struct{}),
		callSlots: make(chan struct{}, cfg.MaxPendingCalls),
		tenants:   newTenantTable(cfg.Tenants),
	}
	w.runCtx, w.runCancel = context.WithCancel(context.Background())
	w.bgCancel = func() {}
	return w, nil
}

// Start creates the stream and the members bucket if missing, answers
// stats requests, joins the fleet and returns once it pulls its share of
// the shards (all of them when it is alone).
func (w *Worker) Start(ctx context.Context) error {
	s, err := ensureStream(ctx, w.js, &w.cfg)
	if err != nil {
		return err
	}
	kv, err := w.membersBucket(ctx)
	if err != nil {
		return err
	}
	led, err := openLedger(ctx, w.js, &w.cfg)
	if err != nil {
		return err
	}
	if err := w.confirm.subscribe(w.nc); err != nil {
		return fmt.Errorf("subscribe to reply confirmations: %w", err)
	}
	sub, err := w.nc.Subscribe(protocol.StatsSubject(w.cfg.Prefix), w.answerStats)
	if err != nil {
		w.confirm.unsubscribe()
		return fmt.Errorf("subscribe to stats: %w", err)
	}
	svc, err := w.startService()
	if err != nil {
		sub.Unsubscribe()
		w.confirm.unsubscribe()
		return fmt.Errorf("start the micro service: %w", err)
	}
	w.mu.Lock()
	if w.stopped || w.memberDone != nil {
		w.mu.Unlock()
		svc.Stop()
		sub.Unsubscribe()
		w.confirm.unsubscribe()
		return ErrStopped
	}
	w.svc = svc
	w.stream = s
	w.ledger = led
	w.statsSub = sub
	w.memberKV = kv
	bgCtx, bgCancel := context.WithCancel(context.Background())
	w.bgCancel = bgCancel
	w.bg.Add(1)
	go func() {
		defer w.bg.Done()
		w.signalProgress(bgCtx)
	}()
	mctx, cancel := context.WithCancel(context.Background())
	w.memberCancel = cancel
	w.memberDone = make(chan struct{})
	w.mu.Unlock()

	ready := make(chan struct{})
	go func() {
		defer close(w.memberDone)
		w.membership(mctx, kv, ready)
	}()
	select {
	case <-ready:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("join the fleet: %w", ctx.Err())
	}
}

// Own makes the worker pull exactly the given shards: loops for shards no
// longer listed stop pulling (their requests in flight still finish), loops
// for new shards start. It returns the errors creating consumers; shards
// that failed are not owned.
func (w *Worker) Own(ctx context.Context, shards []int) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.stopped {
		return ErrStopped
	}
	want := make(map[int]bool, len(shards))
	for _, s := range shards {
		want[s] = true
	}
	for s, l := range w.shards {
		if !want[s] {
			l.stop()
			delete(w.shards, s)
		}
	}
	// Consumers this worker has not made yet.
	var missing []int
	for s := range want {
		if _, ok := w.shards[s]; !ok && w.consumers[s] == nil {
			missing = append(missing, s)
		}
	}
	made, errs := ensureConsumers(ctx, w.stream, &w.cfg, missing)
	for i, s := range missing {
		if errs[i] == nil {
			w.consumers[s] = made[i]
		}
	}
	for s := range want {
		if _, ok := w.shards[s]; ok {
			continue
		}
		if cons := w.consumers[s]; cons != nil {
			w.shards[s] = w.startShard(s, cons)
		}
	}
	return errors.Join(errs...)
}

// consumerTimeout bounds the creation of one shard's consumer.
const consumerTimeout = 2 * time.Second

// ensureConsumers makes the consumers of shards concurrently, each with its
// own bound: one consumer without a leader (it is being elected) must not
// hold up the others, nor the membership loop that waits for them. made[i]
// and errs[i] are shards[i]'s.
func ensureConsumers(ctx context.Context, stream jetstream.Stream, cfg *Config, shards []int) (made []jetstream.Consumer, errs []error) {
	made = make([]jetstream.Consumer, len(shards))
	errs = make([]error, len(shards))
	var wg sync.WaitGroup
	for i, s := range shards {
		wg.Add(1)
		go func() {
			defer wg.Done()
			cctx, cancel := context.WithTimeout(ctx, consumerTimeout)
			defer cancel()
			made[i], errs[i] = ensureConsumer(cctx, stream, cfg, s)
		}()
	}
	wg.Wait()
	return made, errs
}

// reensureConsumers makes the consumers of the shards this worker pulls
// again, where they are gone: consumers keep their state in memory, so a
// NATS server that restarted has lost them, and a pull on a missing
// consumer waits for nothing. Called after every reconnect; creating an
// existing consumer with the same configuration changes nothing.
func (w *Worker) reensureConsumers(ctx context.Context) {
	shards := w.Owned()
	w.mu.Lock()
	stream := w.stream
	w.mu.Unlock()
	_, errs := ensureConsumers(ctx, stream, &w.cfg, shards)
	for i, err := range errs {
		if err != nil && ctx.Err() == nil {
			w.log.Warn().Err(err).Int("shard", shards[i]).Msg("make the shard's consumer again after a reconnect")
		}
	}
}

// Owned returns the shards this worker pulls, sorted.
func (w *Worker) Owned() []int {
	w.mu.Lock()
	defer w.mu.Unlock()
	out := make([]int, 0, len(w.shards))
	for s := range w.shards {
		out = append(out, s)
	}
	slices.Sort(out)
	return out
}

// InFlight returns the number of requests this worker holds.
func (w *Worker) InFlight() int { return w.gate.count() }

// StopPulling stops taking new requests: the micro service stops (no
// call is taken; calls already taken are put on the stream or refused),
// the worker leaves the fleet (its members key is deleted, so others take
// its shards at once), every shard loop ends and no further pull is sent.
// Requests already taken keep running. It returns once the loops have
// ended.
func (w *Worker) StopPulling() {
	w.stopService()
	w.mu.Lock()
	cancel, done, kv := w.memberCancel, w.memberDone, w.memberKV
	w.mu.Unlock()
	if cancel != nil {
		cancel()
		<-done
		ctx, cancelDel := context.WithTimeout(context.Background(), 2*time.Second)
		if err := kv.Delete(ctx, w.cfg.WorkerID); err != nil {
			w.log.Warn().Err(err).Msg("leave the fleet")
		}
		cancelDel()
	}

	w.mu.Lock()
	w.stopped = true
	loops := make([]*shardLoop, 0, len(w.shards))
	for s, l := range w.shards {
		loops = append(loops, l)
		delete(w.shards, s)
	}
	sub := w.statsSub
	w.statsSub = nil
	w.mu.Unlock()
	for _, l := range loops {
		l.stop()
	}
	for _, l := range loops {
		<-l.done
	}
	if sub != nil {
		sub.Unsubscribe()
	}
}

// Wait blocks until every request taken has been answered (or handed back
// to the stream), or ctx ends. Call it after StopPulling.
func (w *Worker) Wait(ctx context.Context) error {
	done := make(chan struct{})
	go func() {
		w.handlers.Wait()
		close(done)
	}()
	select {
	case <-done:
		w.stopBackground()
		return nil
	case <-ctx.Done():
		return fmt.Errorf("requests still in flight: %d: %w", w.gate.count(), ctx.Err())
	}
}

// Abort cancels every request in flight; their messages are left
// unacknowledged, so JetStream redelivers them to another worker.
func (w *Worker) Abort() {
	w.runCancel()
	w.stopBackground()
}

// stopBackground ends the progress signaller.
func (w *Worker) stopBackground() {
	w.mu.Lock()
	cancel := w.bgCancel
	w.mu.Unlock()
	cancel()
	w.bg.Wait()
	w.confirm.unsubscribe()
}

// answerStats answers a stats request. Its reply subject is checked like a
// request's: a stats request comes from anyone who may publish on the
// stats subject.
func (w *Worker) answerStats(m *nats.Msg) {
	if err := w.checkReplyTo(m.Reply); err != nil {
		w.log.Debug().Err(err).Msg("stats request without a usable reply subject")
		return
	}
	st := w.workerStats()
	data, err := json.Marshal(&st)
	if err != nil {
		w.log.Error().Err(err).Msg("encode stats")
		return
	}
	if err := w.out.publish(&nats.Msg{Subject: m.Reply, Data: data}); err != nil {
		w.log.Debug().Err(err).Msg("answer stats")
	}
}

// workerStats returns what the stats subject answers.
func (w *Worker) workerStats() protocol.WorkerStats {
	return protocol.WorkerStats{
		V:        protocol.Version,
		Worker:   w.cfg.WorkerID,
		Started:  w.start,
		Shards:   w.Owned(),
		InFlight: w.gate.count(),
		Pool:     w.stats(),
		Tenants:  w.tenants.top(w.cfg.StatsTenants),
	}
}
