package fleet

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"hash/fnv"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/isode-run/isode/pkg/protocol"
)

// Membership: every worker puts its id into a key-value bucket every
// Heartbeat and watches the bucket. A worker whose last put is older than
// MemberTTL is gone; a worker that leaves gracefully deletes its key, and
// the others see it at once. Each worker owns the shards for which it wins
// rendezvous hashing over the live set, so adding or removing one of N
// workers moves about 1/N of the shards and nothing else.
//
// This gives one owner per shard in steady state. It does not give mutual
// exclusion during a hand-over: for up to a heartbeat two workers may pull
// the same shard. That costs affinity (a tenant may briefly get a second
// container) but never correctness: JetStream hands each request to one
// puller, and containers are per tenant and per worker.

// member is the value a worker announces.
type member struct {
	ID      string    `json:"id"`
	Started time.Time `json:"started"`
}

func (w *Worker) membersBucket(ctx context.Context) (jetstream.KeyValue, error) {
	cfg := jetstream.KeyValueConfig{
		Bucket:      protocol.MembersBucket(w.cfg.Prefix),
		Description: "isode workers; each key is refreshed every heartbeat",
		History:     1,
		TTL:         max(time.Minute, 10*w.cfg.MemberTTL),
		Storage:     jetstream.FileStorage, // memory streams do not survive a server restart
		Replicas:    w.cfg.StreamReplicas,
	}
	// Look first, as for the request stream (see ensureStream).
	kv, err := w.js.KeyValue(ctx, cfg.Bucket)
	if errors.Is(err, jetstream.ErrBucketNotFound) {
		kv, err = w.js.CreateKeyValue(ctx, cfg)
		if errors.Is(err, jetstream.ErrBucketExists) {
			kv, err = w.js.KeyValue(ctx, cfg.Bucket)
		}
	}
	if err != nil {
		return nil, fmt.Errorf("members bucket %s: %w", cfg.Bucket, replicasRefusal(err, "KV_"+cfg.Bucket, cfg.Replicas))
	}
	return kv, nil
}

// owner returns the member that owns shard: the highest rendezvous hash.
func owner(members []string, shard int) string {
	var best string
	var bestH uint64
	for _, m := range members {
		h := fnv.New64a()
		h.Write([]byte(m))
		h.Write([]byte{0})
		h.Write([]byte(strconv.Itoa(shard)))
		if v := mix64(h.Sum64()); best == "" || v > bestH || (v == bestH && m < best) {
			best, bestH = m, v
		}
	}
	return best
}

// mix64 is MurmurHash3's 64-bit finaliser: FNV alone mixes short, similar
// inputs (w1, w2, ...) too weakly for rendezvous hashing to spread shards.
func mix64(x uint64) uint64 {
	x ^= x >> 33
	x *= 0xff51afd7ed558ccd
	x ^= x >> 33
	x *= 0xc4ceb9fe1a85ec53
	x ^= x >> 33
	return x
}

// shardsOf returns the shards self owns among members.
func shardsOf(self string, members []string, shards int) []int {
	var out []int
	for s := 0; s < shards; s++ {
		if owner(members, s) == self {
			out = append(out, s)
		}
	}
	return out
}

// memberView is the live set as membership last reconciled it.
type memberView struct {
	live []string // sorted
	// sure is false while the view may be stale: this worker is cut off
	// (disconnected, its own heartbeat failing) or its watch of the bucket
	// is being re-established.
	sure bool
}

// Alive reports whether the worker id is a live member of the fleet, as
// far as this worker can tell: whenever it cannot tell (before it has
// heard the members once, while it is cut off or re-watching), it answers
// true. It never blocks. The Docker reaper asks it before removing another
// worker's sandboxes.
func (w *Worker) Alive(id string) bool {
	v := w.view.Load()
	if v == nil || !v.sure {
		return true
	}
	_, found := slices.BinarySearch(v.live, id)
	return found
}

// membership runs until ctx ends: it announces this worker, tracks the
// others and re-owns shards whenever the live set changes. ready is closed
// after the first reconciliation.
func (w *Worker) membership(ctx context.Context, kv jetstream.KeyValue, ready chan<- struct{}) {
	log := w.log.With().Str("part", "membership").Logger()
	self := w.cfg.WorkerID
	value, _ := json.Marshal(member{ID: self, Started: w.start})
	seen := map[string]time.Time{} // member -> when its last put arrived here
	var lastBeat time.Time         // our last successful put
	var watchedSelf time.Time      // when the watch last showed our own put (or began)
	var watcher jetstream.KeyWatcher
	var current []string // live set last reconciled
	var owned []int
	first := true
	var updates <-chan jetstream.KeyValueEntry
	initial := true // the watcher first replays the current keys, then sends nil

	beat := func() {
		// A put may take longer than a heartbeat on a saturated machine;
		// failing it early would make the worker drop its shards for nothing.
		pctx, cancel := context.WithTimeout(ctx, max(w.cfg.Heartbeat, w.cfg.MemberTTL/2))
		defer cancel()
		if _, err := kv.Put(pctx, self, value); err != nil {
			if ctx.Err() == nil {
				log.Warn().Err(err).Msg("heartbeat")
			}
			return
		}
		lastBeat = time.Now()
	}
	frozen := false // the view is held while the bucket cannot be written
	reconcile := func() {
		now := time.Now()
		// We count ourselves in while the others surely do: connected,
		// and our last put young enough that it has not expired. And our
		// view is current while the watch shows our own puts: then it
		// shows the others' too.
		limit := w.cfg.MemberTTL - w.cfg.Heartbeat
		reachable := w.nc.IsConnected() && now.Sub(lastBeat) < limit && now.Sub(watchedSelf) < limit
		if !first && !reachable && !w.nc.IsClosed() {
			// Our heartbeats fail, we are reconnecting, or the watch has
			// gone quiet: the members bucket has no leader for the moment
			// (a NATS server died or is cut off, and every worker is in
			// the same boat), the watch's consumer was on a server that
			// died, or this worker is cut off. Either way the puts of the
			// others do not reach us, so expiring them, or ourselves,
			// would be believing a stale view: every worker would drop its
			// shards, or take all of them. Hold the last view instead. If
			// we are the one cut off, the others expire us and take our
			// shards; two pullers of a shard for a while cost affinity,
			// not answers (see above).
			if !frozen {
				frozen = true
				log.Warn().Strs("members", current).Int("shards", len(owned)).
					Msg("cannot announce this worker or hear the others: holding the last view of the fleet")
				w.view.Store(&memberView{live: current, sure: false})
			}
			return
		}
		if frozen && reachable {
			// Heard again: every member we knew gets a full TTL to show
			// up before it is taken for dead.
			frozen = false
			for m := range seen {
				seen[m] = now
			}
			log.Info().Msg("the members bucket answers again: the view is live")
		}
		// A connection closed for good: we serve nothing.
		selfAlive := reachable
		live := []string{}
		for m, t := range seen {
			switch {
			case m == self:
			case now.Sub(t) < w.cfg.MemberTTL:
				live = append(live, m)
			default:
				delete(seen, m)
			}
		}
		if selfAlive {
			live = append(live, self)
		}
		slices.Sort(live)
		want := []int{}
		if selfAlive {
			want = shardsOf(self, live, w.cfg.Shards)
		}
		if !first && slices.Equal(want, owned) && slices.Equal(live, current) {
			return
		}
		w.view.Store(&memberView{live: live, sure: selfAlive && !initial && updates != nil})
		if !slices.Equal(live, current) {
			log.Info().Strs("members", live).Int("shards", len(want)).Msg("fleet changed")
		}
		octx, cancel := context.WithTimeout(ctx, 10*time.Second)
		err := w.Own(octx, want)
		cancel()
		if err != nil {
			log.Warn().Err(err).Msg("take shards")
			owned = nil // try again next tick
		} else {
			owned = want
		}
		current = live
		if first {
			first = false
			close(ready)
		}
	}

	defer func() {
		if watcher != nil {
			watcher.Stop()
		}
	}()
	watch := func() {
		if watcher != nil {
			watcher.Stop()
		}
		watcher, updates = nil, nil
		wt, err := kv.WatchAll(ctx)
		if err != nil {
			if ctx.Err() == nil {
				log.Warn().Err(err).Msg("watch members")
			}
			return
		}
		watcher, updates = wt, wt.Updates()
		watchedSelf = time.Now()
	}

	beat()
	watch()
	tick := time.NewTicker(w.cfg.Heartbeat / 4)
	defer tick.Stop()
	nextBeat := time.Now().Add(w.cfg.Heartbeat)
	reconnects := w.nc.Stats().Reconnects
	// The shards' consumers are made again after a reconnect, off this
	// loop (heartbeats must go on); at most one pass at a time, ended
	// before this loop returns.
	var rechecks sync.WaitGroup
	var rechecking atomic.Bool
	defer rechecks.Wait()
	recheck := func() {
		if !rechecking.CompareAndSwap(false, true) {
			return
		}
		rechecks.Add(1)
		go func() {
			defer rechecks.Done()
			defer rechecking.Store(false)
			w.reensureConsumers(ctx)
		}()
	}
	for {
		select {
		case <-ctx.Done():
			return
		case e, ok := <-updates:
			if !ok {
				watch()
				continue
			}
			if e == nil {
				if initial {
					initial = false
					reconcile()
				}
				continue
			}
			switch e.Operation() {
			case jetstream.KeyValuePut:
				at := time.Now()
				// A replayed key may belong to a worker that died a while
				// ago: date it by the server. (A live worker whose entry
				// looks stale through clock skew is counted at its next put.)
				if initial && e.Created().Before(at) {
					at = e.Created()
				}
				// Never back in time: a replay may date a key earlier
				// than a put already seen, or than a hold's grace.
				if at.After(seen[e.Key()]) {
					seen[e.Key()] = at
				}
				if e.Key() == self {
					watchedSelf = time.Now()
				}
			default:
				delete(seen, e.Key())
			}
			if !initial {
				reconcile()
			}
		case <-tick.C:
			// After a reconnect the watcher's consumer may be gone (a
			// restarted server), which it would notice only after missed
			// heartbeats, 10-20 s during which every worker believes it is
			// alone: watch afresh, dating the replay by the server as at start.
			if r := w.nc.Stats().Reconnects; r != reconnects && w.nc.IsConnected() {
				reconnects = r
				recheck()
				watch()
				initial = updates != nil
			}
			if updates == nil {
				watch()
				initial = updates != nil
			}
			// Our puts are stored but the watch has not shown one for a
			// member TTL: its consumer was on a server that died, and the
			// watcher would notice only after missed heartbeats (the view
			// is held meanwhile, see reconcile). Watch afresh.
			if updates != nil && lastBeat.Sub(watchedSelf) > w.cfg.MemberTTL {
				log.Info().Msg("the members watch shows nothing: watching afresh")
				watch()
				initial = updates != nil
			}
			if !time.Now().Before(nextBeat) {
				beat()
				nextBeat = time.Now().Add(w.cfg.Heartbeat)
			}
			if !initial {
				reconcile()
			}
		}
	}
}
