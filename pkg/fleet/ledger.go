package fleet

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/isode-run/isode/pkg/protocol"
)

// ledger tells a poison request from a busy one. JetStream counts every
// delivery of a request, and a request is delivered again both when a
// worker hands it back on purpose (its tenant's queue is full, the worker
// is shutting down, a reply waits for its confirmation) and when a
// delivery ended with no answer at all (the worker died while it ran, or
// could not publish the reply). Only the second kind makes a request
// poison. Workers record each hand-back in a key-value bucket, keyed by
// the request's stream sequence, before they hand it back; a redelivered
// request's failures are then its deliveries so far, less one, less its
// hand-backs. A first delivery never touches the bucket.
//
// Entries expire with the bucket's TTL, which outlives any request (see
// Config.requestLifetime). If the bucket is unreachable a hand-back goes
// unrecorded and counts as a failure: a request can be given up on early
// while NATS itself is failing, never kept circulating for ever.
type ledger struct {
	kv jetstream.KeyValue
}

func openLedger(ctx context.Context, js jetstream.JetStream, c *Config) (*ledger, error) {
	cfg := jetstream.KeyValueConfig{
		Bucket:      protocol.DeliveriesBucket(c.Prefix),
		Description: "isode: hand-backs of requests, by stream sequence, to tell poison requests from busy ones",
		History:     1,
		TTL:         c.requestLifetime(),
		// Losing it (a single server's restart) only forgets hand-backs.
		Storage:  jetstream.MemoryStorage,
		Replicas: c.StreamReplicas,
	}
	kv, err := js.KeyValue(ctx, cfg.Bucket)
	if errors.Is(err, jetstream.ErrBucketNotFound) {
		kv, err = js.CreateKeyValue(ctx, cfg)
		if errors.Is(err, jetstream.ErrBucketExists) {
			kv, err = js.KeyValue(ctx, cfg.Bucket)
		}
	}
	if err != nil {
		return nil, fmt.Errorf("deliveries bucket %s: %w", cfg.Bucket, replicasRefusal(err, "KV_"+cfg.Bucket, cfg.Replicas))
	}
	return &ledger{kv: kv}, nil
}

func ledgerKey(seq uint64) string { return strconv.FormatUint(seq, 10) }

// handBacks returns the hand-backs recorded for the request at seq.
func (l *ledger) handBacks(ctx context.Context, seq uint64) (uint64, error) {
	e, err := l.kv.Get(ctx, ledgerKey(seq))
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return 0, nil
	}
	if err != nil {
		return 0, err
	}
	n, err := strconv.ParseUint(string(e.Value()), 10, 64)
	if err != nil {
		return 0, fmt.Errorf("deliveries entry %d: %w", seq, err)
	}
	return n, nil
}

// recordHandBack adds one hand-back to the request at seq. Only the worker
// holding a delivery records it, so writers rarely race; a lost race is
// retried a few times.
func (l *ledger) recordHandBack(ctx context.Context, seq uint64) error {
	key := ledgerKey(seq)
	var err error
	for range 4 {
		var e jetstream.KeyValueEntry
		e, err = l.kv.Get(ctx, key)
		switch {
		case errors.Is(err, jetstream.ErrKeyNotFound):
			_, err = l.kv.Create(ctx, key, []byte("1"))
		case err == nil:
			n, perr := strconv.ParseUint(string(e.Value()), 10, 64)
			if perr != nil {
				n = 0
			}
			_, err = l.kv.Update(ctx, key, []byte(strconv.FormatUint(n+1, 10)), e.Revision())
		}
		if err == nil || ctx.Err() != nil {
			return err
		}
		if !errors.Is(err, jetstream.ErrKeyExists) && !isWrongLastSequence(err) {
			return err
		}
	}
	return err
}

// isWrongLastSequence reports a lost compare-and-set race on a key.
func isWrongLastSequence(err error) bool {
	var apiErr *jetstream.APIError
	return errors.As(err, &apiErr) && (apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequence ||
		apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequenceConstant)
}

// ledgerTimeout bounds each ledger call.
const ledgerTimeout = 2 * time.Second
