package pool

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"time"
)

// creation is one sandbox being made. It holds a slot toward High from
// start to end, through its retries and, after an eviction, through the
// closing of the evicted sandbox, so that the engine never holds more than
// High sandboxes.
type creation struct {
	t      *tenant       // nil for a free sandbox, until a tenant claims it
	victim *entry        // evicted sandbox to close first, or nil
	token  chan struct{} // closed when a Create slot is granted
}

// startCreation begins making a sandbox for t (nil: a free one), after
// closing victim if there is one.
func (p *Pool) startCreation(t *tenant, victim *entry) {
	c := &creation{t: t, victim: victim}
	p.creating++
	if victim != nil {
		p.removingVictims++
	}
	if t != nil {
		t.creation = c
	} else {
		p.unclaimed = append(p.unclaimed, c)
	}
	p.wg.Add(1)
	go p.create(c)
}

// refill starts creations of free sandboxes until Low are ready or under
// way, within High, unless a refill failed recently.
func (p *Pool) refill() {
	if p.closed || p.cfg.Low == 0 {
		return
	}
	if !p.refillAt.IsZero() {
		if p.clock.Now().Before(p.refillAt) {
			return
		}
		p.refillAt = time.Time{}
	}
	for len(p.free)+len(p.unclaimed) < p.cfg.Low && p.total() < p.cfg.High {
		p.startCreation(nil, nil)
	}
}

// create runs one creation to its end.
func (p *Pool) create(c *creation) {
	defer p.wg.Done()
	if c.victim != nil {
		if err := p.closeSandbox(c.victim.sb); err != nil {
			p.log.Warn().Err(err).Msg("remove evicted sandbox")
		}
		p.mu.Lock()
		p.removingVictims--
		p.dispatch()
		p.mu.Unlock()
	}
	for attempt := 1; ; attempt++ {
		if !p.createSlot(c) {
			p.mu.Lock()
			p.abandon(c)
			p.mu.Unlock()
			return
		}
		p.mu.Lock()
		if t := c.t; t != nil && t.waiters.Len() == 0 {
			// Every request that wanted it has gone (while it waited for
			// its victim's removal or a slot): it is made free instead,
			// and the next tenant in the ring claims it at once.
			t.creation = nil
			c.t = nil
			p.unclaimed = append(p.unclaimed, c)
			p.forget(t)
			p.dispatch()
		}
		key := ""
		if c.t != nil {
			key = c.t.key
		}
		p.mu.Unlock()

		ctx, cancel := context.WithTimeout(p.createCtx, p.cfg.CreateTimeout)
		start := p.clock.Now()
		sb, err := p.rt.Create(ctx, key)
		took := p.clock.Now().Sub(start)
		cancel()
		if err == nil && sb == nil {
			err = errors.New("the runtime returned neither a sandbox nor an error")
		}

		p.mu.Lock()
		p.releaseCreateSlot()
		if err == nil {
			if p.closed {
				p.abandon(c)
				p.mu.Unlock()
				if err := p.closeSandbox(sb); err != nil {
					p.log.Warn().Err(err).Msg("remove sandbox created after close")
				}
				return
			}
			if p.stats.Created == 0 {
				p.avgCreate = took
			} else {
				p.avgCreate += (took - p.avgCreate) / 5
			}
			p.created(c, sb, key)
			p.mu.Unlock()
			return
		}
		p.stats.CreateFailures++
		log := p.log.Warn().Err(err).Int("attempt", attempt)
		switch {
		case p.closed:
			p.abandon(c)
			p.mu.Unlock()
			return
		case c.t == nil:
			// A refill: give the slot back and try again later, from the
			// janitor, with a pause that grows with each failure in a row.
			p.refillFails++
			wait := p.backoff(p.refillFails)
			p.refillAt = p.clock.Now().Add(wait)
			p.abandon(c)
			p.poke()
			p.mu.Unlock()
			log.Dur("retry_in", wait).Msg("create free sandbox")
			return
		case c.t.waiters.Len() == 0:
			// Every request that wanted it has gone.
			log.Str("tenant", c.t.key).Msg("create sandbox; nobody waits for it any more")
			p.abandon(c)
			p.mu.Unlock()
			return
		case attempt >= p.cfg.CreateRetries:
			t := c.t
			ferr := fmt.Errorf("%w after %d attempts: %w", ErrCreateFailed, attempt, err)
			for t.waiters.Len() > 0 {
				w := t.waiters.Remove(t.waiters.Front()).(*waiter)
				w.elem = nil
				w.err = ferr
				p.unqueue(t)
				close(w.ready)
			}
			p.abandon(c)
			p.mu.Unlock()
			log.Str("tenant", t.key).Msg("create sandbox: giving up")
			return
		}
		wait := p.backoff(attempt)
		p.mu.Unlock()
		log.Str("tenant", key).Dur("retry_in", wait).Msg("create sandbox")
		timer := p.clock.NewTimer(wait)
		select {
		case <-timer.C():
		case <-p.createCtx.Done():
		}
		timer.Stop()
	}
}

// created puts a new sandbox in the pool: free, or the sandbox of the
// tenant that asked or claimed it. p.mu is held.
func (p *Pool) created(c *creation, sb Sandbox, key string) {
	p.creating--
	p.refillFails = 0
	e := p.add(sb, key)
	if c.t == nil {
		p.unclaim(c)
		p.free = append(p.free, e)
		p.log.Debug().Str("sandbox", sb.ID()).Msg("free sandbox ready")
	} else {
		t := c.t
		t.creation = nil
		p.assign(e, t) // assigns a free one claimed while it was made

		p.serve(t, grantColdStart)
		p.log.Debug().Str("sandbox", sb.ID()).Str("tenant", t.key).Msg("sandbox ready")
		if e.inflight == 0 && p.cfg.IdleTimeout > 0 {
			p.wakeBy(e.lastUsed.Add(p.cfg.IdleTimeout)) // nobody waits any more
		}
	}
	p.dispatch()
}

// abandon ends a creation that made nothing and gives its slot back.
// p.mu is held.
func (p *Pool) abandon(c *creation) {
	p.creating--
	if t := c.t; t != nil {
		if t.creation == c {
			t.creation = nil
		}
		p.markNeedy(t)
		p.forget(t)
	} else {
		p.unclaim(c)
	}
	p.dispatch()
}

func (p *Pool) unclaim(c *creation) {
	if i := slices.Index(p.unclaimed, c); i >= 0 {
		p.unclaimed = slices.Delete(p.unclaimed, i, i+1)
	}
}

// createSlot waits for one of the CreateConcurrency slots; it returns false
// when the pool is closing.
func (p *Pool) createSlot(c *creation) bool {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return false
	}
	if p.createRunning < p.cfg.CreateConcurrency && len(p.createWaiting) == 0 {
		p.createRunning++
		p.mu.Unlock()
		return true
	}
	c.token = make(chan struct{})
	p.createWaiting = append(p.createWaiting, c)
	p.mu.Unlock()
	select {
	case <-c.token:
		return true
	case <-p.createCtx.Done():
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	select {
	case <-c.token:
		p.releaseCreateSlot() // granted meanwhile: hand it on
	default:
		if i := slices.Index(p.createWaiting, c); i >= 0 {
			p.createWaiting = slices.Delete(p.createWaiting, i, i+1)
		}
	}
	return false
}

// releaseCreateSlot gives a Create slot back and hands it to the next
// waiting creation, those of tenants before free ones. p.mu is held.
func (p *Pool) releaseCreateSlot() {
	p.createRunning--
	for p.createRunning < p.cfg.CreateConcurrency && len(p.createWaiting) > 0 {
		i := slices.IndexFunc(p.createWaiting, func(c *creation) bool { return c.t != nil })
		if i < 0 {
			i = 0
		}
		c := p.createWaiting[i]
		p.createWaiting = slices.Delete(p.createWaiting, i, i+1)
		p.createRunning++
		close(c.token)
	}
}

// backoff is the pause before attempt n+1: CreateBackoff doubled n-1 times,
// capped at CreateBackoffMax, half of it random.
func (p *Pool) backoff(n int) time.Duration {
	d := p.cfg.CreateBackoff
	for i := 1; i < n && d < p.cfg.CreateBackoffMax; i++ {
		d *= 2
	}
	d = min(d, p.cfg.CreateBackoffMax)
	if d < 2 {
		return d
	}
	return d/2 + rand.N(d/2)
}
