package protocol

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
)

// Code is a stable, machine-readable error code. Codes are part of the wire
// contract: they are never renamed, only added.
type Code string

// Error codes.
const (
	// CodeBadRequest: the request is malformed or violates a limit. Fix the request.
	CodeBadRequest Code = "bad_request"
	// CodeCodeError: the snippet failed: a syntax error, a throw, an error
	// passed to the callback, a result that is not JSON, a callback called twice.
	CodeCodeError Code = "code_error"
	// CodeTimeout: the snippet did not finish within its timeout.
	CodeTimeout Code = "timeout"
	// CodeQueueTimeout: the request's deadline passed before it could start.
	CodeQueueTimeout Code = "queue_timeout"
	// CodeOverloaded: the fleet is at capacity; retry later with backoff.
	CodeOverloaded Code = "overloaded"
	// CodeOutOfMemory: the snippet exceeded its memory limit.
	CodeOutOfMemory Code = "out_of_memory"
	// CodeSandboxCrashed: the tenant's sandbox died while the request ran.
	CodeSandboxCrashed Code = "sandbox_crashed"
	// CodeOutputTooLarge: the result exceeded the size limit.
	CodeOutputTooLarge Code = "output_too_large"
	// CodeShuttingDown: the worker is stopping; the request may be retried.
	CodeShuttingDown Code = "shutting_down"
	// CodeInternal: a fault of the system, not of the request.
	CodeInternal Code = "internal"
	// CodeDeadLettered: the fleet gave up on the request after it was
	// delivered to workers several times without an answer (a worker died
	// while it ran, or its reply could not be published). It was copied to
	// the dead-letter subject (DeadSubject) for an operator and is not run
	// again. Submitting it unchanged is likely to fail the same way.
	CodeDeadLettered Code = "dead_lettered"
	// CodeDuplicateRequest: a request with this id was accepted within the
	// fleet's duplicate window; its reply goes to whoever sent it. Use a new
	// id (the default: a random UUID per Run) unless you meant to dedupe.
	// Clients report it when the stream's PubAck says "duplicate": true;
	// workers never send it.
	CodeDuplicateRequest Code = "duplicate_request"
)

// Codes lists every code, in a stable order.
var Codes = []Code{
	CodeBadRequest, CodeCodeError, CodeTimeout, CodeQueueTimeout, CodeOverloaded,
	CodeOutOfMemory, CodeSandboxCrashed, CodeOutputTooLarge, CodeShuttingDown, CodeInternal,
	CodeDeadLettered, CodeDuplicateRequest,
}

// Status returns the numeric, HTTP-like status of a code, as carried in
// HeaderServiceErrorCode.
func (c Code) Status() int {
	switch c {
	case CodeBadRequest:
		return 400
	case CodeCodeError:
		return 422
	case CodeTimeout:
		return 408
	case CodeQueueTimeout:
		return 504
	case CodeOverloaded:
		return 429
	case CodeOutOfMemory:
		return 507
	case CodeSandboxCrashed:
		return 502
	case CodeOutputTooLarge:
		return 413
	case CodeShuttingDown:
		return 503
	case CodeDeadLettered:
		return 508 // Loop Detected: it kept coming back without an answer
	case CodeDuplicateRequest:
		return 409
	default:
		return 500
	}
}

// Retryable reports whether a request that failed with c may succeed if
// submitted again unchanged. CodeDuplicateRequest is not: the same id is
// refused again until the duplicate window has passed.
func (c Code) Retryable() bool {
	switch c {
	case CodeQueueTimeout, CodeOverloaded, CodeSandboxCrashed, CodeShuttingDown, CodeInternal:
		return true
	}
	return false
}

// Known reports whether c is one of Codes.
func (c Code) Known() bool {
	for _, k := range Codes {
		if c == k {
			return true
		}
	}
	return false
}

// Error is an error with a stable code and a message a person can act on.
// It is both a Go error and the "error" member of a Reply.
type Error struct {
	Code    Code   `json:"code"`
	Message string `json:"message"`
}

// Errorf returns an *Error with a formatted message.
func Errorf(code Code, format string, args ...any) *Error {
	return &Error{Code: code, Message: fmt.Sprintf(format, args...)}
}

func (e *Error) Error() string {
	if e.Message == "" {
		return string(e.Code)
	}
	return string(e.Code) + ": " + e.Message
}

// Is makes errors.Is match every *Error of a code against that code's bare
// sentinel, so that errors.Is(err, protocol.ErrTimeout) holds for every
// timeout. A target with a message (another package's sentinel, such as a
// pool's "queue full") matches only itself.
func (e *Error) Is(target error) bool {
	t, ok := target.(*Error)
	return ok && t.Message == "" && t.Code == e.Code
}

// Sentinels for errors.Is; each matches every *Error of its code.
var (
	ErrBadRequest       = &Error{Code: CodeBadRequest}
	ErrCodeError        = &Error{Code: CodeCodeError}
	ErrTimeout          = &Error{Code: CodeTimeout}
	ErrQueueTimeout     = &Error{Code: CodeQueueTimeout}
	ErrOverloaded       = &Error{Code: CodeOverloaded}
	ErrOutOfMemory      = &Error{Code: CodeOutOfMemory}
	ErrSandboxCrashed   = &Error{Code: CodeSandboxCrashed}
	ErrOutputTooLarge   = &Error{Code: CodeOutputTooLarge}
	ErrShuttingDown     = &Error{Code: CodeShuttingDown}
	ErrInternal         = &Error{Code: CodeInternal}
	ErrDeadLettered     = &Error{Code: CodeDeadLettered}
	ErrDuplicateRequest = &Error{Code: CodeDuplicateRequest}
)

// AsError returns the *Error in err's chain. An error without one becomes
// CodeInternal with err's text; nil stays nil.
//
// When the first *Error in the chain is a bare sentinel (no message), the
// full text of err is used as the message, so that context added with
// fmt.Errorf("...: %w", protocol.ErrOverloaded) reaches the caller.
func AsError(err error) *Error {
	if err == nil {
		return nil
	}
	var pe *Error
	if errors.As(err, &pe) {
		if pe.Message == "" {
			msg := strings.TrimSuffix(err.Error(), ": "+string(pe.Code))
			return &Error{Code: pe.Code, Message: msg}
		}
		return pe
	}
	return &Error{Code: CodeInternal, Message: err.Error()}
}

// CodeOf returns the code of err (CodeInternal for errors without one).
func CodeOf(err error) Code {
	if pe := AsError(err); pe != nil {
		return pe.Code
	}
	return ""
}

// StatusString is Code.Status as the header value.
func (c Code) StatusString() string { return strconv.Itoa(c.Status()) }
