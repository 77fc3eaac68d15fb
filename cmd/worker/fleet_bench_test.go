package main

// Fleet benchmarks (make bench-fleet; never part of make test): throughput
// and latency of `submit bench` against 1, 2 and 3 worker processes on this
// machine, with where the CPU went; and the failover time over 10 SIGKILLs.
// Run them with -benchtime 1x: each measures for a fixed time, not b.N.

import (
	"bufio"
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
		var mu sync.Mutex
		var wg sync.WaitGroup
		for _, c := range list {
			wg.Add(1)
			go func() {
				defer wg.Done()
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				defer cancel()
				r, err := f.cli.ContainerStatsOneShot(ctx, c.ID)
				if err != nil {
					return
				}
				defer r.Body.Close()
				var st container.StatsResponse
				if json.NewDecoder(r.Body).Decode(&st) == nil {
					mu.Lock()
					out[c.ID] = st.CPUStats.CPUUsage.TotalUsage
					mu.Unlock()
				}
			}()
		}
		wg.Wait()
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

// cpuSample is the CPU time used so far, by part; a difference of two is
// the CPU used in between.
type cpuSample struct {
	at                               time.Time
	busy, total                      time.Duration // the machine, all cores
	workers, harness, submit, engine time.Duration
	sandboxes                        time.Duration // of the difference only
	sandboxByID                      map[string]uint64
}

const tick = 10 * time.Millisecond // USER_HZ: /proc counts CPU in 1/100 s

func (f *testFleet) cpuSample(ps []*fleetProc, submitPid int) *cpuSample {
	var ids []string
	var workers int64
	for _, p := range ps {
		ids = append(ids, p.id)
		workers += cpuTicks(p.cmd.Process.Pid)
	}
	c := &cpuSample{sandboxByID: f.sandboxCPU(ids)}
	busy, total := machineTicks()
	c.at = time.Now()
	c.busy, c.total = time.Duration(busy)*tick, time.Duration(total)*tick
	c.workers = time.Duration(workers) * tick
	c.harness = time.Duration(cpuTicks(os.Getpid())) * tick
	c.submit = time.Duration(cpuTicks(submitPid)) * tick
	c.engine = time.Duration(ticksOf("dockerd", "containerd")) * tick
	return c
}

type cpuDiff struct {
	cpuSample
	wall time.Duration
}

func (c *cpuSample) minus(before *cpuSample) cpuDiff {
	return cpuDiff{wall: c.at.Sub(before.at), cpuSample: cpuSample{
		busy: c.busy - before.busy, total: c.total - before.total,
		workers: c.workers - before.workers, harness: c.harness - before.harness,
		submit: c.submit - before.submit, engine: c.engine - before.engine,
		sandboxes: cpuSince(before.sandboxByID, c.sandboxByID),
	}}
}

// pct is d as a share of the machine (every core) over the interval.
func (d cpuDiff) pct(v time.Duration) float64 { return 100 * float64(v) / float64(d.total) }

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

			// Without --quiet, submit prints a progress line a second; the
			// first one of the measurement ("[warm (48 tenants)] ...") marks
			// the end of the warm-up, which cold-starts 48 sandboxes and is
			// kept out of the CPU figures.
			cmd := exec.Command(submit, "bench", "--nats", f.nats.url("app-a"), "--scenario", "warm",
				"--tenants", "48", "--concurrency", "32", "--duration", "15s", "--no-baseline", "--json",
				"--timeout", "30s") // the warm-up cold-starts 48 sandboxes at once on a busy machine
			var out bytes.Buffer
			cmd.Stdout = &out
			progress, err := cmd.StderrPipe()
			if err != nil {
				b.Fatal(err)
			}
			b.ResetTimer()
			if err := cmd.Start(); err != nil {
				b.Fatal(err)
			}
			var errOut strings.Builder
			var c0 *cpuSample
			sc := bufio.NewScanner(progress)
			for sc.Scan() {
				errOut.WriteString(sc.Text() + "\n")
				if c0 == nil && strings.HasPrefix(sc.Text(), "[warm (") {
					c0 = f.cpuSample(ps, cmd.Process.Pid)
				}
			}
			// Sampled just before the process ends: its last progress line
			// comes a second before the end at most.
			c1 := f.cpuSample(ps, cmd.Process.Pid)
			err = cmd.Wait()
			b.StopTimer()
			if err != nil {
				b.Fatalf("submit bench: %v\n%s", err, errOut.String())
			}
			if c0 == nil {
				b.Fatalf("submit bench printed no progress line of the measurement:\n%s", errOut.String())
			}
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
			d := c1.minus(c0)
			b.ReportMetric(d.pct(d.busy), "%cpu-busy")
			b.ReportMetric(d.pct(d.sandboxes), "%cpu-sandboxes")
			b.ReportMetric(d.pct(d.engine), "%cpu-engine")
			rest := d.busy - d.workers - d.harness - d.submit - d.sandboxes - d.engine
			b.Logf("%d workers: %.0f runs/s, p50 %.2f ms, p99 %.2f ms, errors %v; CPU of the whole machine (%d cores) while measuring: busy %.0f%% = workers %.0f%% + NATS and harness %.0f%% + submit %.0f%% + sandboxes %.0f%% (%.2f ms a run) + dockerd/containerd/shims %.0f%% + kernel and other processes %.0f%%",
				n, r.PerSecond, float64(r.Latency["p50"])/1000, float64(r.Latency["p99"])/1000, r.Errors, runtime.NumCPU(),
				d.pct(d.busy), d.pct(d.workers), d.pct(d.harness), d.pct(d.submit), d.pct(d.sandboxes),
				float64(d.sandboxes)/float64(time.Millisecond)/(r.PerSecond*d.wall.Seconds()), d.pct(d.engine), d.pct(rest))
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
		failover := l.failover(killAt, dead, victim.id)
		failovers = append(failovers, failover)
		b.Logf("kill %d: %s (%d shards): first answer on a dead shard after %v, shards re-owned (stats) within %v",
			i+1, victim.id, len(dead), failover.Round(time.Millisecond), reowned[i].Round(time.Millisecond))
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
