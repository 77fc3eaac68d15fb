package main

import (
	"bytes"
	"errors"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/creack/pty"
)

// ptyOutput collects what a process writes to its pseudo-terminal.
type ptyOutput struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (o *ptyOutput) Write(p []byte) (int, error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.b.Write(p)
}

func (o *ptyOutput) String() string {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.b.String()
}

// submit top, in a pseudo-terminal, draws a live view of a real worker
// (its pool, the runs it answers, the busiest tenant) on the alternate
// screen, and on Ctrl-C gives the screen back and exits 0.
func TestTopInATerminal(t *testing.T) {
	e := newE2E(t)
	w := e.start()
	bin := submitBinary(t)
	if _, err := e.run("top-tenant", `return function (cb) { cb(null, 1) }`); err != nil {
		t.Fatal(err)
	}

	cmd := exec.Command(bin, "top", "--nats", e.url, "--interval", "200ms", "--window", "5s")
	tty, err := pty.StartWithSize(cmd, &pty.Winsize{Rows: 40, Cols: 160})
	if err != nil {
		t.Fatal(err)
	}
	defer tty.Close()
	out := &ptyOutput{}
	copied := make(chan struct{})
	go func() {
		defer close(copied)
		var buf [4096]byte
		for {
			n, err := tty.Read(buf[:])
			out.Write(buf[:n])
			if err != nil {
				return
			}
		}
	}()
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() {
		if cmd.ProcessState == nil {
			cmd.Process.Kill()
			<-exited
		}
	})

	// Runs while top watches, until a frame shows them.
	deadline := time.Now().Add(30 * time.Second)
	for !strings.Contains(out.String(), "top-tenant") {
		if time.Now().After(deadline) {
			t.Fatalf("top never showed the tenant's runs:\n%q", out.String())
		}
		if _, err := e.run("top-tenant", `return function (cb) { cb(null, 1) }`); err != nil {
			t.Fatal(err)
		}
	}
	screen := out.String()
	for _, want := range []string{"\x1b[?1049h", "isode top", w.id, "runs/s", "busiest tenants", "Ctrl-C to quit"} {
		if !strings.Contains(screen, want) {
			t.Errorf("the view lacks %q:\n%s", want, screen)
		}
	}

	if _, err := tty.Write([]byte{3}); err != nil { // Ctrl-C: the terminal sends SIGINT
		t.Fatal(err)
	}
	select {
	case err := <-exited:
		var ee *exec.ExitError
		if errors.As(err, &ee) || err != nil {
			t.Fatalf("top exited with %v:\n%q", err, out.String())
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("top did not exit on Ctrl-C:\n%q", out.String())
	}
	tty.Close()
	<-copied
	if s := out.String(); !strings.HasSuffix(strings.TrimRight(s, "\r\n^C"), "\x1b[?25h\x1b[?1049l") {
		t.Errorf("top did not give the screen back last: %q", s[max(0, len(s)-80):])
	}
}
