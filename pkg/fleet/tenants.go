package fleet

import (
	"cmp"
	"slices"
	"sync"

	"github.com/isode-run/isode/pkg/protocol"
)

// tenantTable keeps running totals per tenant, bounded: at most max
// tenants are tracked; when a new one arrives at the bound, the tracked
// tenant with the fewest runs is folded into "others" (its totals are not
// lost from the sum, only from its name). Busy tenants therefore stay.
type tenantTable struct {
	mu      sync.Mutex
	max     int
	tenants map[string]*protocol.TenantStats
	others  protocol.TenantStats
}

func newTenantTable(max int) *tenantTable {
	return &tenantTable{max: max, tenants: make(map[string]*protocol.TenantStats), others: protocol.TenantStats{IsolateKey: protocol.OtherTenants}}
}

func (t *tenantTable) add(rec *protocol.UsageRecord) {
	t.mu.Lock()
	defer t.mu.Unlock()
	key := protocol.TenantKey(rec.Application, rec.IsolateKey)
	s := t.tenants[key]
	if s == nil {
		if len(t.tenants) >= t.max {
			t.evict()
		}
		s = &protocol.TenantStats{IsolateKey: rec.IsolateKey, Application: rec.Application}
		t.tenants[key] = s
	}
	addTo(s, rec)
}

func addTo(s *protocol.TenantStats, rec *protocol.UsageRecord) {
	s.Runs++
	if rec.Code != protocol.CodeOK {
		if s.Errors == nil {
			s.Errors = make(map[string]uint64)
		}
		s.Errors[rec.Code]++
	}
	s.CPUMicros += uint64(rec.CPUMicros)
	s.WallMicros += uint64(rec.WallMicros)
}

// evict folds the tenant with the fewest runs into others. t.mu is held.
func (t *tenantTable) evict() {
	var victim *protocol.TenantStats
	for _, s := range t.tenants {
		if victim == nil || s.Runs < victim.Runs {
			victim = s
		}
	}
	if victim == nil {
		return
	}
	delete(t.tenants, victim.Key())
	t.others.Runs += victim.Runs
	t.others.CPUMicros += victim.CPUMicros
	t.others.WallMicros += victim.WallMicros
	for code, n := range victim.Errors {
		if t.others.Errors == nil {
			t.others.Errors = make(map[string]uint64)
		}
		t.others.Errors[code] += n
	}
}

// top returns the n tenants with the most CPU time (then runs), and the
// others (every tenant not among them, folded) when there are any.
func (t *tenantTable) top(n int) []protocol.TenantStats {
	t.mu.Lock()
	all := make([]protocol.TenantStats, 0, len(t.tenants))
	for _, s := range t.tenants {
		c := *s
		c.Errors = cloneCounts(s.Errors)
		all = append(all, c)
	}
	others := t.others
	others.Errors = cloneCounts(t.others.Errors)
	t.mu.Unlock()
	slices.SortFunc(all, func(a, b protocol.TenantStats) int {
		return cmp.Or(cmp.Compare(b.CPUMicros, a.CPUMicros), cmp.Compare(b.Runs, a.Runs), cmp.Compare(a.Key(), b.Key()))
	})
	if len(all) > n {
		for _, s := range all[n:] {
			others.Runs += s.Runs
			others.CPUMicros += s.CPUMicros
			others.WallMicros += s.WallMicros
			for code, k := range s.Errors {
				if others.Errors == nil {
					others.Errors = make(map[string]uint64)
				}
				others.Errors[code] += k
			}
		}
		all = all[:n]
	}
	if others.Runs > 0 {
		all = append(all, others)
	}
	return all
}

func cloneCounts(m map[string]uint64) map[string]uint64 {
	if m == nil {
		return nil
	}
	c := make(map[string]uint64, len(m))
	for k, v := range m {
		c[k] = v
	}
	return c
}
