package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/uuid"
	"github.com/nats-io/nats.go"

	"github.com/isode-run/isode/pkg/client"
	"github.com/isode-run/isode/pkg/protocol"
)

const defaultSnippet = `return function (cb) { cb(null, 1); }`

// benchResult is one measured scenario.
type benchResult struct {
	Name        string           `json:"name"`
	Concurrency int              `json:"concurrency"`
	Tenants     int              `json:"tenants,omitempty"`
	Runs        int              `json:"runs"`
	Errors      map[string]int   `json:"errors,omitempty"`
	Seconds     float64          `json:"seconds"`
	PerSecond   float64          `json:"per_second"`
	Latency     map[string]int64 `json:"latency_us"` // p50, p90, p99, p999, max, min, mean
	// CPU is the CPU table of a window inside the measurement
	// (--cpu-worker-pid); nil otherwise.
	CPU *cpuReport `json:"cpu,omitempty"`
	// Pool is what the workers' pools did during the measurement, per
	// second (the churn scenario); nil otherwise.
	Pool *poolRates `json:"pool_per_second,omitempty"`
}

// poolRates are the workers' pool counters over a measurement, per second.
type poolRates struct {
	ColdStarts float64 `json:"cold_starts"` // sandboxes created for a waiting tenant
	PoolHits   float64 `json:"pool_hits"`   // free sandboxes taken (each one refilled)
	Evictions  float64 `json:"evictions"`   // idle sandboxes removed to make room
	Hits       float64 `json:"hits"`        // runs in a sandbox the tenant had already
}

type benchReport struct {
	Results []benchResult      `json:"results"`
	Ratios  map[string]float64 `json:"ratios"`
}

func benchCmd(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("submit bench", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var cf connFlags
	cf.register(fs)
	scenario := fs.String("scenario", "warm", "warm: runs over --tenants tenants that already have a sandbox; new: one new tenant per run, spaced by --interval (a free pool sandbox each time if the worker keeps enough); churn: runs over --tenants tenants, more than the workers' --high, so that sandboxes are evicted and created while it runs (reports creations per second)")
	tenants := fs.Int("tenants", 50, "tenants in the warm scenario")
	conc := fs.Int("concurrency", 32, "concurrent callers")
	duration := fs.Duration("duration", 10*time.Second, "how long each measurement runs (unless --count)")
	count := fs.Int("count", 0, "runs per measurement instead of a duration")
	interval := fs.Duration("interval", time.Second, "pause between runs of the new scenario, so the pool refills")
	code := fs.String("snippet", defaultSnippet, "the snippet to run")
	timeout := fs.Duration("timeout", 5*time.Second, "run timeout of each snippet")
	noBaseline := fs.Bool("no-baseline", false, "skip the core NATS echo baseline")
	asJSON := fs.Bool("json", false, "print the report as JSON on stdout")
	quiet := fs.Bool("quiet", false, "no progress line")
	var co cpuOptions
	fs.IntVar(&co.WorkerPID, "cpu-worker-pid", 0, "when the worker runs on this machine: its pid; the warm measurement then reports CPU per run of each component, read from /proc (Linux)")
	fs.StringVar(&co.WorkerID, "cpu-worker-id", "", "the worker's --id, whose containers are its sandboxes (with --cpu-worker-pid)")
	fs.IntVar(&co.NATSPID, "cpu-nats-pid", 0, "the pid of a NATS server of its own, when not embedded in the worker")
	fs.DurationVar(&co.Skip, "cpu-skip", 3*time.Second, "time into the measurement before the CPU window opens")
	fs.DurationVar(&co.Window, "cpu-window", 0, "the CPU window (0: --duration less --cpu-skip and 1s)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *conc < 1 || *tenants < 1 || (*count <= 0 && *duration <= 0) {
		return &exitError{2, errors.New("--concurrency, --tenants and --duration (or --count) must be positive")}
	}
	if co.WorkerPID != 0 {
		if co.WorkerID == "" {
			return &exitError{2, errors.New("--cpu-worker-pid needs --cpu-worker-id")}
		}
		if co.Window == 0 {
			co.Window = *duration - co.Skip - time.Second
		}
		if *count > 0 || co.Window <= 0 {
			return &exitError{2, errors.New("the CPU window needs a --duration longer than --cpu-skip + 1s, and no --count")}
		}
	}
	nc, c, closeAll, err := cf.dial("isode-bench")
	if err != nil {
		return err
	}
	defer closeAll()
	progress := stderr
	if *quiet {
		progress = io.Discard
	}
	b := &bench{ctx: ctx, url: cf.url, nc: nc, c: c, code: *code, timeout: *timeout, progress: progress, duration: *duration, count: *count}
	rep := benchReport{Ratios: map[string]float64{}}

	switch *scenario {
	case "warm":
		if !*noBaseline {
			echo, err := b.echo(*conc)
			if err != nil {
				return err
			}
			rep.Results = append(rep.Results, echo)
		}
		keys := tenantKeys("bench-warm", *tenants)
		if err := b.warmUp(keys, *conc); err != nil {
			return err
		}
		warm := b.measureKeys(fmt.Sprintf("warm (%d tenants)", *tenants), *conc, keys, co)
		warm.Tenants = *tenants
		rep.Results = append(rep.Results, warm)
		if !*noBaseline {
			echo := rep.Results[0]
			rep.Ratios["warm_p50_over_echo_p50"] = ratio(warm.Latency["p50"], echo.Latency["p50"])
			rep.Ratios["warm_p99_over_echo_p99"] = ratio(warm.Latency["p99"], echo.Latency["p99"])
			rep.Ratios["warm_throughput_over_echo_throughput"] = warm.PerSecond / echo.PerSecond
		}
	case "new":
		// A warm reference in the same run, one caller, then new tenants one
		// at a time.
		if !*noBaseline {
			echo, err := b.echo(1)
			if err != nil {
				return err
			}
			rep.Results = append(rep.Results, echo)
		}
		ref := tenantKeys("bench-ref", 1)
		if err := b.warmUp(ref, 1); err != nil {
			return err
		}
		// The reference runs for --duration even when --count is given (it
		// counts the new tenants): twenty runs right after the warm-up
		// measure a sandbox that is still warming.
		warm := b.measure("warm (1 tenant)", 1, b.duration, 0, 0, func(int) error {
			_, err := b.run(ref[0])
			return err
		})
		rep.Results = append(rep.Results, warm)
		n := b.count
		if n <= 0 {
			n = 20
		}
		prefix := "bench-new-" + uuid.NewString()[:8]
		fresh := b.measure("new tenant", 1, 0, n, *interval, func(i int) error {
			_, err := b.run(fmt.Sprintf("%s-%d", prefix, i))
			return err
		})
		rep.Results = append(rep.Results, fresh)
		rep.Ratios["new_p50_over_warm_p50"] = ratio(fresh.Latency["p50"], warm.Latency["p50"])
		// The same warm tenant, spaced like the new ones: what a run costs
		// on a machine that idled for --interval, without the new tenant.
		spaced := b.measure("warm, spaced", 1, 0, n, *interval, func(int) error {
			_, err := b.run(ref[0])
			return err
		})
		rep.Results = append(rep.Results, spaced)
		rep.Ratios["new_p50_over_spaced_warm_p50"] = ratio(fresh.Latency["p50"], spaced.Latency["p50"])
	case "churn":
		// No warm-up: with more tenants than sandboxes, there is no warm
		// state to reach. The CPU window (--cpu-skip) skips the start.
		keys := tenantKeys("bench-churn", *tenants)
		before, err := gatherStats(ctx, nc, cf.prefix, 500*time.Millisecond)
		if err != nil {
			return err
		}
		churn := b.measureKeys(fmt.Sprintf("churn (%d tenants)", *tenants), *conc, keys, co)
		after, err := gatherStats(ctx, nc, cf.prefix, 500*time.Millisecond)
		if err != nil {
			return err
		}
		churn.Tenants = *tenants
		churn.Pool = poolDelta(before, after, churn.Seconds)
		rep.Results = append(rep.Results, churn)
	default:
		return &exitError{2, fmt.Errorf("unknown --scenario %q: want warm, new or churn", *scenario)}
	}
	if *asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(rep)
	}
	printReport(stdout, rep)
	return nil
}

// poolDelta sums the pool counters of the workers that answered both
// times over secs.
func poolDelta(before, after []protocol.WorkerStats, secs float64) *poolRates {
	if secs <= 0 {
		return nil
	}
	was := map[string]protocol.PoolStats{}
	for _, s := range before {
		was[s.Worker] = s.Pool
	}
	var r poolRates
	for _, s := range after {
		p, ok := was[s.Worker]
		if !ok || s.Pool.ColdStarts < p.ColdStarts || s.Pool.PoolHits < p.PoolHits || s.Pool.Evictions < p.Evictions || s.Pool.Hits < p.Hits {
			continue // not there before, or restarted meanwhile
		}
		r.ColdStarts += float64(s.Pool.ColdStarts - p.ColdStarts)
		r.PoolHits += float64(s.Pool.PoolHits - p.PoolHits)
		r.Evictions += float64(s.Pool.Evictions - p.Evictions)
		r.Hits += float64(s.Pool.Hits - p.Hits)
	}
	r.ColdStarts /= secs
	r.PoolHits /= secs
	r.Evictions /= secs
	r.Hits /= secs
	return &r
}

func ratio(a, b int64) float64 {
	if b == 0 {
		return 0
	}
	return float64(a) / float64(b)
}

func tenantKeys(prefix string, n int) []string {
	id := uuid.NewString()[:8]
	keys := make([]string, n)
	for i := range keys {
		keys[i] = fmt.Sprintf("%s-%s-%d", prefix, id, i)
	}
	return keys
}

type bench struct {
	ctx      context.Context
	url      string
	nc       *nats.Conn
	c        *client.Client
	code     string
	timeout  time.Duration
	progress io.Writer
	duration time.Duration
	count    int
	cpu      *cpuOptions // measure opens a CPU window when set
}

func (b *bench) run(key string) (*client.Result, error) {
	ctx, cancel := context.WithTimeout(b.ctx, b.timeout+30*time.Second)
	defer cancel()
	return b.c.Run(ctx, key, b.code, client.WithTimeout(b.timeout))
}

// warmUp runs once for every tenant so each has a sandbox before measuring.
func (b *bench) warmUp(keys []string, conc int) error {
	r := b.measure("warm-up", min(conc, len(keys)), 0, len(keys), 0, func(i int) error {
		_, err := b.run(keys[i])
		return err
	})
	if n := errCount(r); n > 0 {
		return fmt.Errorf("warm-up: %d of %d runs failed: %v", n, len(keys), r.Errors)
	}
	return nil
}

// echo measures a bare core NATS request/reply to a responder in this
// process, through the same server: the floor the fleet is compared with.
func (b *bench) echo(conc int) (benchResult, error) {
	// The responder gets its own connection, as a worker has.
	rc, err := nats.Connect(b.url, nats.Name("isode-bench-echo"))
	if err != nil {
		return benchResult{}, fmt.Errorf("connect echo responder: %w", err)
	}
	defer rc.Close()
	subj := "_ISODE_BENCH_ECHO." + nats.NewInbox()
	if _, err := rc.Subscribe(subj, func(m *nats.Msg) { m.Respond(m.Data) }); err != nil {
		return benchResult{}, err
	}
	if err := rc.Flush(); err != nil {
		return benchResult{}, err
	}
	payload := []byte(`{"v":1,"isolate_key":"echo","code":"` + strings.Repeat("x", len(b.code)) + `"}`)
	return b.measure("core NATS echo", conc, b.duration, b.count, 0, func(int) error {
		_, err := b.nc.Request(subj, payload, 5*time.Second)
		return err
	}), nil
}

// measure runs fn from conc callers for d, or n times in all, and reports
// latencies and throughput. Each caller waits pause between its runs, off
// the clock.
// measureKeys measures runs of keys in turn, with the CPU window of co
// when it names a worker.
func (b *bench) measureKeys(name string, conc int, keys []string, co cpuOptions) benchResult {
	if co.WorkerPID != 0 {
		b.cpu = &co
		defer func() { b.cpu = nil }()
	}
	return b.measure(name, conc, b.duration, b.count, 0, func(i int) error {
		_, err := b.run(keys[i%len(keys)])
		return err
	})
}

func (b *bench) measure(name string, conc int, d time.Duration, n int, pause time.Duration, fn func(i int) error) benchResult {
	var (
		next    atomic.Int64
		mu      sync.Mutex
		lats    = make([]time.Duration, 0, 1<<16)
		errs    = map[string]int{}
		done    atomic.Int64
		stopped atomic.Bool
	)
	start := time.Now()
	ctx, cancel := context.WithCancel(b.ctx)
	defer cancel()
	if n <= 0 && d > 0 {
		t := time.AfterFunc(d, func() { stopped.Store(true) })
		defer t.Stop()
	}
	stopProgress := b.showProgress(ctx, name, start, &done, func() []time.Duration {
		mu.Lock()
		defer mu.Unlock()
		return slices.Clone(lats[max(0, len(lats)-5000):])
	})
	var window *cpuWindow
	if b.cpu != nil {
		window = startCPUWindow(ctx, *b.cpu, done.Load)
	}
	var wg sync.WaitGroup
	for g := 0; g < conc; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			local := make([]time.Duration, 0, 1024)
			flush := func() {
				mu.Lock()
				lats = append(lats, local...)
				mu.Unlock()
				local = local[:0]
			}
			defer flush()
			for !stopped.Load() && ctx.Err() == nil {
				i := int(next.Add(1) - 1)
				if n > 0 && i >= n {
					return
				}
				if pause > 0 && i > 0 {
					select {
					case <-time.After(pause):
					case <-ctx.Done():
						return
					}
				}
				t0 := time.Now()
				err := fn(i)
				lat := time.Since(t0)
				done.Add(1)
				if err != nil {
					mu.Lock()
					errs[errorKey(err)]++
					mu.Unlock()
					continue
				}
				local = append(local, lat)
				if len(local) == cap(local) {
					flush()
				}
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	stopProgress()
	r := benchResult{Name: name, Concurrency: conc, Runs: len(lats), Seconds: elapsed.Seconds(), Latency: percentiles(lats)}
	if len(errs) > 0 {
		r.Errors = errs
	}
	r.PerSecond = float64(len(lats)) / elapsed.Seconds()
	if window != nil {
		cpu, err := window.wait()
		if err != nil {
			fmt.Fprintf(b.progress, "no CPU table for %s: %v\n", name, err)
		}
		r.CPU = cpu
	}
	return r
}

func errorKey(err error) string {
	var pe *protocol.Error
	if errors.As(err, &pe) {
		return string(pe.Code)
	}
	if errors.Is(err, context.DeadlineExceeded) {
		return "no_reply"
	}
	return "client: " + err.Error()
}

func errCount(r benchResult) int {
	n := 0
	for _, v := range r.Errors {
		n += v
	}
	return n
}

func percentiles(lats []time.Duration) map[string]int64 {
	out := map[string]int64{}
	if len(lats) == 0 {
		return out
	}
	sort.Slice(lats, func(i, j int) bool { return lats[i] < lats[j] })
	at := func(q float64) int64 {
		i := int(q * float64(len(lats)-1))
		return lats[i].Microseconds()
	}
	var sum time.Duration
	for _, l := range lats {
		sum += l
	}
	out["min"] = lats[0].Microseconds()
	out["p50"] = at(0.50)
	out["p90"] = at(0.90)
	out["p99"] = at(0.99)
	out["p999"] = at(0.999)
	out["max"] = lats[len(lats)-1].Microseconds()
	out["mean"] = (sum / time.Duration(len(lats))).Microseconds()
	return out
}

// showProgress prints a progress line every second until stopped: in place
// on a terminal, as plain lines otherwise.
func (b *bench) showProgress(ctx context.Context, name string, start time.Time, done *atomic.Int64, recent func() []time.Duration) (stop func()) {
	if b.progress == io.Discard {
		return func() {}
	}
	tty := false
	if f, ok := b.progress.(*os.File); ok {
		if st, err := f.Stat(); err == nil && st.Mode()&os.ModeCharDevice != 0 {
			tty = true
		}
	}
	ctx, cancel := context.WithCancel(ctx)
	finished := make(chan struct{})
	go func() {
		defer close(finished)
		t := time.NewTicker(time.Second)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				if tty {
					fmt.Fprint(b.progress, "\r\033[K")
				}
				return
			case <-t.C:
				el := time.Since(start)
				p := percentiles(recent())
				line := fmt.Sprintf("[%s] %5.1fs %8d runs %8.0f/s  p50 %s  p99 %s",
					name, el.Seconds(), done.Load(), float64(done.Load())/el.Seconds(),
					us(p["p50"]), us(p["p99"]))
				if tty {
					fmt.Fprint(b.progress, "\r\033[K"+line)
				} else {
					fmt.Fprintln(b.progress, line)
				}
			}
		}
	}()
	return func() {
		cancel()
		<-finished
	}
}

func us(v int64) string {
	return (time.Duration(v) * time.Microsecond).String()
}

func printReport(w io.Writer, rep benchReport) {
	fmt.Fprintf(w, "%-24s %5s %9s %10s %10s %10s %10s %10s  %s\n", "SCENARIO", "CONC", "RUNS", "RUNS/S", "P50", "P90", "P99", "MAX", "ERRORS")
	for _, r := range rep.Results {
		errs := "0"
		if len(r.Errors) > 0 {
			b, _ := json.Marshal(r.Errors)
			errs = string(b)
		}
		fmt.Fprintf(w, "%-24s %5d %9d %10.0f %10s %10s %10s %10s  %s\n", r.Name, r.Concurrency, r.Runs, r.PerSecond,
			us(r.Latency["p50"]), us(r.Latency["p90"]), us(r.Latency["p99"]), us(r.Latency["max"]), errs)
	}
	for _, r := range rep.Results {
		if r.Pool != nil {
			fmt.Fprintf(w, "%s: per second %.1f sandboxes created for waiting tenants, %.1f free sandboxes taken, %.1f evicted, %.1f runs in a sandbox the tenant had (hits)\n",
				r.Name, r.Pool.ColdStarts, r.Pool.PoolHits, r.Pool.Evictions, r.Pool.Hits)
		}
	}
	for _, r := range rep.Results {
		if r.CPU != nil {
			printCPU(w, r.Name, r.CPU, r.Latency["p50"], r.Latency["p99"])
		}
	}
	keys := make([]string, 0, len(rep.Ratios))
	for k := range rep.Ratios {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		fmt.Fprintf(w, "%-40s %.2f\n", k, rep.Ratios[k])
	}
}
