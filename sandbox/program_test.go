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

// TestNodeFlagsKeepNodesCodeCache: the agent's flags leave V8's flag hash
// as it is without them. Every worker thread compiles node's own modules
// from node's built-in code cache, which V8 accepts only under the flags it
// was made with (v8.cachedDataVersionTag derives from V8's version, its
// flags and the CPU); a flag that changes the hash, --max-old-space-size
// for one, made each snippet thread compile them from source instead, some
// 35 ms of CPU a thread (sandbox/node-flags.sh).
func TestNodeFlagsKeepNodesCodeCache(t *testing.T) {
	node := testenv.Node(t)
	tag := func(flags ...string) string {
		t.Helper()
		args := append(append([]string{}, flags...), "-p", "require('v8').cachedDataVersionTag()")
		out, err := exec.Command(node, args...).Output()
		if err != nil {
			t.Fatalf("node %q: %v", args, err)
		}
		return strings.TrimSpace(string(out))
	}
	if with, without := tag(NodeFlags()...), tag(); with != without {
		t.Fatalf("node with the agent's flags %q has code cache tag %s, without them %s: one of them changes V8's flag hash, and worker threads would compile node's modules from source", NodeFlags(), with, without)
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
