package dockerx

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"regexp"
	"time"

	"github.com/isode-run/isode/pkg/protocol"
)

// Labels every sandbox container carries.
const (
	// LabelApp marks a container as isode's, with the value AppName.
	LabelApp = "io.isode.app"
	// AppName is the value of LabelApp.
	AppName = "isode"
	// LabelWorker is the id of the worker (Config.WorkerID) that made it.
	LabelWorker = "io.isode.worker"
	// LabelTenant is the isolate key the container was created for. It is
	// absent on a free container: Docker labels cannot change after create,
	// so a later Assign is recorded by the Sandbox only (see Sandbox.Assign).
	LabelTenant = "io.isode.tenant"
	// LabelFleet names the fleet of the worker that made it (Config.Fleet):
	// all workers that share one NATS deployment and subject prefix. It is
	// absent when Config.Fleet is empty. Runtime.StartReaper removes running
	// containers of dead workers only when their LabelFleet is its own.
	LabelFleet = "io.isode.fleet"
)

// Defaults of DefaultConfig.
const (
	DefaultImage = "isode-sandbox:latest"
	DefaultNode  = "node"
	MiB          = 1 << 20
)

// Config sets how a Runtime makes sandboxes. Start from DefaultConfig.
type Config struct {
	// Image is the sandbox image: any image with a Node.js runtime (version
	// sandbox.MinNodeMajor or later), such as the one sandbox/build-image.sh
	// builds or an official node image. It must already be on the engine.
	// Its entrypoint, command, user and working directory are not used.
	Image string
	// Node is the node binary in the image: "node" (found on the image's
	// PATH) or an absolute path.
	Node string
	// WorkerID names this worker in the LabelWorker label: 1 to 64 of
	// [A-Za-z0-9_.-]. Two live workers on one engine must not share it.
	WorkerID string
	// Fleet names the fleet this worker belongs to in the LabelFleet label:
	// "" (no label) or 1 to 64 of [A-Za-z0-9_.-]. Workers that share one
	// NATS deployment and subject prefix share it; different fleets (and
	// the test suites of other programs) on one engine must not. Without
	// it StartReaper never removes other workers' running containers.
	Fleet string

	// Memory is each container's memory limit in bytes; swap is off
	// (MemorySwap == Memory). The tmpfs /tmp counts against it.
	Memory int64
	// NanoCPUs is each container's CPU limit in billionths of a CPU.
	NanoCPUs int64
	// PidsLimit bounds the processes and threads of a container. The agent
	// uses about a dozen threads plus one per concurrent snippet.
	PidsLimit int64
	// NoFile is the open-files limit (soft and hard) in a container.
	NoFile int64
	// TmpfsSize is the size of the writable /tmp in bytes.
	TmpfsSize int64
	// Concurrency is how many snippets one sandbox runs at once (the
	// agent's worker threads); more requests wait in the agent.
	Concurrency int
	// WorkerHeapMB bounds the V8 heap of each snippet thread; a snippet
	// that exceeds it fails with out_of_memory and the sandbox lives on.
	WorkerHeapMB int
	// Runtime is the OCI runtime ("runsc" for gVisor); "" is the engine's
	// default. New fails with ErrUnavailable when the engine lacks it.
	Runtime string

	// AgentSocketDir, when set, is a directory in which the Runtime makes
	// a directory of its own, and in that one a directory per sandbox with
	// the unix socket the sandbox's agent connects to; each is
	// bind-mounted (read-only) into its sandbox alone. The protocol then
	// bypasses dockerd and the containerd shim, which costs far less CPU
	// per run. The engine resolves a bind's source on its own host: the
	// directory must be at the same path there (a worker on the engine's
	// host, or in a container with the directory bind-mounted at the same
	// path). A directory that cannot be made or is not the worker's own,
	// an engine that does not see it, or an agent that cannot reach its
	// socket make the Runtime go back to the attach transport, logged.
	// "" (the default): the protocol runs over the container's attach
	// stream.
	AgentSocketDir string

	// ShareNode mounts, read-only, a volume holding a copy of the image's
	// node directory over that directory in every sandbox, so that all
	// sandboxes run node's code from one file whose pages they share
	// (nodevolume.go); with a storage driver that keeps each container's
	// files apart in memory (fuse-overlayfs, vfs) this saves each busy
	// sandbox from running a private, cold copy. Without it the image's own
	// files are used. A failure to set the volume up is logged and the
	// image's files are used.
	ShareNode bool

	// CallTimeout bounds every single Docker API call.
	CallTimeout time.Duration
	// CreateTimeout bounds Create when its context has no deadline.
	CreateTimeout time.Duration
	// ReadyTimeout bounds the readiness handshake after start.
	ReadyTimeout time.Duration
	// RunMargin is taken off a run's time budget for the agent's own
	// deadline, so that its timeout reply arrives before the caller's.
	RunMargin time.Duration
	// RunGrace is how long past a run's deadline the host still waits for
	// the agent's answer before it declares the sandbox wedged and closes it.
	RunGrace time.Duration

	// MaxResultBytes bounds the JSON of a result (output_too_large above).
	MaxResultBytes int
	// MaxConsoleBytes bounds the console output returned with a run.
	MaxConsoleBytes int
	// MaxFrameBytes bounds every frame the host accepts from a container;
	// a longer one is a protocol violation. It must leave room for a full
	// result and a full console (escaped: up to 6 bytes per byte) and
	// MaxRequestBytes bounds frames to the agent.
	MaxFrameBytes   int
	MaxRequestBytes int
	// StderrTailBytes is how much of the agent's stderr is kept, for
	// error messages and logs.
	StderrTailBytes int

	// Logger receives the Runtime's diagnostics; nil discards them.
	Logger *slog.Logger
}

// DefaultConfig returns the defaults, with a random WorkerID.
func DefaultConfig() Config {
	return Config{
		Image:           DefaultImage,
		Node:            DefaultNode,
		WorkerID:        "w-" + randomHex(6),
		Memory:          128 * MiB,
		NanoCPUs:        1e9,
		PidsLimit:       64,
		NoFile:          256,
		TmpfsSize:       16 * MiB,
		Concurrency:     4,
		ShareNode:       true,
		WorkerHeapMB:    64,
		CallTimeout:     10 * time.Second,
		CreateTimeout:   30 * time.Second,
		ReadyTimeout:    10 * time.Second,
		RunMargin:       25 * time.Millisecond,
		RunGrace:        time.Second,
		MaxResultBytes:  protocol.MaxResultBytes,
		MaxConsoleBytes: protocol.MaxConsoleBytes,
		MaxFrameBytes:   2 * MiB,
		MaxRequestBytes: 4 * MiB,
		StderrTailBytes: 4096,
	}
}

var (
	namePattern    = regexp.MustCompile(`^[A-Za-z0-9_.-]{1,64}$`)
	runtimePattern = regexp.MustCompile(`^[A-Za-z0-9_.-]{0,64}$`)
	nodePattern    = regexp.MustCompile(`^([A-Za-z0-9_.+-]{1,64}|/[A-Za-z0-9_.+@/-]{1,1000})$`)
)

// Validate checks every field and returns one error per bad field, each
// wrapping ErrInvalidConfig, joined.
func (c *Config) Validate() error {
	var errs []error
	bad := func(format string, args ...any) {
		errs = append(errs, fmt.Errorf("%w: "+format, append([]any{ErrInvalidConfig}, args...)...))
	}
	if c.Image == "" {
		bad("Image is empty")
	}
	if !nodePattern.MatchString(c.Node) {
		bad("Node %q must be a command name (found on the image's PATH) or an absolute path", c.Node)
	}
	if !namePattern.MatchString(c.WorkerID) {
		bad("WorkerID %q must be 1 to 64 of A-Z a-z 0-9 _ . -", c.WorkerID)
	}
	if c.Fleet != "" && !namePattern.MatchString(c.Fleet) {
		bad("Fleet %q must be empty or 1 to 64 of A-Z a-z 0-9 _ . -", c.Fleet)
	}
	if c.Memory < 32*MiB {
		bad("Memory %d is below 32 MiB", c.Memory)
	}
	if c.NanoCPUs < 1e7 {
		bad("NanoCPUs %d is below 0.01 CPU", c.NanoCPUs)
	}
	if c.PidsLimit < 16 || c.PidsLimit > 1<<16 {
		bad("PidsLimit %d is outside [16, 65536]: the agent alone uses about a dozen threads", c.PidsLimit)
	}
	if c.NoFile < 64 || c.NoFile > 1<<20 {
		bad("NoFile %d is outside [64, 1048576]", c.NoFile)
	}
	if c.TmpfsSize < MiB || c.TmpfsSize >= c.Memory {
		bad("TmpfsSize %d must be at least 1 MiB and below Memory (%d): it counts against it", c.TmpfsSize, c.Memory)
	}
	if c.Concurrency < 1 || c.Concurrency > 256 {
		bad("Concurrency %d is outside [1, 256]", c.Concurrency)
	}
	if c.WorkerHeapMB < 8 || int64(c.WorkerHeapMB)*MiB >= c.Memory {
		bad("WorkerHeapMB %d must be at least 8 and below Memory (%d MiB)", c.WorkerHeapMB, c.Memory/MiB)
	}
	if d := c.AgentSocketDir; d != "" {
		// base (d/lXXXXXXXXX), sandbox name (isode-<16 hex>), socket name
		if n := len(d) + 11 + 23 + 1 + len(agentSocketName); !filepath.IsAbs(d) || n > maxSocketPath {
			bad("AgentSocketDir %q must be an absolute path of at most %d bytes (a socket path is at most %d)", d, len(d)-(n-maxSocketPath), maxSocketPath)
		}
	}
	if !runtimePattern.MatchString(c.Runtime) {
		bad("Runtime %q is not an OCI runtime name", c.Runtime)
	}
	for _, d := range []struct {
		name string
		v    time.Duration
	}{{"CallTimeout", c.CallTimeout}, {"CreateTimeout", c.CreateTimeout}, {"ReadyTimeout", c.ReadyTimeout}, {"RunGrace", c.RunGrace}} {
		if d.v <= 0 {
			bad("%s %v must be positive", d.name, d.v)
		}
	}
	if c.RunMargin < 0 || c.RunMargin > time.Second {
		bad("RunMargin %v is outside [0, 1s]", c.RunMargin)
	}
	if c.MaxResultBytes < 1 || c.MaxResultBytes > 64*MiB {
		bad("MaxResultBytes %d is outside [1, 64 MiB]", c.MaxResultBytes)
	}
	if c.MaxConsoleBytes < 0 || c.MaxConsoleBytes > 16*MiB {
		bad("MaxConsoleBytes %d is outside [0, 16 MiB]", c.MaxConsoleBytes)
	}
	if need := c.minFrameBytes(); c.MaxFrameBytes < need || c.MaxFrameBytes > 1<<30 {
		bad("MaxFrameBytes %d must be at least %d (a full result and console, escaped) and at most 1 GiB", c.MaxFrameBytes, need)
	}
	if need := minRequestFrameBytes; c.MaxRequestBytes < need || c.MaxRequestBytes > 1<<30 {
		bad("MaxRequestBytes %d is outside [%d, 1 GiB]: it must fit the largest valid request, escaped", c.MaxRequestBytes, need)
	}
	if c.StderrTailBytes < 256 || c.StderrTailBytes > MiB {
		bad("StderrTailBytes %d is outside [256, 1 MiB]", c.StderrTailBytes)
	}
	return errors.Join(errs...)
}

// minFrameBytes is the smallest MaxFrameBytes that fits any reply the agent
// may send within the result and console limits.
func (c *Config) minFrameBytes() int {
	return c.MaxResultBytes + 6*c.MaxConsoleBytes + 16<<10
}

// minRequestFrameBytes fits the largest valid request: code at most
// protocol.MaxCodeBytes, each byte escaped to at most 6, and the input.
const minRequestFrameBytes = 6*protocol.MaxCodeBytes + protocol.MaxInputBytes + 4096

func randomHex(n int) string {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		panic(fmt.Sprintf("crypto/rand failed: %v", err)) // never happens on Linux
	}
	return hex.EncodeToString(b)
}
