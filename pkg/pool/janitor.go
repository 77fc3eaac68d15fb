package pool

import "time"

// janitor recycles idle and old sandboxes and restarts refills after their
// backoff, sleeping until the next such deadline or until poked.
func (p *Pool) janitor() {
	defer p.wg.Done()
	for {
		p.mu.Lock()
		now := p.clock.Now()
		next := p.sweep(now)
		p.nextWake = next
		p.mu.Unlock()

		var timer Timer
		var fire <-chan time.Time
		if !next.IsZero() {
			timer = p.clock.NewTimer(next.Sub(now))
			fire = timer.C()
			// Time may have moved past next while the timer was armed
			// relative to an older now.
			if !p.clock.Now().Before(next) {
				timer.Stop()
				continue
			}
		}
		select {
		case <-fire:
		case <-p.wake:
		case <-p.ctx.Done():
		}
		if timer != nil {
			timer.Stop()
		}
		if p.ctx.Err() != nil {
			return
		}
	}
}

// sweep acts on every deadline passed at now and returns the next one
// (zero: none). p.mu is held.
func (p *Pool) sweep(now time.Time) time.Time {
	if p.closed {
		return time.Time{}
	}
	var next time.Time
	soon := func(at time.Time) {
		if next.IsZero() || at.Before(next) {
			next = at
		}
	}
	changed := false
	if idle := p.cfg.IdleTimeout; idle > 0 {
		for el := p.lru.Front(); el != nil; {
			e := el.Value.(*entry)
			el = el.Next()
			if e.inflight > 0 {
				continue
			}
			if at := e.lastUsed.Add(idle); now.Before(at) {
				soon(at)
				continue
			}
			p.stats.Recycles++
			p.stats.IdleRecycles++
			p.log.Debug().Str("sandbox", e.sb.ID()).Str("tenant", e.tenant.key).Msg("recycle idle sandbox")
			p.retire(e, true)
			changed = true
		}
	}
	if age := p.cfg.MaxAge; age > 0 {
		for e := range p.entries {
			if e.draining {
				continue
			}
			if at := e.created.Add(age); now.Before(at) {
				soon(at)
				continue
			}
			p.stats.MaxAgeRecycles++
			p.log.Debug().Str("sandbox", e.sb.ID()).Msg("recycle old sandbox")
			p.drain(e, false)
			changed = true
		}
	}
	if p.needy.Len() > 0 {
		// A tenant waits for a busy sandbox to serve its quantum.
		if v := p.longestServed(p.victims(p.needy.Front().Value.(*tenant))); v != nil {
			if at := v.assigned.Add(p.quantum()); now.Before(at) {
				soon(at)
			} else {
				changed = true
			}
		}
	}
	if !p.refillAt.IsZero() {
		if now.Before(p.refillAt) {
			soon(p.refillAt)
		} else {
			changed = true
		}
	}
	if changed {
		p.dispatch()
	}
	return next
}
