// Package pool keeps a bounded set of sandboxes, one per tenant (isolate
// key), between a low and a high watermark, and runs requests in them.
//
// # Containers
//
// A sandbox is assigned to one tenant for its whole life and is destroyed,
// never reassigned, when it is recycled. Low free sandboxes are kept ready
// ahead of demand; a new tenant takes one (a pool hit) and it is replaced in
// the background. There are never more than High sandboxes, counting those
// being created and those being removed.
//
// # Requests
//
// Run serves a request, in this order:
//  1. the tenant's sandbox has a free slot (PerSandbox runs at once): run
//     there (a hit);
//  2. the tenant's sandbox is being created, or is full: wait for it;
//  3. a free sandbox is ready: assign it to the tenant (a pool hit);
//  4. fewer than High sandboxes: create one for the tenant (a cold start);
//     every request of the tenant waits on that one creation;
//  5. evict a sandbox that has nothing in flight and create one for the
//     tenant in its place, once fewer than CreateConcurrency creations
//     wait for or make their sandbox and fewer than CreateConcurrency
//     remove the sandbox they evicted (until then the sandbox goes on
//     serving its own tenant);
//  6. wait in the queue.
//
// # Eviction
//
// An eviction takes, of the idle sandboxes, first those whose tenant has
// left: it came back before (a hit), but has now stayed away twice as long
// as it ever did between two runs, and at least a quantum (and a second);
// or it never came back, and has stayed away twice as long as any tenant
// with a sandbox did before coming back, and ten quanta (see departed).
// Then those that served only the requests they were made for, then those
// whose tenant came back while they were resident, each kind least
// recently used first. While other tenants wait for a sandbox behind the
// one being served, though, it takes the most recently used sandbox
// without a hit: more tenants are active than there are sandboxes, and
// tenants that take turns would otherwise each find their sandbox evicted
// just before their turn comes back (LRU's worst case: every creation
// serves one request). Taking the newest keeps the older sandboxes
// resident until their tenants return; the departed come first so that a
// new set of tenants does not churn in what the old set left behind until
// IdleTimeout (at 50 tenants x 32 callers, a second set right after the
// first, or after a burst of one-off tenants, ran at 7 runs/s against
// 1,400 until those sandboxes idled out).
//
// # Queue and fairness
//
// Waiting requests sit in per-tenant FIFO lists, bounded in total by
// QueueSize and per tenant by TenantQueueSize, so that a flooding tenant
// cannot fill the queue. A tenant that waits for a slot in its own sandbox,
// or for its own sandbox being created, needs nothing shared: it is served
// from its sandbox as soon as a slot frees and never holds up another
// tenant. Tenants that need a sandbox and cannot have one yet wait in a
// ring, each tenant once whatever its number of waiting requests, served
// round-robin in the order they joined it whenever capacity changes.
//
// When every sandbox is busy, none is free and High is reached, the tenant
// at the head of the ring takes a busy sandbox: the one that has served its
// tenant longest, once it has served it for a quantum (four times the
// average creation time, so that swapping sandboxes costs at most a fifth
// of a slot's time). That sandbox takes no new run, is removed when its
// runs end and is replaced by one for the waiting tenant; its own tenant
// joins the back of the ring. Other tenants' sandboxes go on serving. So
// no tenant starves, even when more tenants are busy than there are
// sandboxes, and the cost of that falls on one sandbox at a time.
//
// # Goroutines
//
// The pool owns one janitor goroutine (idle and age recycling, refill
// backoff), one watcher per sandbox (its Done channel), one goroutine per
// creation and one per removal. Close waits for all of them.
package pool

import (
	"container/list"
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/rs/zerolog"

	"github.com/isode-run/isode/pkg/protocol"
)

// Pool runs requests in per-tenant sandboxes. Its methods are safe for
// concurrent use.
type Pool struct {
	rt    Runtime
	cfg   Config
	clock Clock
	log   zerolog.Logger

	// ctx is cancelled at the end of Close; it stops the janitor.
	ctx    context.Context
	cancel context.CancelFunc
	// createCtx is cancelled when Close begins; it aborts creations.
	createCtx    context.Context
	createCancel context.CancelFunc
	wg           sync.WaitGroup
	wake         chan struct{} // pokes the janitor; buffered 1
	closeDone    chan struct{}
	closeErr     error

	mu      sync.Mutex
	closed  bool
	tenants map[string]*tenant
	entries map[*entry]struct{}  // live sandboxes: free, assigned, draining
	free    []*entry             // ready and unassigned, oldest first
	lru     list.List            // of *entry: tenants' current sandboxes, least recently released first
	needy   list.List            // of *tenant: tenants waiting for a sandbox, in tag order (fair.go)
	apps    map[string]*appState // applications with requests waiting or tenants needy
	// tagFloor is the tag of the needy tenant last served: a tenant that
	// becomes needy is tagged above it.
	tagFloor uint64

	creating int // creations under way; each holds a slot toward High
	// removingVictims counts the creations still removing the sandbox they
	// evicted (they ask for a Create slot after it).
	removingVictims int
	closing         int         // retired sandboxes whose Close has not returned
	unclaimed       []*creation // creations of free sandboxes no tenant has claimed
	queued          int         // requests waiting
	inflight        int         // runs in flight
	// preempting counts busy sandboxes taken for a waiting tenant and not
	// yet retired: each will free a slot when its runs end.
	preempting int
	avgCreate  time.Duration // moving average of successful Create calls

	createRunning int         // Runtime.Create calls under way
	createWaiting []*creation // creations waiting for a Create slot

	refillFails int       // refill failures in a row
	refillAt    time.Time // no refill before this time (zero: none pending)
	nextWake    time.Time // when the janitor will next look (zero: never)
	drained     chan struct{}

	stats counters
}

// entry is one sandbox in the pool.
type entry struct {
	sb       Sandbox
	made     string  // the tenant it was created for ("": free)
	tenant   *tenant // nil while free
	created  time.Time
	lastUsed time.Time
	assigned time.Time // when its tenant got it
	inflight int
	runs     int
	hits     int           // runs granted while it was its tenant's sandbox already (grantHit)
	maxGap   time.Duration // the longest its tenant stayed away before a hit (departed)
	draining bool          // takes no new run; removed when its runs finish
	evicting bool          // draining for another tenant (preempted)
	retired  bool          // removed from the pool; Close under way or done
	gone     chan struct{} // closed on retirement; stops the watcher
	lruElem  *list.Element
}

// tenant is the pool's record of one isolate key; it exists while the
// tenant has a sandbox, a creation or waiting requests.
type tenant struct {
	key       string
	box       *entry    // current sandbox, never draining
	creation  *creation // under way for this tenant; then box is nil
	waiters   list.List // of *waiter, FIFO
	needyElem *list.Element
	tag       uint64 // its place in the needy ring (fair.go)
	app       string // its application (appName)
}

// How a request got its sandbox, for the counters.
type grantKind int

const (
	grantHit       grantKind = iota // the tenant's sandbox
	grantPoolHit                    // a free sandbox just assigned to the tenant
	grantColdStart                  // a sandbox just created for the tenant
)

type waiter struct {
	t     *tenant
	elem  *list.Element
	ready chan struct{} // closed once e or err is set
	e     *entry
	kind  grantKind // how e was granted
	err   error
}

// New returns a pool that makes sandboxes with rt. It starts the pool's
// goroutines and begins creating Low free sandboxes in the background.
// Zero fields of cfg that have a default take it; an invalid cfg gives an
// error wrapping ErrInvalidConfig.
func New(rt Runtime, cfg Config) (*Pool, error) {
	if rt == nil {
		return nil, fmt.Errorf("%w: runtime is nil", ErrInvalidConfig)
	}
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	cfg = cfg.withDefaults()
	p := &Pool{
		rt:        rt,
		cfg:       cfg,
		clock:     cfg.Clock,
		log:       cfg.Logger,
		wake:      make(chan struct{}, 1),
		closeDone: make(chan struct{}),
		tenants:   make(map[string]*tenant),
		apps:      make(map[string]*appState),
		entries:   make(map[*entry]struct{}),
	}
	p.ctx, p.cancel = context.WithCancel(context.Background())
	p.createCtx, p.createCancel = context.WithCancel(p.ctx)
	p.wg.Add(1)
	go p.janitor()
	p.mu.Lock()
	p.refill()
	p.mu.Unlock()
	return p, nil
}

// Capacity is High*PerSandbox+QueueSize: the most Runs that can be
// outstanding (running or waiting) at once; past it Run always rejects with
// ErrQueueFull. It is a bound, not a promise: Run may reject earlier with
// ErrTenantQueueFull, or with ErrQueueFull while few runs are in flight,
// since requests waiting for a sandbox being created count in the queue.
// A worker that keeps at most Capacity requests outstanding never has one
// refused for lack of room in the pool's own bookkeeping.
func (p *Pool) Capacity() int {
	return p.cfg.High*p.cfg.PerSandbox + p.cfg.QueueSize
}

// Config returns the configuration in force, defaults filled in.
func (p *Pool) Config() Config { return p.cfg }

// Run runs req in the sandbox of its tenant (req.IsolateKey), waiting in
// the queue if need be until ctx's deadline or Config.MaxWait.
//
// It fails with ErrClosed once Close has begun, ErrQueueFull or
// ErrTenantQueueFull when the request cannot wait, ErrQueueTimeout when its
// deadline passed while it waited, an error wrapping ErrCreateFailed when
// its tenant's sandbox could not be created, and ctx.Err() (wrapped) when
// ctx was cancelled while it waited. Errors of Sandbox.Run are returned
// unchanged, with its Result (an empty one when the sandbox gave none).
//
// The Result's Usage says how the request got its sandbox (Start) and how
// long it waited for it (PoolMicros), on top of what the sandbox measured.
func (p *Pool) Run(ctx context.Context, req *protocol.Request) (*protocol.Result, error) {
	if req.IsolateKey == "" {
		return nil, protocol.Errorf(protocol.CodeBadRequest, "isolate_key is empty: name the tenant the code belongs to")
	}
	began := time.Now()
	e, kind, err := p.acquire(ctx, req.IsolateKey)
	if err != nil {
		return nil, err
	}
	waited := time.Since(began)
	defer p.release(e)
	res, err := e.sb.Run(ctx, req)
	if res == nil {
		// The run failed without an answer (its sandbox died): it still
		// ran, and its usage says how it got its sandbox.
		res = &protocol.Result{}
	}
	res.Usage.Start = kind.String()
	res.Usage.PoolMicros = waited.Microseconds()
	return res, err
}

// String is how a grant is named in protocol.Usage.Start.
func (k grantKind) String() string {
	switch k {
	case grantHit:
		return protocol.StartWarm
	case grantPoolHit:
		return protocol.StartPool
	case grantColdStart:
		return protocol.StartCold
	}
	return ""
}

// acquire returns a sandbox of tenant key with one run counted in flight,
// and how it was granted.
func (p *Pool) acquire(ctx context.Context, key string) (*entry, grantKind, error) {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return nil, 0, ErrClosed
	}
	t := p.tenants[key]
	if t != nil && t.box != nil && p.gone(t.box) {
		p.dispatch()
		t = p.tenants[key] // may be forgotten now
	}
	if t != nil && t.box != nil && t.box.inflight < p.cfg.PerSandbox && t.waiters.Len() == 0 {
		e := t.box
		p.take(e, grantHit)
		p.mu.Unlock()
		return e, grantHit, nil
	}
	if t == nil {
		t = &tenant{key: key}
		p.tenants[key] = t
	}
	if t.box == nil && t.creation == nil && t.waiters.Len() == 0 && len(p.free) > 0 {
		// The ring is empty whenever a free sandbox is ready (dispatch
		// hands them out), so taking one here jumps no one.
		if e := p.popFree(); e != nil {
			p.assign(e, t)
			p.take(e, grantPoolHit)
			p.deferRefill()
			p.dispatch()
			p.mu.Unlock()
			return e, grantPoolHit, nil
		}
	}
	if t.waiters.Len() >= p.cfg.TenantQueueSize {
		p.stats.Rejections++
		p.forget(t)
		p.mu.Unlock()
		return nil, 0, ErrTenantQueueFull
	}
	if p.overShare(t) || p.queued >= p.cfg.QueueSize && !p.makeRoom(t) {
		p.stats.Rejections++
		p.forget(t)
		p.mu.Unlock()
		return nil, 0, ErrQueueFull
	}
	w := &waiter{t: t, ready: make(chan struct{})}
	p.enqueue(w)
	// Armed before the request is visible as queued, so that a test
	// advancing a fake clock cannot slip in between.
	timer := p.clock.NewTimer(p.cfg.MaxWait)
	p.markNeedy(t)
	if t.needyElem != nil {
		p.dispatch()
	}
	p.mu.Unlock()
	return p.wait(ctx, w, timer)
}

// wait blocks until w is granted or failed, ctx is done or timer fires.
func (p *Pool) wait(ctx context.Context, w *waiter, timer Timer) (*entry, grantKind, error) {
	defer timer.Stop()
	var err error
	select {
	case <-w.ready:
		return w.e, w.kind, w.err
	case <-ctx.Done():
		err = ctx.Err()
		if errors.Is(err, context.DeadlineExceeded) {
			err = ErrQueueTimeout
		} else {
			err = fmt.Errorf("wait for a sandbox: %w", err)
		}
	case <-timer.C():
		err = ErrQueueTimeout
	}
	p.mu.Lock()
	select {
	case <-w.ready:
		// Granted or failed meanwhile.
		if w.err != nil {
			p.mu.Unlock()
			return nil, 0, w.err
		}
		if err == ErrQueueTimeout {
			p.stats.QueueTimeouts++
		}
		p.mu.Unlock()
		p.release(w.e)
		return nil, 0, err
	default:
	}
	p.dequeue(w)
	p.forget(w.t)
	if err == ErrQueueTimeout {
		p.stats.QueueTimeouts++
	}
	p.mu.Unlock()
	return nil, 0, err
}

// release ends one run in e.
func (p *Pool) release(e *entry) {
	p.mu.Lock()
	defer p.mu.Unlock()
	e.inflight--
	p.inflight--
	if p.inflight == 0 && p.drained != nil {
		close(p.drained)
		p.drained = nil
	}
	if e.retired {
		return
	}
	if p.gone(e) {
		p.dispatch()
		return
	}
	now := p.clock.Now()
	e.lastUsed = now
	if e.draining {
		if e.inflight == 0 {
			p.retire(e, true)
			p.dispatch()
		}
		return
	}
	t := e.tenant
	p.lru.MoveToBack(e.lruElem)
	if t.waiters.Len() > 0 {
		p.serve(t, grantHit)
		if t.needyElem != nil {
			p.dispatch() // serving spent its sandbox (MaxRequests)
		}
	}
	if e.inflight > 0 || e.draining {
		return
	}
	// e is idle: it may be evicted for a waiting tenant, and recycled
	// after IdleTimeout.
	if p.needy.Len() > 0 {
		p.dispatch()
	}
	if p.cfg.IdleTimeout > 0 && !e.retired {
		p.wakeBy(now.Add(p.cfg.IdleTimeout))
	}
}

// take counts one more run in e for a request granted as kind.
func (p *Pool) take(e *entry, kind grantKind) {
	e.inflight++
	e.runs++
	p.inflight++
	switch kind {
	case grantHit:
		e.hits++
		p.stats.Hits++
		if e.inflight == 1 { // it was idle: its tenant came back
			e.maxGap = max(e.maxGap, p.clock.Now().Sub(e.lastUsed))
		}
	case grantPoolHit:
		p.stats.PoolHits++
	case grantColdStart:
		p.stats.ColdStarts++
	}
	if p.cfg.MaxRequests > 0 && e.runs >= p.cfg.MaxRequests {
		p.stats.MaxRequestRecycles++
		p.drain(e, false)
	}
}

// serve grants t's waiting requests slots in its sandbox, in order.
func (p *Pool) serve(t *tenant, kind grantKind) {
	for t.waiters.Len() > 0 && t.box != nil && t.box.inflight < p.cfg.PerSandbox {
		w := t.waiters.Remove(t.waiters.Front()).(*waiter)
		w.elem = nil
		p.unqueue(t)
		w.e = t.box
		w.kind = kind
		p.take(t.box, kind)
		close(w.ready)
	}
}

// dequeue removes a waiter that gave up.
func (p *Pool) dequeue(w *waiter) {
	t := w.t
	t.waiters.Remove(w.elem)
	w.elem = nil
	p.unqueue(t)
	if t.waiters.Len() == 0 && t.needyElem != nil {
		p.removeNeedy(t, false)
	}
}

// markNeedy puts t at the back of the ring if it has waiting requests and
// neither a sandbox nor one being created.
func (p *Pool) markNeedy(t *tenant) {
	if t.needyElem == nil && t.box == nil && t.creation == nil && t.waiters.Len() > 0 {
		p.pushNeedy(t)
	}
}

// forget drops t's record when nothing refers to it any more.
func (p *Pool) forget(t *tenant) {
	if t.box == nil && t.creation == nil && t.waiters.Len() == 0 && p.tenants[t.key] == t {
		delete(p.tenants, t.key)
	}
}

// total is the number of sandboxes counted toward High.
func (p *Pool) total() int {
	return len(p.entries) + p.creating + p.closing
}

// dispatch hands capacity to the tenants waiting in the ring, in order,
// then refills free sandboxes. Call it whenever capacity may have changed.
func (p *Pool) dispatch() {
	if p.closed {
		return
	}
	// Sandboxes being removed or preempted will free their slots soon: that
	// many tenants at the head of the ring wait for them instead of taking
	// another sandbox.
	reserved := 0
	for el := p.needy.Front(); el != nil; {
		// t keeps its place while it is provided for: a tenant whose
		// sandbox is preempted for it joins the ring behind it.
		t := el.Value.(*tenant)
		res := p.provide(t, &reserved)
		next := el.Next()
		switch res {
		case provided:
			p.removeNeedy(t, true)
			// Its new sandbox may be spent already (MaxRequests): back
			// in the ring, and in this pass.
			p.markNeedy(t)
			if t.needyElem != nil && (next == nil || next.Value.(*tenant).tag > t.tag) {
				next = t.needyElem
			}
		case noCapacity:
			next = nil
		}
		el = next
	}
	p.refill()
}

type provision int

const (
	provided provision = iota
	waitForSlot
	noCapacity
)

// provide finds t a sandbox: a free one, a free one being created, a new
// one, a new one in place of an idle one evicted, or, later, one in place
// of a busy one preempted.
func (p *Pool) provide(t *tenant, reserved *int) provision {
	if e := p.popFree(); e != nil {
		p.assign(e, t)
		p.serve(t, grantPoolHit)
		p.deferRefill()
		return provided
	}
	if len(p.unclaimed) > 0 {
		c := p.unclaimed[0]
		p.unclaimed = p.unclaimed[1:]
		c.t = t
		t.creation = c
		return provided
	}
	if p.total() < p.cfg.High {
		p.startCreation(t, nil)
		return provided
	}
	if *reserved < p.closing+p.preempting {
		*reserved++
		return waitForSlot
	}
	// Sandboxes t may take (fair.go), worked out once for both ways.
	may := p.victims(t)
	if v := p.idleVictim(may); v != nil {
		if p.creating-p.removingVictims >= p.cfg.CreateConcurrency || p.removingVictims >= p.cfg.CreateConcurrency {
			// Its replacement could not start soon: v keeps serving its
			// tenant until a creation or a removal ends (both dispatch).
			return noCapacity
		}
		p.stats.Evictions++
		p.log.Debug().Str("sandbox", v.sb.ID()).Str("tenant", v.tenant.key).Str("for", t.key).Msg("evict idle sandbox")
		p.retire(v, false)
		p.startCreation(t, v)
		return provided
	}
	if v := p.longestServed(may); v != nil {
		at := v.assigned.Add(p.quantum())
		if p.clock.Now().Before(at) {
			p.wakeBy(at)
			return noCapacity
		}
		p.stats.Evictions++
		p.stats.Preemptions++
		p.log.Debug().Str("sandbox", v.sb.ID()).Str("tenant", v.tenant.key).Str("for", t.key).Msg("preempt busy sandbox")
		p.drain(v, true)
		*reserved++
		return waitForSlot
	}
	return noCapacity
}

// longestServed returns the tenant sandbox assigned longest ago that may
// allows (victims), or nil.
func (p *Pool) longestServed(may func(*entry) bool) *entry {
	var v *entry
	for el := p.lru.Front(); el != nil; el = el.Next() {
		if e := el.Value.(*entry); may(e) && (v == nil || e.assigned.Before(v.assigned)) {
			v = e
		}
	}
	return v
}

// quantum is how long a tenant keeps a busy sandbox before another tenant
// may preempt it: four times the average creation time, so that swapping
// costs at most a fifth of the slot's time.
func (p *Pool) quantum() time.Duration {
	return 4 * p.avgCreate
}

// minDeparted is the shortest absence after which a tenant counts as
// departed (see departed), whatever its history and the engine's speed.
const minDeparted = time.Second

// departed reports whether e's tenant has left. A tenant that came back to
// e before (a hit) has left once it stays away for more than twice its
// longest absence before such a return, a quantum and minDeparted: tenants
// that take turns come back at about the same interval each time, tenants
// that were busy and stopped are departed after a few seconds at most. A
// tenant that never came back has no such history: it has left once it
// stays away for more than twice the longest absence before a return of
// any tenant with a sandbox now (longestGap: how long the pool has seen
// tenants stay away and still come back) and ten quanta (forty creations'
// time), so that the tenants of a rotation longer than High keep their
// sandboxes until their turn while one-off tenants' sandboxes do not
// outlast a burst of them by more than that.
func (p *Pool) departed(e *entry, now time.Time, longestGap time.Duration) bool {
	away := now.Sub(e.lastUsed)
	if e.hits == 0 {
		return away > max(2*longestGap, 10*p.quantum(), minDeparted)
	}
	return away > max(2*e.maxGap, p.quantum(), minDeparted)
}

// idleVictim returns the tenant sandbox with nothing in flight, of those
// may allows (victims), that an eviction takes, or nil. Sandboxes whose
// tenant has departed go first, least recently used first. Sandboxes whose
// tenant came back while they were resident (a hit) are kept over those
// that served only the requests they were made for; among each kind the
// least recently used goes first, except that while other tenants wait
// behind the one being served (more tenants want a sandbox than there
// are), the most recently used sandbox without a hit goes first.
//
// The exception is what lets a pool with more active tenants than High
// serve any hit at all: tenants that take turns (a cycle longer than High)
// find under LRU that every sandbox was evicted just before their turn
// came back, so that each sandbox serves one request, while taking the
// newest keeps the older ones resident until their tenants return.
func (p *Pool) idleVictim(may func(*entry) bool) *entry {
	now := p.clock.Now()
	var longestGap time.Duration
	for el := p.lru.Front(); el != nil; el = el.Next() {
		longestGap = max(longestGap, el.Value.(*entry).maxGap)
	}
	for el := p.lru.Front(); el != nil; el = el.Next() {
		if e := el.Value.(*entry); e.inflight == 0 && may(e) && p.departed(e, now, longestGap) {
			return e // the least recently used of the departed
		}
	}
	var proven *entry
	if p.needy.Len() > 1 {
		for el := p.lru.Back(); el != nil; el = el.Prev() {
			if e := el.Value.(*entry); e.inflight == 0 && may(e) {
				if e.hits == 0 {
					return e
				}
				proven = e // the least recently used one, in the end
			}
		}
		return proven
	}
	for el := p.lru.Front(); el != nil; el = el.Next() {
		if e := el.Value.(*entry); e.inflight == 0 && may(e) {
			if e.hits == 0 {
				return e
			}
			if proven == nil {
				proven = e
			}
		}
	}
	return proven
}

// popFree takes the oldest free sandbox that is still alive, or nil.
func (p *Pool) popFree() *entry {
	for len(p.free) > 0 {
		e := p.free[0]
		p.free[0] = nil
		p.free = p.free[1:]
		select {
		case <-e.sb.Done():
			p.died(e)
		default:
			return e
		}
	}
	return nil
}

// deferRefill holds refills back for Config.RefillDelay after a free
// sandbox was taken. p.mu is held.
func (p *Pool) deferRefill() {
	if p.cfg.RefillDelay <= 0 {
		return
	}
	if at := p.clock.Now().Add(p.cfg.RefillDelay); at.After(p.refillAt) {
		p.refillAt = at
	}
	p.wakeBy(p.refillAt)
}

// assign makes e, free or new, t's sandbox.
func (p *Pool) assign(e *entry, t *tenant) {
	if e.made != t.key {
		e.sb.Assign(t.key) // must not block
	}
	e.tenant = t
	e.lastUsed = p.clock.Now()
	e.assigned = e.lastUsed
	t.box = e
	e.lruElem = p.lru.PushBack(e)
}

// drain stops giving e new runs; it is retired when its runs finish. With
// evict it is preempted for another tenant, else recycled.
func (p *Pool) drain(e *entry, evict bool) {
	if e.draining || e.retired {
		return
	}
	e.draining = true
	if evict {
		e.evicting = true
		p.preempting++
	} else {
		p.stats.Recycles++
	}
	p.detach(e)
	if e.inflight == 0 {
		p.retire(e, true)
	}
}

// detach unlinks e from its tenant (or the free list); the tenant's waiting
// requests then need a new sandbox.
func (p *Pool) detach(e *entry) {
	if t := e.tenant; t != nil {
		if t.box == e {
			t.box = nil
			p.lru.Remove(e.lruElem)
			e.lruElem = nil
			p.markNeedy(t)
			p.forget(t)
		}
		return
	}
	for i, f := range p.free {
		if f == e {
			p.free = append(p.free[:i], p.free[i+1:]...)
			break
		}
	}
}

// retire removes e from the pool. With closeIt, a goroutine closes its
// sandbox and keeps its slot toward High until Close returns; without, the
// caller takes over the slot and the closing.
func (p *Pool) retire(e *entry, closeIt bool) {
	if e.retired {
		return
	}
	p.detach(e)
	e.retired = true
	if e.evicting {
		p.preempting--
	}
	close(e.gone)
	delete(p.entries, e)
	if closeIt {
		p.closing++
		p.wg.Add(1)
		go func() {
			defer p.wg.Done()
			err := p.closeSandbox(e.sb)
			p.mu.Lock()
			p.closing--
			p.dispatch()
			p.mu.Unlock()
			if err != nil {
				p.log.Warn().Err(err).Str("sandbox", e.sb.ID()).Msg("remove sandbox")
			}
		}()
	}
}

// closeSandbox closes sb with its own deadline: it must happen even while
// the pool shuts down.
func (p *Pool) closeSandbox(sb Sandbox) error {
	ctx, cancel := context.WithTimeout(context.Background(), p.cfg.RemoveTimeout)
	defer cancel()
	err := sb.Close(ctx)
	p.mu.Lock()
	p.stats.Destroyed++
	p.mu.Unlock()
	if err != nil {
		return fmt.Errorf("close sandbox %s: %w", sb.ID(), err)
	}
	return nil
}

// add puts a new sandbox, made for tenant key, into the pool and starts
// its watcher.
func (p *Pool) add(sb Sandbox, key string) *entry {
	now := p.clock.Now()
	e := &entry{sb: sb, made: key, created: now, lastUsed: now, gone: make(chan struct{})}
	p.entries[e] = struct{}{}
	p.stats.Created++
	p.wg.Add(1)
	go p.watch(e)
	if p.cfg.MaxAge > 0 {
		p.wakeBy(now.Add(p.cfg.MaxAge))
	}
	return e
}

// watch removes e from the pool as soon as its sandbox dies.
func (p *Pool) watch(e *entry) {
	defer p.wg.Done()
	select {
	case <-e.sb.Done():
	case <-e.gone:
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.died(e)
	p.dispatch()
}

// gone reports whether e's sandbox has died, and if so removes it at once,
// without waiting for its watcher, so that it is never handed out again.
// p.mu is held.
func (p *Pool) gone(e *entry) bool {
	select {
	case <-e.sb.Done():
		p.died(e)
		return true
	default:
		return false
	}
}

// died removes e, whose sandbox died. p.mu is held. It does not
// dispatch: it is called from within dispatch.
func (p *Pool) died(e *entry) {
	if e.retired {
		return
	}
	p.stats.Deaths++
	cause := protocol.CodeInternal
	if pe := protocol.AsError(e.sb.Err()); pe != nil {
		cause = pe.Code
	}
	if p.stats.deathCauses == nil {
		p.stats.deathCauses = make(map[protocol.Code]uint64)
	}
	p.stats.deathCauses[cause]++
	ev := p.log.Warn().Str("sandbox", e.sb.ID()).Int("in_flight", e.inflight)
	if e.tenant != nil {
		ev = ev.Str("tenant", e.tenant.key)
	}
	ev.AnErr("cause", e.sb.Err()).Msg("sandbox died")
	p.retire(e, true)
}

// wakeBy makes sure the janitor looks again by at. p.mu is held.
func (p *Pool) wakeBy(at time.Time) {
	if p.nextWake.IsZero() || at.Before(p.nextWake) {
		p.poke()
	}
}

// poke wakes the janitor to recompute its next deadline.
func (p *Pool) poke() {
	select {
	case p.wake <- struct{}{}:
	default:
	}
}

// Close stops the pool: Run fails with ErrClosed from now on, and requests
// waiting in the queue get ErrClosed. Runs in flight may finish within
// Config.CloseGrace (and ctx); then every sandbox is closed, which fails
// the runs still in flight with their sandbox's error. Close returns once
// every goroutine of the pool has ended. It returns ctx's error if ctx
// ended the grace period, joined with the errors of closing sandboxes.
// Calling it again waits for the first call and returns its result.
func (p *Pool) Close(ctx context.Context) error {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		select {
		case <-p.closeDone:
			return p.closeErr
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	p.closed = true
	for _, t := range p.tenants {
		for t.waiters.Len() > 0 {
			w := t.waiters.Remove(t.waiters.Front()).(*waiter)
			w.elem = nil
			w.err = ErrClosed
			close(w.ready)
		}
		t.needyElem = nil
	}
	p.queued = 0
	p.needy.Init()
	clear(p.apps)
	drained := make(chan struct{})
	if p.inflight == 0 {
		close(drained)
	} else {
		p.drained = drained
	}
	inflight := p.inflight
	p.mu.Unlock()
	p.createCancel()

	var errs []error
	if inflight > 0 {
		grace := p.clock.NewTimer(p.cfg.CloseGrace)
		select {
		case <-drained:
		case <-grace.C():
		case <-ctx.Done():
			errs = append(errs, fmt.Errorf("close pool: wait for runs in flight: %w", ctx.Err()))
		}
		grace.Stop()
	}

	p.mu.Lock()
	left := p.inflight
	var all []*entry
	for e := range p.entries {
		all = append(all, e)
		p.retire(e, false)
	}
	p.mu.Unlock()
	if left > 0 {
		p.log.Warn().Int("in_flight", left).Msg("close pool: runs still in flight after the grace period; removing their sandboxes")
	}
	var (
		wg    sync.WaitGroup
		errMu sync.Mutex
	)
	for _, e := range all {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := p.closeSandbox(e.sb); err != nil {
				errMu.Lock()
				errs = append(errs, err)
				errMu.Unlock()
			}
		}()
	}
	wg.Wait()
	p.cancel()
	p.wg.Wait()
	p.closeErr = errors.Join(errs...)
	close(p.closeDone)
	return p.closeErr
}
