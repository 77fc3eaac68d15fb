package fleet

import (
	"context"
	"sync"
)

// gate counts the requests a worker holds against its capacity. A shard
// loop takes its next message only while the gate has room; messages the
// client library has already buffered (at most PullBuffer per owned shard)
// wait there, in the stream's custody. A message taken is always handled,
// so nothing delivered is dropped.
type gate struct {
	capacity int

	mu   sync.Mutex
	held int
	room chan struct{} // closed and replaced when held drops below capacity
}

func newGate(capacity int) *gate {
	return &gate{capacity: capacity, room: make(chan struct{})}
}

// wait blocks until the gate has room.
func (g *gate) wait(ctx context.Context) error {
	for {
		g.mu.Lock()
		if g.held < g.capacity {
			g.mu.Unlock()
			return nil
		}
		room := g.room
		g.mu.Unlock()
		select {
		case <-room:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// take counts a message being handled.
func (g *gate) take() {
	g.mu.Lock()
	g.held++
	g.mu.Unlock()
}

// release counts a finished message.
func (g *gate) release() {
	g.mu.Lock()
	g.held--
	if g.held < g.capacity {
		close(g.room)
		g.room = make(chan struct{})
	}
	g.mu.Unlock()
}

func (g *gate) count() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.held
}
