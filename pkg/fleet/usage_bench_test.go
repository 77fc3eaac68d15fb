package fleet

import (
	"encoding/json"
	"testing"
	"time"

	"github.com/isode-run/isode/pkg/metrics"
	"github.com/isode-run/isode/pkg/protocol"
)

// BenchmarkMetering is the worker's CPU per answer for metering, without
// the NATS publish of the record: the reply's usage member, the record's
// encoding, the tenant totals and the Prometheus instruments.
//
//	go test -run '^$' -bench Metering ./pkg/fleet/
func BenchmarkMetering(b *testing.B) {
	reply, _ := json.Marshal(&protocol.Reply{V: 1, ID: "0f8c2a6e-9a57-4a43-9d9f-3c1c2b8f1d2e", Result: json.RawMessage(`"Hello, world!"`), Worker: "w1", RunMicros: 650})
	tenants := newTenantTable(1000)
	m := metrics.New()
	u := protocol.Usage{WallMicros: 640, QueueMicros: 120, PoolMicros: 10, CPUMicros: 90, CPUMeasured: true,
		MemoryBytes: 70 << 20, MemoryPeakBytes: 71 << 20, Start: protocol.StartWarm, BytesIn: 120}
	b.ReportAllocs()
	for b.Loop() {
		uu := u
		data := withUsage(reply, &uu)
		rec := protocol.UsageRecord{V: 1, RunID: "0f8c2a6e-9a57-4a43-9d9f-3c1c2b8f1d2e/w1/1", ID: "0f8c2a6e-9a57-4a43-9d9f-3c1c2b8f1d2e",
			IsolateKey: "tenant1", Application: protocol.DefaultApplication, Worker: "w1", Shard: 7, Code: protocol.CodeOK, Time: time.Now().UTC(), Usage: uu}
		tenants.add(&rec)
		m.Observe(&rec)
		if _, err := json.Marshal(&rec); err != nil || len(data) == 0 {
			b.Fatal(err)
		}
	}
}
