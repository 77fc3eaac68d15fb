package fleet

import (
	"errors"
	"fmt"
	"strconv"
	"strings"

	"github.com/nats-io/nats.go"

	"github.com/isode-run/isode/pkg/protocol"
)

// ErrUnpublishable is returned (wrapped) by outbox.publish for a message
// the NATS server would refuse. The server answers such a publish by
// closing the connection, so it is never sent.
var ErrUnpublishable = errors.New("message cannot be published")

// maxHeaderValueBytes bounds each header value a worker sends; longer
// values (an error message quoting a snippet) are cut.
const maxHeaderValueBytes = 1024

// outbox is the one way a worker publishes on core NATS: replies, stats
// answers, dead letters. Whatever a request put into the message (a reply
// subject, an id, an error message built from a snippet's output), it is
// checked against the limits of the server before it goes out: a message
// the server would refuse (a control line over max_control_line, a
// payload over max_payload) closes the connection for good in nats.go, so
// one hostile request could otherwise stop a worker.
type outbox struct {
	nc             *nats.Conn
	maxControlLine int
}

// publish checks m and publishes it. Header values are cleaned (control
// characters become spaces, long values are cut) rather than refused, so
// an error message can always be delivered. It returns an error wrapping
// ErrUnpublishable for a message that would break the server's limits, or
// the client's error.
func (o *outbox) publish(m *nats.Msg) error {
	if err := o.check(m); err != nil {
		return err
	}
	return o.nc.PublishMsg(m)
}

// check cleans m's headers and reports whether the server would take m.
func (o *outbox) check(m *nats.Msg) error {
	if err := protocol.ValidateSubject(m.Subject, o.maxControlLine); err != nil {
		return fmt.Errorf("%w: subject: %w", ErrUnpublishable, err)
	}
	if m.Reply != "" {
		if err := protocol.ValidateSubject(m.Reply, o.maxControlLine); err != nil {
			return fmt.Errorf("%w: reply subject: %w", ErrUnpublishable, err)
		}
	}
	for k, vs := range m.Header {
		if !headerName(k) {
			return fmt.Errorf("%w: header name %q", ErrUnpublishable, truncate(k, 64))
		}
		for i, v := range vs {
			if clean := headerValue(v); clean != v {
				vs[i] = clean // only ever a message built for this publish
			}
		}
	}
	hdr := headerBytes(m.Header)
	line := controlLine(len(m.Subject), len(m.Reply), hdr, hdr+len(m.Data))
	if line > o.maxControlLine {
		return fmt.Errorf("%w: its protocol line is %d bytes, over the server's limit of %d", ErrUnpublishable, line, o.maxControlLine)
	}
	if max := o.nc.MaxPayload(); max > 0 && int64(hdr+len(m.Data)) > max {
		return fmt.Errorf("%w: %d bytes, over the server's message limit of %d", ErrUnpublishable, hdr+len(m.Data), max)
	}
	return nil
}

// replyFits reports whether a reply to subject can be published with a
// confirmation subject and a message of any size the server takes, so a
// request is refused before it runs rather than after.
func (o *outbox) replyFits(subject string) error {
	// "_ISODE_ACK.<nuid>.<token>", and sizes as long as the largest message.
	confirm := len(protocol.ReplyAckPrefix) + 1 + confirmTokenBytes + 1 + confirmTokenBytes
	largest := int(o.nc.MaxPayload())
	line := controlLine(len(subject), confirm, largest, largest)
	if line > o.maxControlLine {
		return protocol.Errorf(protocol.CodeBadRequest, "header %s is %d bytes: a reply to it would not fit the NATS server's protocol line limit of %d bytes",
			protocol.HeaderReplyTo, len(subject), o.maxControlLine)
	}
	return nil
}

// room returns how many bytes of data a message with these (clean)
// headers may carry under the server's payload limit.
func (o *outbox) room(h nats.Header) int {
	return int(o.nc.MaxPayload()) - headerBytes(h)
}

// headerBytes is the size of h as NATS encodes it: "NATS/1.0", a line per
// value, a blank line; no bytes at all without headers.
func headerBytes(h nats.Header) int {
	if len(h) == 0 {
		return 0
	}
	n := len("NATS/1.0\r\n\r\n")
	for k, vs := range h {
		for _, v := range vs {
			n += len(k) + len(": ") + len(v) + len("\r\n")
		}
	}
	return n
}

// controlLine is the length of the protocol line that publishes a message:
// "HPUB <subject> <reply> <header bytes> <total bytes>\r\n".
func controlLine(subject, reply, hdr, total int) int {
	return len("HPUB ") + subject + 1 + reply + 1 + len(strconv.Itoa(hdr)) + 1 + len(strconv.Itoa(total)) + len("\r\n")
}

// headerName reports whether k is a header name NATS carries intact:
// printable ASCII without spaces or colons.
func headerName(k string) bool {
	if k == "" {
		return false
	}
	for i := 0; i < len(k); i++ {
		if c := k[i]; c <= ' ' || c >= 0x7f || c == ':' {
			return false
		}
	}
	return true
}

// headerValue returns v on one line: control characters (CR and LF would
// end the header, or the header block) become spaces, and a value over
// maxHeaderValueBytes is cut at a rune boundary.
func headerValue(v string) string {
	clean := true
	for i := 0; i < len(v); i++ {
		if c := v[i]; c < ' ' || c == 0x7f {
			clean = false
			break
		}
	}
	if !clean {
		v = strings.Map(func(r rune) rune {
			if r < ' ' || r == 0x7f {
				return ' '
			}
			return r
		}, v)
	}
	return truncate(v, maxHeaderValueBytes)
}

// truncate cuts s to at most n bytes at a rune boundary.
func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	for n > 0 && s[n]&0xc0 == 0x80 {
		n--
	}
	return s[:n]
}
