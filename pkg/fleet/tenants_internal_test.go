package fleet

import (
	"fmt"
	"testing"

	"github.com/isode-run/isode/pkg/protocol"
)

// The table never holds more than its bound, keeps the busy tenants by
// name when many one-off tenants pass, and loses nothing from the sums.
func TestTenantTableIsBounded(t *testing.T) {
	tt := newTenantTable(10)
	rec := func(key, code string, cpu int64) *protocol.UsageRecord {
		return &protocol.UsageRecord{IsolateKey: key, Code: code, Usage: protocol.Usage{CPUMicros: cpu, WallMicros: 2 * cpu}}
	}
	var runs, cpu uint64
	for i := range 1000 {
		tt.add(rec("busy", protocol.CodeOK, 1000))
		runs++
		cpu += 1000
		if i%10 == 0 {
			tt.add(rec("busy", string(protocol.CodeTimeout), 5000))
			runs++
			cpu += 5000
		}
		tt.add(rec(fmt.Sprintf("once-%d", i), string(protocol.CodeCodeError), 10))
		runs++
		cpu += 10
		if n := len(tt.tenants); n > 10 {
			t.Fatalf("%d tenants tracked, bound 10", n)
		}
	}
	top := tt.top(3)
	if len(top) != 4 || top[0].IsolateKey != "busy" || top[3].IsolateKey != protocol.OtherTenants {
		t.Fatalf("top: %+v", top)
	}
	if b := top[0]; b.Runs != 1100 || b.Errors[string(protocol.CodeTimeout)] != 100 || b.CPUMicros != 1_500_000 || b.WallMicros != 3_000_000 {
		t.Errorf("busy: %+v", b)
	}
	var gotRuns, gotCPU, gotErrors uint64
	for _, s := range top {
		gotRuns += s.Runs
		gotCPU += s.CPUMicros
		gotErrors += s.Errors[string(protocol.CodeCodeError)]
	}
	if gotRuns != runs || gotCPU != cpu || gotErrors != 1000 {
		t.Errorf("sums: runs %d/%d, cpu %d/%d, code errors %d/1000", gotRuns, runs, gotCPU, cpu, gotErrors)
	}
	// Copies: changing what top returned changes nothing inside.
	top[0].Errors["x"] = 1
	if tt.top(1)[0].Errors["x"] != 0 {
		t.Error("top shares its error counts with the table")
	}
}
