package dockerx

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/docker/docker/api/types/container"

	"github.com/isode-run/isode/internal/testenv"
)

// BenchmarkCreateSteps measures what each step of making a sandbox costs,
// the steps Runtime.create takes (create, attach, start, the agent's
// readiness answer), and the removal that ends its life (Sandbox.Close),
// with P lifecycles under way at once (the pool's CreateConcurrency):
//
//	go test -run '^$' -bench CreateSteps -benchtime 16x ./pkg/dockerx/
//
// Per step it reports the wall time (<step>-ms/op) and, serially (P=1),
// the CPU that the engine (dockerd, containerd), the shims (containerd
// shims, runc, fuse-overlayfs: only those still running when sampled, so
// this one is a lower bound and may even go negative) and the whole
// machine spent in it, read from /proc around each step (10 ms ticks:
// only averages over many ops mean anything). For every P it reports
// lifecycles per second, the machine's and the engine's CPU per lifecycle,
// and the container's own CPU up to ready (its cgroup: node's start-up).
// The machine's CPU counts other work on a shared machine too.
//
// On the 2-vCPU CI kind of machine (2026-11-27, load average 3-5 from
// other work), serially: create 27 ms, attach 0.7 ms, start 108 ms, ready
// 199 ms, remove 75 ms; a lifecycle took 460 ms of machine CPU, of which
// 220 ms in the container (node's start-up) and 80 ms in dockerd and
// containerd (create 16, start 26, remove 36). Lifecycles per second at
// P = 1, 2, 3, 4, 6, 8: 2.3, 3.9, 3.7, 4.1, 4.2, 3.8: two at once fill
// the machine, and more only stretch each (ready 199 ms at P=1, 515 ms
// at 4, 1,064 ms at 8).
func BenchmarkCreateSteps(b *testing.B) {
	cli := testenv.Docker(b)
	cfg := DefaultConfig()
	cfg.Image = testenv.Image(b, cli)
	cfg.WorkerID = "test-steps-" + strconv.FormatInt(time.Now().UnixNano()%1e9, 36)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	r, err := New(ctx, cfg)
	cancel()
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if err := r.Close(ctx); err != nil {
			b.Errorf("Runtime.Close: %v", err)
		}
		testenv.RemoveByLabel(b, cli, LabelWorker, cfg.WorkerID)
	})
	// One lifecycle first: the engine's caches of the image.
	if _, err := lifecycle(r, false); err != nil {
		b.Fatal(err)
	}
	for _, par := range []int{1, 2, 3, 4, 6, 8} {
		b.Run(fmt.Sprintf("P=%d", par), func(b *testing.B) {
			var (
				mu    sync.Mutex
				total stepCosts
				n     int
				errs  []error
			)
			m0 := readCPU()
			start := time.Now()
			b.ResetTimer()
			var wg sync.WaitGroup
			next := make(chan struct{})
			for range par {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for range next {
						c, err := lifecycle(r, par == 1)
						mu.Lock()
						if err != nil {
							errs = append(errs, err)
						} else {
							total.add(c)
							n++
						}
						mu.Unlock()
					}
				}()
			}
			for b.Loop() {
				next <- struct{}{}
			}
			close(next)
			wg.Wait()
			b.StopTimer()
			elapsed := time.Since(start)
			m1 := readCPU()
			if len(errs) > 0 {
				b.Fatalf("%d lifecycles failed, first: %v", len(errs), errs[0])
			}
			per := func(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 / float64(n) }
			for i, name := range stepNames {
				b.ReportMetric(per(total.wall[i]), name+"-ms/op")
				if par == 1 {
					b.ReportMetric(per(total.engine[i]), name+"-engine-cpu-ms/op")
					b.ReportMetric(per(total.shims[i]), name+"-shim-cpu-ms/op")
					b.ReportMetric(per(total.machine[i]), name+"-machine-cpu-ms/op")
				}
			}
			b.ReportMetric(per(total.container), "container-cpu-to-ready-ms/op")
			b.ReportMetric(float64(n)/elapsed.Seconds(), "lifecycles/s")
			b.ReportMetric(per(m1.busy-m0.busy), "machine-cpu-ms/op")
			b.ReportMetric(per(m1.engine-m0.engine), "engine-cpu-ms/op")
			b.ReportMetric(0, "ns/op")
		})
	}
}

var stepNames = [...]string{"create", "attach", "start", "ready", "remove"}

type stepCosts struct {
	wall, engine, shims, machine [len(stepNames)]time.Duration
	container                    time.Duration // the container's cgroup CPU at ready (cgroup v1)
}

func (c *stepCosts) add(o stepCosts) {
	for i := range stepNames {
		c.wall[i] += o.wall[i]
		c.engine[i] += o.engine[i]
		c.shims[i] += o.shims[i]
		c.machine[i] += o.machine[i]
	}
	c.container += o.container
}

// lifecycle makes one free sandbox step by step as Runtime.create does,
// then closes it, timing each step (and sampling CPU around it when
// sample is set).
func lifecycle(r *Runtime, sample bool) (c stepCosts, err error) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	step := 0
	var c0 cpuSample
	var t0 time.Time
	begin := func() {
		if sample {
			c0 = readCPU()
		}
		t0 = time.Now()
	}
	end := func() {
		c.wall[step] = time.Since(t0)
		if sample {
			c1 := readCPU()
			c.engine[step] = c1.engine - c0.engine
			c.shims[step] = c1.shims - c0.shims
			c.machine[step] = c1.busy - c0.busy
		}
		step++
	}

	cfg, host := containerSpec(&r.cfg, "")
	if r.nodeArgs != nil {
		cfg.Cmd = r.nodeArgs
	}
	name := "isode-" + randomHex(8)
	begin()
	resp, err := r.cli.ContainerCreate(ctx, cfg, host, nil, nil, name)
	end()
	if err != nil {
		_ = r.remove(context.Background(), name)
		return c, fmt.Errorf("create container: %w", err)
	}
	s := newSandbox(r, resp.ID, name, "")
	if !r.track(s) {
		_ = r.remove(context.Background(), resp.ID)
		return c, ErrClosed
	}
	defer func() {
		if err != nil {
			_ = s.Close(context.Background())
		}
	}()
	begin()
	hr, err := r.cli.ContainerAttach(ctx, resp.ID, container.AttachOptions{Stream: true, Stdin: true, Stdout: true, Stderr: true})
	end()
	if err != nil {
		return c, fmt.Errorf("attach container: %w", err)
	}
	s.attach(hr.Conn, hr.Reader)
	begin()
	err = r.cli.ContainerStart(ctx, resp.ID, container.StartOptions{})
	end()
	if err != nil {
		return c, fmt.Errorf("start container: %w", err)
	}
	begin()
	_, err = s.Ping(ctx)
	end()
	if err != nil {
		return c, fmt.Errorf("ping: %w", err)
	}
	// The container's own CPU up to ready (node's start-up, the init).
	if b, err := os.ReadFile("/sys/fs/cgroup/cpuacct/docker/" + resp.ID + "/cpuacct.usage"); err == nil {
		ns, _ := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
		c.container = time.Duration(ns)
	}
	begin()
	err = s.Close(ctx)
	end()
	return c, err
}

// cpuSample is CPU time used so far: by dockerd and containerd, by the
// containerd shims, runc and fuse-overlayfs (those that are still
// running: one that ended takes its CPU with it), and by the whole
// machine (busy time of all CPUs).
type cpuSample struct {
	engine, shims, busy time.Duration
}

// clockTick is USER_HZ, 100 on Linux.
const clockTick = 10 * time.Millisecond

func readCPU() cpuSample {
	var s cpuSample
	if b, err := os.ReadFile("/proc/stat"); err == nil {
		line, _, _ := strings.Cut(string(b), "\n")
		f := strings.Fields(line)
		for i, v := range f[1:] {
			if i == 3 || i == 4 { // idle, iowait
				continue
			}
			n, _ := strconv.ParseInt(v, 10, 64)
			s.busy += time.Duration(n) * clockTick
		}
	}
	dirs, _ := filepath.Glob("/proc/[0-9]*")
	for _, d := range dirs {
		b, err := os.ReadFile(d + "/stat")
		if err != nil {
			continue
		}
		// pid (comm) state ppid ... utime(14) stime(15)
		st := string(b)
		i, j := strings.IndexByte(st, '('), strings.LastIndexByte(st, ')')
		if i < 0 || j < i {
			continue
		}
		comm := st[i+1 : j]
		f := strings.Fields(st[j+1:])
		if len(f) < 13 {
			continue
		}
		ut, _ := strconv.ParseInt(f[11], 10, 64)
		sy, _ := strconv.ParseInt(f[12], 10, 64)
		cpu := time.Duration(ut+sy) * clockTick
		switch {
		case comm == "dockerd" || comm == "containerd":
			s.engine += cpu
		case strings.HasPrefix(comm, "containerd-shim"), comm == "runc", comm == "fuse-overlayfs":
			s.shims += cpu
		}
	}
	return s
}
