package client_test

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/isode-run/isode/internal/testenv"
	"github.com/isode-run/isode/pkg/client"
	"github.com/isode-run/isode/pkg/protocol"
)

const snippet = `return function (cb) { cb(null, 1); }`

// connect starts an in-process JetStream server and returns a connection
// to it, closed at cleanup.
func connect(t *testing.T) *nats.Conn {
	t.Helper()
	s := testenv.NATS(t)
	nc, err := nats.Connect(s.ClientURL())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	return nc
}

// requestStream creates the request stream as workers do (pkg/fleet's
// streamConfig: a work queue on isode.run.*, discard new, a duplicate
// window, per-message TTLs), edited by edit. It has no consumer, so what
// it accepts stays in it and nobody answers.
func requestStream(t *testing.T, nc *nats.Conn, edit func(*jetstream.StreamConfig)) jetstream.Stream {
	t.Helper()
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	cfg := jetstream.StreamConfig{
		Name:        protocol.StreamName(protocol.DefaultPrefix),
		Subjects:    []string{protocol.RunWildcard(protocol.DefaultPrefix)},
		Retention:   jetstream.WorkQueuePolicy,
		Storage:     jetstream.FileStorage,
		Discard:     jetstream.DiscardNew,
		MaxMsgs:     100_000,
		MaxBytes:    1 << 30,
		MaxMsgSize:  protocol.MaxRequestBytes + 16<<10,
		Duplicates:  2 * time.Minute,
		AllowMsgTTL: true,
	}
	if edit != nil {
		edit(&cfg)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s, err := js.CreateStream(ctx, cfg)
	if err != nil {
		t.Fatalf("create stream: %v", err)
	}
	return s
}

func newClient(t *testing.T, nc *nats.Conn) *client.Client {
	t.Helper()
	c, err := client.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// runFails runs snippet with a 30 s deadline and returns its error, failing
// the test unless Run returned within 2 s: a refusal must not wait for the
// deadline.
func runFails(t *testing.T, c *client.Client, opts ...client.RunOption) error {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	start := time.Now()
	res, err := c.Run(ctx, "tenant1", snippet, opts...)
	if took := time.Since(start); took > 2*time.Second {
		t.Fatalf("Run took %v (error %v): it waited for the deadline instead of failing at once", took, err)
	}
	if err == nil {
		t.Fatalf("Run = %+v, want an error", res)
	}
	return err
}

func TestRunNoStream(t *testing.T) {
	c := newClient(t, connect(t))
	err := runFails(t, c)
	if !errors.Is(err, client.ErrNoStream) || !errors.Is(err, protocol.ErrOverloaded) {
		t.Fatalf("err = %v, want ErrNoStream (overloaded)", err)
	}
}

// A stream that refuses the publish makes Run fail at once, with the code
// of the reason: overloaded when it is full (for each limit a worker sets
// on it), and a code that is not retried when retrying cannot help.
func TestRunStreamRefuses(t *testing.T) {
	tests := []struct {
		name    string
		give    func(*jetstream.StreamConfig)
		wantErr error
		wantIn  string
	}{
		{"max msgs", func(c *jetstream.StreamConfig) { c.MaxMsgs = 1 }, protocol.ErrOverloaded, "maximum messages exceeded"},
		{"max bytes", func(c *jetstream.StreamConfig) { c.MaxBytes = 1 << 10 }, protocol.ErrOverloaded, "maximum bytes exceeded"},
		{"max message size", func(c *jetstream.StreamConfig) { c.MaxMsgSize = 64 }, protocol.ErrBadRequest, "max message size"},
		{"no per-message TTL", func(c *jetstream.StreamConfig) { c.AllowMsgTTL = false }, protocol.ErrInternal, "AllowMsgTTL"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			nc := connect(t)
			requestStream(t, nc, tt.give)
			if errors.Is(tt.wantErr, protocol.ErrOverloaded) {
				// Fill the stream: one message of 900 bytes meets either limit.
				js, err := jetstream.New(nc)
				if err != nil {
					t.Fatal(err)
				}
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				defer cancel()
				if _, err := js.Publish(ctx, protocol.RunSubject(protocol.DefaultPrefix, 0), make([]byte, 900)); err != nil {
					t.Fatalf("fill the stream: %v", err)
				}
			}
			err := runFails(t, newClient(t, nc))
			if !errors.Is(err, tt.wantErr) {
				t.Fatalf("err = %v, want %v", err, tt.wantErr)
			}
			if !strings.Contains(err.Error(), tt.wantIn) {
				t.Errorf("err = %v: want it to say %q", err, tt.wantIn)
			}
		})
	}
}
