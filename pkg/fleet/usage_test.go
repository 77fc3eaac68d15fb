package fleet_test

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"

	"github.com/isode-run/isode/internal/testenv"
	"github.com/isode-run/isode/pkg/client"
	"github.com/isode-run/isode/pkg/protocol"
)

// captureUsage makes a JetStream stream of the usage subjects, as a
// platform that bills from them would, and returns a function that reads
// every record it holds.
func captureUsage(t *testing.T, e *env) func() []protocol.UsageRecord {
	t.Helper()
	js, err := jetstream.New(e.nc)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	s, err := js.CreateStream(ctx, jetstream.StreamConfig{
		Name:       "BILLING",
		Subjects:   []string{protocol.UsageWildcard(protocol.DefaultPrefix)},
		Storage:    jetstream.MemoryStorage,
		Duplicates: time.Minute,
	})
	if err != nil {
		t.Fatal(err)
	}
	return func() []protocol.UsageRecord {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		info, err := s.Info(ctx)
		if err != nil {
			t.Fatal(err)
		}
		var out []protocol.UsageRecord
		for seq := info.State.FirstSeq; info.State.Msgs > 0 && seq <= info.State.LastSeq; seq++ {
			m, err := s.GetMsg(ctx, seq)
			if err != nil {
				t.Fatal(err)
			}
			var r protocol.UsageRecord
			if err := json.Unmarshal(m.Data, &r); err != nil {
				t.Fatalf("record %d: %v", seq, err)
			}
			if !strings.HasPrefix(m.Subject, protocol.DefaultPrefix+".usage.") || m.Header.Get(protocol.HeaderMsgID) != r.RunID {
				t.Fatalf("record %d on %s with id %q, run id %q", seq, m.Subject, m.Header.Get(protocol.HeaderMsgID), r.RunID)
			}
			out = append(out, r)
		}
		return out
	}
}

// The usage stream holds exactly one record per answer the workers made:
// runs that succeeded and failed, and requests refused before they ran;
// nothing for redeliveries answered again from the reply cache. Its totals
// are those of what ran, and each reply carries the same figures.
func TestUsageRecordPerRun(t *testing.T) {
	e := newEnv(t)
	records := captureUsage(t, e)
	var calls atomic.Int64
	var mu sync.Mutex
	ranCPU := map[string]int64{} // request code -> CPU the runner reported
	cfg := testConfig("w1")
	cfg.DuplicateWindow = 100 * time.Millisecond
	cfg.RetryDelay = 50 * time.Millisecond
	var observed atomic.Int64
	cfg.OnUsage = func(rec *protocol.UsageRecord) { observed.Add(1) }
	startWorker(t, e, runnerFunc(func(ctx context.Context, req *protocol.Request) (*protocol.Result, error) {
		n := calls.Add(1)
		time.Sleep(5 * time.Millisecond)
		res := &protocol.Result{Value: json.RawMessage(`1`), Usage: protocol.Usage{
			Start: protocol.StartWarm, CPUMicros: 100 * n, CPUMeasured: true, PoolMicros: 100, MemoryBytes: 1 << 20, MemoryPeakBytes: 2 << 20,
		}}
		mu.Lock()
		ranCPU[req.Code] = 100 * n
		mu.Unlock()
		if strings.HasPrefix(req.Code, "fail") {
			return res, protocol.Errorf(protocol.CodeCodeError, "Error: boom")
		}
		return res, nil
	}), cfg)
	c := newClient(t, e, 8)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	// Ten runs that succeed, three that fail, each once.
	replies := map[string]*client.Result{}
	for i := range 13 {
		code := fmt.Sprintf("ok %d", i)
		if i >= 10 {
			code = fmt.Sprintf("fail %d", i)
		}
		res, err := c.Run(ctx, fmt.Sprintf("tenant-%d", i%3), code, client.WithRequestID(fmt.Sprintf("req-%d", i)))
		if i >= 10 {
			if pe := protocol.AsError(err); pe == nil || pe.Code != protocol.CodeCodeError {
				t.Fatalf("%s: %v", code, err)
			}
		} else if err != nil {
			t.Fatal(err)
		}
		if res == nil || res.Usage == nil {
			t.Fatalf("%s: reply without usage", code)
		}
		replies[res.ID] = res
	}
	// A redelivery of an answered request (here: the same id stored again
	// after the duplicate window) is answered from the cache: no record.
	time.Sleep(300 * time.Millisecond)
	again, err := c.Run(ctx, "tenant-0", "ok 0", client.WithRequestID("req-0"))
	if err != nil {
		t.Fatal(err)
	}
	if *again.Usage != *replies["req-0"].Usage {
		t.Errorf("the replayed reply's usage %+v differs from the first %+v", *again.Usage, *replies["req-0"].Usage)
	}
	// A reply nobody confirms is sent again from the cache, several times:
	// still one record.
	publishConfirmed(t, e, "unheard", "tenant-9", nats.NewInbox(), time.Now().Add(3*time.Second))
	// A request refused before it ran (its deadline passed) is answered,
	// and metered with no run.
	late := publishRaw(t, e, protocol.Shard("tenant-late", 8), mustJSON(t, protocol.Request{V: 1, IsolateKey: "tenant-late", Code: "x"}),
		map[string]string{protocol.HeaderDeadline: fmt.Sprint(time.Now().Add(-time.Second).UnixMilli())})
	if late.Error == nil || late.Error.Code != protocol.CodeQueueTimeout || late.Usage == nil || late.Usage.Start != "" || late.Usage.CPUMicros != 0 {
		t.Fatalf("late request: %+v usage %+v", late.Error, late.Usage)
	}

	// Wait for the unconfirmed request to reach its deadline and leave.
	waitFor(t, 15*time.Second, func() error {
		if n := streamMsgs(t, e); n != 0 {
			return fmt.Errorf("%d requests still in the stream", n)
		}
		return nil
	})
	if n := calls.Load(); n != 14 {
		t.Fatalf("the runner ran %d times, want 14 (13 and the unconfirmed one)", n)
	}
	var got []protocol.UsageRecord
	waitFor(t, 5*time.Second, func() error {
		got = records()
		if len(got) != 15 { // 14 runs and the late request
			return fmt.Errorf("%d usage records, want 15", len(got))
		}
		return nil
	})
	time.Sleep(200 * time.Millisecond)
	if n := len(records()); n != 15 {
		t.Fatalf("%d usage records after a while, want 15", n)
	}
	if n := observed.Load(); n != 15 {
		t.Errorf("OnUsage heard of %d records, want 15", n)
	}

	var cpu, wantCPU int64
	codes := map[string]int{}
	ids := map[string]bool{}
	for _, r := range got {
		if ids[r.ID] {
			t.Errorf("two records for request %s", r.ID)
		}
		ids[r.ID] = true
		codes[r.Code]++
		cpu += r.CPUMicros
		if r.Worker != "w1" || r.V != protocol.Version || r.Application != "default" || r.Shard != protocol.Shard(r.IsolateKey, 8) {
			t.Errorf("record %+v", r)
		}
		if r.ID == "late" || r.IsolateKey == "tenant-late" {
			continue
		}
		if r.Start != protocol.StartWarm || r.WallMicros < 4000 || r.PoolMicros != 100 || r.QueueMicros < r.PoolMicros || r.BytesIn == 0 || r.BytesOut == 0 || r.MemoryBytes != 1<<20 {
			t.Errorf("record %+v", r)
		}
		if rep, ok := replies[r.ID]; ok && *rep.Usage != r.Usage {
			t.Errorf("request %s: reply usage %+v, record %+v", r.ID, *rep.Usage, r.Usage)
		}
	}
	for _, v := range ranCPU {
		wantCPU += v
	}
	if cpu != wantCPU {
		t.Errorf("records total %d us of CPU, the runs reported %d", cpu, wantCPU)
	}
	if codes["ok"] != 11 || codes["code_error"] != 3 || codes["queue_timeout"] != 1 {
		t.Errorf("codes %v", codes)
	}

	// The worker's stats have the same totals per tenant.
	m, err := e.nc.Request(protocol.StatsSubject(protocol.DefaultPrefix), nil, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	var st protocol.WorkerStats
	if err := json.Unmarshal(m.Data, &st); err != nil {
		t.Fatal(err)
	}
	var runs, tenantCPU, errs uint64
	for _, ts := range st.Tenants {
		runs += ts.Runs
		tenantCPU += ts.CPUMicros
		for _, n := range ts.Errors {
			errs += n
		}
	}
	if len(st.Tenants) != 5 || runs != 15 || tenantCPU != uint64(wantCPU) || errs != 4 {
		t.Errorf("stats tenants %+v: %d runs, %d us CPU, %d errors; want 5 tenants, 15 runs, %d us, 4 errors", st.Tenants, runs, tenantCPU, errs, wantCPU)
	}
}

func mustJSON(t *testing.T, v any) []byte {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// A W3C traceparent on a request is on the worker's log lines for that
// run, on its reply and in its usage record; an invalid one is ignored.
func TestTraceparentIsCarried(t *testing.T) {
	e := newEnv(t)
	records := captureUsage(t, e)
	logs := &testenv.SyncBuffer{}
	cfg := testConfig("w1")
	cfg.Logger = zerolog.New(logs).Level(zerolog.DebugLevel)
	startWorker(t, e, echo, cfg)
	c := newClient(t, e, 8)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	const tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
	res, err := c.Run(ctx, "traced", "x", client.WithTraceparent(tp), client.WithRequestID("traced-1"))
	if err != nil {
		t.Fatal(err)
	}
	if res.Traceparent != tp {
		t.Errorf("reply traceparent %q", res.Traceparent)
	}
	// An invalid one (upper case) is neither echoed nor logged.
	bad := strings.ToUpper(tp)
	if _, err := c.Run(ctx, "traced", "x", client.WithTraceparent(bad)); err == nil {
		t.Error("the client took an invalid traceparent")
	}
	inbox := nats.NewInbox()
	sub, err := e.nc.SubscribeSync(inbox)
	if err != nil {
		t.Fatal(err)
	}
	m := nats.NewMsg(protocol.RunSubject(protocol.DefaultPrefix, protocol.Shard("traced", 8)))
	m.Data = mustJSON(t, protocol.Request{V: 1, IsolateKey: "traced", Code: "y"})
	m.Header.Set(protocol.HeaderMsgID, "traced-2")
	m.Header.Set(protocol.HeaderReplyTo, inbox)
	m.Header.Set(protocol.HeaderTraceparent, bad)
	js, _ := jetstream.New(e.nc)
	if _, err := js.PublishMsg(ctx, m); err != nil {
		t.Fatal(err)
	}
	rep, err := sub.NextMsg(5 * time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if got := rep.Header.Get(protocol.HeaderTraceparent); got != "" {
		t.Errorf("an invalid traceparent came back: %q", got)
	}

	var lines int
	for _, l := range strings.Split(strings.TrimSpace(logs.String()), "\n") {
		var entry struct {
			ID          string `json:"id"`
			Traceparent string `json:"traceparent"`
		}
		if json.Unmarshal([]byte(l), &entry) != nil {
			continue
		}
		switch entry.ID {
		case "traced-1":
			lines++
			if entry.Traceparent != tp {
				t.Errorf("log line without the trace: %s", l)
			}
		case "traced-2":
			if entry.Traceparent != "" {
				t.Errorf("log line with an invalid trace: %s", l)
			}
		}
	}
	if lines == 0 {
		t.Errorf("no log line about the traced run:\n%s", logs.String())
	}
	waitFor(t, 5*time.Second, func() error {
		recs := records()
		if len(recs) != 2 {
			return fmt.Errorf("%d records", len(recs))
		}
		for _, r := range recs {
			if want := map[string]string{"traced-1": tp, "traced-2": ""}[r.ID]; r.Traceparent != want {
				t.Errorf("record of %s: traceparent %q, want %q", r.ID, r.Traceparent, want)
			}
		}
		return nil
	})
}
