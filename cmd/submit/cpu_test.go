package main

import (
	"os"
	"testing"
	"time"
)

func TestStatFields(t *testing.T) {
	// A command name with spaces and a parenthesis, as a process may choose.
	stat := []byte("42 (we(ird) name) S 1 42 42 0 -1 4194560 1234 0 0 0 70 30 0 0 20 0 3 0 100 1000 10\n")
	f, err := statFields(stat)
	if err != nil {
		t.Fatal(err)
	}
	if f[0] != "S" || f[10-3] != "1234" || f[14-3] != "70" || f[15-3] != "30" {
		t.Fatalf("fields %q", f)
	}
	if _, err := statFields([]byte("42 (x")); err == nil {
		t.Fatal("a stat without its closing parenthesis was accepted")
	}
}

func TestCPUDiff(t *testing.T) {
	t0 := time.Now()
	a := &cpuSample{at: t0, runs: 100, busy: 1000, procs: map[int]procUsage{
		10: {comp: "worker", start: 5, ticks: 5, csw: 10},
		20: {comp: "sandboxes", start: 7, ticks: 10},
		30: {comp: "sandboxes", start: 8, ticks: 40}, // ends during the window
		40: {comp: "sandboxes", start: 9, ticks: 30}, // its pid is reused
	}}
	b := &cpuSample{at: t0.Add(10 * time.Second), runs: 1100, busy: 1400, procs: map[int]procUsage{
		10: {comp: "worker", start: 5, ticks: 55, csw: 2010, threads: 2},
		20: {comp: "sandboxes", start: 7, ticks: 60, threads: 2},
		40: {comp: "sandboxes", start: 900, ticks: 20, threads: 1}, // new: all of it counts
		50: {comp: "sandboxes", start: 950, ticks: 20},             // new
	}}
	r := cpuDiff(a, b, 1)
	if r.Runs != 1000 || r.PerSecond != 100 || r.Cores != 0.4 || r.Gone != 2 {
		t.Fatalf("runs %d, per second %v, cores %v, gone %d", r.Runs, r.PerSecond, r.Cores, r.Gone)
	}
	// 100 ticks of 10 ms over 1000 runs: 1 ms a run.
	want := map[string]float64{"sandboxes": 900, "worker": 500, "other": 2600}
	for _, c := range r.Components {
		if c.CPUPerRunUs != want[c.Name] {
			t.Errorf("%s: %v us a run, want %v", c.Name, c.CPUPerRunUs, want[c.Name])
		}
		if c.Name == "worker" && c.SwitchesPerRn != 2 {
			t.Errorf("worker: %v switches a run, want 2", c.SwitchesPerRn)
		}
		if c.Name == "sandboxes" && c.Threads != 3 {
			t.Errorf("sandboxes: %d threads, want 3", c.Threads)
		}
	}
	if r.CPUPerRunUs != 1400 {
		t.Errorf("all but other: %v, want 1400", r.CPUPerRunUs)
	}
}

func TestSampleCPUSeesItself(t *testing.T) {
	if _, err := os.Stat("/proc/self/stat"); err != nil {
		t.Skip("no /proc")
	}
	s, err := sampleCPU(cpuOptions{}, nil, 0)
	if err != nil {
		t.Fatal(err)
	}
	self := s.procs[os.Getpid()]
	if self.comp != "bench" || self.threads < 1 || self.start == 0 || s.busy == 0 {
		t.Fatalf("this process: %+v, machine busy %d", self, s.busy)
	}
}
