package fleet_test

import (
	"context"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/isode-run/isode/pkg/protocol"
)

// Shard consumers keep their state in memory; a consumer an older worker
// made with its state in a file (whose storage the server will not change)
// is kept as it is, and the worker still serves its shard.
func TestConsumerStorage(t *testing.T) {
	e := newEnv(t)
	cfg := testConfig("w1")
	js, err := jetstream.New(e.nc)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	// An older worker's stream and one file-backed consumer.
	startWorker(t, e, echo, cfg)
	s, err := js.Stream(ctx, protocol.StreamName(cfg.Prefix))
	if err != nil {
		t.Fatal(err)
	}
	for shard := range cfg.Shards {
		info, err := s.Consumer(ctx, protocol.ConsumerName(cfg.Prefix, shard))
		if err != nil {
			t.Fatal(err)
		}
		if !info.CachedInfo().Config.MemoryStorage {
			t.Fatalf("consumer of shard %d keeps its state in a file", shard)
		}
	}
	key := "tenant-storage"
	shard := protocol.Shard(key, cfg.Shards)
	name := protocol.ConsumerName(cfg.Prefix, shard)
	if err := s.DeleteConsumer(ctx, name); err != nil {
		t.Fatal(err)
	}
	old, err := s.CreateConsumer(ctx, jetstream.ConsumerConfig{
		Durable: name, FilterSubject: protocol.RunSubject(cfg.Prefix, shard),
		AckPolicy: jetstream.AckExplicitPolicy, DeliverPolicy: jetstream.DeliverAllPolicy,
	})
	if err != nil {
		t.Fatal(err)
	}
	if old.CachedInfo().Config.MemoryStorage {
		t.Fatal("the old consumer was made in memory")
	}
	startWorker(t, e, echo, testConfig("w2"))
	info, err := s.Consumer(ctx, name)
	if err != nil {
		t.Fatal(err)
	}
	if info.CachedInfo().Config.MemoryStorage || info.CachedInfo().Config.AckWait != cfg.AckWait {
		t.Fatalf("consumer config after a newer worker: memory %v, ack wait %v", info.CachedInfo().Config.MemoryStorage, info.CachedInfo().Config.AckWait)
	}
	c := newClient(t, e, cfg.Shards)
	res, err := c.Run(ctx, key, `return function (cb) { cb(null, 1); }`)
	if err != nil {
		t.Fatal(err)
	}
	if res == nil {
		t.Fatal("no result")
	}
}
