package protocol_test

import (
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"testing"

	"github.com/isode-run/isode/pkg/protocol"
)

// TestCodeContract pins each code's status and retryability: both are part
// of the wire contract (HeaderServiceErrorCode, the README's table).
func TestCodeContract(t *testing.T) {
	tests := []struct {
		give          protocol.Code
		wantStatus    int
		wantRetryable bool
		wantSentinel  error
	}{
		{protocol.CodeBadRequest, 400, false, protocol.ErrBadRequest},
		{protocol.CodeCodeError, 422, false, protocol.ErrCodeError},
		{protocol.CodeTimeout, 408, false, protocol.ErrTimeout},
		{protocol.CodeQueueTimeout, 504, true, protocol.ErrQueueTimeout},
		{protocol.CodeOverloaded, 429, true, protocol.ErrOverloaded},
		{protocol.CodeOutOfMemory, 507, false, protocol.ErrOutOfMemory},
		{protocol.CodeSandboxCrashed, 502, true, protocol.ErrSandboxCrashed},
		{protocol.CodeOutputTooLarge, 413, false, protocol.ErrOutputTooLarge},
		{protocol.CodeShuttingDown, 503, true, protocol.ErrShuttingDown},
		{protocol.CodeInternal, 500, true, protocol.ErrInternal},
		{protocol.CodeDeadLettered, 508, false, protocol.ErrDeadLettered},
		{protocol.CodeDuplicateRequest, 409, false, protocol.ErrDuplicateRequest},
	}
	if len(tests) != len(protocol.Codes) {
		t.Fatalf("the table has %d codes, protocol.Codes %d: add the new code here", len(tests), len(protocol.Codes))
	}
	for _, tt := range tests {
		t.Run(string(tt.give), func(t *testing.T) {
			if !slices.Contains(protocol.Codes, tt.give) || !tt.give.Known() {
				t.Errorf("%s is missing from protocol.Codes", tt.give)
			}
			if got := tt.give.Status(); got != tt.wantStatus {
				t.Errorf("Status() = %d, want %d", got, tt.wantStatus)
			}
			if got := tt.give.Retryable(); got != tt.wantRetryable {
				t.Errorf("Retryable() = %v, want %v", got, tt.wantRetryable)
			}
			// An error of this code that crossed the wire and was wrapped
			// still matches the code's sentinel, and no other.
			data, err := json.Marshal(protocol.Errorf(tt.give, "something"))
			if err != nil {
				t.Fatal(err)
			}
			var back protocol.Error
			if err := json.Unmarshal(data, &back); err != nil {
				t.Fatal(err)
			}
			wrapped := fmt.Errorf("run: %w", &back)
			if !errors.Is(wrapped, tt.wantSentinel) {
				t.Errorf("%v does not match its sentinel", wrapped)
			}
			for _, other := range tests {
				if other.give != tt.give && errors.Is(wrapped, other.wantSentinel) {
					t.Errorf("%v matches the sentinel of %s", wrapped, other.give)
				}
			}
		})
	}
}
