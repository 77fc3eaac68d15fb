package pool

import (
	"errors"

	"github.com/isode-run/isode/pkg/protocol"
)

// Errors returned by the pool. Each error that can reach a client is a
// *protocol.Error with a stable code and a message a person can act on;
// match them with errors.Is. A sentinel with a message matches only itself,
// while the bare protocol sentinels (protocol.ErrOverloaded, ...) match every
// error of their code: errors.Is(pool.ErrTenantQueueFull,
// protocol.ErrOverloaded) holds.
//
// Errors from Sandbox.Run are returned unchanged.
var (
	// ErrClosed is returned by Run once Close has begun, also to requests
	// that were waiting in the queue.
	ErrClosed = &protocol.Error{Code: protocol.CodeShuttingDown, Message: "the worker is shutting down; retry the request"}

	// ErrQueueFull is returned by Run at once when the queue of waiting
	// requests (Config.QueueSize) is full: the worker is at capacity.
	ErrQueueFull = &protocol.Error{Code: protocol.CodeOverloaded, Message: "the worker is at capacity and its queue is full; retry later with backoff"}

	// ErrTenantQueueFull is returned by Run at once when this tenant already
	// has Config.TenantQueueSize requests waiting.
	ErrTenantQueueFull = &protocol.Error{Code: protocol.CodeOverloaded, Message: "this tenant has too many requests waiting; retry later with backoff or send fewer at once"}

	// ErrQueueTimeout is returned by Run when the request's deadline (or
	// Config.MaxWait) passed while it waited for a sandbox.
	ErrQueueTimeout = &protocol.Error{Code: protocol.CodeQueueTimeout, Message: "the request's deadline passed while it waited for a sandbox"}

	// ErrCreateFailed is returned by Run to the requests waiting for their
	// tenant's sandbox when every attempt to create it failed. The error
	// returned wraps both ErrCreateFailed and the last attempt's cause.
	ErrCreateFailed = &protocol.Error{Code: protocol.CodeInternal, Message: "the sandbox could not be started"}

	// ErrInvalidConfig is wrapped by every error of Config.Validate and New.
	ErrInvalidConfig = errors.New("invalid pool config")
)
