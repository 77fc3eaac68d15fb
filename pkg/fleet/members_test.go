package fleet_test

import (
	"context"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/isode-run/isode/pkg/client"
	"github.com/isode-run/isode/pkg/fleet"
	"github.com/isode-run/isode/pkg/protocol"
)

func fleetConfig(id string) fleet.Config {
	cfg := testConfig(id)
	cfg.Shards = 64
	cfg.Heartbeat = 100 * time.Millisecond
	cfg.MemberTTL = 1500 * time.Millisecond
	return cfg
}

// ownership checks that every shard has exactly one owner among workers
// and returns the owner of each shard.
func ownership(workers map[string]*fleet.Worker, shards int) (map[int]string, error) {
	owners := map[int]string{}
	for id, w := range workers {
		for _, s := range w.Owned() {
			if prev, dup := owners[s]; dup {
				return nil, fmt.Errorf("shard %d owned by %s and %s", s, prev, id)
			}
			owners[s] = id
		}
	}
	if len(owners) != shards {
		return nil, fmt.Errorf("%d of %d shards owned", len(owners), shards)
	}
	return owners, nil
}

func steady(t *testing.T, workers map[string]*fleet.Worker, shards int) map[int]string {
	t.Helper()
	var owners map[int]string
	waitFor(t, 10*time.Second, func() error {
		o, err := ownership(workers, shards)
		owners = o
		return err
	})
	return owners
}

func TestFleetSharesShardsAndRebalancesOnJoin(t *testing.T) {
	e := newEnv(t)
	workers := map[string]*fleet.Worker{}
	for _, id := range []string{"w1", "w2", "w3"} {
		workers[id] = startWorker(t, e, echo, fleetConfig(id))
	}
	before := steady(t, workers, 64)
	for id, w := range workers {
		if n := len(w.Owned()); n < 10 || n > 35 {
			t.Errorf("%s owns %d of 64 shards with 3 workers", id, n)
		}
	}

	workers["w4"] = startWorker(t, e, echo, fleetConfig("w4"))
	after := steady(t, workers, 64)
	moved := 0
	for s, o := range after {
		if before[s] != o {
			moved++
			if o != "w4" {
				t.Errorf("shard %d moved from %s to %s, not to the newcomer", s, before[s], o)
			}
		}
	}
	if n := len(workers["w4"].Owned()); n < 8 || n > 28 || moved != n {
		t.Errorf("newcomer took %d shards, %d moved (want about 16, and only those)", n, moved)
	}
	t.Logf("4th worker took %d of 64 shards", moved)

	// Every tenant is still served, whoever owns its shard.
	c := newClient(t, e, 64)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for i := 0; i < 64; i++ {
		if _, err := c.Run(ctx, fmt.Sprintf("tenant-%d", i), "x"); err != nil {
			t.Fatal(err)
		}
	}
}

func TestGracefulLeaveHandsOverWithoutTimeout(t *testing.T) {
	e := newEnv(t)
	workers := map[string]*fleet.Worker{}
	for _, id := range []string{"w1", "w2", "w3"} {
		cfg := fleetConfig(id)
		cfg.MemberTTL = 10 * time.Second // a hand-over by expiry would take this long
		workers[id] = startWorker(t, e, echo, cfg)
	}
	steady(t, workers, 64)
	leaving := workers["w2"]
	delete(workers, "w2")
	start := time.Now()
	leaving.StopPulling()
	steady(t, workers, 64)
	took := time.Since(start)
	if took > 5*time.Second {
		t.Fatalf("hand-over took %v: it waited for expiry", took)
	}
	t.Logf("graceful hand-over took %v", took)
}

func TestDeadWorkerShardsMove(t *testing.T) {
	e := newEnv(t)
	workers := map[string]*fleet.Worker{}
	conns := map[string]*nats.Conn{}
	for _, id := range []string{"w1", "w2", "w3"} {
		nc, err := nats.Connect(e.url)
		if err != nil {
			t.Fatal(err)
		}
		conns[id] = nc
		workers[id] = startWorkerOn(t, nc, echo, fleetConfig(id))
	}
	owners := steady(t, workers, 64)
	// Cut w3 off NATS without a word: its heartbeats stop.
	var victimShard int
	for s, o := range owners {
		if o == "w3" {
			victimShard = s
			break
		}
	}
	start := time.Now()
	conns["w3"].Close()
	dead := workers["w3"]
	delete(workers, "w3")
	steady(t, workers, 64)
	took := time.Since(start)
	if took > 5*time.Second {
		t.Fatalf("shards of a dead worker moved after %v", took)
	}
	if n := len(dead.Owned()); n != 0 {
		t.Errorf("worker cut off from NATS still claims %d shards", n)
	}
	t.Logf("a dead worker's shards moved in %v (member TTL %v)", took, fleetConfig("x").MemberTTL)

	// A tenant of the dead worker's shard is answered by a live one.
	c := newClient(t, e, 64)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	key := keyOnShard(victimShard, 64)
	res, err := c.Run(ctx, key, "x")
	if err != nil {
		t.Fatal(err)
	}
	if res.Worker == "w3" || !slices.Contains([]string{"w1", "w2"}, res.Worker) {
		t.Fatalf("answered by %q", res.Worker)
	}
}

func keyOnShard(shard, shards int) string {
	for i := 0; ; i++ {
		k := fmt.Sprintf("k%d", i)
		if protocolShard(k, shards) == shard {
			return k
		}
	}
}

var _ = client.WithShards

func TestAliveFollowsMembership(t *testing.T) {
	e := newEnv(t)
	w1 := startWorker(t, e, echo, fleetConfig("w1"))
	w2 := startWorker(t, e, echo, fleetConfig("w2"))
	waitFor(t, 10*time.Second, func() error {
		if !w1.Alive("w2") || !w2.Alive("w1") || !w1.Alive("w1") {
			return fmt.Errorf("w1 sees w2: %v, w2 sees w1: %v", w1.Alive("w2"), w2.Alive("w1"))
		}
		if w1.Alive("never-was") {
			return fmt.Errorf("an unknown worker is alive")
		}
		return nil
	})
	w2.StopPulling()
	waitFor(t, 10*time.Second, func() error {
		if w1.Alive("w2") {
			return fmt.Errorf("w2 left but is alive to w1")
		}
		return nil
	})
}

func TestFleetIDIsTheStreams(t *testing.T) {
	e := newEnv(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	cfg := fleetConfig("w1")
	a, err := fleet.FleetID(ctx, e.nc, cfg)
	if err != nil {
		t.Fatal(err)
	}
	nc2, err := nats.Connect(e.url)
	if err != nil {
		t.Fatal(err)
	}
	defer nc2.Close()
	b, err := fleet.FleetID(ctx, nc2, cfg)
	if err != nil || a != b || len(a) != 16 {
		t.Fatalf("fleet ids %q and %q (%v)", a, b, err)
	}
	js, _ := jetstream.New(e.nc)
	if err := js.DeleteStream(ctx, protocol.StreamName(cfg.Prefix)); err != nil {
		t.Fatal(err)
	}
	c, err := fleet.FleetID(ctx, e.nc, cfg)
	if err != nil || c == a {
		t.Fatalf("a stream made anew has fleet id %q, the old one %q (%v)", c, a, err)
	}
}
