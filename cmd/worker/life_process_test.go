package main

// Process tests of the worker's life around NATS: real worker binaries
// against a real NATS server run in this process, with real sandboxes
// where the worker gets that far.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/docker/docker/api/types/container"
	"github.com/docker/docker/api/types/filters"
	"github.com/docker/docker/client"
	natsserver "github.com/nats-io/nats-server/v2/server"
	natstest "github.com/nats-io/nats-server/v2/test"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/isode-run/isode/internal/testenv"
	isode "github.com/isode-run/isode/pkg/client"
	"github.com/isode-run/isode/pkg/dockerx"
	"github.com/isode-run/isode/pkg/protocol"
)

// lifeEnv is a test's Docker engine, sandbox image and worker binary.
type lifeEnv struct {
	t     *testing.T
	cli   *client.Client
	image string
	bin   string
	name  string // prefix of worker ids, unique to the test
}

// lifeSetup checks for the engine and the image (failing under CI when
// either is missing) and builds the worker.
func lifeSetup(t *testing.T) *lifeEnv {
	t.Helper()
	cli := testenv.Docker(t)
	img := testenv.Image(t, cli)
	return &lifeEnv{t: t, cli: cli, image: img, bin: workerBinary(t), name: "life-" + randomHex(3)}
}

// start starts a worker process against natsURL without waiting for it to
// be ready; at cleanup it is stopped and its containers removed.
func (e *lifeEnv) start(natsURL, name string, args ...string) *fleetProc {
	e.t.Helper()
	id := e.name + "-" + name
	all := append([]string{"--nats", natsURL, "--id", id, "--image", e.image,
		"--low", "1", "--high", "4", "--grace", "10s"}, args...)
	p := lifeStartProcess(e.t, e.bin, id, all...)
	e.t.Cleanup(func() { testenv.RemoveByLabel(e.t, e.cli, dockerx.LabelWorker, p.id) })
	return p
}

// list returns the containers labelled with a worker's id.
func (e *lifeEnv) list(id string) []container.Summary {
	e.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	list, err := e.cli.ContainerList(ctx, container.ListOptions{All: true,
		Filters: filters.NewArgs(filters.Arg("label", dockerx.LabelWorker+"="+id))})
	if err != nil {
		e.t.Fatal(err)
	}
	return list
}

// containers counts the containers labelled with a worker's id.
func (e *lifeEnv) containers(id string) int { return len(e.list(id)) }

// lifeDescribe says what state each container is in and how old it is.
func lifeDescribe(list []container.Summary) string {
	var b strings.Builder
	for _, c := range list {
		fmt.Fprintf(&b, "\n  %.12s %v state %s (%s), created %v ago, tenant %q", c.ID, c.Names, c.State, c.Status,
			time.Since(time.Unix(c.Created, 0)).Round(time.Second), c.Labels[dockerx.LabelTenant])
	}
	return b.String()
}

// lifeStartProcess starts the worker binary with a JSON log in a file; at
// cleanup it is stopped (SIGTERM, then SIGKILL) and its log shown if the
// test failed.
func lifeStartProcess(t *testing.T, bin, id string, args ...string) *fleetProc {
	t.Helper()
	logPath := filepath.Join(t.TempDir(), id+".log")
	logf, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, append([]string{"--log-format", "json", "--log-level", "info"}, args...)...)
	cmd.Stdout, cmd.Stderr = logf, logf
	dieWithTest(cmd)
	if err := cmd.Start(); err != nil {
		logf.Close()
		t.Fatalf("start worker %s: %v", id, err)
	}
	p := &fleetProc{id: id, cmd: cmd, logPath: logPath, done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		logf.Close()
		close(p.done)
	}()
	t.Cleanup(func() {
		p.stop(t)
		if t.Failed() || os.Getenv("ISODE_TEST_LOGS") != "" {
			t.Logf("log of %s (last lines):\n%s", p.id, p.tail(60))
		}
	})
	return p
}

// lifeExitCode is a process's exit status (-1 if a signal ended it).
func lifeExitCode(err error) int {
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return ee.ExitCode()
	}
	if err != nil {
		return -1
	}
	return 0
}

// lifeCheckFor calls f until it returns nil or total passes, then fails
// the test with f's last error.
func lifeCheckFor(t *testing.T, total time.Duration, f func() error) {
	t.Helper()
	var last error
	if !testenv.Poll(total, func() bool { last = f(); return last == nil }) {
		t.Fatalf("after %v: %v", total, last)
	}
}

// lifeRunNATS runs a JetStream NATS server on port (-1: any) with opts
// changed by set, until the test ends.
func lifeRunNATS(t *testing.T, port int, set func(*natsserver.Options)) *natsserver.Server {
	t.Helper()
	opts := testenv.NATSOptions(t)
	opts.Port = port
	if set != nil {
		set(&opts)
	}
	s := natstest.RunServer(&opts)
	t.Cleanup(func() { s.Shutdown(); s.WaitForShutdown() })
	return s
}

// lifeConnect connects a client to url until the test ends.
func lifeConnect(t *testing.T, url string) *nats.Conn {
	t.Helper()
	nc, err := nats.Connect(url, nats.MaxReconnects(-1), nats.ReconnectWait(100*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	return nc
}

// lifeOwners asks the workers for their stats and returns who owns each
// shard, as far as they answer within wait.
func lifeOwners(nc *nats.Conn, wait time.Duration) map[int]string {
	inbox := nc.NewInbox()
	sub, err := nc.SubscribeSync(inbox)
	if err != nil {
		return nil
	}
	defer sub.Unsubscribe()
	if err := nc.PublishRequest(protocol.StatsSubject(protocol.DefaultPrefix), inbox, nil); err != nil {
		return nil
	}
	own := map[int]string{}
	deadline := time.Now().Add(wait)
	for {
		m, err := sub.NextMsg(time.Until(deadline))
		if err != nil {
			return own
		}
		var s protocol.WorkerStats
		if json.Unmarshal(m.Data, &s) == nil {
			for _, sh := range s.Shards {
				own[sh] = s.Worker
			}
		}
	}
}

// TestLifeStartedBeforeNATS: three workers started before their NATS
// server exists (compose and systemd start them all at once, and the
// server is not always first) wait for it, then all become ready and each
// serves runs. None exits.
func TestLifeStartedBeforeNATS(t *testing.T) {
	if testing.Short() {
		t.Skip("process-level test")
	}
	e := lifeSetup(t)
	port := testenv.FreePort(t)
	url := fmt.Sprintf("nats://127.0.0.1:%d", port)
	began := time.Now()
	ps := []*fleetProc{e.start(url, "w1"), e.start(url, "w2"), e.start(url, "w3")}

	lifeCheckFor(t, 60*time.Second, func() error {
		for _, p := range ps {
			if p.exited() {
				t.Fatalf("worker %s exited while NATS was not there yet (%v):\n%s", p.id, p.err, p.tail(20))
			}
			if !strings.Contains(p.log(), `"waiting for NATS at `+url+`"`) {
				return fmt.Errorf("worker %s has not said it waits for NATS:\n%s", p.id, p.tail(10))
			}
		}
		return nil
	})
	// The server comes about 2s after the workers, as a slower container
	// would. This wait is the scenario, not synchronisation.
	<-time.After(time.Until(began.Add(2 * time.Second)))
	for _, p := range ps {
		if p.exited() {
			t.Fatalf("worker %s exited while NATS was not there yet (%v):\n%s", p.id, p.err, p.tail(20))
		}
	}
	lifeRunNATS(t, port, nil)
	t.Logf("NATS server started %v after the workers", time.Since(began).Round(time.Millisecond))

	for _, p := range ps {
		p.waitReady(t, 120*time.Second)
		if !strings.Contains(p.log(), `"connected to NATS"`) {
			t.Errorf("worker %s is ready but never logged that it connected:\n%s", p.id, p.tail(20))
		}
	}
	t.Logf("all three ready %v after they started", time.Since(began).Round(time.Millisecond))

	// Each worker serves a run: a tenant on a shard it owns, found from
	// the workers' stats (asked again if shards moved in between).
	nc := lifeConnect(t, url)
	c, err := isode.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	for _, p := range ps {
		lifeCheckFor(t, 120*time.Second, func() error {
			own := lifeOwners(nc, time.Second)
			key := ""
			for i := 0; i < 1000 && key == ""; i++ {
				k := fmt.Sprintf("%s-tenant-%d", p.id, i)
				if own[protocol.Shard(k, protocol.DefaultShards)] == p.id {
					key = k
				}
			}
			if key == "" {
				return fmt.Errorf("worker %s owns no shard: %v", p.id, own)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			res, err := c.Run(ctx, key, `return function (cb) { cb(null, 6 * 7) }`)
			if err != nil {
				return fmt.Errorf("run for %s: %w", key, err)
			}
			if string(res.Value) != "42" {
				t.Fatalf("run for %s returned %s, want 42", key, res.Value)
			}
			if res.Worker != p.id {
				return fmt.Errorf("run for %s on %s's shard answered by %s", key, p.id, res.Worker)
			}
			return nil
		})
	}
	// None exited; each leaves cleanly on SIGTERM while NATS is still up.
	for _, p := range ps {
		if p.exited() {
			t.Fatalf("worker %s exited (%v):\n%s", p.id, p.err, p.tail(20))
		}
		p.term(t)
	}
	for _, p := range ps {
		err, ok := p.waitExit(60 * time.Second)
		if !ok {
			t.Fatalf("worker %s still running 60s after SIGTERM:\n%s", p.id, p.tail(20))
		}
		if code := lifeExitCode(err); code != 0 {
			t.Errorf("worker %s: exit status %d (%v) after SIGTERM, want 0:\n%s", p.id, code, err, p.tail(20))
		}
	}
}

// TestLifeClosedForGoodExitsNonZero: a NATS connection the server closes
// for good (nats.go does not reconnect after "Maximum Control Line
// Exceeded") ends the worker with a non-zero status and a log line saying
// why, and the worker removes its containers first.
//
// The server's max_control_line is 512 while the worker is told 4096, a
// misconfiguration its own subject check cannot catch. The trigger is a
// run request whose reply subject (header Isode-Reply-To) is 510 bytes,
// within the protocol's 512: the request is published with a short control
// line, and the worker's reply to that subject has a line over 512. (A
// core request to isode.stats with a long reply subject does not work: the
// requester's own PUB line carries the same subject, so the server closes
// the requester's connection and the request never reaches the worker.)
func TestLifeClosedForGoodExitsNonZero(t *testing.T) {
	if testing.Short() {
		t.Skip("process-level test")
	}
	e := lifeSetup(t)
	s := lifeRunNATS(t, -1, func(o *natsserver.Options) { o.MaxControlLine = 512 })
	url := s.ClientURL()
	// --low 0: no free sandbox is being made when the connection closes.
	// (A create in flight then can leave a container behind: pkg/dockerx
	// removes it by name when ContainerCreate is cancelled, which misses
	// one the engine finishes creating afterwards; a bug of its own.)
	p := e.start(url, "w1", "--max-control-line", "4096", "--low", "0")
	p.waitReady(t, 120*time.Second)

	// A run with an ordinary reply subject works on this server, and
	// leaves the tenant's sandbox for the worker to remove.
	nc := lifeConnect(t, url)
	c, err := isode.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	rctx, rcancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer rcancel()
	if res, err := c.Run(rctx, "life-ordinary", `return function (cb) { cb(null, 1) }`); err != nil || string(res.Value) != "1" {
		t.Fatalf("ordinary run: %v, %v", res, err)
	}
	if n := e.containers(p.id); n != 1 {
		t.Fatalf("worker %s has %d containers after one tenant's run, want 1", p.id, n)
	}

	replyTo := "_INBOX.life." + strings.Repeat("x", 498) // 510 bytes
	key := "life-long-reply"
	body, _ := json.Marshal(protocol.Request{V: protocol.Version, IsolateKey: key, Code: `return function (cb) { cb(null, 1) }`})
	m := nats.NewMsg(protocol.RunSubject(protocol.DefaultPrefix, protocol.Shard(key, protocol.DefaultShards)))
	m.Data = body
	m.Header.Set(protocol.HeaderMsgID, "life-"+randomHex(6))
	m.Header.Set(protocol.HeaderReplyTo, replyTo)
	m.Header.Set(protocol.HeaderDeadline, strconv.FormatInt(time.Now().Add(time.Minute).UnixMilli(), 10))
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	sent := time.Now()
	if _, err := js.PublishMsg(ctx, m); err != nil {
		t.Fatal(err)
	}

	// The request takes a cold start, then the reply closes the
	// connection: time the exit from the worker's line saying so.
	var closedAt time.Time
	testenv.Poll(120*time.Second, func() bool {
		if closedAt.IsZero() && strings.Contains(p.log(), `"NATS connection closed for good`) {
			closedAt = time.Now()
		}
		return p.exited()
	})
	if !p.exited() {
		t.Fatalf("worker %s still running 120s after the request (closed at %v):\n%s", p.id, closedAt, p.tail(30))
	}
	exitedAt := time.Now()
	if closedAt.IsZero() {
		closedAt = exitedAt
	}
	err = p.err // set before done closed
	t.Logf("worker exited with status %d %v after the request, %v after it logged the close",
		lifeExitCode(err), exitedAt.Sub(sent).Round(time.Millisecond), exitedAt.Sub(closedAt).Round(time.Millisecond))
	if code := lifeExitCode(err); code != 1 {
		t.Errorf("exit status %d (%v), want 1", code, err)
	}
	if d := exitedAt.Sub(closedAt); d > 15*time.Second {
		t.Errorf("the worker took %v from the close to its exit, want a few seconds", d)
	}
	log := p.log()
	for _, want := range []string{`"NATS connection closed for good`, "worker: NATS connection closed for good (" + url + ")"} {
		if !strings.Contains(log, want) {
			t.Errorf("the log does not say %q:\n%s", want, p.tail(30))
		}
	}
	if !strings.Contains(strings.ToLower(log), "maximum control line exceeded") {
		t.Errorf("the log does not give the server's reason (maximum control line exceeded):\n%s", p.tail(30))
	}
	if left := e.list(p.id); len(left) != 0 {
		t.Errorf("worker %s exited leaving %d containers: %s", p.id, len(left), lifeDescribe(left))
	}
}

// TestLifeGivesUpWaitingForNATS: with no NATS server, a worker gives up
// after --nats-connect-timeout with an error that names the URL without
// its password. It never gets as far as Docker, so it needs none.
func TestLifeGivesUpWaitingForNATS(t *testing.T) {
	bin := workerBinary(t)
	url := fmt.Sprintf("nats://isode:s3cret@127.0.0.1:%d", testenv.FreePort(t))
	began := time.Now()
	p := lifeStartProcess(t, bin, "life-timeout-"+randomHex(3), "--nats", url, "--nats-connect-timeout", "2s")
	err, ok := p.waitExit(60 * time.Second)
	if !ok {
		t.Fatalf("worker still running 60s after it started, with --nats-connect-timeout 2s:\n%s", p.tail(20))
	}
	took := time.Since(began)
	if code := lifeExitCode(err); code != 1 {
		t.Errorf("exit status %d (%v), want 1", code, err)
	}
	if took < 2*time.Second {
		t.Errorf("gave up after %v, before the 2s timeout", took)
	}
	log := p.log()
	shown := strings.Replace(url, "s3cret", "xxxxx", 1)
	for _, want := range []string{`"waiting for NATS at ` + shown + `"`, "worker: NATS server not reachable at " + shown + " within 2s (--nats-connect-timeout)", "connection refused"} {
		if !strings.Contains(log, want) {
			t.Errorf("the log does not say %q:\n%s", want, log)
		}
	}
	if strings.Contains(log, "s3cret") {
		t.Errorf("the log shows the password:\n%s", log)
	}
}

// TestLifeTermWhileWaitingForNATS: SIGTERM while the worker waits for NATS
// ends it at once with status 0, as a stop before it served anything.
func TestLifeTermWhileWaitingForNATS(t *testing.T) {
	bin := workerBinary(t)
	url := fmt.Sprintf("nats://127.0.0.1:%d", testenv.FreePort(t))
	p := lifeStartProcess(t, bin, "life-term-"+randomHex(3), "--nats", url)
	lifeCheckFor(t, 60*time.Second, func() error {
		if p.exited() {
			t.Fatalf("worker exited while waiting (%v):\n%s", p.err, p.tail(20))
		}
		if !strings.Contains(p.log(), `"waiting for NATS at `+url+`"`) {
			return errors.New("the worker has not said it waits for NATS")
		}
		return nil
	})
	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	err, ok := p.waitExit(20 * time.Second)
	if !ok {
		t.Fatalf("worker still running 20s after SIGTERM:\n%s", p.tail(20))
	}
	if code := lifeExitCode(err); code != 0 {
		t.Errorf("exit status %d (%v) after SIGTERM while waiting, want 0:\n%s", code, err, p.tail(20))
	}
	if !strings.Contains(p.log(), `"stopped while waiting for NATS"`) {
		t.Errorf("the log does not say it stopped while waiting:\n%s", p.tail(20))
	}
}
