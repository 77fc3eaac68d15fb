package fleet

import (
	"container/list"
	"sync"
	"time"
)

// replyCache keeps recent encoded replies by request id, bounded by age and
// total size, so that a redelivered request is answered again rather than
// run twice.
type replyCache struct {
	ttl      time.Duration
	maxBytes int

	mu    sync.Mutex
	bytes int
	byID  map[string]*list.Element
	order *list.List // of *cached, oldest first
}

type cached struct {
	id       string
	reply    []byte
	header   map[string][]string
	deadline time.Time // the request's: a replay is offered until then
	expires  time.Time
}

func newReplyCache(ttl time.Duration, maxBytes int) *replyCache {
	return &replyCache{ttl: ttl, maxBytes: maxBytes, byID: make(map[string]*list.Element), order: list.New()}
}

func (c *replyCache) get(id string, now time.Time) (*cached, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.expire(now)
	e, ok := c.byID[id]
	if !ok {
		return nil, false
	}
	return e.Value.(*cached), true
}

func (c *replyCache) put(v *cached, now time.Time) {
	size := len(v.reply) + len(v.id)
	if size > c.maxBytes || c.ttl <= 0 {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if old, ok := c.byID[v.id]; ok {
		c.remove(old)
	}
	v.expires = now.Add(c.ttl)
	c.byID[v.id] = c.order.PushBack(v)
	c.bytes += size
	for c.bytes > c.maxBytes {
		c.remove(c.order.Front())
	}
	c.expire(now)
}

func (c *replyCache) expire(now time.Time) {
	for e := c.order.Front(); e != nil && !now.Before(e.Value.(*cached).expires); e = c.order.Front() {
		c.remove(e)
	}
}

func (c *replyCache) remove(e *list.Element) {
	v := c.order.Remove(e).(*cached)
	delete(c.byID, v.id)
	c.bytes -= len(v.reply) + len(v.id)
}
