package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"time"
)

// The CPU sampler of `submit bench --cpu-worker-pid`: when the fleet runs
// on this machine, it reads /proc at the start and at the end of a steady
// window inside the measurement and charges each process's CPU time to a
// component: the worker's sandboxes (every process in the cgroup of one of
// its containers: node and Docker's init), the worker (with an embedded
// NATS server), a NATS server of its own, the containerd shims of those
// containers, dockerd, containerd, and this bench. "other" is the rest of
// the machine's busy time (other people's work on a shared machine).
//
// Linux only; /proc times are in clock ticks (USER_HZ, 100 on Linux).

const clockTicks = 100

// components, in report order.
var components = []string{"sandboxes", "worker", "nats", "containerd-shim", "dockerd", "containerd", "bench", "other"}

// cpuOptions says which processes are whose.
type cpuOptions struct {
	WorkerPID int    // the worker process
	NATSPID   int    // a separate NATS server, 0 when embedded
	WorkerID  string // the worker's id: its containers carry it in io.isode.worker
	Skip      time.Duration
	Window    time.Duration
}

// procUsage is what /proc says of one process.
type procUsage struct {
	comp    string
	start   uint64 // start time, ticks after boot: a pid reused meanwhile is another process
	ticks   uint64 // utime + stime, all threads
	minflt  uint64
	csw     uint64 // voluntary and involuntary, all live threads
	threads int
}

// cpuSample is one reading of the machine.
type cpuSample struct {
	at    time.Time
	runs  int64
	busy  uint64 // the machine's non-idle ticks, all CPUs
	procs map[int]procUsage
}

// componentUsage is one row of the CPU table.
type componentUsage struct {
	Name          string  `json:"name"`
	CPUPerRunUs   float64 `json:"cpu_per_run_us"`
	Share         float64 `json:"share"`
	FaultsPerRun  float64 `json:"minor_faults_per_run,omitempty"`
	SwitchesPerRn float64 `json:"context_switches_per_run,omitempty"`
	Threads       int     `json:"threads,omitempty"`
}

// cpuReport is the CPU table of one window.
type cpuReport struct {
	Seconds     float64          `json:"seconds"`
	Runs        int64            `json:"runs"`
	PerSecond   float64          `json:"per_second"`
	Cores       float64          `json:"cores_busy"` // the whole machine, other people's work included
	CPUPerRunUs float64          `json:"cpu_per_run_us"`
	Components  []componentUsage `json:"components"`
	Containers  int              `json:"containers"`
	// Gone counts the processes that ended during the window: what they
	// used after it opened is missing from the table.
	Gone int `json:"processes_gone"`
}

var containerIDPattern = regexp.MustCompile(`[0-9a-f]{64}`)

// workerContainers returns the ids of the worker's running containers.
// The docker CLI is asked (so that submit needs no Docker client); an
// engine that cannot be reached is an error.
func workerContainers(ctx context.Context, workerID string) (map[string]bool, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, "docker", "ps", "-q", "--no-trunc", "--filter", "label=io.isode.worker="+workerID).Output()
	if err != nil {
		return nil, fmt.Errorf("list the worker's containers: %w", err)
	}
	ids := map[string]bool{}
	for _, l := range strings.Fields(string(out)) {
		ids[l] = true
	}
	return ids, nil
}

// sampleCPU reads every process of the machine once.
func sampleCPU(o cpuOptions, containers map[string]bool, runs int64) (*cpuSample, error) {
	s := &cpuSample{at: time.Now(), runs: runs, procs: map[int]procUsage{}}
	busy, err := machineBusy()
	if err != nil {
		return nil, err
	}
	s.busy = busy
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return nil, err
	}
	self := os.Getpid()
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		comp := classify(pid, self, o, containers)
		if comp == "" {
			continue
		}
		u, err := readProc(pid)
		if err != nil {
			continue // gone meanwhile
		}
		u.comp = comp
		s.procs[pid] = u
	}
	return s, nil
}

// classify names the component of a process, "" for one that is not ours.
func classify(pid, self int, o cpuOptions, containers map[string]bool) string {
	switch pid {
	case self:
		return "bench"
	case o.WorkerPID:
		return "worker"
	case o.NATSPID:
		if o.NATSPID != 0 {
			return "nats"
		}
	}
	comm, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "comm"))
	if err != nil {
		return ""
	}
	name := strings.TrimSpace(string(comm))
	switch {
	case name == "dockerd":
		return "dockerd"
	case name == "containerd":
		return "containerd"
	case strings.HasPrefix(name, "containerd-shim"):
		cmd, _ := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "cmdline"))
		if id := containerIDPattern.Find(cmd); id != nil && containers[string(id)] {
			return "containerd-shim"
		}
		return ""
	}
	cg, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "cgroup"))
	if err != nil {
		return ""
	}
	for _, id := range containerIDPattern.FindAll(cg, -1) {
		if containers[string(id)] {
			return "sandboxes"
		}
	}
	return ""
}

// readProc reads a process's CPU time and minor faults (whole process,
// from stat) and its threads' context switches.
func readProc(pid int) (procUsage, error) {
	dir := filepath.Join("/proc", strconv.Itoa(pid))
	stat, err := os.ReadFile(filepath.Join(dir, "stat"))
	if err != nil {
		return procUsage{}, err
	}
	f, err := statFields(stat)
	if err != nil {
		return procUsage{}, err
	}
	// After the command: state is field 3; minflt 10, utime 14, stime 15,
	// starttime 22 (1-based, proc(5)); f[0] is field 3.
	num := func(field int) uint64 {
		v, _ := strconv.ParseUint(f[field-3], 10, 64)
		return v
	}
	u := procUsage{ticks: num(14) + num(15), minflt: num(10), start: num(22)}
	tasks, _ := os.ReadDir(filepath.Join(dir, "task"))
	for _, t := range tasks {
		st, err := os.ReadFile(filepath.Join(dir, "task", t.Name(), "status"))
		if err != nil {
			continue
		}
		u.csw += statusField(st, "voluntary_ctxt_switches:") + statusField(st, "nonvoluntary_ctxt_switches:")
	}
	u.threads = len(tasks)
	return u, nil
}

// statFields returns the fields of /proc/PID/stat after the command name,
// which may itself hold spaces and parentheses.
func statFields(stat []byte) ([]string, error) {
	i := bytes.LastIndexByte(stat, ')')
	if i < 0 || i+2 > len(stat) {
		return nil, errors.New("malformed stat")
	}
	f := strings.Fields(string(stat[i+2:]))
	if len(f) < 20 {
		return nil, errors.New("short stat")
	}
	return f, nil
}

func statusField(status []byte, key string) uint64 {
	i := bytes.Index(status, []byte(key))
	if i < 0 {
		return 0
	}
	rest := status[i+len(key):]
	if j := bytes.IndexByte(rest, '\n'); j >= 0 {
		rest = rest[:j]
	}
	v, _ := strconv.ParseUint(strings.TrimSpace(string(rest)), 10, 64)
	return v
}

// machineBusy returns the machine's non-idle ticks over all CPUs.
func machineBusy() (uint64, error) {
	f, err := os.Open("/proc/stat")
	if err != nil {
		return 0, err
	}
	defer f.Close()
	line, err := bufio.NewReader(f).ReadString('\n')
	if err != nil && err != io.EOF {
		return 0, err
	}
	fields := strings.Fields(line)
	if len(fields) < 5 || fields[0] != "cpu" {
		return 0, errors.New("/proc/stat has no cpu line")
	}
	var busy uint64
	for i, v := range fields[1:] {
		if i == 3 || i == 4 { // idle, iowait
			continue
		}
		if i >= 7 { // guest and guest_nice are already in user and nice
			break
		}
		n, _ := strconv.ParseUint(v, 10, 64)
		busy += n
	}
	return busy, nil
}

// cpuDiff turns two samples into the per-run table. A process is charged
// what it used between the samples; one that started meanwhile (a sandbox
// created during the window) all it used, its start included. What a
// process that ended meanwhile used after the first sample is not seen:
// Gone counts them.
func cpuDiff(a, b *cpuSample, containers int) *cpuReport {
	runs := b.runs - a.runs
	secs := b.at.Sub(a.at).Seconds()
	r := &cpuReport{Seconds: secs, Runs: runs, Containers: containers}
	if secs <= 0 || runs <= 0 {
		return r
	}
	r.PerSecond = float64(runs) / secs
	tickUs := 1e6 / float64(clockTicks)
	busy := sub(b.busy, a.busy)
	r.Cores = float64(busy) / clockTicks / secs
	type sums struct {
		ticks, flt, csw uint64
		threads         int
	}
	by := map[string]*sums{}
	for _, c := range components {
		by[c] = &sums{}
	}
	for pid, u := range b.procs {
		was, ok := a.procs[pid]
		if !ok || was.start != u.start || was.comp != u.comp {
			was = procUsage{} // new since the first sample
		}
		s := by[u.comp]
		s.ticks += sub(u.ticks, was.ticks)
		s.flt += sub(u.minflt, was.minflt)
		s.csw += sub(u.csw, was.csw)
		s.threads += u.threads
	}
	for pid, u := range a.procs {
		if now, ok := b.procs[pid]; !ok || now.start != u.start {
			r.Gone++
		}
	}
	var known uint64
	for _, c := range components {
		s := by[c]
		if c == "other" || (s.ticks == 0 && s.threads == 0) {
			continue
		}
		known += s.ticks
		r.Components = append(r.Components, componentUsage{
			Name:          c,
			CPUPerRunUs:   float64(s.ticks) * tickUs / float64(runs),
			FaultsPerRun:  float64(s.flt) / float64(runs),
			SwitchesPerRn: float64(s.csw) / float64(runs),
			Threads:       s.threads,
		})
	}
	var total float64
	for _, c := range r.Components {
		total += c.CPUPerRunUs
	}
	r.CPUPerRunUs = total
	for i := range r.Components {
		r.Components[i].Share = r.Components[i].CPUPerRunUs / total
	}
	// Busy time nobody above accounts for: other work on the machine. It is
	// not per run; shown per run only to compare with the rest.
	if other := sub(busy, known); other > 0 {
		r.Components = append(r.Components, componentUsage{Name: "other", CPUPerRunUs: float64(other) * tickUs / float64(runs)})
	}
	return r
}

func sub(b, a uint64) uint64 {
	if b < a {
		return 0
	}
	return b - a
}

// cpuWindow samples the machine twice during a measurement: o.Skip after
// it starts and o.Window later. runs reports the runs done so far.
type cpuWindow struct {
	o    cpuOptions
	done chan struct{}
	rep  *cpuReport
	err  error
}

func startCPUWindow(ctx context.Context, o cpuOptions, runs func() int64) *cpuWindow {
	w := &cpuWindow{o: o, done: make(chan struct{})}
	go func() {
		defer close(w.done)
		w.rep, w.err = w.sample(ctx, runs)
	}()
	return w
}

func (w *cpuWindow) sample(ctx context.Context, runs func() int64) (*cpuReport, error) {
	sleep := func(d time.Duration) error {
		t := time.NewTimer(d)
		defer t.Stop()
		select {
		case <-t.C:
			return nil
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	if err := sleep(w.o.Skip); err != nil {
		return nil, err
	}
	// The container list is read before the window: docker ps costs dockerd CPU.
	ids, err := workerContainers(ctx, w.o.WorkerID)
	if err != nil {
		return nil, err
	}
	a, err := sampleCPU(w.o, ids, runs())
	if err != nil {
		return nil, err
	}
	if err := sleep(w.o.Window); err != nil {
		return nil, err
	}
	// Containers made during the window (churn) count too.
	later, err := workerContainers(ctx, w.o.WorkerID)
	if err != nil {
		return nil, err
	}
	for id := range ids {
		later[id] = true
	}
	b, err := sampleCPU(w.o, later, runs())
	if err != nil {
		return nil, err
	}
	return cpuDiff(a, b, len(later)), nil
}

// wait returns the report once the window is over.
func (w *cpuWindow) wait() (*cpuReport, error) {
	<-w.done
	return w.rep, w.err
}

func printCPU(w io.Writer, name string, r *cpuReport, p50, p99 int64) {
	fmt.Fprintf(w, "\nCPU per run, %s: %.1f s window, %d runs, %.0f runs/s, p50 %s, p99 %s, %d containers, machine busy %.2f cores\n",
		name, r.Seconds, r.Runs, r.PerSecond, us(p50), us(p99), r.Containers, r.Cores)
	if r.Gone > 0 {
		fmt.Fprintf(w, "(%d processes ended during the window: what they used in it is not counted)\n", r.Gone)
	}
	fmt.Fprintf(w, "%-16s %12s %7s %12s %12s %8s\n", "COMPONENT", "CPU/RUN", "SHARE", "FAULTS/RUN", "CSW/RUN", "THREADS")
	rows := append([]componentUsage(nil), r.Components...)
	sort.SliceStable(rows, func(i, j int) bool { return rows[i].Name != "other" && rows[j].Name == "other" })
	for _, c := range rows {
		share := fmt.Sprintf("%.0f%%", 100*c.Share)
		if c.Name == "other" {
			share = "-"
		}
		fmt.Fprintf(w, "%-16s %10.0fus %7s %12.1f %12.1f %8d\n", c.Name, c.CPUPerRunUs, share, c.FaultsPerRun, c.SwitchesPerRn, c.Threads)
	}
	fmt.Fprintf(w, "%-16s %10.0fus\n", "all but other", r.CPUPerRunUs)
}
