package pool

import (
	"context"

	"github.com/isode-run/isode/pkg/protocol"
)

// Runtime makes sandboxes. pkg/dockerx implements it with Docker
// containers; tests use a fake. The pool calls Create with bounded
// concurrency and a deadline.
type Runtime interface {
	// Create makes a sandbox that is ready to run code: its agent has
	// answered. tenant is the isolate key it is made for, or "" for a free
	// sandbox made ahead of demand. Any failure leaves nothing behind.
	Create(ctx context.Context, tenant string) (Sandbox, error)
}

// RuntimeFunc adapts a function to Runtime.
type RuntimeFunc func(ctx context.Context, tenant string) (Sandbox, error)

// Create calls f.
func (f RuntimeFunc) Create(ctx context.Context, tenant string) (Sandbox, error) {
	return f(ctx, tenant)
}

// Sandbox is one isolated runtime serving one tenant for its whole life.
// All methods are safe for concurrent use.
type Sandbox interface {
	// ID identifies the sandbox (the container id).
	ID() string
	// Run runs one request and returns its result. ctx's deadline bounds
	// the run. Errors are *protocol.Error values (code_error, timeout,
	// out_of_memory, sandbox_crashed, output_too_large, ...); the Result
	// may be non-nil alongside an error to carry console output.
	// Several Runs may be in flight at once.
	Run(ctx context.Context, req *protocol.Request) (*protocol.Result, error)
	// Assign records the tenant a free sandbox now belongs to. It must not
	// block; labelling the container is best effort.
	Assign(tenant string)
	// Close stops and removes the sandbox; runs still in flight fail.
	// It is idempotent and returns nil when the sandbox is already gone.
	Close(ctx context.Context) error
	// Done is closed when the sandbox has died or been closed.
	Done() <-chan struct{}
	// Err says why the sandbox is gone once Done is closed: a
	// *protocol.Error with CodeOutOfMemory or CodeSandboxCrashed, or
	// nil after Close.
	Err() error
}
