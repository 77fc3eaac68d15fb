package protocol

import "strings"

// CallSubject is the fleet's plain request/reply door: any NATS client
// sends the JSON Request as the body of a request (a message with a reply
// subject) and gets the Reply JSON back on that reply subject, as from
// any NATS service. A worker of the queue group takes the call and puts it
// on the request stream (RunSubject, a fresh Nats-Msg-Id, Isode-Reply-To
// set to the call's reply subject); whichever worker runs it answers.
// Errors carry HeaderServiceError / HeaderServiceErrorCode. A call with no
// reply subject is dropped. The caller gives up what pkg/client has:
// confirmed replies (HeaderReplyAck) and choosing the request id; a full
// stream is still answered at once (CodeOverloaded).
func CallSubject(prefix string) string { return prefix + ".call" }

// ServiceName is the name under which the fleet's workers register as a
// NATS micro service (`nats micro info isode`): the prefix, with every
// byte a service name may not hold made '_'.
func ServiceName(prefix string) string {
	return strings.Map(func(r rune) rune {
		switch {
		case r >= 'a' && r <= 'z', r >= 'A' && r <= 'Z', r >= '0' && r <= '9', r == '-', r == '_':
			return r
		}
		return '_'
	}, prefix)
}
