package fleet

import (
	"context"
	"sync"
)

// gate counts the requests a worker holds against its capacity.
//
// A shard loop pulls only while the gate has room. Its first message per
// pull is not reserved (so an idle worker keeps one small pull open on
// every shard it owns, whatever its capacity); any further messages of a
// batch are reserved before the pull is sent. Messages already on their way
// are always accepted, so the count exceeds capacity by at most one per
// owned shard, and nothing delivered is ever dropped.
type gate struct {
	capacity int

	mu       sync.Mutex
	held     int // messages being handled
	reserved int // batch slots promised to pulls in flight
	room     chan struct{}
}

func newGate(capacity int) *gate {
	return &gate{capacity: capacity, room: make(chan struct{})}
}

// wait blocks until the gate has room, then reserves up to extra slots
// beyond the first and returns how many it reserved.
func (g *gate) wait(ctx context.Context, extra int) (int, error) {
	for {
		g.mu.Lock()
		free := g.capacity - g.held - g.reserved
		if free > 0 {
			r := min(extra, free-1)
			g.reserved += r
			g.mu.Unlock()
			return r, nil
		}
		room := g.room
		g.mu.Unlock()
		select {
		case <-room:
		case <-ctx.Done():
			return 0, ctx.Err()
		}
	}
}

// take counts a delivered message, using a reserved slot if reserved.
func (g *gate) take(reserved bool) {
	g.mu.Lock()
	g.held++
	if reserved {
		g.reserved--
	}
	g.mu.Unlock()
}

// unreserve returns reserved slots a pull did not use.
func (g *gate) unreserve(n int) {
	if n == 0 {
		return
	}
	g.mu.Lock()
	g.reserved -= n
	g.signal()
	g.mu.Unlock()
}

// release counts a finished message.
func (g *gate) release() {
	g.mu.Lock()
	g.held--
	g.signal()
	g.mu.Unlock()
}

func (g *gate) signal() {
	if g.held+g.reserved < g.capacity {
		close(g.room)
		g.room = make(chan struct{})
	}
}

func (g *gate) count() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.held
}
