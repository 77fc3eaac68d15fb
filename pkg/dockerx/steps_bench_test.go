package dockerx_test

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/isode-run/isode/internal/testenv"
	"github.com/isode-run/isode/pkg/dockerx"
)

// BenchmarkCreateSteps measures what each step of making a sandbox costs
// (the engine's create, attach and start calls, then the wait for the
// agent's readiness answer) and the removal that ends its life
// (Sandbox.Close), with P lifecycles under way at once (the pool's
// CreateConcurrency):
//
//	go test -run '^$' -bench CreateSteps -benchtime 16x ./pkg/dockerx/
//
// It goes through Runtime.Create and Sandbox.Close as the worker does,
// whatever transport they use, with the Runtime's Docker client pointed at
// a proxy of the engine's socket that times each call: create, attach and
// start are the engine's calls (until their response headers), ready is
// the rest of Create, remove is the whole of Close. Per step it reports
// the wall time (<step>-ms/op) and, serially (P=1), the CPU that the
// engine (dockerd, containerd), the shims (containerd shims, runc,
// fuse-overlayfs: only those still running when sampled, so a lower bound
// that may even go negative) and the whole machine spent in it, read from
// /proc around each step (10 ms ticks: only averages over many ops mean
// anything). For every P it reports lifecycles per second, the machine's
// and the engine's CPU per lifecycle, and the container's own CPU up to
// ready (its cgroup v1 cpuacct: node's start-up). The machine's CPU counts
// other work on a shared machine too.
//
// On the 2-vCPU CI kind of machine (2026-11-27, load average 3-5 from
// other work, the attach transport), serially: create 27 ms, attach
// 0.7 ms, start 108 ms, ready 199 ms, remove 75 ms; a lifecycle took
// 460 ms of machine CPU, of which 220 ms in the container (node's
// start-up) and 80 ms in dockerd and containerd (create 16, start 26,
// remove 36). Lifecycles per second at P = 1, 2, 3, 4, 6, 8: 2.3, 3.9,
// 3.7, 4.1, 4.2, 3.8: two at once fill the machine, and more only stretch
// each (ready 199 ms at P=1, 515 ms at 4, 1,064 ms at 8).
func BenchmarkCreateSteps(b *testing.B) {
	cli := testenv.Docker(b)
	image := testenv.Image(b, cli)
	px := startStepProxy(b, cli.DaemonHost())
	b.Setenv("DOCKER_HOST", "unix://"+px.path)
	cfg := dockerx.DefaultConfig()
	cfg.Image = image
	cfg.WorkerID = "test-steps-" + randomHex(6)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	rt, err := dockerx.New(ctx, cfg)
	cancel()
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if err := rt.Close(ctx); err != nil {
			b.Errorf("Runtime.Close: %v", err)
		}
		testenv.RemoveByLabel(b, cli, dockerx.LabelWorker, cfg.WorkerID)
	})
	// One lifecycle first: the engine's caches of the image.
	if _, err := lifecycle(rt, false); err != nil {
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
			px.reset(par == 1)
			m0 := readCPU()
			start := time.Now()
			var wg sync.WaitGroup
			next := make(chan struct{})
			for range par {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for range next {
						c, err := lifecycle(rt, par == 1)
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
			if n == 0 {
				return
			}
			// The engine's calls, summed over all lifecycles: with P at
			// once they cannot be told apart per lifecycle.
			calls := px.totals()
			for i := range stepStart + 1 {
				total.wall[i] = calls[stepNames[i]].wall
				total.engine[i] = calls[stepNames[i]].cpu.engine
				total.shims[i] = calls[stepNames[i]].cpu.shims
				total.machine[i] = calls[stepNames[i]].cpu.busy
			}
			for i := range stepStart + 1 {
				total.wall[stepReady] -= total.wall[i]
				total.engine[stepReady] -= total.engine[i]
				total.shims[stepReady] -= total.shims[i]
				total.machine[stepReady] -= total.machine[i]
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

// The steps, in order: the engine's three calls, the rest of Create
// (ready), Close (remove). Create's whole time is accumulated under ready
// and the calls' times are taken off it.
const (
	stepCreate = iota
	stepAttach
	stepStart
	stepReady
	stepRemove
)

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

// lifecycle makes one free sandbox and closes it, timing Create (under
// ready) and Close (remove), and sampling CPU around them when sample is
// set.
func lifecycle(rt *dockerx.Runtime, sample bool) (c stepCosts, err error) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	var c0 cpuSample
	if sample {
		c0 = readCPU()
	}
	t0 := time.Now()
	s, err := rt.Create(ctx, "")
	c.wall[stepReady] = time.Since(t0)
	if sample {
		c1 := readCPU()
		c.engine[stepReady], c.shims[stepReady], c.machine[stepReady] = c1.engine-c0.engine, c1.shims-c0.shims, c1.busy-c0.busy
	}
	if err != nil {
		return c, err
	}
	// The container's own CPU up to ready (node's start-up, the init).
	if b, err := os.ReadFile("/sys/fs/cgroup/cpuacct/docker/" + s.ID() + "/cpuacct.usage"); err == nil {
		ns, _ := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
		c.container = time.Duration(ns)
	}
	if sample {
		c0 = readCPU()
	}
	t0 = time.Now()
	err = s.Close(ctx)
	c.wall[stepRemove] = time.Since(t0)
	if sample {
		c1 := readCPU()
		c.engine[stepRemove], c.shims[stepRemove], c.machine[stepRemove] = c1.engine-c0.engine, c1.shims-c0.shims, c1.busy-c0.busy
	}
	return c, err
}

// stepProxy is an HTTP proxy of the engine's unix socket that times the
// calls that make a container: create, attach, start.
type stepProxy struct {
	path string

	mu     sync.Mutex
	sample bool
	calls  map[string]callCost
}

type callCost struct {
	n    int
	wall time.Duration
	cpu  cpuSample // only while one call at a time is under way
}

var stepPaths = map[string]*regexp.Regexp{
	"create": regexp.MustCompile(`^/v[0-9.]+/containers/create$`),
	"attach": regexp.MustCompile(`^/v[0-9.]+/containers/[^/]+/attach$`),
	"start":  regexp.MustCompile(`^/v[0-9.]+/containers/[^/]+/start$`),
}

type stepKey struct{}

type callStart struct {
	name string
	at   time.Time
	cpu  cpuSample
}

func startStepProxy(b *testing.B, daemonHost string) *stepProxy {
	engine := strings.TrimPrefix(daemonHost, "unix://")
	if engine == daemonHost {
		b.Skipf("the engine is not on a unix socket (%s)", daemonHost)
	}
	dir, err := os.MkdirTemp("", "isode-steps-")
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { os.RemoveAll(dir) })
	px := &stepProxy{path: filepath.Join(dir, "docker.sock"), calls: map[string]callCost{}}
	ln, err := net.Listen("unix", px.path)
	if err != nil {
		b.Fatal(err)
	}
	rp := &httputil.ReverseProxy{
		Rewrite: func(r *httputil.ProxyRequest) {
			r.SetURL(&url.URL{Scheme: "http", Host: "docker"})
		},
		Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", engine)
		}},
		FlushInterval: -1,
		ModifyResponse: func(res *http.Response) error {
			if st, ok := res.Request.Context().Value(stepKey{}).(*callStart); ok {
				px.record(st)
			}
			return nil
		},
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		for name, re := range stepPaths {
			if r.Method == http.MethodPost && re.MatchString(r.URL.Path) {
				st := &callStart{name: name, at: time.Now()}
				if px.sampling() {
					st.cpu = readCPU()
				}
				r = r.WithContext(context.WithValue(r.Context(), stepKey{}, st))
				break
			}
		}
		rp.ServeHTTP(w, r)
	})}
	go srv.Serve(ln)
	b.Cleanup(func() { srv.Close() })
	return px
}

func (px *stepProxy) record(st *callStart) {
	took := time.Since(st.at)
	var c1 cpuSample
	sample := px.sampling()
	if sample {
		c1 = readCPU()
	}
	px.mu.Lock()
	defer px.mu.Unlock()
	c := px.calls[st.name]
	c.n++
	c.wall += took
	if sample {
		c.cpu.engine += c1.engine - st.cpu.engine
		c.cpu.shims += c1.shims - st.cpu.shims
		c.cpu.busy += c1.busy - st.cpu.busy
	}
	px.calls[st.name] = c
}

// reset forgets the calls timed so far; sample says whether to read CPU
// around each call (one at a time only).
func (px *stepProxy) reset(sample bool) {
	px.mu.Lock()
	defer px.mu.Unlock()
	clear(px.calls)
	px.sample = sample
}

func (px *stepProxy) sampling() bool {
	px.mu.Lock()
	defer px.mu.Unlock()
	return px.sample
}

func (px *stepProxy) totals() map[string]callCost {
	px.mu.Lock()
	defer px.mu.Unlock()
	out := make(map[string]callCost, len(px.calls))
	for k, v := range px.calls {
		out[k] = v
	}
	return out
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
