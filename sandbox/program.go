// Package sandbox holds the agent that runs inside every sandbox container
// (agent.js and worker.js, whose tests are node's: node --test sandbox/) and
// gives pkg/dockerx the command line that starts it.
//
// The agent travels with the worker, not with the image: the container runs
// the image's node with the agent's source on its command line (node -e), so
// any image with a Node.js runtime works as the sandbox image. That needs no
// file of the worker's host on the engine's host, so it works the same with
// a remote engine and with a worker that itself runs in a container.
package sandbox

import (
	_ "embed"
	"encoding/json"
	"fmt"
	"regexp"
	"strings"
)

var (
	//go:embed agent.js
	agentJS string
	//go:embed worker.js
	workerJS string
	//go:embed node-flags.sh
	nodeFlagsSh string
)

// MinNodeMajor is the oldest Node.js major version the agent supports; the
// agent refuses to start on an older one (agent.js MIN_NODE_MAJOR).
const MinNodeMajor = 18

// MaxArgBytes bounds one argument of a process's command line on Linux
// (MAX_ARG_STRLEN, 32 pages): the program must fit in it.
const MaxArgBytes = 128 << 10

// Program returns the JavaScript the container's node evaluates: agent.js,
// then a call of its main with worker.js's source, from which it starts its
// worker threads.
func Program() string {
	src, err := json.Marshal(workerJS) // a valid JavaScript string literal (U+2028/9 escaped)
	if err != nil {
		panic(err) // a string always marshals
	}
	return agentJS + "\n;main({ workerSource: " + string(src) + " });\n"
}

var flagsLine = regexp.MustCompile(`(?m)^ISODE_NODE_FLAGS=\((.*)\)$`)

// NodeFlags returns the flags of the agent's node process (node-flags.sh).
func NodeFlags() []string {
	m := flagsLine.FindStringSubmatch(nodeFlagsSh)
	if m == nil {
		panic("sandbox: node-flags.sh has no ISODE_NODE_FLAGS line")
	}
	return strings.Fields(m[1])
}

// Args returns node's arguments that start the agent: its flags, then -e
// and the program.
func Args() []string {
	return append(NodeFlags(), "-e", Program())
}

// Check reports an error when the program does not fit on a command line.
func Check() error {
	if n := len(Program()) + 1; n > MaxArgBytes {
		return fmt.Errorf("the agent's program is %d bytes, over the %d bytes of one command-line argument", n, MaxArgBytes)
	}
	return nil
}
