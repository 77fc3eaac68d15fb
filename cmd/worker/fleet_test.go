package main

// Process-level fleet tests: real worker processes with real sandboxes,
// against one NATS server that runs in this test process with the
// deployment's own configuration (deploy/nats.conf, so the fleet runs under
// its least-privilege users) and that a test can restart on the same port
// and store.

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/docker/docker/api/types/container"
	"github.com/docker/docker/api/types/filters"
	"github.com/docker/docker/client"
	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/isode-run/isode/internal/testenv"
	"github.com/isode-run/isode/pkg/dockerx"
	"github.com/isode-run/isode/pkg/protocol"
)

// ---- NATS, configured as deployed ----

// deployNATS is a JetStream NATS server started from deploy/nats.conf on a
// fixed loopback port, with its store in a test directory. It keeps port and
// store across restarts.
type deployNATS struct {
	t    testing.TB
	opts *server.Options
	pass map[string]string // user -> password
	log  *natsServerLog

	mu sync.Mutex
	s  *server.Server
}

// newDeployNATS starts the server and stops it at cleanup. It sets the
// password variables of the configuration with t.Setenv, so its test may
// not be parallel.
func newDeployNATS(t testing.TB) *deployNATS {
	t.Helper()
	n := &deployNATS{t: t, pass: map[string]string{}, log: &natsServerLog{}}
	for _, u := range []string{"app-a", "app-b", "worker", "ops"} {
		n.pass[u] = randomHex(12)
		if tt, ok := t.(interface{ Setenv(k, v string) }); ok {
			tt.Setenv("ISODE_"+strings.ToUpper(strings.ReplaceAll(u, "-", "_"))+"_PASSWORD", n.pass[u])
		} else {
			t.Fatal("deployNATS needs t.Setenv")
		}
	}
	opts, err := server.ProcessConfigFile(filepath.Join("..", "..", "deploy", "nats.conf"))
	if err != nil {
		t.Fatalf("deploy/nats.conf: %v", err)
	}
	opts.Host = "127.0.0.1"
	opts.Port = testenv.FreePort(t)
	opts.StoreDir = t.TempDir()
	opts.NoSigs = true
	n.opts = opts
	n.start()
	t.Cleanup(n.shutdown)
	return n
}

func (n *deployNATS) start() {
	n.t.Helper()
	o := n.opts.Clone()
	s, err := server.NewServer(o)
	if err != nil {
		n.t.Fatalf("NATS server: %v", err)
	}
	s.SetLoggerV2(n.log, false, false, false)
	go s.Start()
	if !s.ReadyForConnections(20 * time.Second) {
		s.Shutdown()
		n.t.Fatal("NATS server not ready within 20s")
	}
	n.mu.Lock()
	n.s = s
	n.mu.Unlock()
}

func (n *deployNATS) shutdown() {
	n.mu.Lock()
	s := n.s
	n.s = nil
	n.mu.Unlock()
	if s != nil {
		s.Shutdown()
		s.WaitForShutdown()
	}
}

// restart stops the server and starts it again on the same port and store.
func (n *deployNATS) restart() {
	n.shutdown()
	n.start()
}

// url returns the server's URL with the credentials of user.
func (n *deployNATS) url(user string) string {
	return fmt.Sprintf("nats://%s:%s@127.0.0.1:%d", user, n.pass[user], n.opts.Port)
}

// connect connects as user; the connection reconnects forever.
func (n *deployNATS) connect(user string, opts ...nats.Option) *nats.Conn {
	n.t.Helper()
	opts = append([]nats.Option{nats.Name("fleet-test " + user), nats.MaxReconnects(-1),
		nats.ReconnectWait(100 * time.Millisecond)}, opts...)
	nc, err := nats.Connect(n.url(user), opts...)
	if err != nil {
		n.t.Fatalf("connect as %s: %v", user, err)
	}
	n.t.Cleanup(nc.Close)
	return nc
}

// natsServerLog keeps the server's permission violations (and its errors, for
// failure reports).
type natsServerLog struct {
	mu         sync.Mutex
	violations []string
	errors     []string
}

func (l *natsServerLog) record(format string, v []any) {
	line := fmt.Sprintf(format, v...)
	l.mu.Lock()
	defer l.mu.Unlock()
	if strings.Contains(line, "Violation") {
		l.violations = append(l.violations, line)
	}
	if len(l.errors) < 200 {
		l.errors = append(l.errors, line)
	}
}

func (l *natsServerLog) Noticef(string, ...any)         {}
func (l *natsServerLog) Debugf(string, ...any)          {}
func (l *natsServerLog) Tracef(string, ...any)          {}
func (l *natsServerLog) Warnf(format string, v ...any)  { l.record(format, v) }
func (l *natsServerLog) Errorf(format string, v ...any) { l.record(format, v) }
func (l *natsServerLog) Fatalf(format string, v ...any) { l.record(format, v) }

// violationsOf returns the logged permission violations of a user.
func (l *natsServerLog) violationsOf(user string) []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []string
	for _, v := range l.violations {
		if strings.Contains(v, "/user:"+user+`"`) || strings.Contains(v, `User "`+user+`"`) {
			out = append(out, v)
		}
	}
	return out
}

// ---- worker processes ----

// fleetProc is a worker process started from the built binary.
type fleetProc struct {
	id      string
	cmd     *exec.Cmd
	logPath string
	done    chan struct{} // closed once the process has exited
	err     error         // Wait's result, set before done closes
}

// testFleet is a test's NATS server, Docker engine and worker processes.
type testFleet struct {
	t     testing.TB
	nats  *deployNATS
	cli   *client.Client
	image string
	bin   string
	name  string // prefix of worker ids, unique to the test
	ops   *nats.Conn
}

func newFleet(t testing.TB) *testFleet {
	t.Helper()
	cli := testenv.Docker(t)
	img := testenv.Image(t, cli)
	bin := workerBinary(t)
	n := newDeployNATS(t)
	f := &testFleet{t: t, nats: n, cli: cli, image: img, bin: bin, name: "fl-" + randomHex(3)}
	f.ops = n.connect("ops")
	return f
}

// start starts a worker process named name (its id is unique to the test).
// It does not wait for it to be ready.
func (f *testFleet) start(name string, args ...string) *fleetProc {
	f.t.Helper()
	id := f.name + "-" + name
	logPath := filepath.Join(f.t.TempDir(), id+".log")
	logf, err := os.Create(logPath)
	if err != nil {
		f.t.Fatal(err)
	}
	level := "info"
	if os.Getenv("ISODE_TEST_LOGS") == "debug" {
		level = "debug"
	}
	all := append([]string{"--nats", f.nats.url("worker"), "--id", id, "--image", f.image,
		"--low", "1", "--high", "6", "--grace", "10s", "--log-format", "json", "--log-level", level}, args...)
	cmd := exec.Command(f.bin, all...)
	cmd.Stdout, cmd.Stderr = logf, logf
	dieWithTest(cmd)
	if err := cmd.Start(); err != nil {
		logf.Close()
		f.t.Fatalf("start worker %s: %v", id, err)
	}
	p := &fleetProc{id: id, cmd: cmd, logPath: logPath, done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		logf.Close()
		close(p.done)
	}()
	f.t.Cleanup(func() {
		p.stop(f.t)
		f.removeContainers(p.id)
		if f.t.Failed() || os.Getenv("ISODE_TEST_LOGS") != "" {
			f.t.Logf("log of %s (last lines):\n%s", p.id, p.tail(200))
		}
	})
	return p
}

// startReady starts workers and waits until each logged that it is ready.
func (f *testFleet) startReady(names ...string) []*fleetProc {
	f.t.Helper()
	ps := make([]*fleetProc, len(names))
	for i, n := range names {
		ps[i] = f.start(n)
	}
	for _, p := range ps {
		p.waitReady(f.t, 90*time.Second)
	}
	return ps
}

func (p *fleetProc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

func (p *fleetProc) log() string {
	b, _ := os.ReadFile(p.logPath)
	return string(b)
}

func (p *fleetProc) tail(n int) string {
	lines := strings.Split(strings.TrimRight(p.log(), "\n"), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}

func (p *fleetProc) waitReady(t testing.TB, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !strings.Contains(p.log(), `"worker ready"`) {
		if p.exited() {
			t.Fatalf("worker %s exited before it was ready (%v):\n%s", p.id, p.err, p.tail(30))
		}
		if time.Now().After(deadline) {
			t.Fatalf("worker %s not ready after %v:\n%s", p.id, timeout, p.tail(30))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// kill sends SIGKILL and waits for the process to be gone.
func (p *fleetProc) kill(t testing.TB) {
	t.Helper()
	if err := p.cmd.Process.Signal(syscall.SIGKILL); err != nil && !p.exited() {
		t.Fatalf("kill %s: %v", p.id, err)
	}
	<-p.done
}

// term sends SIGTERM (a graceful leave) without waiting.
func (p *fleetProc) term(t testing.TB) {
	t.Helper()
	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil && !p.exited() {
		t.Fatalf("SIGTERM %s: %v", p.id, err)
	}
}

// waitExit waits for the process to exit and returns its error (nil for
// status 0).
func (p *fleetProc) waitExit(timeout time.Duration) (error, bool) {
	select {
	case <-p.done:
		return p.err, true
	case <-time.After(timeout):
		return nil, false
	}
}

// stop ends a process this test started: SIGTERM, then SIGKILL after 30s.
func (p *fleetProc) stop(t testing.TB) {
	if p.exited() {
		return
	}
	p.cmd.Process.Signal(syscall.SIGTERM)
	if _, ok := p.waitExit(30 * time.Second); ok {
		return
	}
	t.Errorf("worker %s (pid %d) ignored SIGTERM for 30s; killing it", p.id, p.cmd.Process.Pid)
	p.cmd.Process.Signal(syscall.SIGKILL)
	<-p.done
}

// removeContainers removes every sandbox a worker made and checks that
// none is left.
func (f *testFleet) removeContainers(id string) {
	testenv.RemoveByLabel(f.t, f.cli, dockerx.LabelWorker, id)
	deadline := time.Now().Add(30 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		list, err := f.cli.ContainerList(ctx, container.ListOptions{All: true,
			Filters: filters.NewArgs(filters.Arg("label", dockerx.LabelWorker+"="+id))})
		cancel()
		if err == nil && len(list) == 0 {
			return
		}
		if time.Now().After(deadline) {
			f.t.Errorf("worker %s: %d containers still there 30s after removal (%v)", id, len(list), err)
			return
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// ---- fleet state from isode.stats ----

// stats gathers the workers' answers for wait, as `submit stats` does.
func (f *testFleet) stats(wait time.Duration) []protocol.WorkerStats {
	f.t.Helper()
	inbox := f.ops.NewInbox()
	sub, err := f.ops.SubscribeSync(inbox)
	if err != nil {
		f.t.Fatal(err)
	}
	defer sub.Unsubscribe()
	if err := f.ops.PublishRequest(protocol.StatsSubject(protocol.DefaultPrefix), inbox, nil); err != nil {
		return nil // reconnecting: the caller polls again
	}
	var all []protocol.WorkerStats
	deadline := time.Now().Add(wait)
	for {
		m, err := sub.NextMsg(time.Until(deadline))
		if err != nil {
			break
		}
		var s protocol.WorkerStats
		if json.Unmarshal(m.Data, &s) == nil && s.Worker != "" {
			all = append(all, s)
		}
	}
	return all
}

// shardOwners is who owns each shard, as the workers report it.
type shardOwners map[int]string

// steady polls stats until exactly the workers ids answer and every shard
// has exactly one owner among them; it returns the shardOwners.
func (f *testFleet) steady(ids []string, timeout time.Duration) shardOwners {
	f.t.Helper()
	deadline := time.Now().Add(timeout)
	var last string
	for {
		st := f.stats(700 * time.Millisecond)
		own, problem := checkShardOwners(st, ids)
		if problem == "" {
			return own
		}
		last = problem
		if time.Now().After(deadline) {
			f.t.Fatalf("no steady state with workers %v after %v: %s", ids, timeout, last)
		}
	}
}

// settle polls stats until the state steady() waits for has held for a
// whole window, and returns when that window began. A fleet that reaches
// one owner per shard only to fall apart again has not settled.
func (f *testFleet) settle(ids []string, window, timeout time.Duration) (time.Time, shardOwners) {
	f.t.Helper()
	deadline := time.Now().Add(timeout)
	var since time.Time
	var last string
	for {
		at := time.Now()
		own, problem := checkShardOwners(f.stats(700*time.Millisecond), ids)
		switch {
		case problem != "":
			since, last = time.Time{}, problem
		case since.IsZero():
			since = at
		case time.Since(since) >= window:
			return since, own
		}
		if time.Now().After(deadline) {
			f.t.Fatalf("workers %v did not settle for %v within %v: %s", ids, window, timeout, last)
		}
	}
}

// checkShardOwners returns the shardOwners when stats show exactly ids answering and
// each shard owned once, or what is wrong.
func checkShardOwners(st []protocol.WorkerStats, ids []string) (shardOwners, string) {
	answered := []string{}
	own := shardOwners{}
	for _, s := range st {
		answered = append(answered, s.Worker)
		for _, sh := range s.Shards {
			if prev, ok := own[sh]; ok {
				return nil, fmt.Sprintf("shard %d owned by %s and %s", sh, prev, s.Worker)
			}
			own[sh] = s.Worker
		}
	}
	sort.Strings(answered)
	want := slices.Clone(ids)
	sort.Strings(want)
	if !slices.Equal(answered, want) {
		return nil, fmt.Sprintf("workers answering: %v", answered)
	}
	if len(own) != protocol.DefaultShards {
		return nil, fmt.Sprintf("%d of %d shards owned", len(own), protocol.DefaultShards)
	}
	return own, ""
}

func (o shardOwners) of(id string) []int {
	var out []int
	for s, w := range o {
		if w == id {
			out = append(out, s)
		}
	}
	sort.Ints(out)
	return out
}

func (o shardOwners) counts() map[string]int {
	c := map[string]int{}
	for _, w := range o {
		c[w]++
	}
	return c
}

// ---- load: requests published and answered, counted one by one ----

const fleetSnippet = `return function (ctx, cb) { setTimeout(function () { cb(null, ctx.data); }, 5); }`

// fleetRequest is one submitted run.
type fleetRequest struct {
	id       string
	key      string
	shard    int
	n        int
	sent     time.Time
	accepted bool // the stream acknowledged the publish
	answered chan struct{}

	// Set before answered closes.
	at     time.Time
	worker string
	err    *protocol.Error
	value  string
}

// load submits runs from several callers over many tenants until stopped.
// A fleetRequest counts as accepted when the stream acknowledged its publish;
// each accepted fleetRequest must get an answer.
type fleetLoad struct {
	t       testing.TB
	nc      *nats.Conn
	js      jetstream.JetStream
	inbox   string
	sub     *nats.Subscription
	tenants []string

	stopCh chan struct{}
	wg     sync.WaitGroup

	mu      sync.Mutex
	byID    map[string]*fleetRequest
	all     []*fleetRequest
	dupes   int
	unacked int // replies to requests whose publish was not acknowledged
}

func (f *testFleet) startLoad(callers int, tenants []string) *fleetLoad {
	f.t.Helper()
	nc := f.nats.connect("app-a")
	js, err := jetstream.New(nc)
	if err != nil {
		f.t.Fatal(err)
	}
	l := &fleetLoad{t: f.t, nc: nc, js: js, inbox: nc.NewInbox() + ".", tenants: tenants,
		stopCh: make(chan struct{}), byID: map[string]*fleetRequest{}}
	l.sub, err = nc.Subscribe(l.inbox+"*", l.deliver)
	if err != nil {
		f.t.Fatal(err)
	}
	l.sub.SetPendingLimits(-1, -1)
	if err := nc.Flush(); err != nil {
		f.t.Fatal(err)
	}
	for c := 0; c < callers; c++ {
		l.wg.Add(1)
		go l.caller(c)
	}
	f.t.Cleanup(l.stop)
	return l
}

func (l *fleetLoad) deliver(m *nats.Msg) {
	id := strings.TrimPrefix(m.Subject, l.inbox)
	at := time.Now()
	if m.Reply != "" {
		m.Respond(nil) // confirm the reply (protocol.HeaderReplyAck)
	}
	var rep protocol.Reply
	err := json.Unmarshal(m.Data, &rep)
	l.mu.Lock()
	defer l.mu.Unlock()
	r := l.byID[id]
	switch {
	case r == nil:
		return
	case r.worker != "":
		l.dupes++
		return
	}
	if !r.accepted {
		l.unacked++
	}
	r.at, r.worker = at, rep.Worker
	switch {
	case err != nil:
		r.err = protocol.Errorf(protocol.CodeInternal, "undecodable reply: %v", err)
	case rep.Error != nil:
		r.err = rep.Error
	default:
		r.value = string(rep.Result)
	}
	if r.worker == "" {
		r.worker = "?"
	}
	close(r.answered)
}

func (l *fleetLoad) caller(c int) {
	defer l.wg.Done()
	rng := rand.New(rand.NewPCG(uint64(c), uint64(time.Now().UnixNano())))
	for seq := 0; ; seq++ {
		select {
		case <-l.stopCh:
			return
		default:
		}
		key := l.tenants[rng.IntN(len(l.tenants))]
		r := &fleetRequest{id: fmt.Sprintf("%s-%d-%d", randomHex(4), c, seq), key: key,
			shard: protocol.Shard(key, protocol.DefaultShards), n: c*1_000_000 + seq, answered: make(chan struct{})}
		body, _ := json.Marshal(protocol.Request{V: protocol.Version, IsolateKey: key, Code: fleetSnippet,
			Input: json.RawMessage(strconv.Itoa(r.n)), TimeoutMs: 5000})
		m := nats.NewMsg(protocol.RunSubject(protocol.DefaultPrefix, r.shard))
		m.Data = body
		m.Header.Set(protocol.HeaderMsgID, r.id)
		m.Header.Set(protocol.HeaderReplyTo, l.inbox+r.id)
		m.Header.Set(protocol.HeaderDeadline, strconv.FormatInt(time.Now().Add(2*time.Minute).UnixMilli(), 10))
		m.Header.Set(protocol.HeaderReplyAck, "1")
		l.mu.Lock()
		l.byID[r.id] = r
		l.all = append(l.all, r)
		l.mu.Unlock()
		r.sent = time.Now()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		_, err := l.js.PublishMsg(ctx, m)
		cancel()
		if err != nil {
			// Not acknowledged: it does not count as accepted (it may still
			// be answered if the stream did store it).
			select {
			case <-time.After(50 * time.Millisecond):
			case <-l.stopCh:
				return
			}
			continue
		}
		l.mu.Lock()
		r.accepted = true
		l.mu.Unlock()
		select {
		case <-r.answered:
		case <-l.stopCh:
			return
		}
	}
}

// stop ends submission; requests already accepted still get answered.
func (l *fleetLoad) stop() {
	select {
	case <-l.stopCh:
	default:
		close(l.stopCh)
	}
	l.wg.Wait()
}

// answered counts answered requests.
func (l *fleetLoad) answered() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	n := 0
	for _, r := range l.all {
		if r.worker != "" {
			n++
		}
	}
	return n
}

// waitFor polls until cond holds on the requests (called with l.mu held),
// or fails the test after timeout.
func (l *fleetLoad) waitFor(timeout time.Duration, what string, cond func(rs []*fleetRequest) bool) {
	l.t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		l.mu.Lock()
		ok := cond(l.all)
		l.mu.Unlock()
		if ok {
			return
		}
		if time.Now().After(deadline) {
			l.t.Fatalf("after %v: %s", timeout, what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// fleetTally is the outcome of a load.
type fleetTally struct {
	published, accepted, answered, lost, failed, wrong int
	byWorker                                           map[string]int
	lostIDs                                            []string
}

func (tl fleetTally) String() string {
	return fmt.Sprintf("published %d, accepted %d, answered %d, lost %d, errors %d, wrong values %d; answers by worker %v",
		tl.published, tl.accepted, tl.answered, tl.lost, tl.failed, tl.wrong, tl.byWorker)
}

// finish stops the load, waits up to timeout for every accepted fleetRequest to
// be answered and counts.
func (l *fleetLoad) finish(timeout time.Duration) fleetTally {
	l.t.Helper()
	l.stop()
	deadline := time.Now().Add(timeout)
	for {
		tl := l.count()
		if tl.lost == 0 || time.Now().After(deadline) {
			return tl
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func (l *fleetLoad) count() fleetTally {
	l.mu.Lock()
	defer l.mu.Unlock()
	tl := fleetTally{byWorker: map[string]int{}}
	for _, r := range l.all {
		tl.published++
		if !r.accepted {
			continue
		}
		tl.accepted++
		if r.worker == "" {
			tl.lost++
			if len(tl.lostIDs) < 10 {
				tl.lostIDs = append(tl.lostIDs, fmt.Sprintf("%s (tenant %s, shard %d, sent %s)", r.id, r.key, r.shard, r.sent.Format("15:04:05.000")))
			}
			continue
		}
		tl.answered++
		tl.byWorker[r.worker]++
		switch {
		case r.err != nil:
			tl.failed++
		case r.value != strconv.Itoa(r.n):
			tl.wrong++
		}
	}
	return tl
}

// errorsSeen lists the distinct errors answered.
func (l *fleetLoad) errorsSeen() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	seen := map[string]bool{}
	var out []string
	for _, r := range l.all {
		if r.err != nil && !seen[r.err.Error()] && len(out) < 10 {
			seen[r.err.Error()] = true
			out = append(out, r.err.Error())
		}
	}
	return out
}

// check fails the test unless every accepted fleetRequest was answered
// correctly.
func (l *fleetLoad) check(tl fleetTally) {
	l.t.Helper()
	l.t.Logf("load: %v (%d duplicate replies)", tl, l.dupes)
	if tl.accepted == 0 {
		l.t.Fatal("no fleetRequest was accepted")
	}
	if tl.lost > 0 {
		l.t.Errorf("%d accepted requests never answered, e.g. %v", tl.lost, tl.lostIDs)
	}
	if tl.failed > 0 || tl.wrong > 0 {
		l.t.Errorf("%d error replies and %d wrong values: %v", tl.failed, tl.wrong, l.errorsSeen())
	}
}

// firstAnswer returns the earliest answer after t0 by a worker other than
// not, for a fleetRequest on one of shards.
func firstAnswer(rs []*fleetRequest, t0 time.Time, shards []int, not string) (time.Time, bool) {
	var first time.Time
	for _, r := range rs {
		if r.worker == "" || r.worker == not || !r.at.After(t0) || !slices.Contains(shards, r.shard) {
			continue
		}
		if first.IsZero() || r.at.Before(first) {
			first = r.at
		}
	}
	return first, !first.IsZero()
}

// failover waits for the first answer, by a worker other than victim, on
// one of the dead shards after killAt, and returns how long after killAt
// it came.
func (l *fleetLoad) failover(killAt time.Time, dead []int, victim string) time.Duration {
	l.waitFor(60*time.Second, "no answer on the dead worker's shards", func(rs []*fleetRequest) bool {
		_, ok := firstAnswer(rs, killAt, dead, victim)
		return ok
	})
	l.mu.Lock()
	first, _ := firstAnswer(l.all, killAt, dead, victim)
	l.mu.Unlock()
	return first.Sub(killAt)
}

// fleetTenants returns n tenant keys unique to this test.
func fleetTenants(prefix string, n int) []string {
	keys := make([]string, n)
	for i := range keys {
		keys[i] = fmt.Sprintf("%s-t%d", prefix, i)
	}
	return keys
}

// ---- the tests ----

// timeline describes, relative to t0, the answers on shards after t0: when
// each request was sent, when and by whom it was answered.
func (l *fleetLoad) timeline(t0 time.Time, shards []int, n int) string {
	l.mu.Lock()
	defer l.mu.Unlock()
	var rs []*fleetRequest
	for _, r := range l.all {
		if r.worker != "" && r.at.After(t0) && slices.Contains(shards, r.shard) {
			rs = append(rs, r)
		}
	}
	sort.Slice(rs, func(i, j int) bool { return rs[i].at.Before(rs[j].at) })
	var b strings.Builder
	for _, r := range rs[:min(n, len(rs))] {
		fmt.Fprintf(&b, "\n  sent %+.2fs answered %+.2fs by %s (shard %d)", r.sent.Sub(t0).Seconds(), r.at.Sub(t0).Seconds(), r.worker, r.shard)
	}
	return b.String()
}

// answeredBy counts the answers by worker id.
func answeredBy(rs []*fleetRequest, id string) int {
	n := 0
	for _, r := range rs {
		if r.worker == id {
			n++
		}
	}
	return n
}

// busiest returns which of ids answered the most requests sent after since.
func busiest(rs []*fleetRequest, ids []string, since time.Time) (string, int) {
	n := map[string]int{}
	for _, r := range rs {
		if r.worker != "" && r.sent.After(since) {
			n[r.worker]++
		}
	}
	best := ""
	for _, id := range ids {
		if best == "" || n[id] > n[best] {
			best = id
		}
	}
	return best, n[best]
}

func answeredCount(rs []*fleetRequest) int {
	n := 0
	for _, r := range rs {
		if r.worker != "" {
			n++
		}
	}
	return n
}

// TestFleetScaleOutAndFailover: three workers reach a steady state with one
// owner per shard; a fourth joins and takes about a quarter of the shards,
// and no shard moves anywhere else; one worker is killed with SIGKILL under
// load: every request the stream accepted is answered, and the failover
// time (kill to the first answer by another worker on one of the dead
// worker's shards) is measured.
func TestFleetScaleOutAndFailover(t *testing.T) {
	if testing.Short() {
		t.Skip("process-level fleet test")
	}
	f := newFleet(t)
	began := time.Now()
	ps := f.startReady("w1", "w2", "w3")
	ids := []string{ps[0].id, ps[1].id, ps[2].id}
	three := f.steady(ids, 30*time.Second)
	t.Logf("steady state with 3 workers %v after their start: %v", time.Since(began).Round(time.Millisecond), three.counts())

	// A fourth worker joins: it takes about a quarter of the shards, and
	// only shards that move to it move.
	joinAt := time.Now()
	w4 := f.start("w4")
	w4.waitReady(t, 90*time.Second)
	ids = append(ids, w4.id)
	four := f.steady(ids, 30*time.Second)
	t.Logf("w4 joined: steady again %v after its start: %v", time.Since(joinAt).Round(time.Millisecond), four.counts())
	for s := 0; s < protocol.DefaultShards; s++ {
		if three[s] != four[s] && four[s] != w4.id {
			t.Errorf("shard %d moved from %s to %s, not to the new worker", s, three[s], four[s])
		}
	}
	if n := len(four.of(w4.id)); n < 6 || n > 28 {
		t.Errorf("the fourth worker took %d of %d shards, want about a quarter", n, protocol.DefaultShards)
	}

	// SIGKILL under load, to the worker that serves the most of it (one
	// whose shards hold none of the test's tenants would prove nothing).
	loadAt := time.Now()
	l := f.startLoad(8, fleetTenants(f.name, 12))
	l.waitFor(60*time.Second, "no load", func(rs []*fleetRequest) bool { return answeredCount(rs) >= 40 })
	l.mu.Lock()
	victimID, _ := busiest(l.all, ids, loadAt)
	l.mu.Unlock()
	victim := slices.Concat(ps, []*fleetProc{w4})[slices.Index(ids, victimID)]
	dead := four.of(victim.id)
	killAt := time.Now()
	victim.kill(t)
	t.Logf("SIGKILL to %s (%d shards) after %d answers", victim.id, len(dead), l.answered())
	alive := slices.DeleteFunc(slices.Clone(ids), func(id string) bool { return id == victim.id })
	after := f.steady(alive, 30*time.Second)
	reowned := time.Since(killAt)
	failover := l.failover(killAt, dead, victim.id)
	t.Logf("failover after SIGKILL: first answer on a dead shard by another worker after %v; stats show its shards re-owned within %v: %v",
		failover.Round(time.Millisecond), reowned.Round(time.Millisecond), after.counts())
	if failover > 15*time.Second {
		t.Errorf("failover took %v, want well under 15s (target 5s)", failover)
	}
	// Keep the load going past the failover, then count.
	base := l.answered()
	l.waitFor(60*time.Second, "the fleet stopped serving after the failover", func(rs []*fleetRequest) bool {
		return answeredCount(rs) >= base+40
	})
	tl := l.finish(60 * time.Second)
	t.Logf("answers on the dead worker's shards after the kill:%s", l.timeline(killAt, dead, 12))
	l.check(tl)
	if tl.lost > 0 {
		f.explainLost(l)
	}
	if tl.byWorker[victim.id] == 0 {
		t.Errorf("the killed worker answered nothing before it died: %v", tl)
	}
	f.checkPermissions()
	t.Logf("total %v", time.Since(began).Round(time.Millisecond))
}

// TestFleetNATSRestart: the NATS server restarts under load; nothing the
// stream had accepted is lost, the workers reconnect and the fleet settles
// again with one owner per shard.
func TestFleetNATSRestart(t *testing.T) {
	if testing.Short() {
		t.Skip("process-level fleet test")
	}
	f := newFleet(t)
	began := time.Now()
	ps := f.startReady("r1", "r2", "r3")
	ids := []string{ps[0].id, ps[1].id, ps[2].id}
	f.steady(ids, 30*time.Second)

	l := f.startLoad(8, fleetTenants(f.name, 12))
	l.waitFor(60*time.Second, "no answers before the restart", func(rs []*fleetRequest) bool { return answeredCount(rs) >= 60 })
	restartAt := time.Now()
	f.nats.restart()
	base := l.answered()
	t.Logf("NATS server down and up again in %v, after %d answers", time.Since(restartAt).Round(time.Millisecond), base)
	// Settled: one owner per shard, and it stays so (workers that lost
	// sight of each other would each take every shard).
	since, settled := f.settle(ids, 5*time.Second, 60*time.Second)
	resettled := since.Sub(restartAt)
	t.Logf("one owner per shard, for good, %v after the restart began: %v", resettled.Round(time.Millisecond), settled.counts())
	if resettled > 30*time.Second {
		t.Errorf("the fleet took %v to settle after a NATS restart", resettled)
	}
	l.waitFor(60*time.Second, "no answers after the restart", func(rs []*fleetRequest) bool { return answeredCount(rs) >= base+40 })
	t.Logf("40 more answers %v after the restart began", time.Since(restartAt).Round(time.Millisecond))
	tl := l.finish(60 * time.Second)
	l.check(tl)
	if tl.lost > 0 {
		f.explainLost(l)
	}
	f.checkPermissions()
	t.Logf("total %v", time.Since(began).Round(time.Millisecond))
}

// TestFleetGracefulLeave: a worker stopped with SIGTERM hands its shards
// over at once. The other worker is configured to wait a whole minute for
// a silent member, and takes the shards within seconds; nothing is lost.
func TestFleetGracefulLeave(t *testing.T) {
	if testing.Short() {
		t.Skip("process-level fleet test")
	}
	f := newFleet(t)
	const ttl = 60 * time.Second
	a := f.start("a", "--heartbeat", "1s", "--member-ttl", ttl.String())
	b := f.start("b", "--heartbeat", "1s", "--member-ttl", ttl.String())
	a.waitReady(t, 90*time.Second)
	b.waitReady(t, 90*time.Second)
	both := f.steady([]string{a.id, b.id}, 30*time.Second)
	t.Logf("steady: %v", both.counts())

	l := f.startLoad(6, fleetTenants(f.name, 12))
	l.waitFor(60*time.Second, "a answered nothing", func(rs []*fleetRequest) bool { return answeredBy(rs, a.id) >= 10 })
	leaveAt := time.Now()
	a.term(t)
	f.steady([]string{b.id}, 30*time.Second)
	handover := time.Since(leaveAt)
	t.Logf("graceful leave: %s owns every shard %v after SIGTERM to %s (member TTL %v)", b.id, handover.Round(time.Millisecond), a.id, ttl)
	if handover > ttl/3 {
		t.Errorf("hand-over took %v: it waited for the member TTL (%v)", handover, ttl)
	}
	err, ok := a.waitExit(60 * time.Second)
	if !ok {
		t.Fatalf("%s did not exit within 60s of SIGTERM", a.id)
	}
	if err != nil {
		t.Errorf("%s exited with %v after SIGTERM, want status 0", a.id, err)
	}
	base := l.answered()
	l.waitFor(60*time.Second, "b stopped serving", func(rs []*fleetRequest) bool { return answeredCount(rs) >= base+30 })
	tl := l.finish(60 * time.Second)
	l.check(tl)
	if tl.lost > 0 {
		f.explainLost(l)
	}
	f.checkPermissions()
}

// checkPermissions fails the test if a worker or the application hit a
// permission of deploy/nats.conf.
func (f *testFleet) checkPermissions() {
	f.t.Helper()
	for _, u := range []string{"worker", "app-a", "app-b", "ops"} {
		if v := f.nats.log.violationsOf(u); len(v) > 0 {
			f.t.Errorf("user %s hit %d permission violations of deploy/nats.conf, e.g. %q", u, len(v), v[0])
		}
	}
}

// explainLost logs where lost requests' shards stand in JetStream.
func (f *testFleet) explainLost(l *fleetLoad) {
	f.t.Helper()
	js, err := jetstream.New(f.ops)
	if err != nil {
		return
	}
	l.mu.Lock()
	shards := map[int]bool{}
	for _, r := range l.all {
		if r.accepted && r.worker == "" {
			shards[r.shard] = true
		}
	}
	l.mu.Unlock()
	for s := range shards {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		c, err := js.Consumer(ctx, protocol.StreamName(protocol.DefaultPrefix), protocol.ConsumerName(protocol.DefaultPrefix, s))
		if err == nil {
			ci := c.CachedInfo()
			f.t.Logf("shard %d: %d pending, %d awaiting ack, %d redelivered, %d waiting pulls", s, ci.NumPending, ci.NumAckPending, ci.NumRedelivered, ci.NumWaiting)
		} else {
			f.t.Logf("shard %d: consumer info: %v", s, err)
		}
		cancel()
	}
}
