package sandbox

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"io"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/isode-run/isode/internal/testenv"
)

func TestProgramFitsOnACommandLine(t *testing.T) {
	if err := Check(); err != nil {
		t.Fatal(err)
	}
	t.Logf("program: %d bytes of at most %d", len(Program()), MaxArgBytes)
}

func TestNodeFlags(t *testing.T) {
	got := NodeFlags()
	if len(got) == 0 || !strings.HasPrefix(got[0], "--") {
		t.Fatalf("NodeFlags() = %q", got)
	}
}

// TestProgramRuns starts node with Args, as a container does, and runs a
// snippet through it: the eval'd agent starts its worker threads from
// source, outside any file.
func TestProgramRuns(t *testing.T) {
	node := testenv.Node(t)
	var req bytes.Buffer
	for _, m := range []string{
		`{"id":1,"op":"ping"}`,
		`{"id":2,"op":"run","code":"return function (cb) { cb(null, require('path').join('a', 'b')) }","timeout_ms":5000}`,
		`{"id":3,"op":"run","code":"return function (cb) { cb(null, require('/tmp/x.js')) }","timeout_ms":5000}`,
	} {
		binary.Write(&req, binary.BigEndian, uint32(len(m)))
		req.WriteString(m)
	}
	cmd := exec.Command(node, Args()...)
	cmd.Dir = t.TempDir()
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	timer := time.AfterFunc(30*time.Second, func() { cmd.Process.Kill() })
	defer timer.Stop()
	if _, err := stdin.Write(req.Bytes()); err != nil {
		t.Fatal(err)
	}
	replies := map[int]map[string]any{}
	for len(replies) < 3 {
		var n uint32
		if err := binary.Read(stdout, binary.BigEndian, &n); err != nil {
			t.Fatalf("read reply: %v; stderr: %s", err, stderr.String())
		}
		body := make([]byte, n)
		if _, err := io.ReadFull(stdout, body); err != nil {
			t.Fatal(err)
		}
		var r map[string]any
		if err := json.Unmarshal(body, &r); err != nil {
			t.Fatal(err)
		}
		id, _ := r["id"].(float64)
		replies[int(id)] = r
	}
	stdin.Close()
	if err := cmd.Wait(); err != nil {
		t.Fatalf("node after stdin closed: %v; stderr: %s", err, stderr.String())
	}
	if r, _ := replies[1]["result"].(map[string]any); r["ready"] != true {
		t.Errorf("ping: %v", replies[1])
	}
	if r := replies[2]["result"]; r != "a/b" {
		t.Errorf("run: %v", replies[2])
	}
	if e, _ := replies[3]["error"].(map[string]any); e == nil || e["code"] != "code_error" || !strings.Contains(e["message"].(string), "not by path") {
		t.Errorf("require of a path: %v", replies[3])
	}
}
