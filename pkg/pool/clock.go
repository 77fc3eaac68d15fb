package pool

import "time"

// Clock tells the time and makes timers. The pool reads every time it acts
// on (idle and age recycling, refill backoff, MaxWait, CloseGrace) through
// it, so tests can drive it with a fake. Deadlines of contexts passed to
// Run and the per-attempt CreateTimeout use real time.
type Clock interface {
	Now() time.Time
	NewTimer(d time.Duration) Timer
}

// Timer is the part of *time.Timer the pool uses.
type Timer interface {
	C() <-chan time.Time
	Stop() bool
}

type realClock struct{}

func (realClock) Now() time.Time { return time.Now() }

func (realClock) NewTimer(d time.Duration) Timer { return realTimer{time.NewTimer(d)} }

type realTimer struct{ t *time.Timer }

func (t realTimer) C() <-chan time.Time { return t.t.C }
func (t realTimer) Stop() bool          { return t.t.Stop() }
