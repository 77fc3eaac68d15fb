package fleet

import (
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"slices"
	"strconv"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/isode-run/isode/pkg/protocol"
)

// Stream metadata keys recording the deployment's layout.
const (
	metaShards  = "isode.shards"
	metaVersion = "isode.protocol"
)

// ErrIncompatibleStream is returned when the request stream exists with a
// layout this worker cannot serve (another shard count, other subjects or
// retention).
var ErrIncompatibleStream = errors.New("incompatible request stream")

func (c *Config) streamConfig() jetstream.StreamConfig {
	storage := jetstream.FileStorage
	if c.StreamMemory {
		storage = jetstream.MemoryStorage
	}
	return jetstream.StreamConfig{
		Name:        protocol.StreamName(c.Prefix),
		Description: "isode run requests, one subject per shard",
		Subjects:    []string{protocol.RunWildcard(c.Prefix)},
		Retention:   jetstream.WorkQueuePolicy,
		Storage:     storage,
		Discard:     jetstream.DiscardNew,
		MaxMsgs:     c.StreamMaxMsgs,
		MaxBytes:    c.StreamMaxBytes,
		MaxMsgSize:  protocol.MaxRequestBytes + 16<<10,
		Duplicates:  c.DuplicateWindow,
		// A backstop: workers end every request they take within its
		// bounded deadline; this drops one nobody takes.
		MaxAge:      c.requestLifetime(),
		Replicas:    c.StreamReplicas,
		AllowMsgTTL: true,
		Metadata: map[string]string{
			metaShards:  strconv.Itoa(c.Shards),
			metaVersion: strconv.Itoa(protocol.Version),
		},
	}
}

// ensureStream creates the request stream if it is missing and checks that
// an existing one has this deployment's layout. It does not overwrite an
// operator's tuning of an existing stream (limits, replicas).
func ensureStream(ctx context.Context, js jetstream.JetStream, c *Config) (jetstream.Stream, error) {
	want := c.streamConfig()
	// Look first: creating an existing stream is checked against the
	// account's storage limits before the server notices it exists, so a
	// second worker could be refused for "insufficient resources".
	s, err := js.Stream(ctx, want.Name)
	if errors.Is(err, jetstream.ErrStreamNotFound) {
		s, err = js.CreateStream(ctx, want)
		if err == nil {
			return s, nil
		}
		if !errors.Is(err, jetstream.ErrStreamNameAlreadyInUse) {
			return nil, fmt.Errorf("create stream %s: %w", want.Name, err)
		}
		s, err = js.Stream(ctx, want.Name) // another worker made it meanwhile
	}
	if err != nil {
		return nil, fmt.Errorf("look up stream %s: %w", want.Name, err)
	}
	have := s.CachedInfo().Config
	switch {
	case have.Retention != jetstream.WorkQueuePolicy:
		return nil, fmt.Errorf("%w: stream %s has retention %v, want work queue", ErrIncompatibleStream, want.Name, have.Retention)
	case !slices.Contains(have.Subjects, want.Subjects[0]):
		return nil, fmt.Errorf("%w: stream %s has subjects %v, want %v", ErrIncompatibleStream, want.Name, have.Subjects, want.Subjects)
	case have.Metadata[metaShards] != want.Metadata[metaShards]:
		return nil, fmt.Errorf("%w: stream %s was made for %q shards, this worker is configured for %d: every worker and client of a deployment must use the same shard count",
			ErrIncompatibleStream, want.Name, have.Metadata[metaShards], c.Shards)
	}
	if have.MaxAge == 0 {
		// A stream made before requests' lives were bounded: add the
		// backstop, leaving the operator's other settings as they are.
		upd := have
		upd.MaxAge = max(want.MaxAge, have.Duplicates)
		if s2, err := js.UpdateStream(ctx, upd); err != nil {
			c.Logger.Warn().Err(err).Str("stream", want.Name).Msg("add a maximum age to the request stream")
		} else {
			s = s2
		}
	}
	return s, nil
}

func (c *Config) consumerConfig(shard int) jetstream.ConsumerConfig {
	return jetstream.ConsumerConfig{
		Durable:       protocol.ConsumerName(c.Prefix, shard),
		Description:   "isode shard " + strconv.Itoa(shard),
		FilterSubject: protocol.RunSubject(c.Prefix, shard),
		AckPolicy:     jetstream.AckExplicitPolicy,
		AckWait:       c.AckWait,
		MaxDeliver:    c.MaxDeliver,
		MaxAckPending: 10_000,
		MaxWaiting:    512,
		DeliverPolicy: jetstream.DeliverAllPolicy,
		// The consumer's state (delivered and ack floors, redelivery
		// counts) is kept in the server's memory, not written to a file:
		// with one consumer per shard the file store rewrote a state file
		// (create, write, rename) up to ten times a second per busy shard,
		// which cost the embedded server more CPU than the rest of a run's
		// NATS side (make bench-compare: the worker's CPU per run halved).
		// Nothing at-least-once rests on it: the stream is a work queue,
		// so a request leaves it only when acked, and a server that
		// restarts without the state delivers again what is still there;
		// only MaxDeliver counts start over.
		MemoryStorage: true,
	}
}

// ensureConsumer creates or updates the durable pull consumer of a shard.
func ensureConsumer(ctx context.Context, s jetstream.Stream, c *Config, shard int) (jetstream.Consumer, error) {
	cfg := c.consumerConfig(shard)
	cons, err := s.CreateOrUpdateConsumer(ctx, cfg)
	if err != nil {
		// A consumer made by an older worker keeps its state in a file,
		// and the server refuses to change a consumer's storage: keep it.
		if old, lerr := s.Consumer(ctx, cfg.Durable); lerr == nil && old.CachedInfo().Config.MemoryStorage != cfg.MemoryStorage {
			cfg.MemoryStorage = old.CachedInfo().Config.MemoryStorage
			cons, err = s.CreateOrUpdateConsumer(ctx, cfg)
		}
	}
	if err != nil {
		return nil, fmt.Errorf("create consumer %s: %w", cfg.Durable, err)
	}
	return cons, nil
}

// FleetID names the fleet of workers that share this NATS deployment and
// prefix: a digest of the request stream's name and creation time, the
// same for every worker that uses that stream and different for another
// deployment (or a stream made anew). It creates the stream if missing, as
// Start does. Workers label their sandboxes with it, so that a worker's
// reaper only ever removes sandboxes of its own fleet.
func FleetID(ctx context.Context, nc *nats.Conn, cfg Config) (string, error) {
	js, err := jetstream.New(nc)
	if err != nil {
		return "", fmt.Errorf("jetstream: %w", err)
	}
	s, err := ensureStream(ctx, js, &cfg)
	if err != nil {
		return "", err
	}
	info := s.CachedInfo()
	h := fnv.New64a()
	h.Write([]byte(info.Config.Name))
	h.Write([]byte{0})
	h.Write([]byte(strconv.FormatInt(info.Created.UnixNano(), 10)))
	return fmt.Sprintf("%016x", h.Sum64()), nil
}
