package main

import (
	"context"
	"encoding/json"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	isode "github.com/isode-run/isode/pkg/client"
	"github.com/isode-run/isode/pkg/protocol"
)

// burnCPU loops until its own thread has used ctx.data.ms of CPU by the
// kernel's count: on a shared machine a loop of so much wall time could
// get much less.
const burnCPU = `return function (ctx, cb) {
	const fs = require("fs");
	const cpu = () => Number(fs.readFileSync("/proc/thread-self/schedstat", "latin1").split(" ")[0]);
	const end = cpu() + ctx.data.ms * 1e6;
	while (cpu() < end);
	cb(null, "burnt");
}`

// The usage on replies and in the usage stream matches what the snippets
// did: a loop that burns 300 ms of CPU reports about that; a 300 ms timer
// reports the wall time and little CPU; the first run of a tenant took a
// free sandbox or a new one, the next ones were warm; one record per run, with the
// reply's figures.
func TestUsageMatchesWhatSnippetsDid(t *testing.T) {
	e := newE2E(t)
	js, err := jetstream.New(e.nc)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	e.start()
	usage, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: "BILLING", Subjects: []string{protocol.UsageWildcard("isode")}, Storage: jetstream.MemoryStorage})
	if err != nil {
		t.Fatal(err)
	}

	burn, err := e.run("usage-a", burnCPU, isode.WithInput(json.RawMessage(`{"ms":300}`)), isode.WithTimeout(20*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	u := burn.Usage
	if u == nil || !u.CPUMeasured {
		t.Fatalf("busy loop: usage %+v", u)
	}
	if cpu := time.Duration(u.CPUMicros) * time.Microsecond; cpu < 300*time.Millisecond || cpu > 360*time.Millisecond {
		t.Errorf("a loop that burnt 300 ms of CPU reported %v", cpu)
	}
	if u.WallMicros < u.CPUMicros || (u.Start != protocol.StartPool && u.Start != protocol.StartCold) || u.MemoryBytes < 1<<20 || u.MemoryPeakBytes < u.MemoryBytes || u.BytesIn == 0 || u.BytesOut == 0 {
		t.Errorf("busy loop: usage %+v", u)
	}

	idle, err := e.run("usage-a", `return function (cb) { setTimeout(() => cb(null, "slept"), 300) }`)
	if err != nil {
		t.Fatal(err)
	}
	u = idle.Usage
	if u == nil || !u.CPUMeasured || u.Start != protocol.StartWarm {
		t.Fatalf("timer: usage %+v", u)
	}
	if wall, cpu := time.Duration(u.WallMicros)*time.Microsecond, time.Duration(u.CPUMicros)*time.Microsecond; wall < 300*time.Millisecond || cpu > 30*time.Millisecond {
		t.Errorf("a 300 ms timer reported wall %v, CPU %v", wall, cpu)
	}

	_, err = e.run("usage-a", `return function (cb) { throw new Error("boom") }`)
	if pe := protocol.AsError(err); pe == nil || pe.Code != protocol.CodeCodeError {
		t.Fatalf("throw: %v", err)
	}

	// A snippet that burns CPU, then posts results of its own claiming
	// none, does not change its figure: the agent reads the kernel's.
	forged, err := e.run("usage-a", `return function (cb) {
		const fs = require("fs");
		const cpu = () => Number(fs.readFileSync("/proc/thread-self/schedstat", "latin1").split(" ")[0]);
		const end = cpu() + 100e6;
		while (cpu() < end);
		const { parentPort } = require("worker_threads");
		for (let id = 0; id < 64; id++) parentPort.postMessage({ t: "result", id, json: '"forged"', usage: { cpu_ns: 0, rss: 0, peak_rss: 0 }, console: "", truncated: false, recycle: true });
	}`, isode.WithTimeout(20*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	if u := forged.Usage; u == nil || u.CPUMicros < 100_000 || u.MemoryBytes == 0 {
		t.Errorf("a snippet that burnt 100 ms of CPU and claimed none reported %+v", u)
	}

	replies := map[string]*protocol.Usage{burn.ID: burn.Usage, idle.ID: idle.Usage, forged.ID: forged.Usage}
	var recs []protocol.UsageRecord
	deadline := time.Now().Add(10 * time.Second)
	for {
		info, err := usage.Info(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if info.State.Msgs >= 4 || time.Now().After(deadline) {
			time.Sleep(200 * time.Millisecond) // nothing more comes
			if info, err = usage.Info(ctx); err != nil {
				t.Fatal(err)
			}
			if info.State.Msgs != 4 {
				t.Fatalf("%d usage records for 4 runs", info.State.Msgs)
			}
			for seq := info.State.FirstSeq; seq <= info.State.LastSeq; seq++ {
				m, err := usage.GetMsg(ctx, seq)
				if err != nil {
					t.Fatal(err)
				}
				var r protocol.UsageRecord
				if err := json.Unmarshal(m.Data, &r); err != nil {
					t.Fatal(err)
				}
				recs = append(recs, r)
			}
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	codes := map[string]int{}
	for _, r := range recs {
		codes[r.Code]++
		if r.IsolateKey != "usage-a" || r.Shard != protocol.Shard("usage-a", protocol.DefaultShards) {
			t.Errorf("record %+v", r)
		}
		if want, ok := replies[r.ID]; ok && *want != r.Usage {
			t.Errorf("record of %s: %+v, its reply said %+v", r.ID, r.Usage, *want)
		}
	}
	if codes[protocol.CodeOK] != 3 || codes[string(protocol.CodeCodeError)] != 1 {
		t.Errorf("record codes %v", codes)
	}
}
