package fleet

import (
	"crypto/rand"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nuid"

	"github.com/isode-run/isode/pkg/protocol"
)

// confirmations matches requesters' confirmations of replies (see
// protocol.HeaderReplyAck) to the requests waiting for them. A reply is
// published with a reply subject under this worker's own prefix; the
// requester answers it, or the NATS server answers it at once with a
// no-responders status when nobody listens on the reply's subject. Either
// way, or when the wait runs out, the request's callback learns whether
// the reply was delivered. One subscription and one timer per waiting
// reply; no goroutine waits.
//
// Each reply's subject ends in a random 128-bit token: another connection
// cannot guess one, so it can neither confirm a reply nobody received nor
// forge the no-responders status that has a reply sent again.
type confirmations struct {
	prefix string // "_ISODE_ACK.<nuid>."
	wait   time.Duration

	mu      sync.Mutex
	sub     *nats.Subscription
	waiting map[string]*confirmation
}

// confirmTokenBytes bounds the length of each part of a confirmation
// subject after the prefix: a nuid (22) and a random token (26).
const confirmTokenBytes = 26

type confirmation struct {
	timer *time.Timer
	done  func(delivered bool)
}

func newConfirmations(wait time.Duration) *confirmations {
	return &confirmations{
		prefix:  protocol.ReplyAckPrefix + "." + nuid.Next() + ".",
		wait:    wait,
		waiting: make(map[string]*confirmation),
	}
}

// subscribe starts receiving confirmations on nc.
func (c *confirmations) subscribe(nc *nats.Conn) error {
	sub, err := nc.Subscribe(c.prefix+"*", c.receive)
	if err != nil {
		return err
	}
	sub.SetPendingLimits(-1, 64<<20)
	c.mu.Lock()
	c.sub = sub
	c.mu.Unlock()
	return nil
}

// unsubscribe stops receiving; replies still waiting time out.
func (c *confirmations) unsubscribe() {
	c.mu.Lock()
	sub := c.sub
	c.sub = nil
	c.mu.Unlock()
	if sub != nil {
		sub.Unsubscribe()
	}
}

// expect registers a reply about to be published and returns the subject to
// publish it with as its reply subject. done is called exactly once, with
// true when the requester confirmed the reply, false when nobody listened
// or no confirmation came within the wait, unless cancel is called first
// and returns true (the reply was never published).
func (c *confirmations) expect(done func(delivered bool)) (subject string, cancel func() bool) {
	token := rand.Text()
	cf := &confirmation{done: done}
	c.mu.Lock()
	c.waiting[token] = cf
	cf.timer = time.AfterFunc(c.wait, func() { c.resolve(token, false) })
	c.mu.Unlock()
	return c.prefix + token, func() bool { return c.take(token) != nil }
}

// take removes a waiting confirmation; nil when it was resolved already.
func (c *confirmations) take(token string) *confirmation {
	c.mu.Lock()
	cf, ok := c.waiting[token]
	delete(c.waiting, token)
	c.mu.Unlock()
	if !ok {
		return nil
	}
	cf.timer.Stop()
	return cf
}

func (c *confirmations) receive(m *nats.Msg) {
	token, ok := strings.CutPrefix(m.Subject, c.prefix)
	if !ok {
		return
	}
	// The server's no-responders notice: an empty message with status 503.
	noResponders := len(m.Data) == 0 && m.Header.Get("Status") == "503"
	c.resolve(token, !noResponders)
}

func (c *confirmations) resolve(token string, delivered bool) {
	if cf := c.take(token); cf != nil {
		cf.done(delivered)
	} // else resolved already (a late or repeated confirmation)
}
