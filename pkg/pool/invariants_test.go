package pool

import (
	"fmt"
	"testing"
	"time"
)

// check verifies the pool's bookkeeping. Tests call it while the pool is
// busy.
func (p *Pool) check() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return nil
	}
	if p.total() > p.cfg.High {
		return fmt.Errorf("%d sandboxes counted (%d live, %d creating, %d closing), High is %d",
			p.total(), len(p.entries), p.creating, p.closing, p.cfg.High)
	}
	queued := 0
	creations := len(p.unclaimed)
	for key, t := range p.tenants {
		if t.key != key {
			return fmt.Errorf("tenant %q filed under %q", t.key, key)
		}
		queued += t.waiters.Len()
		if t.waiters.Len() > p.cfg.TenantQueueSize {
			return fmt.Errorf("tenant %q has %d waiting, cap %d", key, t.waiters.Len(), p.cfg.TenantQueueSize)
		}
		if t.box == nil && t.creation == nil && t.waiters.Len() == 0 {
			return fmt.Errorf("tenant %q kept with nothing", key)
		}
		if t.box != nil && t.creation != nil {
			return fmt.Errorf("tenant %q has a sandbox and a creation", key)
		}
		if t.creation != nil {
			creations++
		}
		if e := t.box; e != nil {
			if _, ok := p.entries[e]; !ok || e.tenant != t || e.draining || e.retired {
				return fmt.Errorf("tenant %q's sandbox is not in the pool as its own", key)
			}
			if e.inflight > p.cfg.PerSandbox {
				return fmt.Errorf("tenant %q has %d runs in one sandbox, cap %d", key, e.inflight, p.cfg.PerSandbox)
			}
			if t.waiters.Len() > 0 && e.inflight < p.cfg.PerSandbox {
				return fmt.Errorf("tenant %q has waiters and a free slot", key)
			}
		}
		if (t.needyElem != nil) != (t.box == nil && t.creation == nil && t.waiters.Len() > 0) {
			return fmt.Errorf("tenant %q: in ring %v, sandbox %v, creation %v, waiting %d",
				key, t.needyElem != nil, t.box != nil, t.creation != nil, t.waiters.Len())
		}
	}
	if queued != p.queued {
		return fmt.Errorf("queued %d, waiters %d", p.queued, queued)
	}
	if queued > p.cfg.QueueSize {
		return fmt.Errorf("%d waiting, QueueSize %d", queued, p.cfg.QueueSize)
	}
	// Creations of evicting tenants are counted with their tenant.
	if creations != p.creating {
		return fmt.Errorf("creating %d, creations found %d", p.creating, creations)
	}
	preempting := 0
	for e := range p.entries {
		if e.evicting {
			preempting++
			if !e.draining || e.inflight == 0 {
				return fmt.Errorf("preempted sandbox %s: draining %v, in flight %d", e.sb.ID(), e.draining, e.inflight)
			}
		}
	}
	if preempting != p.preempting {
		return fmt.Errorf("preempting %d, preempted sandboxes %d", p.preempting, preempting)
	}
	if len(p.free) > 0 && p.needy.Len() > 0 {
		return fmt.Errorf("%d free sandboxes while %d tenants wait for one", len(p.free), p.needy.Len())
	}
	for _, e := range p.free {
		if e.tenant != nil || e.inflight != 0 {
			return fmt.Errorf("free sandbox %s is assigned or busy", e.sb.ID())
		}
	}
	return nil
}

// watchInvariants checks p every few hundred microseconds until stop is
// closed, and reports the first violation.
func watchInvariants(t *testing.T, p *Pool) (stop func()) {
	done := make(chan struct{})
	finished := make(chan struct{})
	go func() {
		defer close(finished)
		for {
			if err := p.check(); err != nil {
				t.Errorf("invariant: %v", err)
				return
			}
			select {
			case <-done:
				return
			case <-time.After(100 * time.Microsecond):
			}
		}
	}()
	return func() { close(done); <-finished }
}
