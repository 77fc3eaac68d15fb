package dockerx

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"testing"
	"time"

	"github.com/docker/docker/client"

	"github.com/isode-run/isode/pkg/protocol"
)

// endRuntime is a Runtime with no engine behind it: enough for a Sandbox
// to end (its background removal fails and is logged).
func endRuntime(t *testing.T) *Runtime {
	cli, err := client.NewClientWithOpts(client.WithHost("unix:///nonexistent/docker.sock"))
	if err != nil {
		t.Fatal(err)
	}
	r := &Runtime{cfg: DefaultConfig(), cli: cli, log: slog.New(slog.DiscardHandler), sandboxes: map[string]*Sandbox{}, creating: map[string]bool{}}
	r.ctx, r.cancel = context.WithCancel(context.Background())
	t.Cleanup(func() { r.cancel(); r.wg.Wait(); cli.Close() })
	return r
}

// goneBeforeTold checks that Done is closed before the calls in flight
// hear of the end: their channels are unbuffered here, so the sandbox
// blocks on telling them until the test listens.
func goneBeforeTold(t *testing.T, s *Sandbox, end func(), calls map[uint64]protocol.Code) {
	t.Helper()
	chans := map[uint64]chan outcome{}
	for id := range calls {
		c := &call{ch: make(chan outcome)}
		chans[id] = c.ch
		if err := s.conn.register(id, c); err != nil {
			t.Fatal(err)
		}
	}
	go end()
	select {
	case <-s.Done():
	case <-time.After(2 * time.Second):
		t.Fatal("the calls in flight were told of the end before Done was closed: the pool would hand the dead sandbox to the next request")
	}
	got := make(chan string, len(calls))
	for id, ch := range chans {
		go func() {
			if code, want := protocol.CodeOf((<-ch).err), calls[id]; code != want {
				got <- fmt.Sprintf("call %d: %s, want %s", id, code, want)
			} else {
				got <- ""
			}
		}()
	}
	for range calls {
		if msg := <-got; msg != "" {
			t.Error(msg)
		}
	}
}

// pipedSandbox is a Sandbox whose agent connection is one end of a pipe
// nobody reads.
func pipedSandbox(t *testing.T, id string) *Sandbox {
	s := newSandbox(endRuntime(t), id, "n-"+id, "")
	a, b := net.Pipe()
	t.Cleanup(func() { a.Close(); b.Close() })
	s.conn = s.newConn(a)
	return s
}

func TestEndClosesDoneBeforeFailingCalls(t *testing.T) {
	s := pipedSandbox(t, "c1")
	goneBeforeTold(t, s, func() { s.end(protocol.Errorf(protocol.CodeSandboxCrashed, "killed"), false) },
		map[uint64]protocol.Code{1: protocol.CodeSandboxCrashed, 2: protocol.CodeSandboxCrashed})
}

func TestWedgedClosesDoneBeforeTimingOut(t *testing.T) {
	s := pipedSandbox(t, "c2")
	goneBeforeTold(t, s, func() { s.conn.wedged(1, time.Second) },
		map[uint64]protocol.Code{1: protocol.CodeTimeout, 2: protocol.CodeSandboxCrashed})
}
