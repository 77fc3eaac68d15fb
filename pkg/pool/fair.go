package pool

import "github.com/isode-run/isode/pkg/protocol"

// Fairness between applications. A tenant belongs to the application named
// by its key (protocol.SplitTenantKey: "<app>|<isolate key>", or the
// implicit application). Two rules keep one application's flood from
// starving another's tenants, whatever the number of tenants each has:
//
//   - the needy ring (tenants waiting for a sandbox) is served round-robin
//     between applications first, then between the tenants of each: a
//     tenant that becomes needy is tagged one past its application's last
//     tag (and never below the tag last served), and the ring is kept in
//     tag order. With one application this is the plain round-robin.
//   - a tenant may take (evict or preempt) the sandbox of a tenant of its
//     own application, or of an application holding more sandboxes than
//     its own: an application with few tenants keeps its sandboxes while
//     one with many churns through its own;
//   - an application (other than the implicit one) may hold at most
//     AppQueueSize waiting requests, so that a worker whose queue it
//     filled never stops taking the others' requests from the stream;
//   - a full queue (QueueSize) makes room for an application holding less
//     than any other: the newest request of the application holding the
//     most is refused (ErrQueueFull, as if it had come when the queue was
//     full) and the newcomer takes its place.

// appState is an application's share of the queue and the ring. It exists
// while the application has waiting requests or needy tenants.
type appState struct {
	name    string
	queued  int    // requests of its tenants waiting
	needy   int    // its tenants in the needy ring
	lastTag uint64 // tag of its tenant last put in the ring
}

// appOf returns t's application record, made when it is missing.
func (p *Pool) appOf(t *tenant) *appState {
	name := t.appName()
	a := p.apps[name]
	if a == nil {
		a = &appState{name: name}
		p.apps[name] = a
	}
	return a
}

// settle forgets t's application record when nothing of it waits.
func (p *Pool) settle(t *tenant) {
	name := t.appName()
	if a := p.apps[name]; a != nil && a.queued == 0 && a.needy == 0 {
		delete(p.apps, name)
	}
}

// enqueue counts a new waiter of t.
func (p *Pool) enqueue(w *waiter) {
	w.elem = w.t.waiters.PushBack(w)
	p.queued++
	p.appOf(w.t).queued++
}

// unqueue counts a waiter of t that stopped waiting (granted, failed or
// gone); the caller has removed it from t.waiters.
func (p *Pool) unqueue(t *tenant) {
	p.queued--
	a := p.appOf(t)
	a.queued--
	p.settle(t)
}

// pushNeedy puts t into the needy ring at its application's turn.
func (p *Pool) pushNeedy(t *tenant) {
	a := p.appOf(t)
	t.tag = max(a.lastTag, p.tagFloor) + 1
	a.lastTag = t.tag
	a.needy++
	for el := p.needy.Back(); el != nil; el = el.Prev() {
		if el.Value.(*tenant).tag <= t.tag {
			t.needyElem = p.needy.InsertAfter(t, el)
			return
		}
	}
	t.needyElem = p.needy.PushFront(t)
}

// removeNeedy takes t out of the needy ring; served says it got a sandbox
// (the ring's turn moves past it).
func (p *Pool) removeNeedy(t *tenant, served bool) {
	p.needy.Remove(t.needyElem)
	t.needyElem = nil
	if served {
		p.tagFloor = max(p.tagFloor, t.tag)
	}
	a := p.appOf(t)
	a.needy--
	p.settle(t)
}

// makeRoom refuses the newest waiting request of the application holding
// the most of a full queue, when t's application holds fewer than it less
// one; it reports whether there is room for t's request now.
func (p *Pool) makeRoom(t *tenant) bool {
	mine := 0
	if a := p.apps[t.appName()]; a != nil {
		mine = a.queued
	}
	var big *appState
	for _, a := range p.apps {
		if big == nil || a.queued > big.queued {
			big = a
		}
	}
	if big == nil || big.queued <= mine+1 {
		return false
	}
	// Its tenant with the most waiting gives up its newest request.
	var victim *tenant
	for _, v := range p.tenants {
		if v.waiters.Len() > 0 && v.appName() == big.name && (victim == nil || v.waiters.Len() > victim.waiters.Len()) {
			victim = v
		}
	}
	if victim == nil {
		return false
	}
	w := victim.waiters.Back().Value.(*waiter)
	p.dequeue(w)
	w.err = ErrQueueFull
	p.stats.Rejections++
	close(w.ready)
	p.forget(victim)
	return true
}

// appName is the name of t's application.
func (t *tenant) appName() string {
	if t.app == "" {
		t.app, _ = protocol.SplitTenantKey(t.key)
	}
	return t.app
}

// overShare reports whether t's application holds its whole share of the
// queue (AppQueueSize; the implicit application has no share of its own).
func (p *Pool) overShare(t *tenant) bool {
	name := t.appName()
	if name == protocol.DefaultApplication {
		return false
	}
	a := p.apps[name]
	return a != nil && a.queued >= p.cfg.AppQueueSize
}

// victims returns which tenant sandboxes t may take: its own
// application's, and those of applications holding more sandboxes than
// t's. With one application, every one.
func (p *Pool) victims(t *tenant) func(*entry) bool {
	mine := t.appName()
	// Sandboxes held: assigned ones, and ones being created for a tenant.
	held := map[string]int{}
	for el := p.lru.Front(); el != nil; el = el.Next() {
		held[el.Value.(*entry).tenant.appName()]++
	}
	for _, v := range p.tenants {
		if v.creation != nil {
			held[v.appName()]++
		}
	}
	if len(held) <= 1 {
		return func(*entry) bool { return true }
	}
	return func(e *entry) bool {
		app := e.tenant.appName()
		return app == mine || held[app] > held[mine]
	}
}
