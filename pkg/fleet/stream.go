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

// ErrReplicas is returned when the NATS deployment cannot hold the
// configured number of replicas (Config.StreamReplicas) of the request
// stream or of a bucket: a single server asked for more than one, or a
// cluster with fewer JetStream servers than replicas.
var ErrReplicas = errors.New("NATS cannot hold the configured replicas")

// JetStream error codes of a stream's creation that mean its replicas
// cannot be placed (nats-server's server/errors.json).
const (
	errCodeReplicasNotSupported jetstream.ErrorCode = 10074 // JSStreamReplicasNotSupportedErr: a single server
	errCodeClusterNoPeers       jetstream.ErrorCode = 10005 // JSClusterNoPeersErrF: no suitable peers for placement
	errCodeInsufficientRes      jetstream.ErrorCode = 10023 // JSInsufficientResourcesErr
)

// replicasRefusal turns the server's refusal to place a stream's replicas
// into ErrReplicas with what to do about it; other errors are returned as
// they are.
func replicasRefusal(err error, stream string, replicas int) error {
	var apiErr *jetstream.APIError
	if !errors.As(err, &apiErr) {
		return err
	}
	switch apiErr.ErrorCode {
	case errCodeReplicasNotSupported, errCodeClusterNoPeers, errCodeInsufficientRes:
		return fmt.Errorf("%w: stream %s with %d replicas: the server says %q: connect to a NATS cluster with at least %d JetStream servers, or lower --stream-replicas",
			ErrReplicas, stream, replicas, apiErr.Description, replicas)
	}
	return err
}

func (c *Config) streamConfig() jetstream.StreamConfig {
	storage := jetstream.FileStorage
	if c.StreamMemory {
		storage = jetstream.MemoryStorage
	}
	return jetstream.StreamConfig{
		Name:        protocol.StreamName(c.Prefix),
		Description: "isode run requests, one subject per application and shard",
		Subjects:    protocol.StreamSubjects(c.Prefix),
		Retention:   jetstream.WorkQueuePolicy,
		Storage:     storage,
		Discard:     jetstream.DiscardNew,
		MaxMsgs:     c.StreamMaxMsgs,
		// Each application's shard is a subject: a full one refuses that
		// application's new requests and nobody else's, and never drops
		// a request it accepted.
		MaxMsgsPerSubject:    c.StreamMaxPerSubject,
		DiscardNewPerSubject: true,
		MaxBytes:             c.StreamMaxBytes,
		MaxMsgSize:           protocol.MaxRequestBytes + 16<<10,
		Duplicates:           c.DuplicateWindow,
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
			return nil, fmt.Errorf("create stream %s: %w", want.Name, replicasRefusal(err, want.Name, want.Replicas))
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
	case !slices.Contains(have.Subjects, protocol.RunWildcard(c.Prefix)):
		return nil, fmt.Errorf("%w: stream %s has subjects %v, want %v", ErrIncompatibleStream, want.Name, have.Subjects, want.Subjects)
	case have.Metadata[metaShards] != want.Metadata[metaShards]:
		return nil, fmt.Errorf("%w: stream %s was made for %q shards, this worker is configured for %d: every worker and client of a deployment must use the same shard count",
			ErrIncompatibleStream, want.Name, have.Metadata[metaShards], c.Shards)
	}
	if have.Replicas != want.Replicas {
		// An operator's choice, or a stream made before the cluster was:
		// left as it is, and said.
		c.Logger.Warn().Str("stream", want.Name).Int("replicas", have.Replicas).Int("configured", want.Replicas).
			Msg("the request stream exists with another replica count; it is left as it is (nats stream edit --replicas changes it)")
	}
	// A stream made by an older worker: add what this one relies on,
	// leaving the operator's other settings as they are.
	upd, changed := have, false
	if have.MaxAge == 0 {
		// Requests' lives are bounded: the backstop.
		upd.MaxAge = max(want.MaxAge, have.Duplicates)
		changed = true
	}
	for _, sub := range want.Subjects {
		if !slices.Contains(upd.Subjects, sub) {
			// Applications' subjects.
			upd.Subjects = append(slices.Clone(upd.Subjects), sub)
			changed = true
		}
	}
	if have.MaxMsgsPerSubject <= 0 {
		// One application's flood must not fill the stream for all.
		upd.MaxMsgsPerSubject, upd.DiscardNewPerSubject = want.MaxMsgsPerSubject, true
		changed = true
	}
	if changed {
		if s2, err := js.UpdateStream(ctx, upd); err != nil {
			c.Logger.Warn().Err(err).Str("stream", want.Name).Msg("bring the request stream up to date (maximum age, applications' subjects, per-subject limit)")
		} else {
			s = s2
		}
	}
	return s, nil
}

func (c *Config) consumerConfig(shard int) jetstream.ConsumerConfig {
	return jetstream.ConsumerConfig{
		Durable:     protocol.ConsumerName(c.Prefix, shard),
		Description: "isode shard " + strconv.Itoa(shard),
		// The shard of every application.
		FilterSubjects: protocol.ShardFilters(c.Prefix, shard),
		AckPolicy:      jetstream.AckExplicitPolicy,
		AckWait:        c.AckWait,
		MaxDeliver:     c.MaxDeliver,
		MaxAckPending:  10_000,
		MaxWaiting:     512,
		DeliverPolicy:  jetstream.DeliverAllPolicy,
		// The consumer's state (delivered, acked) is kept in memory: a
		// file-backed consumer's state file is rewritten on every ack, up
		// to ten times a second per busy shard, which was 41% of a
		// worker's CPU with 50 active tenants (its embedded server). On a
		// work queue at-least-once does not rest on it: an acked request
		// is gone from the stream, an unacked one is delivered again. A
		// server restart loses the consumer itself; workers make it again
		// after every reconnect (reensureConsumers).
		MemoryStorage: true,
	}
}

// ensureConsumer creates or updates the durable pull consumer of a shard.
// A consumer made by an older worker with its state in files cannot be
// changed to memory (the server refuses the update as a create error,
// 10012): it is kept as it is.
func ensureConsumer(ctx context.Context, s jetstream.Stream, c *Config, shard int) (jetstream.Consumer, error) {
	cfg := c.consumerConfig(shard)
	cons, err := s.CreateOrUpdateConsumer(ctx, cfg)
	var api *jetstream.APIError
	if errors.As(err, &api) && api.ErrorCode == jetstream.JSErrCodeConsumerCreate && ctx.Err() == nil {
		cfg.MemoryStorage = false
		cons, err = s.CreateOrUpdateConsumer(ctx, cfg)
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
