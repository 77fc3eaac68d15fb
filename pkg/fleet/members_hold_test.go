package fleet_test

import (
	"context"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/isode-run/isode/pkg/fleet"
	"github.com/isode-run/isode/pkg/protocol"
)

// On a NATS cluster, when the server leading the members bucket dies, the
// bucket has no leader for seconds and every worker's heartbeat fails at
// once. Workers took that for their own death: each dropped all its
// shards, then, hearing only itself again, took all of them, and the fleet
// flapped until the election was over (the fault suite saw tenants
// unserved for 19-38 s). Each now holds its last view while it cannot
// announce itself, and one owner per shard comes back when it can.
//
// Here every put fails while the connections stay up, as during that
// election: the bucket refuses any message for a while.
func TestMembershipHoldsWhileTheBucketRefusesPuts(t *testing.T) {
	workers, before, js, bucket := threeWorkers(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cfg := bucket.CachedInfo().Config
	refuse := cfg
	refuse.MaxMsgSize = 1
	if _, err := js.UpdateStream(ctx, refuse); err != nil {
		t.Fatal(err)
	}
	// For several member TTLs no worker may drop or take a shard.
	shardsStay(t, workers, before, "while heartbeats fail")
	if _, err := js.UpdateStream(ctx, cfg); err != nil {
		t.Fatal(err)
	}
	after := steady(t, workers, 64)
	for s, o := range after {
		if before[s] != o {
			t.Errorf("after heartbeats resumed, shard %d moved from %s to %s", s, before[s], o)
		}
	}
}

// The members watch is a consumer on one server; when that server dies the
// watch goes quiet while puts go on, and the watcher notices only after
// missed heartbeats. Meanwhile every other member's entry expired in each
// worker's view: each took all 64 shards. A worker that does not see its
// own puts come back holds its view and watches afresh, and then sees the
// fleet change again.
func TestMembershipWatchesAfreshWhenTheWatchGoesQuiet(t *testing.T) {
	workers, before, _, bucket := threeWorkers(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	// The watches' consumers vanish, as with the server that held them.
	names := bucket.ConsumerNames(ctx)
	n := 0
	for name := range names.Name() {
		if err := bucket.DeleteConsumer(ctx, name); err != nil {
			t.Fatalf("delete consumer %s: %v", name, err)
		}
		n++
	}
	if n < 3 {
		t.Fatalf("deleted %d watch consumers, want one per worker", n)
	}
	shardsStay(t, workers, before, "after the watches vanished")
	// Watching again: a worker that leaves is seen to leave.
	workers["w3"].StopPulling()
	delete(workers, "w3")
	steady(t, workers, 64)
}

// threeWorkers starts workers w1-w3 and returns them, their shards once
// steady, JetStream and the members bucket's stream.
func threeWorkers(t *testing.T) (map[string]*fleet.Worker, map[int]string, jetstream.JetStream, jetstream.Stream) {
	t.Helper()
	e := newEnv(t)
	workers := map[string]*fleet.Worker{}
	for _, id := range []string{"w1", "w2", "w3"} {
		workers[id] = startWorker(t, e, echo, fleetConfig(id))
	}
	before := steady(t, workers, 64)
	js, _ := jetstream.New(e.nc)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	bucket, err := js.Stream(ctx, "KV_"+protocol.MembersBucket(protocol.DefaultPrefix))
	if err != nil {
		t.Fatal(err)
	}
	return workers, before, js, bucket
}

// shardsStay fails the test if, for three member TTLs, any shard's owner
// differs from before; when says what is going on.
func shardsStay(t *testing.T, workers map[string]*fleet.Worker, before map[int]string, when string) {
	t.Helper()
	deadline := time.Now().Add(3 * fleetConfig("x").MemberTTL)
	for time.Now().Before(deadline) {
		now, err := ownership(workers, 64)
		if err != nil {
			t.Fatalf("%s: %v", when, err)
		}
		for s, o := range now {
			if before[s] != o {
				t.Fatalf("%s, shard %d moved from %s to %s", when, s, before[s], o)
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
}
