package main

// Fleet benchmarks (make bench-fleet; never part of make test): throughput
// and latency of `submit bench` against 1, 2 and 3 worker processes on this
// machine, with where the CPU went; and the failover time over 10 SIGKILLs.
// Run them with -benchtime 1x: each measures for a fixed time, not b.N.

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/docker/docker/api/types/container"
	"github.com/docker/docker/api/types/filters"

	"github.com/isode-run/isode/pkg/dockerx"
)

var (
	submitOnce sync.Once
	submitPath string
	submitErr  error
	submitOut  []byte
)

// submitBinary returns the path of a freshly built submit binary.
func submitBinary(t testing.TB) string {
	t.Helper()
	submitOnce.Do(func() {
		dir, err := os.MkdirTemp("", "isode-submit-bin-")
		if err != nil {
			submitErr = err
			return
		}
		submitPath = filepath.Join(dir, "submit")
		cmd := exec.Command("go", "build", "-o", submitPath, "../submit")
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		submitOut, submitErr = cmd.CombinedOutput()
	})
	if submitErr != nil {
		t.Fatalf("build submit: %v\n%s", submitErr, submitOut)
	}
	return submitPath
}

// cpuTicks reads the CPU time (user+system, in clock ticks) of a process.
func cpuTicks(pid int) int64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	// Fields after the command name, which is in parentheses.
	f := strings.Fields(string(b[bytes.LastIndexByte(b, ')')+2:]))
	if len(f) < 13 {
		return 0
	}
	u, _ := strconv.ParseInt(f[11], 10, 64)
	s, _ := strconv.ParseInt(f[12], 10, 64)
	return u + s
}

// ticksOf sums the CPU ticks of the processes whose command name (comm)
// starts with one of prefixes: the engine's own processes here.
func ticksOf(prefixes ...string) int64 {
	dirs, _ := filepath.Glob("/proc/[0-9]*")
	var sum int64
	for _, d := range dirs {
		comm, err := os.ReadFile(d + "/comm")
		if err != nil {
			continue
		}
		for _, p := range prefixes {
			if strings.HasPrefix(strings.TrimSpace(string(comm)), p) {
				pid, _ := strconv.Atoi(filepath.Base(d))
				sum += cpuTicks(pid)
				break
			}
		}
	}
	return sum
}

// machineTicks reads the machine's busy and total CPU ticks.
func machineTicks() (busy, total int64) {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0, 0
	}
	line, _, _ := strings.Cut(string(b), "\n")
	for i, v := range strings.Fields(line)[1:] {
		n, _ := strconv.ParseInt(v, 10, 64)
		total += n
		if i != 3 && i != 4 { // idle, iowait
			busy += n
		}
	}
	return busy, total
}

// sandboxCPU returns the CPU time (ns) each sandbox of the workers ids has
// used so far, by container.
func (f *testFleet) sandboxCPU(ids []string) map[string]uint64 {
	out := map[string]uint64{}
	for _, id := range ids {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		list, err := f.cli.ContainerList(ctx, container.ListOptions{
			Filters: filters.NewArgs(filters.Arg("label", dockerx.LabelWorker+"="+id))})
		cancel()
		if err != nil {
			f.t.Logf("list sandboxes: %v", err)
			continue
		}
		for _, c := range list {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			r, err := f.cli.ContainerStatsOneShot(ctx, c.ID)
			if err == nil {
				var st container.StatsResponse
				if json.NewDecoder(r.Body).Decode(&st) == nil {
					out[c.ID] = st.CPUStats.CPUUsage.TotalUsage
				}
				r.Body.Close()
			}
			cancel()
		}
	}
	return out
}

// cpuSince sums the CPU used since before (containers new since count whole).
func cpuSince(before, after map[string]uint64) time.Duration {
	var ns uint64
	for id, v := range after {
		if v >= before[id] {
			ns += v - before[id]
		}
	}
	return time.Duration(ns)
}

// BenchmarkFleetThroughput: `submit bench --scenario warm` (48 tenants, 32
// callers, 15 s) against 1, 2 and 3 worker processes sharing this machine
// with NATS and the load generator.
func BenchmarkFleetThroughput(b *testing.B) {
	for _, n := range []int{1, 2, 3} {
		b.Run(fmt.Sprintf("workers=%d", n), func(b *testing.B) {
			f := newFleet(b)
			submit := submitBinary(b)
			var ps []*fleetProc
			var ids []string
			for i := 0; i < n; i++ {
				p := f.start(fmt.Sprintf("b%d", i+1), "--low", "2", "--high", "64")
				ps = append(ps, p)
				ids = append(ids, p.id)
			}
			for _, p := range ps {
				p.waitReady(b, 90*time.Second)
			}
			f.steady(ids, 30*time.Second)

			cmd := exec.Command(submit, "bench", "--nats", f.nats.url("app"), "--scenario", "warm",
				"--tenants", "48", "--concurrency", "32", "--duration", "15s", "--no-baseline", "--json", "--quiet")
			var out, errOut bytes.Buffer
			cmd.Stdout, cmd.Stderr = &out, &errOut
			// CPU is sampled around the whole run, warm-up included; the
			// warm-up is short next to the 15 s measurement.
			sandboxes0 := f.sandboxCPU(ids)
			engine0 := ticksOf("dockerd", "containerd")
			busy0, total0 := machineTicks()
			self0 := cpuTicks(os.Getpid())
			workers0 := int64(0)
			for _, p := range ps {
				workers0 += cpuTicks(p.cmd.Process.Pid)
			}
			b.ResetTimer()
			if err := cmd.Start(); err != nil {
				b.Fatal(err)
			}
			submitPid := cmd.Process.Pid
			var submitCPU int64
			done := make(chan error, 1)
			go func() { done <- cmd.Wait() }()
			var err error
		wait:
			for {
				select {
				case err = <-done:
					break wait
				case <-time.After(200 * time.Millisecond):
					if c := cpuTicks(submitPid); c > 0 {
						submitCPU = c
					}
				}
			}
			b.StopTimer()
			if err != nil {
				b.Fatalf("submit bench: %v\n%s", err, errOut.String())
			}
			busy1, total1 := machineTicks()
			engine1 := ticksOf("dockerd", "containerd")
			workers1 := int64(0)
			for _, p := range ps {
				workers1 += cpuTicks(p.cmd.Process.Pid)
			}
			self1 := cpuTicks(os.Getpid())
			sandboxes := cpuSince(sandboxes0, f.sandboxCPU(ids))

			var rep struct {
				Results []struct {
					Name      string           `json:"name"`
					Runs      int              `json:"runs"`
					Errors    map[string]int   `json:"errors"`
					PerSecond float64          `json:"per_second"`
					Latency   map[string]int64 `json:"latency_us"`
				} `json:"results"`
			}
			if err := json.Unmarshal(out.Bytes(), &rep); err != nil || len(rep.Results) == 0 {
				b.Fatalf("submit bench --json: %v\n%s", err, out.String())
			}
			r := rep.Results[len(rep.Results)-1]
			b.ReportMetric(r.PerSecond, "runs/s")
			b.ReportMetric(float64(r.Latency["p50"])/1000, "p50-ms")
			b.ReportMetric(float64(r.Latency["p99"])/1000, "p99-ms")
			busy, total := float64(busy1-busy0), float64(total1-total0)
			share := func(ticks int64) float64 { return 100 * float64(ticks) / total }
			machine := 100 * busy / total
			b.ReportMetric(machine, "%cpu-busy")
			// Clock ticks are 1/100 s (USER_HZ); total counts every core.
			sandboxShare := 100 * float64(sandboxes) / float64(time.Duration(total)*10*time.Millisecond)
			ours := share(workers1-workers0) + share(self1-self0) + share(submitCPU) + sandboxShare + share(engine1-engine0)
			b.ReportMetric(sandboxShare, "%cpu-sandboxes")
			b.ReportMetric(share(engine1-engine0), "%cpu-engine")
			b.Logf("%d workers: %.0f runs/s, p50 %.2f ms, p99 %.2f ms, errors %v; CPU of the whole machine (%d cores): busy %.0f%% = workers %.0f%% + NATS and harness %.0f%% + submit %.0f%% + sandboxes %.0f%% + dockerd/containerd/shims %.0f%% + kernel and other processes %.0f%%",
				n, r.PerSecond, float64(r.Latency["p50"])/1000, float64(r.Latency["p99"])/1000, r.Errors, runtime.NumCPU(),
				machine, share(workers1-workers0), share(self1-self0), share(submitCPU), sandboxShare, share(engine1-engine0), machine-ours)
		})
	}
}

// BenchmarkFleetFailover: three workers under load; ten times, one is
// killed with SIGKILL and a replacement joins. Failover is the time from
// the kill to the first answer by another worker on one of the dead
// worker's shards. Every accepted request must be answered.
func BenchmarkFleetFailover(b *testing.B) {
	const kills = 10
	f := newFleet(b)
	ps := f.startReady("f1", "f2", "f3")
	alive := []*fleetProc{ps[0], ps[1], ps[2]}
	idsOf := func(ps []*fleetProc) []string {
		var ids []string
		for _, p := range ps {
			ids = append(ids, p.id)
		}
		return ids
	}
	own := f.steady(idsOf(alive), 30*time.Second)
	l := f.startLoad(8, fleetTenants(f.name, 12))
	var failovers, reowned []time.Duration
	b.ResetTimer()
	for i := 0; i < kills; i++ {
		// The victim: whoever served the most since the fleet last settled
		// (one whose shards hold none of the tenants would prove nothing).
		since := time.Now()
		l.waitFor(60*time.Second, "no load before the kill", func(rs []*fleetRequest) bool {
			_, n := busiest(rs, idsOf(alive), since)
			return n >= 10
		})
		l.mu.Lock()
		victimID, _ := busiest(l.all, idsOf(alive), since)
		l.mu.Unlock()
		victim := alive[slices.Index(idsOf(alive), victimID)]
		dead := own.of(victim.id)
		killAt := time.Now()
		victim.kill(b)
		alive = slices.DeleteFunc(alive, func(p *fleetProc) bool { return p == victim })
		f.steady(idsOf(alive), 30*time.Second)
		reowned = append(reowned, time.Since(killAt))
		l.waitFor(60*time.Second, "no answer on the dead worker's shards", func(rs []*fleetRequest) bool {
			_, ok := firstAnswer(rs, killAt, dead, victim.id)
			return ok
		})
		l.mu.Lock()
		first, _ := firstAnswer(l.all, killAt, dead, victim.id)
		l.mu.Unlock()
		failovers = append(failovers, first.Sub(killAt))
		b.Logf("kill %d: %s (%d shards): first answer on a dead shard after %v, shards re-owned (stats) within %v",
			i+1, victim.id, len(dead), first.Sub(killAt).Round(time.Millisecond), reowned[i].Round(time.Millisecond))
		p := f.start(fmt.Sprintf("f%d", i+4))
		p.waitReady(b, 90*time.Second)
		alive = append(alive, p)
		own = f.steady(idsOf(alive), 30*time.Second)
	}
	b.StopTimer()
	tl := l.finish(60 * time.Second)
	l.check(tl)
	slices.Sort(failovers)
	var sum time.Duration
	for _, d := range failovers {
		sum += d
	}
	ms := func(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
	b.ReportMetric(ms(failovers[len(failovers)/2]), "failover-p50-ms")
	b.ReportMetric(ms(failovers[len(failovers)-1]), "failover-max-ms")
	b.ReportMetric(ms(sum/time.Duration(len(failovers))), "failover-mean-ms")
	b.Logf("failover over %d kills: min %v, median %v, mean %v, max %v (all: %v)", kills,
		failovers[0].Round(time.Millisecond), failovers[len(failovers)/2].Round(time.Millisecond),
		(sum / time.Duration(len(failovers))).Round(time.Millisecond), failovers[len(failovers)-1].Round(time.Millisecond), failovers)
}
