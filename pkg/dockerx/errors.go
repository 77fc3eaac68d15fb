package dockerx

import "errors"

// Errors returned by this package, matched with errors.Is. Errors of Run and
// Err are *protocol.Error values instead (see Sandbox.Run).
var (
	// ErrInvalidConfig: a Config field is out of range; Validate and New
	// wrap it with the field's name.
	ErrInvalidConfig = errors.New("invalid dockerx config")
	// ErrClosed: the Runtime is closed; it makes no more sandboxes.
	ErrClosed = errors.New("dockerx runtime closed")
	// ErrUnavailable: the engine cannot provide what the Config asks for
	// (the OCI runtime is not installed, the image is missing). New returns
	// it rather than running sandboxes with weaker isolation.
	ErrUnavailable = errors.New("docker engine cannot provide the sandbox")
	// ErrNotReady: a created container's agent did not answer the
	// readiness handshake. The container has been removed.
	ErrNotReady = errors.New("sandbox not ready")
)
