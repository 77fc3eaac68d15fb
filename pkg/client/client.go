// Package client submits JavaScript to an isode fleet over NATS: the Go form
// of the original isode.run(key, code, cb).
//
//	nc, _ := nats.Connect(nats.DefaultURL)
//	c, _ := client.New(nc)
//	defer c.Close()
//	res, err := c.Run(ctx, "tenant1", `return function (cb) { cb(null, "Hello, world!"); }`)
//
// Run hides the reply inbox, the request id and the deadline. Errors that
// come from the fleet are *protocol.Error values: match them with
// errors.Is(err, protocol.ErrTimeout) and friends, or read their Code.
package client

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/google/uuid"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/isode-run/isode/pkg/protocol"
)

// Errors of the client itself (the fleet's errors are *protocol.Error).
var (
	// ErrClosed is returned by Run after Close.
	ErrClosed = errors.New("isode client: closed")
	// ErrNoStream is returned when no JetStream stream takes the request
	// subject: no worker has set the fleet up on this NATS server yet.
	ErrNoStream = &protocol.Error{Code: protocol.CodeOverloaded, Message: "no JetStream stream accepts isode requests on this NATS server: is a worker running?"}
	// ErrNotAcknowledged is returned (with ctx's error) when ctx ended
	// before the stream acknowledged the request: it may or may not have
	// been stored.
	ErrNotAcknowledged = errors.New("isode client: the stream did not acknowledge the request")
	// ErrNoReply is returned (with ctx's error) when the stream accepted
	// the request and no reply came before ctx ended.
	ErrNoReply = errors.New("isode client: no reply")
)

// ackRetry is how long Run waits for the stream's acknowledgement before it
// publishes the request again, with the same id. On a NATS cluster a
// publish that reaches the stream while its leader changes (a server died,
// a partition) is neither stored nor answered; the stream's duplicate
// window makes the copy safe: it is stored once.
const ackRetry = time.Second

// Client submits runs. It is safe for concurrent use; one Client per
// process is enough. It does not own the NATS connection.
type Client struct {
	nc       *nats.Conn
	prefix   string
	shards   int
	ttlSlack time.Duration
	ackRetry time.Duration

	inbox string // "<inbox>." ; replies arrive on inbox+"<n>.r", acks on inbox+"<n>.a"
	sub   *nats.Subscription

	mu      sync.Mutex
	next    uint64
	pending map[string]*call
	closed  bool
}

type call struct {
	reply chan *nats.Msg // the Reply, buffered 1
	ack   chan *nats.Msg // the PubAck, buffered 1
}

// Option configures a Client.
type Option func(*Client) error

// ErrInvalidOption wraps every rejected Option.
var ErrInvalidOption = errors.New("isode client: invalid option")

// WithPrefix sets the subject prefix of the fleet (default protocol.DefaultPrefix).
func WithPrefix(prefix string) Option {
	return func(c *Client) error {
		if prefix == "" || strings.ContainsAny(prefix, " \t*>") {
			return fmt.Errorf("%w: prefix %q", ErrInvalidOption, prefix)
		}
		c.prefix = prefix
		return nil
	}
}

// WithShards sets the fleet's shard count (default protocol.DefaultShards).
// It must match the workers'.
func WithShards(n int) Option {
	return func(c *Client) error {
		if n < 1 || n > 100000 {
			return fmt.Errorf("%w: shards %d", ErrInvalidOption, n)
		}
		c.shards = n
		return nil
	}
}

// New returns a Client that publishes on nc.
func New(nc *nats.Conn, opts ...Option) (*Client, error) {
	c := &Client{
		nc:       nc,
		prefix:   protocol.DefaultPrefix,
		shards:   protocol.DefaultShards,
		ttlSlack: 5 * time.Second,
		ackRetry: ackRetry,
		pending:  make(map[string]*call),
	}
	for _, o := range opts {
		if err := o(c); err != nil {
			return nil, err
		}
	}
	c.inbox = nc.NewInbox() + "."
	sub, err := nc.Subscribe(c.inbox+">", c.deliver)
	if err != nil {
		return nil, fmt.Errorf("subscribe to reply inbox: %w", err)
	}
	sub.SetPendingLimits(-1, 256<<20)
	c.sub = sub
	return c, nil
}

// Close stops the client; runs in flight return ErrClosed. It does not
// close the NATS connection.
func (c *Client) Close() error {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return nil
	}
	c.closed = true
	c.mu.Unlock()
	return c.sub.Unsubscribe()
}

func (c *Client) deliver(m *nats.Msg) {
	rest, ok := strings.CutPrefix(m.Subject, c.inbox)
	if !ok {
		return
	}
	token, kind, ok := strings.Cut(rest, ".")
	if !ok {
		return
	}
	if kind == "r" && m.Reply != "" {
		// Confirm every reply, late and duplicate ones too, so the worker
		// stops offering it (protocol.HeaderReplyAck).
		// It fails only on a closed connection, where nothing can be done;
		// the worker then offers the reply again until the deadline.
		_ = m.Respond(nil)
	}
	c.mu.Lock()
	cl := c.pending[token]
	c.mu.Unlock()
	if cl == nil {
		return // a late or duplicate reply: the caller already has one
	}
	ch := cl.reply
	if kind == "a" {
		ch = cl.ack
	}
	select {
	case ch <- m:
	default: // duplicate delivery; keep the first
	}
}

// Result is what a run produced.
type Result struct {
	// Value is the JSON the snippet returned ("null" for nothing).
	Value json.RawMessage
	// Console is the snippet's console output (bounded by the worker).
	Console          string
	ConsoleTruncated bool
	// ID is the request id; Worker the worker that answered; RunTime the
	// time the snippet ran.
	ID      string
	Worker  string
	RunTime time.Duration
	// Usage is what the request cost (nil from workers that do not say).
	Usage *protocol.Usage
	// Traceparent is the trace context the reply carries back (see
	// WithTraceparent).
	Traceparent string
}

// RunOption configures one run.
type RunOption func(*runOptions) error

type runOptions struct {
	input       json.RawMessage
	timeout     time.Duration
	id          string
	traceparent string
}

// WithInput passes JSON input to the snippet as ctx.data.
func WithInput(input json.RawMessage) RunOption {
	return func(o *runOptions) error {
		if !json.Valid(input) {
			return fmt.Errorf("%w: input is not valid JSON", ErrInvalidOption)
		}
		o.input = input
		return nil
	}
}

// WithTimeout bounds the snippet's run time (default protocol.DefaultTimeout).
// The whole call, queueing included, is bounded by ctx; a ctx without a
// deadline gets one of the timeout plus 30 s.
func WithTimeout(d time.Duration) RunOption {
	return func(o *runOptions) error {
		if d <= 0 || d > protocol.MaxTimeout {
			return fmt.Errorf("%w: timeout %v not in (0, %v]", ErrInvalidOption, d, protocol.MaxTimeout)
		}
		o.timeout = d
		return nil
	}
}

// WithRequestID sets the request id (default: a random UUID per Run). The
// stream stores a request id once within its duplicate window (its
// Duplicates setting, 2 minutes as workers create it): Run with an id already
// accepted in that window returns protocol.ErrDuplicateRequest at once,
// and the run happens only once, answered to whoever submitted it first.
// Reuse an id to make sure a snippet with side effects runs at most once
// (a retry after an unanswered Run learns, from ErrDuplicateRequest, that
// the first submission was accepted); use a new id to get a result.
func WithRequestID(id string) RunOption {
	return func(o *runOptions) error {
		if id == "" || len(id) > 128 || strings.ContainsAny(id, " \t\r\n.*>") {
			return fmt.Errorf("%w: request id %q", ErrInvalidOption, id)
		}
		o.id = id
		return nil
	}
}

// WithTraceparent sends a W3C trace context (protocol.HeaderTraceparent):
// the worker logs it with the run, and returns it on the reply
// (Result.Traceparent) and in the run's usage record.
func WithTraceparent(tp string) RunOption {
	return func(o *runOptions) error {
		if protocol.Traceparent(tp) == "" {
			return fmt.Errorf("%w: traceparent %q is not a W3C traceparent", ErrInvalidOption, tp)
		}
		o.traceparent = tp
		return nil
	}
}

// Run runs code for the tenant isolateKey and returns its result. Errors
// from the snippet or the fleet are *protocol.Error values; the Result is
// returned alongside them when the fleet answered (it carries console
// output). Invalid arguments are caught here, before anything is sent.
//
// When the stream does not store the request, Run returns at once:
// protocol.ErrDuplicateRequest when its id (see WithRequestID) was already
// accepted, protocol.ErrOverloaded when the stream is full, ErrNoStream
// when no stream takes it. Otherwise it waits for the reply until ctx ends.
func (c *Client) Run(ctx context.Context, isolateKey, code string, opts ...RunOption) (*Result, error) {
	o := runOptions{timeout: protocol.DefaultTimeout}
	for _, opt := range opts {
		if err := opt(&o); err != nil {
			return nil, err
		}
	}
	req := protocol.Request{
		V:          protocol.Version,
		IsolateKey: isolateKey,
		Code:       code,
		Input:      o.input,
		TimeoutMs:  o.timeout.Milliseconds(),
	}
	if err := req.Validate(); err != nil {
		return nil, err
	}
	data, err := json.Marshal(&req)
	if err != nil {
		return nil, fmt.Errorf("encode request: %w", err)
	}
	if len(data) > protocol.MaxRequestBytes {
		// Code within MaxCodeBytes can still encode larger: JSON escapes
		// each control character as 6 bytes. Past the limit the stream or
		// NATS would refuse it with an error that is no *protocol.Error.
		return nil, protocol.Errorf(protocol.CodeBadRequest, "the request is %d bytes encoded, over the limit of %d (JSON escapes each control character in the code as 6 bytes)", len(data), protocol.MaxRequestBytes)
	}
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, o.timeout+30*time.Second)
		defer cancel()
	}
	deadline, _ := ctx.Deadline()
	id := o.id
	if id == "" {
		id = uuid.NewString()
	}
	return c.send(ctx, id, protocol.Shard(isolateKey, c.shards), deadline, data, o.traceparent)
}

// send publishes one encoded request and waits for its reply.
func (c *Client) send(ctx context.Context, id string, shard int, deadline time.Time, data []byte, traceparent string) (*Result, error) {
	cl := &call{reply: make(chan *nats.Msg, 1), ack: make(chan *nats.Msg, 1)}
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return nil, ErrClosed
	}
	c.next++
	token := strconv.FormatUint(c.next, 36)
	c.pending[token] = cl
	c.mu.Unlock()
	defer func() {
		c.mu.Lock()
		delete(c.pending, token)
		c.mu.Unlock()
	}()

	msg := nats.NewMsg(protocol.RunSubject(c.prefix, shard))
	msg.Reply = c.inbox + token + ".a"
	msg.Data = data
	msg.Header.Set(protocol.HeaderMsgID, id)
	msg.Header.Set(protocol.HeaderReplyTo, c.inbox+token+".r")
	msg.Header.Set(protocol.HeaderDeadline, strconv.FormatInt(deadline.UnixMilli(), 10))
	msg.Header.Set(protocol.HeaderReplyAck, "1")
	if traceparent != "" {
		msg.Header.Set(protocol.HeaderTraceparent, traceparent)
	}
	// Let the stream drop the request by itself once nobody waits for it.
	ttl := time.Until(deadline) + c.ttlSlack
	msg.Header.Set(jetstream.MsgTTLHeader, strconv.FormatInt(int64(ttl/time.Second)+1, 10)+"s")
	publish := func() error {
		if err := c.nc.PublishMsg(msg); err != nil {
			return fmt.Errorf("publish request: %w", err)
		}
		return nil
	}
	if err := publish(); err != nil {
		return nil, err
	}
	return cl.wait(ctx, id, c.ackRetry, publish)
}

// wait returns the first of: the reply, the stream's refusal of the
// request, the end of ctx. A reply needs no PubAck before it (the two
// travel separately and either may come first), and when both are there
// the reply wins: it is the answer the caller wants.
//
// Until the stream acknowledges the request, wait publishes it again every
// retry (see ackRetry). Once it has, an acknowledgement that says
// "duplicate" or "no stream" may be of a later copy: the request was
// stored (an earlier copy), or the copy met a stream with no leader for
// the moment; either way it waits on.
func (cl *call) wait(ctx context.Context, id string, retry time.Duration, publish func() error) (*Result, error) {
	acked, resent := false, false
	t := time.NewTimer(retry)
	defer t.Stop()
	for {
		select {
		case m := <-cl.reply:
			return decodeReply(id, m)
		case m := <-cl.ack:
			err := checkAck(id, m)
			if err != nil && resent && (errors.Is(err, protocol.ErrDuplicateRequest) || errors.Is(err, ErrNoStream)) {
				// A copy's answer: a duplicate means an earlier copy was
				// stored; no stream means none took this copy (yet).
				acked = acked || errors.Is(err, protocol.ErrDuplicateRequest)
				continue
			}
			if err != nil {
				select {
				case m := <-cl.reply:
					return decodeReply(id, m)
				default:
				}
				// Not stored (a duplicate id, a full stream): nothing
				// will answer, so waiting for the deadline is pointless.
				return nil, err
			}
			acked = true
		case <-t.C:
			if !acked {
				// A failed publish (the connection closed) is retried
				// at the next tick, until ctx ends.
				_ = publish()
				resent = true
				t.Reset(retry)
			}
		case <-ctx.Done():
			if !acked {
				return nil, fmt.Errorf("request %s: %w: %w", id, ErrNotAcknowledged, ctx.Err())
			}
			return nil, fmt.Errorf("request %s: %w: %w", id, ErrNoReply, ctx.Err())
		}
	}
}

func decodeReply(id string, m *nats.Msg) (*Result, error) {
	var rep protocol.Reply
	if err := json.Unmarshal(m.Data, &rep); err != nil {
		return nil, fmt.Errorf("decode reply to %s: %w", id, err)
	}
	if err := rep.Validate(); err != nil {
		return nil, fmt.Errorf("reply to %s: %w", id, err)
	}
	res := &Result{
		Value:            rep.Result,
		Console:          rep.Console,
		ConsoleTruncated: rep.ConsoleTruncated,
		ID:               rep.ID,
		Worker:           rep.Worker,
		RunTime:          time.Duration(rep.RunMicros) * time.Microsecond,
		Usage:            rep.Usage,
		Traceparent:      m.Header.Get(protocol.HeaderTraceparent),
	}
	if rep.Error != nil {
		return res, rep.Error
	}
	return res, nil
}
