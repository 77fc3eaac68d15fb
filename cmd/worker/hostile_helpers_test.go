package main

// The machinery of the hostile suite (hostile_test.go): a NATS server that
// can be restarted on the same port and store, a Docker socket proxy that
// can be cut, bystander tenants whose latency is measured during each
// attack, the leak checks run once the pool settles, and the summary table.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/docker/docker/api/types/container"
	"github.com/docker/docker/api/types/filters"
	natsserver "github.com/nats-io/nats-server/v2/server"
	natstest "github.com/nats-io/nats-server/v2/test"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/isode-run/isode/internal/testenv"
	isode "github.com/isode-run/isode/pkg/client"
	"github.com/isode-run/isode/pkg/dockerx"
	"github.com/isode-run/isode/pkg/protocol"
)

// --- a NATS server that can be restarted ------------------------------------

// restartableNATS is an embedded JetStream server whose port and store stay
// the same across restarts, so that clients reconnect to it.
type restartableNATS struct {
	t    testing.TB
	mu   sync.Mutex
	opts natsserver.Options
	s    *natsserver.Server
}

func startRestartableNATS(t testing.TB) *restartableNATS {
	t.Helper()
	opts := testenv.NATSOptions(t)
	s := natstest.RunServer(&opts)
	opts.Port = s.Addr().(*net.TCPAddr).Port
	n := &restartableNATS{t: t, opts: opts, s: s}
	t.Cleanup(func() {
		n.mu.Lock()
		defer n.mu.Unlock()
		if n.s != nil {
			n.s.Shutdown()
			n.s.WaitForShutdown()
		}
	})
	return n
}

func (n *restartableNATS) url() string { return fmt.Sprintf("nats://127.0.0.1:%d", n.opts.Port) }

// stop shuts the server down; start brings it back on the same port and store.
func (n *restartableNATS) stop() {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.s.Shutdown()
	n.s.WaitForShutdown()
	n.s = nil
}

func (n *restartableNATS) start() {
	n.mu.Lock()
	defer n.mu.Unlock()
	opts := n.opts
	n.s = natstest.RunServer(&opts)
}

// --- a Docker socket proxy that can be cut ----------------------------------

// dockerProxy forwards a unix socket to the engine's. The worker is pointed
// at it with DOCKER_HOST; cut makes the engine unreachable for the worker
// (every connection, attach streams and the event stream included, is
// closed and new ones are refused) without touching dockerd.
type dockerProxy struct {
	path   string
	target string
	ln     net.Listener

	mu    sync.Mutex
	cut   bool
	conns map[net.Conn]struct{}
	wg    sync.WaitGroup
}

func startDockerProxy(t testing.TB) *dockerProxy {
	t.Helper()
	target := dockerx.DefaultSocketPath
	if h := os.Getenv("DOCKER_HOST"); h != "" {
		p, ok := strings.CutPrefix(h, "unix://")
		if !ok {
			t.Fatalf("the Docker proxy needs a unix socket, DOCKER_HOST is %q", h)
		}
		target = p
	} else if p := os.Getenv("ISODE_SOCKET_PATH"); p != "" {
		target = p
	}
	dir, err := os.MkdirTemp("", "isode-dp-") // short: unix socket paths are limited
	if err != nil {
		t.Fatal(err)
	}
	p := &dockerProxy{path: filepath.Join(dir, "docker.sock"), target: target, conns: make(map[net.Conn]struct{})}
	p.ln, err = net.Listen("unix", p.path)
	if err != nil {
		t.Fatal(err)
	}
	p.wg.Add(1)
	go p.accept()
	t.Cleanup(func() {
		p.ln.Close()
		p.closeAll()
		p.wg.Wait()
		os.RemoveAll(dir)
	})
	return p
}

func (p *dockerProxy) accept() {
	defer p.wg.Done()
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		p.mu.Lock()
		if p.cut {
			p.mu.Unlock()
			c.Close()
			continue
		}
		up, err := net.Dial("unix", p.target)
		if err != nil {
			p.mu.Unlock()
			c.Close()
			continue
		}
		p.conns[c] = struct{}{}
		p.conns[up] = struct{}{}
		p.wg.Add(2)
		p.mu.Unlock()
		pipe := func(dst, src net.Conn) {
			defer p.wg.Done()
			io.Copy(dst, src)
			dst.Close()
			src.Close()
			p.mu.Lock()
			delete(p.conns, dst)
			delete(p.conns, src)
			p.mu.Unlock()
		}
		go pipe(up, c)
		go pipe(c, up)
	}
}

func (p *dockerProxy) closeAll() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for c := range p.conns {
		c.Close()
	}
}

// setCut cuts (true) or restores (false) the worker's access to the engine.
func (p *dockerProxy) setCut(cut bool) {
	p.mu.Lock()
	p.cut = cut
	p.mu.Unlock()
	if cut {
		p.closeAll()
	}
}

// --- the suite's shared state -----------------------------------------------

// bystanders are the tenants that keep being served during every attack.
var bystanders = []string{"bystander-a", "bystander-b", "bystander-c"}

const trivial = `return function (cb) { cb(null, "ok") }`

// hostile is the suite's worker and everything measured around it.
type hostile struct {
	e     *e2e
	w     *worker
	nats  *restartableNATS
	proxy *dockerProxy
	js    jetstream.JetStream
	high  int
	g0    int // goroutines before the worker started

	mu   sync.Mutex
	rows []summaryRow
}

// summaryRow is one line of the summary table in SECURITY.md.
type summaryRow struct {
	Case, Outcome, Code string
	Ratio               float64 // bystanders' median latency during / before
	Others              string  // effect on other tenants, when not a ratio
}

// newHostile starts the NATS server, the Docker proxy and one worker that
// reaches the engine through the proxy.
func newHostile(t *testing.T, args ...string) *hostile {
	t.Helper()
	var ns *restartableNATS
	e := connectE2E(t, func() string { ns = startRestartableNATS(t); return ns.url() },
		nats.MaxReconnects(-1), nats.ReconnectWait(100*time.Millisecond), nats.ReconnectBufSize(64<<20))
	proxy := startDockerProxy(t)
	t.Setenv("DOCKER_HOST", "unix://"+proxy.path) // the worker's engine, not e.cli's
	h := &hostile{e: e, nats: ns, proxy: proxy, high: 10}
	h.js, _ = jetstream.New(e.nc)
	h.g0 = ownGoroutines()
	all := append([]string{"--log-level", envOr("ISODE_HOSTILE_LOG_LEVEL", "info"), "--low", "2", "--high", strconv.Itoa(h.high), "--ack-wait", "2s"}, args...)
	h.w = e.start(all...)
	t.Cleanup(func() {
		if p := os.Getenv("ISODE_HOSTILE_LOG"); p != "" && t.Failed() {
			os.WriteFile(p, []byte(h.w.log.String()), 0o644)
		}
	})
	return h
}

// run runs code for key through the client and NATS, bounded by wait.
func (h *hostile) run(key, code string, timeout, wait time.Duration, opts ...isode.RunOption) (*isode.Result, error) {
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	return h.e.c.Run(ctx, key, code, append([]isode.RunOption{isode.WithTimeout(timeout)}, opts...)...)
}

// mustRun runs code and returns its result's JSON, failing the test on error.
func (h *hostile) mustRun(t testing.TB, key, code string) string {
	t.Helper()
	res, err := h.run(key, code, 10*time.Second, 60*time.Second)
	if err != nil {
		t.Fatalf("%s: %v", key, err)
	}
	return string(res.Value)
}

// wantErr runs code and checks that it fails with want; it returns the error
// and the result (console output) for further checks.
func (h *hostile) wantErr(t testing.TB, key, code string, timeout time.Duration, want protocol.Code, msg string) (*protocol.Error, *isode.Result) {
	t.Helper()
	res, err := h.run(key, code, timeout, timeout+60*time.Second)
	pe := new(protocol.Error)
	if !errors.As(err, &pe) {
		t.Fatalf("%s: got %v (result %+v), want a %s error", key, err, res, want)
	}
	if pe.Code != want || !strings.Contains(pe.Message, msg) {
		t.Fatalf("%s: got %s %q, want %s mentioning %q", key, pe.Code, pe.Message, want, msg)
	}
	return pe, res
}

// hostname returns the short container id of key's sandbox: the same value
// before and after an attack means the sandbox survived it.
func (h *hostile) hostname(t testing.TB, key string) string {
	t.Helper()
	var s string
	if err := json.Unmarshal([]byte(h.mustRun(t, key, `return function (cb) { cb(null, require("os").hostname()) }`)), &s); err != nil {
		t.Fatal(err)
	}
	return s
}

// containerOf returns the full id of the container whose id starts with short.
func (h *hostile) containerOf(t testing.TB, short string) string {
	t.Helper()
	for _, c := range h.list(t) {
		if strings.HasPrefix(c.ID, short) {
			return c.ID
		}
	}
	t.Fatalf("no container of worker %s has id %s...", h.w.id, short)
	return ""
}

func (h *hostile) list(t testing.TB) []container.Summary {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	list, err := h.e.cli.ContainerList(ctx, container.ListOptions{All: true,
		Filters: filters.NewArgs(filters.Arg("label", dockerx.LabelWorker+"="+h.w.id))})
	if err != nil {
		t.Fatal(err)
	}
	return list
}

// stats asks the worker for its pool counters over NATS.
func (h *hostile) stats() (protocol.WorkerStats, error) {
	var st protocol.WorkerStats
	m, err := h.e.nc.Request(protocol.StatsSubject(protocol.DefaultPrefix), nil, 5*time.Second)
	if err != nil {
		return st, err
	}
	err = json.Unmarshal(m.Data, &st)
	return st, err
}

// --- bystanders ---------------------------------------------------------------

// latencies of bystander runs; errs are their failures.
type sample struct {
	lat  []time.Duration
	errs []error
}

func median(d []time.Duration) time.Duration {
	if len(d) == 0 {
		return 0
	}
	s := slices.Clone(d)
	slices.Sort(s)
	return s[len(s)/2]
}

// baseline measures the bystanders' latency before an attack.
func (h *hostile) baseline(t testing.TB) time.Duration {
	t.Helper()
	var lat []time.Duration
	for range 2 {
		for _, b := range bystanders {
			start := time.Now()
			if _, err := h.run(b, trivial, 10*time.Second, 30*time.Second); err != nil {
				t.Fatalf("bystander %s before the attack: %v", b, err)
			}
			lat = append(lat, time.Since(start))
		}
	}
	return median(lat)
}

// bystanding runs the bystanders in a loop until stop is called; stop
// returns what they saw. Each bystander runs at least min times.
type bystanding struct {
	stopc chan struct{}
	wg    sync.WaitGroup
	mu    sync.Mutex
	s     sample
}

func (h *hostile) startBystanders(min int) *bystanding {
	b := &bystanding{stopc: make(chan struct{})}
	for _, key := range bystanders {
		b.wg.Add(1)
		go func() {
			defer b.wg.Done()
			tick := time.NewTicker(40 * time.Millisecond)
			defer tick.Stop()
			for n := 0; ; n++ {
				if n >= min {
					select {
					case <-b.stopc:
						return
					default:
					}
				}
				start := time.Now()
				res, err := h.run(key, trivial, 5*time.Second, 8*time.Second) // a lost reply (NATS restart) costs 8s
				lat := time.Since(start)
				if err == nil && string(res.Value) != `"ok"` {
					err = fmt.Errorf("bystander %s got %s", key, res.Value)
				}
				b.mu.Lock()
				if err != nil {
					b.s.errs = append(b.s.errs, fmt.Errorf("%s: %w", key, err))
				} else {
					b.s.lat = append(b.s.lat, lat)
				}
				b.mu.Unlock()
				select {
				case <-b.stopc:
					if n+1 >= min {
						return
					}
				case <-tick.C:
				}
			}
		}()
	}
	return b
}

func (b *bystanding) stop() sample {
	close(b.stopc)
	b.wg.Wait()
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.s
}

// --- leaks --------------------------------------------------------------------

// footprint is what the worker holds: goroutines of this process (the
// in-process worker, the NATS server, the client), containers of the worker.
type footprint struct {
	goroutines int
	containers int
}

func (h *hostile) footprint(t testing.TB) footprint {
	return footprint{goroutines: ownGoroutines(), containers: len(h.list(t))}
}

// ownGoroutines counts this process's goroutines but those of the embedded
// NATS server, whose count follows the consumers the worker made, not
// anything the worker leaked.
func ownGoroutines() int {
	buf := make([]byte, 1<<20)
	for {
		n := runtime.Stack(buf, true)
		if n < len(buf) {
			buf = buf[:n]
			break
		}
		buf = make([]byte, 2*len(buf))
	}
	count := 0
	for _, g := range strings.Split(string(buf), "\n\n") {
		if strings.HasPrefix(g, "goroutine ") && !strings.Contains(g, "nats-server/v2/server.") {
			count++
		}
	}
	return count
}

// goroutineDump is the goroutine profile, for failures.
func goroutineDump() string {
	var b strings.Builder
	pprof.Lookup("goroutine").WriteTo(&b, 1)
	return b.String()
}

// Goroutines the in-process worker keeps per live sandbox (the attach
// stream's reader, the pool's watcher), and some slack for idle HTTP
// connections and timers that come and go.
const (
	goroutinesPerSandbox = 3
	goroutineSlack       = 24
	heapBound            = 160 << 20
)

// settle waits for the pool to settle after an attack and checks that
// nothing leaked: every container of the worker is running and is one the
// pool counts, no more than High, goroutines back to what the live
// sandboxes explain, and the heap after GC within a bound.
func (h *hostile) settle(t testing.TB, before footprint) {
	t.Helper()
	var why string
	ok := testenv.Poll(30*time.Second, func() bool {
		list := h.list(t)
		st, err := h.stats()
		if err != nil {
			why = "no stats: " + err.Error()
			return false
		}
		running := 0
		for _, c := range list {
			if c.State == container.StateRunning {
				running++
			}
		}
		pool := st.Pool.Free + st.Pool.Assigned
		switch {
		case len(list) != running:
			why = fmt.Sprintf("%d of %d containers are not running", len(list)-running, len(list))
		case st.Pool.Creating > 0 || running != pool:
			why = fmt.Sprintf("%d containers running, the pool counts %d (+%d being created)", running, pool, st.Pool.Creating)
		case running > h.high:
			why = fmt.Sprintf("%d containers, over High (%d)", running, h.high)
		default:
			g := ownGoroutines()
			want := before.goroutines + goroutinesPerSandbox*max(0, running-before.containers) + goroutineSlack
			if g > want {
				why = fmt.Sprintf("%d goroutines, want at most %d (%d before, %d -> %d containers)", g, want, before.goroutines, before.containers, running)
				return false
			}
			return true
		}
		return false
	})
	if !ok {
		if strings.Contains(why, "goroutines") {
			t.Logf("goroutines:\n%s", goroutineDump())
		}
		t.Fatalf("the pool did not settle within 30s: %s", why)
	}
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	if ms.HeapAlloc > heapBound {
		t.Fatalf("heap after GC is %d MiB, over the bound of %d MiB", ms.HeapAlloc>>20, heapBound>>20)
	}
	select {
	case err := <-h.w.done:
		h.w.exited = true
		t.Fatalf("the worker exited: %v", err)
	default:
	}
}

// --- cases --------------------------------------------------------------------

// outcome is what an attack observed, for the summary table.
type outcome struct {
	outcome string        // what happened to the offending request(s)
	code    protocol.Code // their error code, "" for none
	others  string        // effect on other tenants when bystanders cannot show it
	// retryableOK accepts bystander failures with retryable codes (for
	// faults that take the transport or the engine away from everyone).
	retryableOK bool
}

// scenario runs one attack as a subtest: bystanders are measured before
// and during it, and the pool must settle without leaks afterwards.
func (h *hostile) scenario(t *testing.T, name string, attack func(t *testing.T) outcome) {
	t.Helper()
	t.Run(name, func(t *testing.T) {
		before := h.footprint(t)
		base := h.baseline(t)
		by := h.startBystanders(2)
		o := attack(t)
		s := by.stop()
		for _, err := range s.errs {
			if o.retryableOK && protocol.CodeOf(err).Retryable() {
				continue
			}
			t.Errorf("a bystander failed during the attack: %v", err)
		}
		during := median(s.lat)
		ratio := float64(during) / float64(max(base, time.Microsecond))
		worst := slices.Max(append(s.lat, 0))
		t.Logf("bystanders: %d runs, median %v before, %v during (x%.1f), worst %v, %d failed",
			len(s.lat), base.Round(10*time.Microsecond), during.Round(10*time.Microsecond), ratio, worst.Round(time.Millisecond), len(s.errs))
		// The machine is a shared 2-core VM: only a very generous bound.
		if !o.retryableOK && (worst > 10*time.Second || during > 3*time.Second) {
			t.Errorf("bystanders were starved: median %v, worst %v during the attack", during, worst)
		}
		h.settle(t, before)
		others := o.others
		if others == "" {
			others = fmt.Sprintf("served, x%.1f", ratio)
			if len(s.errs) > 0 {
				others = fmt.Sprintf("%d retryable failures, then served; x%.1f", len(s.errs), ratio)
			}
		}
		code := string(o.code)
		if code == "" {
			code = "-"
		}
		h.mu.Lock()
		h.rows = append(h.rows, summaryRow{Case: name, Outcome: o.outcome, Code: code, Ratio: ratio, Others: others})
		h.mu.Unlock()
	})
}

// table renders the summary as Markdown.
func (h *hostile) table() string {
	h.mu.Lock()
	defer h.mu.Unlock()
	var b strings.Builder
	b.WriteString("| case | outcome | error code | other tenants (latency during / before) |\n| --- | --- | --- | --- |\n")
	for _, r := range h.rows {
		fmt.Fprintf(&b, "| %s | %s | %s | %s |\n", r.Case, strings.ReplaceAll(r.Outcome, "|", "/"), r.Code, r.Others)
	}
	return b.String()
}

// writeSummary logs the table and, when ISODE_HOSTILE_SUMMARY names a file,
// writes it there.
func (h *hostile) writeSummary(t testing.TB, took time.Duration) {
	tab := h.table() + fmt.Sprintf("\nSuite run time: %v.\n", took.Round(time.Second))
	t.Logf("summary:\n%s", tab)
	if p := os.Getenv("ISODE_HOSTILE_SUMMARY"); p != "" {
		if err := os.WriteFile(p, []byte(tab), 0o644); err != nil {
			t.Errorf("write summary: %v", err)
		}
	}
}

// --- raw requests ---------------------------------------------------------------

// rawRequest is a hand-made request: any body, any headers.
type rawRequest struct {
	subject string
	body    []byte
	header  map[string]string
}

// publishRaw publishes hand-made requests and returns their inboxes'
// subscription; the reply to request i arrives on inbox+"."+i.
func (h *hostile) publishRaw(t testing.TB, reqs []rawRequest) (inbox string, sub *nats.Subscription) {
	t.Helper()
	inbox = nats.NewInbox()
	sub, err := h.e.nc.SubscribeSync(inbox + ".>")
	if err != nil {
		t.Fatal(err)
	}
	sub.SetPendingLimits(-1, -1)
	t.Cleanup(func() { sub.Unsubscribe() })
	for i, r := range reqs {
		m := nats.NewMsg(r.subject)
		m.Data = r.body
		m.Header.Set(protocol.HeaderMsgID, "raw-"+randomHex(8))
		m.Header.Set(protocol.HeaderReplyTo, inbox+"."+strconv.Itoa(i))
		m.Header.Set(protocol.HeaderDeadline, strconv.FormatInt(time.Now().Add(30*time.Second).UnixMilli(), 10))
		for k, v := range r.header {
			if v == "" {
				m.Header.Del(k)
			} else {
				m.Header.Set(k, v)
			}
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		_, err := h.js.PublishMsg(ctx, m)
		cancel()
		if err != nil {
			t.Fatalf("publish request %d: %v", i, err)
		}
	}
	return inbox, sub
}

// collect waits for n replies on sub, keyed by the inbox suffix.
func collect(t testing.TB, inbox string, sub *nats.Subscription, n int, wait time.Duration) map[int]*protocol.Reply {
	t.Helper()
	got := make(map[int]*protocol.Reply, n)
	deadline := time.Now().Add(wait)
	for len(got) < n {
		m, err := sub.NextMsg(time.Until(deadline))
		if err != nil {
			t.Fatalf("%d of %d replies after %v: %v", len(got), n, wait, err)
		}
		i, err := strconv.Atoi(strings.TrimPrefix(m.Subject, inbox+"."))
		if err != nil {
			t.Fatalf("reply on %s", m.Subject)
		}
		var rep protocol.Reply
		if err := json.Unmarshal(m.Data, &rep); err != nil {
			t.Fatalf("reply %d is not JSON: %v", i, err)
		}
		if _, dup := got[i]; !dup {
			got[i] = &rep
		}
	}
	return got
}

// request is one hand-made, valid run request.
func request(key, code string, timeoutMs int64) rawRequest {
	body, _ := json.Marshal(protocol.Request{V: protocol.Version, IsolateKey: key, Code: code, TimeoutMs: timeoutMs})
	return rawRequest{subject: protocol.RunSubject(protocol.DefaultPrefix, protocol.Shard(key, protocol.DefaultShards)), body: body}
}

// sameShard returns a key with prefix on the shard of key.
func sameShard(key, prefix string) string {
	want := protocol.Shard(key, protocol.DefaultShards)
	for i := 0; ; i++ {
		k := prefix + strconv.Itoa(i)
		if protocol.Shard(k, protocol.DefaultShards) == want {
			return k
		}
	}
}

// buildInBackground builds the worker binary while the suite runs; the
// returned function waits for it.
func buildInBackground(t testing.TB) func(testing.TB) string {
	path := filepath.Join(t.TempDir(), "worker")
	done := make(chan struct{})
	var out []byte
	var err error
	go func() {
		defer close(done)
		cmd := exec.Command("go", "build", "-o", path, ".")
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		out, err = cmd.CombinedOutput()
	}()
	t.Cleanup(func() { <-done })
	return func(t testing.TB) string {
		t.Helper()
		<-done
		if err != nil {
			t.Fatalf("build the worker: %v\n%s", err, out)
		}
		return path
	}
}

func envOr(name, def string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return def
}
