package client

import (
	"encoding/json"
	"fmt"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/isode-run/isode/pkg/protocol"
)

// JetStream error codes (the err_code of a PubAck's error) that a publish to
// the request stream can be answered with, under nats-server's names
// (server/errors.json). nats.go's jetstream package exports only a few of
// them as JSErrCode... constants; those are used as they are.
const (
	// JSStreamStoreFailedF: the store refused the message. From a publish
	// this is a full stream: max msgs, max bytes or max msgs per subject
	// under discard-new (the description says which).
	errCodeStreamStoreFailed jetstream.ErrorCode = 10077
	// JSStreamTooManyRequests: the stream's ingest queue is full.
	errCodeStreamTooManyRequests jetstream.ErrorCode = 10167
	// JSStorageResourcesExceededErr and JSMemoryResourcesExceededErr: the
	// server has no room left for the (file or memory) stream.
	errCodeStorageResourcesExceeded jetstream.ErrorCode = 10047
	errCodeMemoryResourcesExceeded  jetstream.ErrorCode = 10028
	// JSAccountResourcesExceededErr: the account's JetStream limits are reached.
	errCodeAccountResourcesExceeded jetstream.ErrorCode = 10002
	// JSInsufficientResourcesErr: a clustered stream's leader has no room.
	errCodeInsufficientResources jetstream.ErrorCode = 10023
	// JSStreamDuplicateMessageConflict: a clustered stream is still storing
	// another message with this id.
	errCodeDuplicateMessageConflict jetstream.ErrorCode = 10158
	// JSMessageTTLDisabledErr: the stream was made without AllowMsgTTL.
	errCodeMessageTTLDisabled jetstream.ErrorCode = 10166
)

// The no-responders status the server sends to a publish's reply subject
// when no stream (no subscriber at all) takes the subject. nats.go matches
// it with unexported constants (statusHdr, noResponders).
const (
	statusHeader       = "Status"
	statusNoResponders = "503"
)

// pubAck is the stream's answer to a publish, as nats-server writes it:
// a PubAck, or an error (with the stream's name in PubAck).
type pubAck struct {
	jetstream.PubAck
	Error *jetstream.APIError `json:"error,omitempty"`
}

// checkAck maps the stream's answer to the publish of request id to an
// error: nil when the request was stored, ErrNoStream when no stream took
// it, a *protocol.Error when the stream did not store it
// (ErrDuplicateRequest, ErrOverloaded, ErrBadRequest, ErrInternal), and a
// wrapped decode error when the answer is no PubAck at all.
func checkAck(id string, m *nats.Msg) error {
	if len(m.Data) == 0 && m.Header.Get(statusHeader) == statusNoResponders {
		return ErrNoStream
	}
	var ack pubAck
	if err := json.Unmarshal(m.Data, &ack); err != nil {
		return fmt.Errorf("decode stream acknowledgement of request %s: %w", id, err)
	}
	if ack.Error == nil {
		if ack.Duplicate {
			// Not stored: no worker will ever see this copy, so nothing
			// will answer on its inbox.
			return protocol.Errorf(protocol.CodeDuplicateRequest,
				"request id %q was already accepted within the fleet's duplicate window (stream %s, sequence %d), so this copy was not queued and no reply will come to it; the first one's reply goes to whoever sent it. Use a new id (Run picks a random one unless WithRequestID is given) unless you meant to dedupe",
				id, ack.Stream, ack.Sequence)
		}
		return nil
	}
	return StreamRefusal(id, ack.Stream, ack.Error)
}

// StreamRefusal maps the error with which the request stream refused the
// publish of request id to the error its submitter gets: overloaded when
// there is no room now, duplicate_request, bad_request for a message over
// the stream's size limit, internal otherwise. It is the one place that
// reads JetStream's error codes for a publish; the workers' plain
// request/reply door uses it too.
func StreamRefusal(id, stream string, e *jetstream.APIError) *protocol.Error {
	switch e.ErrorCode {
	case errCodeStreamStoreFailed, errCodeStreamTooManyRequests,
		errCodeStorageResourcesExceeded, errCodeMemoryResourcesExceeded,
		errCodeAccountResourcesExceeded, errCodeInsufficientResources:
		return protocol.Errorf(protocol.CodeOverloaded, "the request queue is full (%s, JetStream code %d): retry later with backoff", e.Description, e.ErrorCode)
	case errCodeDuplicateMessageConflict:
		return protocol.Errorf(protocol.CodeDuplicateRequest,
			"request id %q is being accepted from another submission at this moment (%s), so this copy was not queued and no reply will come to it. Use a new id (Run picks a random one unless WithRequestID is given) unless you meant to dedupe",
			id, e.Description)
	case jetstream.JSErrCodeStreamMessageExceedsMaximum:
		return protocol.Errorf(protocol.CodeBadRequest, "the request stream refused the request as too large (%s): its max message size is set below what the protocol allows; send less code or input, or raise the stream's limit", e.Description)
	case errCodeMessageTTLDisabled:
		return protocol.Errorf(protocol.CodeInternal, "the request stream %s does not allow per-message TTLs, which this client sets (%s): recreate the stream with AllowMsgTTL, as current workers do", stream, e.Description)
	}
	return protocol.Errorf(protocol.CodeInternal, "the stream refused the request: %s (JetStream code %d)", e.Description, e.ErrorCode)
}
