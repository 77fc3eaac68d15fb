package fleet

import (
	"encoding/json"
	"strconv"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/isode-run/isode/pkg/protocol"
)

// usageOf completes the usage of an answered request from what the runner
// measured (res.Usage, when res is set) and what the worker knows: the
// stream's wait (from the stream storing the request to this worker taking
// it), the time spent in the runner, the request's size. BytesOut is set
// when the reply is encoded (withUsage).
func (d *delivery) usageOf(res *protocol.Result, runTime time.Duration) *protocol.Usage {
	var u protocol.Usage
	if res != nil {
		u = res.Usage
	}
	streamWait := max(d.began.Sub(d.stored), 0)
	if u.Start != "" {
		// It ran: the runner's time is its wait for a sandbox, then the run.
		u.WallMicros = max(runTime.Microseconds()-u.PoolMicros, 0)
		// One thread cannot use more CPU than the time it ran: a figure
		// over it is not believed (it comes from inside the sandbox).
		u.CPUMicros = min(u.CPUMicros, u.WallMicros)
	} else {
		// It never reached a sandbox: whatever time it spent was waiting.
		u.PoolMicros = runTime.Microseconds()
		u.CPUMicros, u.CPUMeasured = 0, false
	}
	u.QueueMicros = streamWait.Microseconds() + u.PoolMicros
	u.BytesIn = int64(len(d.msg.Data()))
	return &u
}

// withUsage returns the encoded Reply data with u added as its "usage"
// member, after setting u.BytesOut to the size of data without it. data is
// a JSON object this worker encoded (never empty: it has "v").
func withUsage(data []byte, u *protocol.Usage) []byte {
	if u == nil {
		return data
	}
	u.BytesOut = int64(len(data))
	b, err := json.Marshal(u)
	if err != nil { // not reached: Usage is numbers and strings
		return data
	}
	out := make([]byte, 0, len(data)+len(b)+10)
	out = append(out, data[:len(data)-1]...)
	out = append(out, `,"usage":`...)
	out = append(out, b...)
	return append(out, '}')
}

// meter records the usage of a request this worker answered (not a replay
// from the reply cache): it publishes the record on the usage subject,
// adds it to the tenant totals (WorkerStats.Tenants) and gives it to
// Config.OnUsage. Only requests whose body was decoded have a tenant and
// are metered.
func (d *delivery) meter(code string, u *protocol.Usage) {
	if d.tenant == "" || u == nil {
		return
	}
	w := d.w
	app, isolateKey := protocol.SplitTenantKey(d.tenant)
	var n uint64
	if d.md != nil {
		n = d.md.NumDelivered
	}
	rec := protocol.UsageRecord{
		V:           protocol.Version,
		RunID:       d.id + "/" + w.cfg.WorkerID + "/" + strconv.FormatUint(n, 10),
		ID:          d.id,
		IsolateKey:  isolateKey,
		Application: app,
		Worker:      w.cfg.WorkerID,
		Shard:       d.shard,
		Code:        code,
		Time:        time.Now().UTC(),
		Traceparent: d.traceparent,
		Usage:       *u,
	}
	w.tenants.add(&rec)
	if w.cfg.OnUsage != nil {
		w.cfg.OnUsage(&rec)
	}
	data, err := json.Marshal(&rec)
	if err != nil { // not reached
		w.log.Warn().Err(err).Msg("encode a usage record")
		return
	}
	hdr := nats.Header{}
	hdr.Set(protocol.HeaderMsgID, headerValue(rec.RunID))
	if err := w.out.publish(&nats.Msg{Subject: protocol.UsageSubject(w.cfg.Prefix, d.shard), Header: hdr, Data: data}); err != nil {
		w.log.Warn().Err(err).Str("id", d.id).Msg("publish a usage record")
	}
}
