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
	a := &cpuSample{at: t0, runs: 100, busy: 1000,
		byComp: map[string]uint64{"sandboxes": 10, "worker": 5}, fltComp: map[string]uint64{}, cswComp: map[string]uint64{"worker": 10}, threads: map[string]int{}}
	b := &cpuSample{at: t0.Add(10 * time.Second), runs: 1100, busy: 1400,
		byComp: map[string]uint64{"sandboxes": 110, "worker": 55}, fltComp: map[string]uint64{}, cswComp: map[string]uint64{"worker": 2010}, threads: map[string]int{"sandboxes": 3, "worker": 2}}
	r := cpuDiff(a, b, 1)
	if r.Runs != 1000 || r.PerSecond != 100 || r.Cores != 0.4 {
		t.Fatalf("runs %d, per second %v, cores %v", r.Runs, r.PerSecond, r.Cores)
	}
	// 100 ticks of 10 ms over 1000 runs: 1 ms a run.
	want := map[string]float64{"sandboxes": 1000, "worker": 500, "other": 2500}
	for _, c := range r.Components {
		if c.CPUPerRunUs != want[c.Name] {
			t.Errorf("%s: %v us a run, want %v", c.Name, c.CPUPerRunUs, want[c.Name])
		}
		if c.Name == "worker" && c.SwitchesPerRn != 2 {
			t.Errorf("worker: %v switches a run, want 2", c.SwitchesPerRn)
		}
	}
	if r.CPUPerRunUs != 1500 {
		t.Errorf("all but other: %v, want 1500", r.CPUPerRunUs)
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
	if s.threads["bench"] < 1 || s.busy == 0 {
		t.Fatalf("bench threads %d, machine busy %d", s.threads["bench"], s.busy)
	}
}
