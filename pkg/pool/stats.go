package pool

import "github.com/isode-run/isode/pkg/protocol"

// counters are the pool's running totals; see Stats.
type counters struct {
	Hits, PoolHits, ColdStarts                        uint64
	Evictions, Preemptions                            uint64
	Recycles, IdleRecycles, MaxRequestRecycles        uint64
	MaxAgeRecycles                                    uint64
	Deaths, CreateFailures, Rejections, QueueTimeouts uint64
	Created, Destroyed                                uint64
	// deathCauses counts Deaths by the error code of the sandbox's Err.
	deathCauses map[protocol.Code]uint64
}

// Stats is a snapshot of the pool's state and counters.
//
// Every request granted a sandbox counts once, as a Hit, a PoolHit or a
// ColdStart, so their sum is the number of runs started.
type Stats struct {
	Low, High int

	Free     int // ready, unassigned sandboxes
	Assigned int // sandboxes of tenants, including those finishing their last runs
	Busy     int // assigned sandboxes with runs in flight
	Creating int // creations under way (each counts toward High)
	Closing  int // sandboxes being removed (each counts toward High)
	Queued   int // requests waiting
	InFlight int // runs in flight

	Hits       uint64 // requests served by their tenant's sandbox
	PoolHits   uint64 // requests served by a free sandbox assigned to their tenant for them
	ColdStarts uint64 // requests that waited for a sandbox created for their tenant
	Evictions  uint64 // sandboxes removed to make room for another tenant
	// Preemptions counts the Evictions of busy sandboxes (see the package
	// doc), which finish their runs first.
	Preemptions uint64
	// Recycles counts sandboxes removed for idleness, runs or age; the
	// three counters after it break it down.
	Recycles           uint64
	IdleRecycles       uint64
	MaxRequestRecycles uint64
	MaxAgeRecycles     uint64
	Deaths             uint64 // sandboxes that died on their own
	// DeathCauses breaks Deaths down by the code of the sandbox's Err
	// (out_of_memory, sandbox_crashed; internal when it gave none).
	DeathCauses    map[protocol.Code]uint64
	CreateFailures uint64 // failed Runtime.Create attempts
	Rejections     uint64 // requests refused with ErrQueueFull or ErrTenantQueueFull
	QueueTimeouts  uint64 // requests whose deadline passed while they waited
	Created        uint64 // sandboxes created
	Destroyed      uint64 // Sandbox.Close calls made
}

// Stats returns a snapshot of the pool.
func (p *Pool) Stats() Stats {
	p.mu.Lock()
	defer p.mu.Unlock()
	s := Stats{
		Low:      p.cfg.Low,
		High:     p.cfg.High,
		Free:     len(p.free),
		Assigned: len(p.entries) - len(p.free),
		Creating: p.creating,
		Closing:  p.closing,
		Queued:   p.queued,
		InFlight: p.inflight,

		Hits:               p.stats.Hits,
		PoolHits:           p.stats.PoolHits,
		ColdStarts:         p.stats.ColdStarts,
		Evictions:          p.stats.Evictions,
		Preemptions:        p.stats.Preemptions,
		Recycles:           p.stats.Recycles,
		IdleRecycles:       p.stats.IdleRecycles,
		MaxRequestRecycles: p.stats.MaxRequestRecycles,
		MaxAgeRecycles:     p.stats.MaxAgeRecycles,
		Deaths:             p.stats.Deaths,
		CreateFailures:     p.stats.CreateFailures,
		Rejections:         p.stats.Rejections,
		QueueTimeouts:      p.stats.QueueTimeouts,
		Created:            p.stats.Created,
		Destroyed:          p.stats.Destroyed,
	}
	if len(p.stats.deathCauses) > 0 {
		s.DeathCauses = make(map[protocol.Code]uint64, len(p.stats.deathCauses))
		for c, n := range p.stats.deathCauses {
			s.DeathCauses[c] = n
		}
	}
	for e := range p.entries {
		if e.tenant != nil && e.inflight > 0 {
			s.Busy++
		}
	}
	return s
}

// Protocol returns s in the wire shape a worker publishes.
func (s Stats) Protocol() protocol.PoolStats {
	return protocol.PoolStats{
		Free:          s.Free,
		Assigned:      s.Assigned,
		Busy:          s.Busy,
		Creating:      s.Creating,
		Queued:        s.Queued,
		Low:           s.Low,
		High:          s.High,
		Hits:          s.Hits,
		PoolHits:      s.PoolHits,
		ColdStarts:    s.ColdStarts,
		Evictions:     s.Evictions,
		Recycles:      s.Recycles,
		Deaths:        s.Deaths,
		Failures:      s.CreateFailures,
		Rejected:      s.Rejections,
		QueueTimeouts: s.QueueTimeouts,
	}
}
