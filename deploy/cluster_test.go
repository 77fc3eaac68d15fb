package deploy

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/docker/docker/api/types/container"
	"github.com/docker/docker/api/types/filters"
	"github.com/docker/docker/api/types/image"
	"github.com/docker/docker/api/types/network"
	"github.com/docker/docker/client"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/isode-run/isode/internal/testenv"
	isode "github.com/isode-run/isode/pkg/client"
	"github.com/isode-run/isode/pkg/dockerx"
	"github.com/isode-run/isode/pkg/protocol"
)

// The fault suite (make test-cluster): the cluster deployment
// (compose.cluster.yaml: three NATS servers, R3, three workers, each in its
// own container on one private network) under a bystander load of many
// tenants, through one fault at a time. For each fault it checks that no
// request the stream accepted goes unanswered, and reports the duplicates,
// the longest time any tenant went unserved, and the load's p99 before and
// during the fault.

const (
	suiteWorkers  = 3
	suiteTenants  = 30
	suiteCallers  = 16
	partitionTime = 20 * time.Second
	// The contract asserted; the target (10 s) is reported.
	maxOutage = 30 * time.Second
)

var clusterServers = []string{"nats-1", "nats-2", "nats-3"}

func TestClusterFaults(t *testing.T) {
	if os.Getenv("ISODE_CLUSTER_SUITE") != "1" {
		t.Skip("the NATS cluster fault suite runs in `make test-cluster` (ISODE_CLUSTER_SUITE=1)")
	}
	if composeTool() == "" {
		if testenv.CI() {
			t.Fatal("CI is set, so this may not be skipped: neither `docker compose` nor `docker-compose` is installed")
		}
		t.Skip("neither `docker compose` nor `docker-compose` is installed")
	}
	began := time.Now()
	c := startCluster(t)
	t.Logf("cluster up and healthy after %v", time.Since(began).Round(time.Second))

	l := c.startLoad(t)
	// Warm up: every tenant gets its container before anything is measured.
	if !testenv.Poll(90*time.Second, func() bool { return l.tenantsServed() == suiteTenants }) {
		t.Fatalf("only %d of %d tenants served after 90s", l.tenantsServed(), suiteTenants)
	}
	time.Sleep(3 * time.Second)

	var windows []*faultWindow
	scenario := func(name string, fault func(t *testing.T, w *faultWindow)) {
		t.Run(name, func(t *testing.T) {
			c.waitHealthy(t, 90*time.Second)
			l.waitSettled(t, 60*time.Second)
			w := &faultWindow{name: name, before: time.Now()}
			time.Sleep(8 * time.Second) // the bystander's p99 before
			w.start = time.Now()
			c.event("%s: fault starts", name)
			fault(t, w)
			if w.heal.IsZero() {
				w.heal = time.Now()
			}
			c.event("%s: fault healed", name)
			c.waitHealthy(t, 90*time.Second)
			l.waitSettled(t, 60*time.Second)
			w.healthy = time.Now()
			c.event("%s: healthy again", name)
			time.Sleep(5 * time.Second) // the load settles
			w.end = time.Now()
			windows = append(windows, w)
		})
	}

	scenario("kill the request stream's leader", func(t *testing.T, w *faultWindow) {
		leader := c.leader(t, "ISODE")
		w.detail = "kill -9 " + leader
		c.kill(t, leader)
		time.Sleep(10 * time.Second)
		c.start(t, leader)
	})
	scenario("rolling restart", func(t *testing.T, w *faultWindow) {
		w.detail = "docker restart nats-1, nats-2, nats-3 in turn"
		for i, s := range clusterServers {
			if i > 0 {
				c.waitHealthy(t, 90*time.Second)
			}
			c.restart(t, s)
		}
	})
	scenario("partition a worker", func(t *testing.T, w *faultWindow) {
		id := c.containers(t, "worker")[0]
		w.detail = fmt.Sprintf("network disconnect of a worker for %v", partitionTime)
		restore := c.disconnect(t, id)
		time.Sleep(partitionTime)
		w.heal = time.Now()
		restore()
	})
	scenario("partition a NATS server", func(t *testing.T, w *faultWindow) {
		leader := c.leader(t, "ISODE")
		w.detail = fmt.Sprintf("network disconnect of %s (the stream's leader) for %v", leader, partitionTime)
		restore := c.disconnect(t, c.containers(t, leader)[0])
		time.Sleep(partitionTime)
		w.heal = time.Now()
		restore()
	})
	scenario("kill a worker while a NATS server is down", func(t *testing.T, w *faultWindow) {
		down := c.leader(t, "KV_"+protocol.MembersBucket(protocol.DefaultPrefix))
		w.detail = "kill -9 " + down + " (the members bucket's leader), then kill -9 a worker"
		c.kill(t, down)
		time.Sleep(2 * time.Second)
		worker := c.containers(t, "worker")[0]
		c.killContainer(t, worker)
		time.Sleep(10 * time.Second)
		c.start(t, down)
		c.startContainer(t, worker)
	})

	l.stop()
	t.Logf("suite took %v (%d requests)", time.Since(began).Round(time.Second), l.count())
	var table strings.Builder
	fmt.Fprintf(&table, "\n| fault | accepted | lost | duplicates | longest tenant outage | p99 before | p99 during |\n|---|---|---|---|---|---|---|\n")
	for _, w := range windows {
		r := l.report(w)
		fmt.Fprintf(&table, "| %s (%s) | %d | %d | %d | %.1f s | %v | %v |\n", w.name, w.detail, r.accepted, r.lost,
			r.duplicates, r.outage.Seconds(), r.p99Before.Round(time.Millisecond), r.p99During.Round(time.Millisecond))
		t.Logf("%s: longest outage: %s", w.name, r.outageOf)
		if r.lost > 0 {
			t.Errorf("%s: %d accepted requests were never answered: %v", w.name, r.lost, r.lostIDs)
		}
		if r.outage > maxOutage {
			t.Errorf("%s: a tenant went unserved for %v, over %v", w.name, r.outage.Round(time.Millisecond), maxOutage)
		}
		if r.wrong > 0 {
			t.Errorf("%s: %d answers were not the request's own", w.name, r.wrong)
		}
	}
	c.mu.Lock()
	t.Logf("timeline:\n%s", strings.Join(c.events, "\n"))
	c.mu.Unlock()
	t.Logf("fault table:%s", table.String())
	if lost := l.lostOverall(); lost > 0 {
		t.Errorf("%d accepted requests were never answered in the whole run", lost)
	}
	c.checkViolations(t)
}

// cluster is one run of compose.cluster.yaml under a project of its own.
type cluster struct {
	cli     *client.Client
	project string
	env     []string
	ports   [3]int
	app     string // passwords
	ops     string
	opsNC   *nats.Conn

	mu      sync.Mutex
	workers map[string]bool // every worker id seen, for the cleanup of sandboxes
	events  []string        // the suite's timeline, logged at the end
}

func (c *cluster) event(format string, args ...any) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.events = append(c.events, clock()+" "+fmt.Sprintf(format, args...))
}

func startCluster(t *testing.T) *cluster {
	cli := testenv.Docker(t)
	testenv.Image(t, cli)
	suffix := randomHex(4)
	c := &cluster{
		cli:     cli,
		project: "isodecluster" + suffix,
		app:     randomHex(16),
		ops:     randomHex(16),
		workers: map[string]bool{},
	}
	for i := range c.ports {
		c.ports[i] = testenv.FreePort(t)
	}
	workerImage := "isode-worker:cluster-test-" + suffix
	natsImage := "isode-nats:cluster-test-" + suffix
	c.env = append(os.Environ(),
		"ISODE_COMPOSE_PROJECT="+c.project,
		"ISODE_WORKER_IMAGE="+workerImage,
		"ISODE_NATS_IMAGE="+natsImage,
		"ISODE_CLUSTER_CLIENT_PORTS=1",
		fmt.Sprintf("ISODE_NATS_PORT=%d", c.ports[0]),
		fmt.Sprintf("ISODE_NATS_PORT_2=%d", c.ports[1]),
		fmt.Sprintf("ISODE_NATS_PORT_3=%d", c.ports[2]),
		"ISODE_APP_A_PASSWORD="+c.app,
		"ISODE_APP_B_PASSWORD="+randomHex(16),
		"ISODE_WORKER_PASSWORD="+randomHex(16),
		"ISODE_OPS_PASSWORD="+c.ops,
	)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		for _, img := range []string{workerImage, natsImage} {
			if _, err := cli.ImageRemove(ctx, img, image.RemoveOptions{Force: true, PruneChildren: true}); err != nil && !client.IsErrNotFound(err) {
				t.Logf("remove image %s: %v", img, err)
			}
		}
	})
	build := exec.Command("../scripts/build-images.sh")
	build.Env = c.env
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build images: %v\n%s", err, out)
	}

	// Whatever happens, the project and its workers' sandboxes go away.
	t.Cleanup(func() {
		if path := os.Getenv("ISODE_CLUSTER_LOGS"); path != "" {
			out, _ := c.composeOut("logs", "--no-color")
			if err := os.WriteFile(path, out, 0o644); err != nil {
				t.Errorf("write the deployment's logs: %v", err)
			}
		}
		if t.Failed() {
			out, _ := c.composeOut("logs", "--no-color", "--tail", "40")
			t.Logf("the deployment's last logs:\n%s", out)
		}
		if c.opsNC != nil {
			c.opsNC.Close()
		}
		if out, err := c.composeOut("down", "-v", "--remove-orphans", "-t", "30"); err != nil {
			t.Errorf("compose down: %v\n%s", err, out)
		}
		c.mu.Lock()
		ids := slices.Collect(func(yield func(string) bool) {
			for id := range c.workers {
				if !yield(id) {
					return
				}
			}
		})
		c.mu.Unlock()
		// Sandboxes of stopped workers go as their AutoRemove completes;
		// those of killed ones once their stdin closes.
		left := func() int {
			n := 0
			for _, id := range ids {
				cs, _ := cli.ContainerList(context.Background(), container.ListOptions{All: true,
					Filters: filters.NewArgs(filters.Arg("label", dockerx.LabelWorker+"="+id))})
				n += len(cs)
			}
			return n
		}
		testenv.Poll(30*time.Second, func() bool { return left() == 0 })
		for _, id := range ids {
			if n := testenv.RemoveByLabel(t, cli, dockerx.LabelWorker, id); n > 0 {
				t.Errorf("%d sandboxes of worker %s were left", n, id)
			}
		}
		byProject := filters.NewArgs(filters.Arg("label", "com.docker.compose.project="+c.project))
		if cs, err := cli.ContainerList(context.Background(), container.ListOptions{All: true, Filters: byProject}); err != nil || len(cs) > 0 {
			t.Errorf("containers of the project left: %d (%v)", len(cs), err)
		}
	})
	if out, err := c.composeOut("up", "-d", "--scale", fmt.Sprintf("worker=%d", suiteWorkers)); err != nil {
		t.Fatalf("compose up: %v\n%s", err, out)
	}
	nc, err := nats.Connect(c.urls("ops"), nats.Name("isode cluster suite ops"), nats.MaxReconnects(-1),
		nats.ReconnectWait(100*time.Millisecond), nats.PingInterval(2*time.Second), nats.RetryOnFailedConnect(true))
	if err != nil {
		t.Fatal(err)
	}
	c.opsNC = nc
	c.waitHealthy(t, 120*time.Second)

	// Everything the fleet keeps is replicated on all three servers.
	for _, name := range []string{"ISODE", "KV_" + protocol.MembersBucket(protocol.DefaultPrefix)} {
		info := c.streamInfo(t, name)
		if info == nil || info.Config.Replicas != 3 {
			t.Fatalf("stream %s: %+v; want 3 replicas", name, info)
		}
	}
	return c
}

func (c *cluster) composeOut(args ...string) ([]byte, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "../scripts/cluster.sh", args...)
	cmd.Env = c.env
	cmd.WaitDelay = 10 * time.Second
	return cmd.CombinedOutput()
}

// urls lists the three servers' published client ports for user.
func (c *cluster) urls(user string) string {
	pw := map[string]string{"app-a": c.app, "ops": c.ops}[user]
	var us []string
	for _, p := range c.ports {
		us = append(us, fmt.Sprintf("nats://%s:%s@127.0.0.1:%d", user, pw, p))
	}
	return strings.Join(us, ",")
}

func (c *cluster) streamInfo(t *testing.T, name string) *jetstream.StreamInfo {
	t.Helper()
	js, err := jetstream.New(c.opsNC)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	s, err := js.Stream(ctx, name)
	if err != nil {
		return nil
	}
	return s.CachedInfo()
}

// leader returns the server leading the stream name.
func (c *cluster) leader(t *testing.T, name string) string {
	t.Helper()
	info := c.streamInfo(t, name)
	if info == nil || info.Cluster == nil || info.Cluster.Leader == "" {
		t.Fatalf("stream %s has no leader: %+v", name, info)
	}
	return info.Cluster.Leader
}

// stats asks every worker for its stats.
func (c *cluster) stats() []protocol.WorkerStats {
	inbox := c.opsNC.NewInbox()
	sub, err := c.opsNC.SubscribeSync(inbox)
	if err != nil {
		return nil
	}
	defer sub.Unsubscribe()
	if err := c.opsNC.PublishRequest(protocol.StatsSubject(protocol.DefaultPrefix), inbox, nil); err != nil {
		return nil
	}
	var out []protocol.WorkerStats
	deadline := time.Now().Add(700 * time.Millisecond)
	for {
		m, err := sub.NextMsg(time.Until(deadline))
		if err != nil {
			break
		}
		var st protocol.WorkerStats
		if json.Unmarshal(m.Data, &st) == nil && st.Worker != "" {
			out = append(out, st)
		}
	}
	c.mu.Lock()
	for _, st := range out {
		c.workers[st.Worker] = true
	}
	c.mu.Unlock()
	return out
}

// healthy reports why the deployment is not in its steady state, or "":
// every stream with a leader and both followers current, every worker in
// the fleet and every shard owned by exactly one.
func (c *cluster) healthy(t *testing.T) string {
	for _, name := range []string{"ISODE", "KV_" + protocol.MembersBucket(protocol.DefaultPrefix)} {
		info := c.streamInfo(t, name)
		switch {
		case info == nil || info.Cluster == nil || info.Cluster.Leader == "":
			return name + " has no leader"
		case len(info.Cluster.Replicas) != 2:
			return fmt.Sprintf("%s has %d followers", name, len(info.Cluster.Replicas))
		}
		for _, r := range info.Cluster.Replicas {
			if !r.Current || r.Offline {
				return fmt.Sprintf("%s: follower %s is not current", name, r.Name)
			}
		}
	}
	st := c.stats()
	if len(st) != suiteWorkers {
		return fmt.Sprintf("%d workers answer stats", len(st))
	}
	owners := map[int]int{}
	for _, s := range st {
		for _, sh := range s.Shards {
			owners[sh]++
		}
	}
	for sh := range protocol.DefaultShards {
		if owners[sh] != 1 {
			return fmt.Sprintf("shard %d has %d owners", sh, owners[sh])
		}
	}
	return ""
}

func (c *cluster) waitHealthy(t *testing.T, d time.Duration) {
	t.Helper()
	var why string
	if !testenv.Poll(d, func() bool {
		why = c.healthy(t)
		if why != "" {
			time.Sleep(200 * time.Millisecond)
		}
		return why == ""
	}) {
		t.Fatalf("not healthy after %v: %s", d, why)
	}
}

// containers returns the ids of the project's containers of service.
func (c *cluster) containers(t *testing.T, service string) []string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	cs, err := c.cli.ContainerList(ctx, container.ListOptions{All: true, Filters: filters.NewArgs(
		filters.Arg("label", "com.docker.compose.project="+c.project),
		filters.Arg("label", "com.docker.compose.service="+service))})
	if err != nil || len(cs) == 0 {
		t.Fatalf("containers of %s: %d (%v)", service, len(cs), err)
	}
	ids := make([]string, len(cs))
	for i, x := range cs {
		ids[i] = x.ID
	}
	sort.Strings(ids)
	return ids
}

func (c *cluster) kill(t *testing.T, service string) { c.killContainer(t, c.containers(t, service)[0]) }

func (c *cluster) killContainer(t *testing.T, id string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := c.cli.ContainerKill(ctx, id, "KILL"); err != nil {
		t.Fatalf("kill %s: %v", id, err)
	}
	c.event("killed %.12s", id)
}

func (c *cluster) start(t *testing.T, service string) {
	c.startContainer(t, c.containers(t, service)[0])
}

// startContainer starts the container unless its restart policy already has.
func (c *cluster) startContainer(t *testing.T, id string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	info, err := c.cli.ContainerInspect(ctx, id)
	if err != nil {
		t.Fatalf("inspect %s: %v", id, err)
	}
	if info.State.Running {
		c.event("%.12s was restarted by its restart policy", id)
		return
	}
	if err := c.cli.ContainerStart(ctx, id, container.StartOptions{}); err != nil {
		t.Fatalf("start %s: %v", id, err)
	}
	c.event("started %.12s", id)
}

func (c *cluster) restart(t *testing.T, service string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	timeout := 10
	if err := c.cli.ContainerRestart(ctx, c.containers(t, service)[0], container.StopOptions{Timeout: &timeout}); err != nil {
		t.Fatalf("restart %s: %v", service, err)
	}
	c.event("restarted %s", service)
}

// disconnect cuts the container off the cluster's network and returns the
// function that connects it again, under the same aliases (the service's
// name, which the others resolve).
func (c *cluster) disconnect(t *testing.T, id string) (restore func()) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	info, err := c.cli.ContainerInspect(ctx, id)
	if err != nil {
		t.Fatalf("inspect %s: %v", id, err)
	}
	var netName string
	var aliases []string
	for name, ep := range info.NetworkSettings.Networks {
		netName, aliases = name, ep.Aliases
	}
	if netName == "" {
		t.Fatalf("container %s is on no network", id)
	}
	if err := c.cli.NetworkDisconnect(ctx, netName, id, true); err != nil {
		t.Fatalf("disconnect %s from %s: %v", id, netName, err)
	}
	c.event("disconnected %.12s (%v)", id, aliases)
	return func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := c.cli.NetworkConnect(ctx, netName, id, &network.EndpointSettings{Aliases: aliases}); err != nil {
			t.Fatalf("connect %s to %s again: %v", id, netName, err)
		}
		c.event("connected %.12s again", id)
	}
}

// checkViolations fails on any permission violation of a worker in the
// servers' logs: the cluster must need no more than the single server.
func (c *cluster) checkViolations(t *testing.T) {
	out, err := c.composeOut(append([]string{"logs", "--no-color"}, clusterServers...)...)
	if err != nil {
		t.Errorf("compose logs: %v", err)
		return
	}
	for _, line := range strings.Split(string(out), "\n") {
		if strings.Contains(line, "Violation") {
			t.Errorf("permission violation: %s", line)
		}
	}
}

// faultWindow is one scenario's times: the bystander's "before" from
// before to start, the fault from start to heal, "during" from start to
// healthy (the deployment back in its steady state and the load settled).
type faultWindow struct {
	name, detail                      string
	before, start, heal, healthy, end time.Time
}

// load is the bystander: callers running snippets for many tenants through
// pkg/client, against all three servers.
type load struct {
	nc       *nats.Conn
	c        *isode.Client
	obs      *nats.Subscription
	next     atomic.Uint64
	stopCh   chan struct{}
	wg       sync.WaitGroup
	mu       sync.Mutex
	reqs     []*request
	inflight map[*request]bool
	replies  map[string][]time.Time // request id -> arrival of each reply
}

// settled reports whether the load runs undisturbed: no request has waited
// more than 2 s, and requests complete.
func (l *load) settled() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	now := time.Now()
	for r := range l.inflight {
		if now.Sub(r.sent) > 2*time.Second {
			return false
		}
	}
	for i := len(l.reqs) - 1; i >= 0 && now.Sub(l.reqs[i].done) < time.Second; i-- {
		if l.reqs[i].ok {
			return true
		}
	}
	return false
}

func (l *load) waitSettled(t *testing.T, d time.Duration) {
	t.Helper()
	if !testenv.Poll(d, l.settled) {
		t.Fatalf("the bystander load did not settle within %v", d)
	}
}

type request struct {
	id, tenant string
	sent, done time.Time
	worker     string // that answered
	accepted   bool   // the stream stored it (as far as the client knows)
	answered   bool
	ok         bool // answered with the right value
	wrong      bool
}

const bystanderSnippet = `return function (ctx, cb) { cb(null, ctx.data); }`

func (c *cluster) startLoad(t *testing.T) *load {
	nc, err := nats.Connect(c.urls("app-a"), nats.Name("isode cluster suite bystander"), nats.MaxReconnects(-1),
		// As the workers do (cmd/worker): a server cut off by the network
		// is noticed by missed pongs, or a write that does not complete.
		nats.ReconnectWait(100*time.Millisecond), nats.PingInterval(2*time.Second), nats.FlusherTimeout(4*time.Second),
		nats.DisconnectErrHandler(func(_ *nats.Conn, err error) { c.event("bystander disconnected: %v", err) }),
		nats.ReconnectHandler(func(nc *nats.Conn) { c.event("bystander reconnected to %s", nc.ConnectedAddr()) }))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	cl, err := isode.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	l := &load{nc: nc, c: cl, stopCh: make(chan struct{}), replies: map[string][]time.Time{}, inflight: map[*request]bool{}}
	// Every reply the connection receives, duplicates included (the client
	// keeps only the first).
	l.obs, err = nc.Subscribe("_INBOX.>", func(m *nats.Msg) {
		var rep protocol.Reply
		if json.Unmarshal(m.Data, &rep) != nil || rep.ID == "" || !strings.HasPrefix(rep.ID, "b") {
			return
		}
		l.mu.Lock()
		l.replies[rep.ID] = append(l.replies[rep.ID], time.Now())
		l.mu.Unlock()
	})
	if err != nil {
		t.Fatal(err)
	}
	l.obs.SetPendingLimits(-1, -1)
	for i := range suiteCallers {
		l.wg.Add(1)
		go l.caller(i)
	}
	t.Cleanup(l.stop)
	return l
}

func (l *load) caller(n int) {
	defer l.wg.Done()
	for seq := 0; ; seq++ {
		select {
		case <-l.stopCh:
			return
		default:
		}
		k := l.next.Add(1)
		r := &request{id: fmt.Sprintf("b%d-%d", n, seq), tenant: fmt.Sprintf("tenant-%02d", k%suiteTenants), sent: time.Now()}
		l.mu.Lock()
		l.inflight[r] = true
		l.mu.Unlock()
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		res, err := l.c.Run(ctx, r.tenant, bystanderSnippet, isode.WithRequestID(r.id),
			isode.WithInput(json.RawMessage(fmt.Sprint(k))), isode.WithTimeout(5*time.Second))
		cancel()
		r.done = time.Now()
		r.answered = res != nil
		if res != nil {
			r.worker = res.Worker
		}
		r.accepted = r.answered || errors.Is(err, isode.ErrNoReply)
		r.ok = err == nil && res != nil && string(res.Value) == fmt.Sprint(k)
		r.wrong = err == nil && res != nil && !r.ok
		l.mu.Lock()
		delete(l.inflight, r)
		l.reqs = append(l.reqs, r)
		l.mu.Unlock()
		if !r.answered {
			// Refused or not acknowledged (no stream leader, for a moment):
			// a real caller backs off.
			time.Sleep(100 * time.Millisecond)
		}
	}
}

func (l *load) stop() {
	select {
	case <-l.stopCh:
		return
	default:
	}
	close(l.stopCh)
	l.wg.Wait()
	// Late duplicates have a moment to arrive.
	time.Sleep(2 * time.Second)
	l.obs.Unsubscribe()
}

func (l *load) count() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.reqs)
}

func (l *load) tenantsServed() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	seen := map[string]bool{}
	for _, r := range l.reqs {
		if r.ok {
			seen[r.tenant] = true
		}
	}
	return len(seen)
}

func (l *load) lostOverall() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	n := 0
	for _, r := range l.reqs {
		if r.accepted && !r.answered && len(l.replies[r.id]) == 0 {
			n++
		}
	}
	return n
}

type faultReport struct {
	accepted, lost, duplicates, wrong int
	lostIDs                           []string
	outage                            time.Duration
	outageOf                          string // the tenant, when, and who served it before and after
	p99Before, p99During              time.Duration
}

// report measures one window. The outage is, over every tenant, the
// longest time from the fault's start until the deployment was healthy
// again during which none of its requests completed successfully.
func (l *load) report(w *faultWindow) faultReport {
	l.mu.Lock()
	defer l.mu.Unlock()
	var r faultReport
	var before, during []time.Duration
	completions := map[string][]*request{}
	for _, q := range l.reqs {
		switch {
		case !q.sent.Before(w.before) && q.sent.Before(w.start):
			before = append(before, q.done.Sub(q.sent))
		case !q.sent.Before(w.start) && q.sent.Before(w.healthy):
			during = append(during, q.done.Sub(q.sent))
		}
		if q.ok && !q.done.Before(w.start) && !q.done.After(w.end) {
			completions[q.tenant] = append(completions[q.tenant], q)
		}
		if q.sent.Before(w.start) || !q.sent.Before(w.end) {
			continue
		}
		if q.accepted {
			r.accepted++
		}
		if q.wrong {
			r.wrong++
		}
		if q.accepted && !q.answered && len(l.replies[q.id]) == 0 {
			r.lost++
			r.lostIDs = append(r.lostIDs, q.id)
		}
	}
	for _, times := range l.replies {
		for _, at := range times[1:] {
			if !at.Before(w.start) && at.Before(w.end) {
				r.duplicates++
			}
		}
	}
	for k := range suiteTenants {
		tenant := fmt.Sprintf("tenant-%02d", k)
		done := completions[tenant]
		sort.Slice(done, func(i, j int) bool { return done[i].done.Before(done[j].done) })
		prev, prevBy := w.start, "?"
		for _, q := range append(done, &request{done: w.healthy, worker: "(steady)"}) {
			at := q.done
			if at.After(w.healthy) {
				at = w.healthy
			}
			if gap := at.Sub(prev); gap > r.outage {
				r.outage = gap
				r.outageOf = fmt.Sprintf("%s from +%.1fs (served by %s) to +%.1fs (by %s)", tenant,
					prev.Sub(w.start).Seconds(), prevBy, at.Sub(w.start).Seconds(), q.worker)
			}
			prev, prevBy = at, q.worker
		}
	}
	r.p99Before, r.p99During = p99(before), p99(during)
	return r
}

func clock() string { return time.Now().UTC().Format("15:04:05.000") }

func p99(ds []time.Duration) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	slices.Sort(ds)
	return ds[min(len(ds)-1, len(ds)*99/100)]
}
