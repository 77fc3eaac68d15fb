package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/isode-run/isode/pkg/dockerx"
	"github.com/isode-run/isode/pkg/fleet"
	"github.com/isode-run/isode/pkg/pool"
	"github.com/isode-run/isode/pkg/protocol"
)

// errInvalidConfig wraps every configuration error.
var errInvalidConfig = errors.New("invalid configuration")

// config is the worker's whole configuration.
type config struct {
	NATSURL   string // "" starts an embedded server
	Listen    string // embedded server's client address
	DataDir   string // embedded server's JetStream store
	WorkerID  string
	Prefix    string
	Shards    int
	LogLevel  string
	LogFormat string
	Grace     time.Duration
	DebugAddr string // pprof listener, "" for none
	// MetricsAddr is the Prometheus endpoint's listener, "" for none.
	MetricsAddr string
	Heartbeat   time.Duration // fleet membership heartbeat
	MemberTTL   time.Duration // fleet membership expiry
	// NATSConnectTimeout bounds the wait for the NATS server at start.
	NATSConnectTimeout time.Duration
	// ReapInterval is how often the reaper looks for sandboxes nobody
	// owns; OrphanGrace is how long another worker of the fleet must have
	// been gone before its running sandboxes are removed.
	ReapInterval time.Duration
	OrphanGrace  time.Duration

	Pool   pool.Config
	Docker dockerx.Config
	Fleet  fleet.Config

	// Sizes as given, parsed in parse.
	memory, tmpfs string
	cpus          float64
	agentSockets  string // --agent-sockets: auto, none or a directory

	// natsMaxControlLine is the max_control_line of the NATS server; it
	// moves to Fleet.MaxControlLine once fleet.Config has that field.
	natsMaxControlLine int
}

func defaultConfig() config {
	host, _ := os.Hostname()
	return config{
		Listen:    "127.0.0.1:4222",
		DataDir:   ".isode/nats",
		WorkerID:  defaultWorkerID(host),
		Prefix:    protocol.DefaultPrefix,
		Shards:    protocol.DefaultShards,
		LogLevel:  "info",
		LogFormat: "auto",
		Grace:     20 * time.Second,
		Heartbeat: 500 * time.Millisecond,
		MemberTTL: 2 * time.Second,
		Pool:      workerPoolDefaults(),
		Docker:    dockerx.DefaultConfig(),
		Fleet:     fleet.DefaultConfig(),
		memory:    "128MiB",
		tmpfs:     "16MiB",
		cpus:      1,

		agentSockets: "auto",

		NATSConnectTimeout: 60 * time.Second,
		ReapInterval:       30 * time.Second,
		OrphanGrace:        2 * time.Minute,
		natsMaxControlLine: defaultMaxControlLine,
	}
}

// Bounds of --max-control-line; the default is nats-server's own.
const (
	defaultMaxControlLine = 4096
	minMaxControlLine     = 1024
	maxMaxControlLine     = 1 << 20
)

// workerPoolDefaults are the pool's defaults, with a refill delay.
func workerPoolDefaults() pool.Config {
	c := pool.DefaultConfig()
	c.RefillDelay = 100 * time.Millisecond
	return c
}

var idUnsafe = regexp.MustCompile(`[^A-Za-z0-9_.-]+`)

// defaultWorkerID is the host name plus a short random suffix, so that a
// restarted worker is a new member and never adopts a dead one's containers.
func defaultWorkerID(host string) string {
	host = idUnsafe.ReplaceAllString(host, "-")
	if host == "" {
		host = "worker"
	}
	if len(host) > 40 {
		host = host[:40]
	}
	return fmt.Sprintf("%s-%04x", host, rand.Uint32()&0xffff)
}

// flagSet declares every setting with its environment variable; a flag on
// the command line wins over the environment, which wins over the default.
type flagSet struct {
	*flag.FlagSet
	envErr error
}

func (f *flagSet) env(name, envVar, usage string, set func(string) error, def string) {
	f.Func(name, fmt.Sprintf("%s (env %s, default %s)", usage, envVar, def), set)
	if v, ok := os.LookupEnv(envVar); ok && f.envErr == nil {
		if err := set(v); err != nil {
			f.envErr = fmt.Errorf("%w: %s=%q: %v", errInvalidConfig, envVar, v, err)
		}
	}
}

func (f *flagSet) str(p *string, name, envVar, usage string) {
	def := *p
	if def == "" {
		def = `""`
	}
	f.env(name, envVar, usage, func(s string) error { *p = s; return nil }, def)
}

func (f *flagSet) int(p *int, name, envVar, usage string) {
	f.env(name, envVar, usage, func(s string) error {
		n, err := strconv.Atoi(s)
		if err != nil {
			return errors.New("not a whole number")
		}
		*p = n
		return nil
	}, strconv.Itoa(*p))
}

func (f *flagSet) int64(p *int64, name, envVar, usage string) {
	f.env(name, envVar, usage, func(s string) error {
		n, err := strconv.ParseInt(s, 10, 64)
		if err != nil {
			return errors.New("not a whole number")
		}
		*p = n
		return nil
	}, strconv.FormatInt(*p, 10))
}

func (f *flagSet) dur(p *time.Duration, name, envVar, usage string) {
	f.env(name, envVar, usage, func(s string) error {
		d, err := time.ParseDuration(s)
		if err != nil {
			return errors.New("not a duration (e.g. 500ms, 2m)")
		}
		*p = d
		return nil
	}, p.String())
}

func (f *flagSet) boolean(p *bool, name, envVar, usage string) {
	set := func(s string) error {
		v, err := strconv.ParseBool(s)
		if err != nil {
			return errors.New("not a boolean (true or false)")
		}
		*p = v
		return nil
	}
	f.BoolFunc(name, fmt.Sprintf("%s (env %s, default %t)", usage, envVar, *p), set)
	if v, ok := os.LookupEnv(envVar); ok && f.envErr == nil {
		if err := set(v); err != nil {
			f.envErr = fmt.Errorf("%w: %s=%q: %v", errInvalidConfig, envVar, v, err)
		}
	}
}

func (f *flagSet) float(p *float64, name, envVar, usage string) {
	f.env(name, envVar, usage, func(s string) error {
		v, err := strconv.ParseFloat(s, 64)
		if err != nil {
			return errors.New("not a number")
		}
		*p = v
		return nil
	}, strconv.FormatFloat(*p, 'g', -1, 64))
}

// parseConfig reads the environment and args into a validated config.
func parseConfig(args []string, stderr io.Writer) (config, error) {
	c := defaultConfig()
	fs := &flagSet{FlagSet: flag.NewFlagSet("worker", flag.ContinueOnError)}
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintf(stderr, "Usage: worker [flags]\n\nRuns isode sandboxes for requests taken from NATS. Every flag can also be set\nby the environment variable named with it; a flag wins over the variable.\nThe Docker engine is found through DOCKER_HOST, else ISODE_SOCKET_PATH\n(default /var/run/docker.sock).\n\n")
		fs.PrintDefaults()
	}

	fs.str(&c.NATSURL, "nats", "ISODE_NATS_URL", "NATS server URL(s), comma-separated; empty starts an embedded JetStream server")
	fs.dur(&c.ReapInterval, "reap-interval", "ISODE_REAP_INTERVAL", "how often the reaper removes sandboxes nobody owns")
	fs.dur(&c.OrphanGrace, "orphan-grace", "ISODE_ORPHAN_GRACE", "how long another worker of the fleet must have been gone before the reaper removes its running sandboxes")
	fs.dur(&c.NATSConnectTimeout, "nats-connect-timeout", "ISODE_NATS_CONNECT_TIMEOUT", "at start, how long to wait for the NATS server before giving up")
	fs.int(&c.natsMaxControlLine, "max-control-line", "ISODE_NATS_MAX_CONTROL_LINE", "the max_control_line of the NATS server the worker connects to; subjects the worker publishes to are checked against it (the embedded server is given it)")
	fs.str(&c.Listen, "listen", "ISODE_LISTEN", "client address of the embedded NATS server")
	fs.str(&c.DataDir, "data-dir", "ISODE_DATA_DIR", "JetStream store directory of the embedded NATS server")
	fs.str(&c.WorkerID, "id", "ISODE_WORKER_ID", "worker id (default: host name plus a random suffix)")
	fs.str(&c.Prefix, "prefix", "ISODE_PREFIX", "subject prefix of the fleet")
	fs.int(&c.Shards, "shards", "ISODE_SHARDS", "shard count of the deployment (all workers and clients must agree)")
	fs.str(&c.LogLevel, "log-level", "ISODE_LOG_LEVEL", "log level: debug, info, warn, error")
	fs.str(&c.LogFormat, "log-format", "ISODE_LOG_FORMAT", "log format: json, console, or auto (console on a terminal)")
	fs.dur(&c.Grace, "grace", "ISODE_SHUTDOWN_GRACE", "on SIGTERM, how long runs in flight may take to finish")
	fs.str(&c.DebugAddr, "debug-addr", "ISODE_DEBUG_ADDR", "address of a pprof HTTP listener for profiling, e.g. 127.0.0.1:6060 (empty: none)")
	fs.str(&c.MetricsAddr, "metrics-addr", "ISODE_METRICS_ADDR", "address of the Prometheus endpoint (/metrics), e.g. 127.0.0.1:9464 (empty: none)")
	fs.dur(&c.Heartbeat, "heartbeat", "ISODE_HEARTBEAT", "fleet membership heartbeat")
	fs.dur(&c.MemberTTL, "member-ttl", "ISODE_MEMBER_TTL", "a worker silent this long is considered gone and its shards move")

	fs.int(&c.Pool.Low, "low", "ISODE_LOW", "low watermark L: free sandboxes kept ready for new tenants")
	fs.int(&c.Pool.High, "high", "ISODE_HIGH", "high watermark H: maximum sandboxes")
	fs.dur(&c.Pool.IdleTimeout, "idle", "ISODE_IDLE_TIMEOUT", "recycle a tenant's sandbox idle this long (0: never)")
	fs.int(&c.Pool.PerSandbox, "concurrency", "ISODE_CONCURRENCY", "snippets one sandbox (tenant) runs at once")
	fs.int(&c.Pool.QueueSize, "queue", "ISODE_QUEUE", "requests waiting for a sandbox, over all tenants")
	fs.int(&c.Pool.TenantQueueSize, "tenant-queue", "ISODE_TENANT_QUEUE", "requests waiting for a sandbox, per tenant")
	fs.int(&c.Pool.AppQueueSize, "app-queue", "ISODE_APP_QUEUE", "requests waiting for a sandbox, per application account (0: half of --queue); the rest wait in the stream, so that other applications' requests are still taken")
	fs.int(&c.Pool.MaxRequests, "max-requests", "ISODE_MAX_REQUESTS", "recycle a sandbox after this many runs (0: unlimited)")
	fs.dur(&c.Pool.MaxAge, "max-age", "ISODE_MAX_AGE", "recycle a sandbox this old (0: unlimited)")
	fs.int(&c.Pool.CreateConcurrency, "create-concurrency", "ISODE_CREATE_CONCURRENCY", "sandboxes created at once")
	fs.dur(&c.Pool.RefillDelay, "refill-delay", "ISODE_REFILL_DELAY", "wait this long before replacing a free sandbox a new tenant took, so its first run does not compete with a container start")

	fs.str(&c.Docker.Image, "image", "ISODE_IMAGE", "sandbox image: any image with Node.js 18+ (build the default with: make sandbox-image)")
	fs.str(&c.Docker.Node, "node", "ISODE_NODE", "node binary in the sandbox image: a name found on the image's PATH, or an absolute path")
	fs.str(&c.memory, "memory", "ISODE_MEMORY", "memory limit of each sandbox (no swap), e.g. 128MiB")
	fs.float(&c.cpus, "cpus", "ISODE_CPUS", "CPU limit of each sandbox, in CPUs")
	fs.int64(&c.Docker.PidsLimit, "pids", "ISODE_PIDS", "process/thread limit of each sandbox")
	fs.str(&c.tmpfs, "tmpfs", "ISODE_TMPFS", "size of each sandbox's /tmp (counts against memory)")
	fs.int(&c.Docker.WorkerHeapMB, "heap-mb", "ISODE_HEAP_MB", "V8 heap limit of each snippet thread, in MiB")
	fs.str(&c.Docker.Runtime, "runtime", "ISODE_RUNTIME", "OCI runtime for sandboxes, e.g. runsc (empty: the engine's default)")
	fs.boolean(&c.Docker.ShareNode, "share-node", "ISODE_SHARE_NODE", "run every sandbox's node from one copy of the image's node directory in a volume of this worker's (isode-node-<worker id>), mounted read-only over it, so that sandboxes share its code in memory: with storage drivers such as fuse-overlayfs each container otherwise runs a private copy")
	fs.str(&c.agentSockets, "agent-sockets", "ISODE_AGENT_SOCKETS", "where sandboxes' agents get their unix sockets, which spare each run the trip through dockerd and the container's shim: a directory that the Docker engine's host has at the same path; none: speak over the containers' attach streams; auto: a directory under the temporary directory when the engine is reached over a unix socket, none otherwise; a worker whose sandboxes cannot reach their sockets goes back to the attach streams, with a warning")

	fs.dur(&c.Fleet.MaxTimeout, "max-timeout", "ISODE_MAX_TIMEOUT", "cap on a request's run timeout")
	fs.dur(&c.Fleet.AckWait, "ack-wait", "ISODE_ACK_WAIT", "redelivery delay of a request whose worker went silent")
	fs.dur(&c.Fleet.MaxQueueWait, "max-queue-wait", "ISODE_MAX_QUEUE_WAIT", "longest a request waits (stream and pool) before it runs, whatever deadline it asks for")
	fs.int(&c.Fleet.MaxFailures, "max-failures", "ISODE_MAX_FAILURES", "deliveries of one request that may end without an answer (worker died, reply unpublishable) before it is dead-lettered")
	fs.int(&c.Fleet.MaxPendingCalls, "max-pending-calls", "ISODE_MAX_PENDING_CALLS", "plain calls (isode.call) this worker may have on their way to the stream; more are answered overloaded")
	fs.int64(&c.Fleet.StreamMaxMsgs, "stream-max-msgs", "ISODE_STREAM_MAX_MSGS", "requests the stream holds before it rejects new ones as overloaded")
	fs.int64(&c.Fleet.StreamMaxPerSubject, "stream-max-per-subject", "ISODE_STREAM_MAX_PER_SUBJECT", "requests one application holds in the stream for one shard before its new ones there are rejected as overloaded (others' are still taken)")
	fs.boolean(&c.Fleet.StreamMemory, "stream-memory", "ISODE_STREAM_MEMORY", "keep the request stream in memory: faster, but a restart of a single NATS server loses the requests waiting in it")
	fs.int(&c.Fleet.StreamReplicas, "stream-replicas", "ISODE_STREAM_REPLICAS", "replicas of the request stream (clustered NATS)")

	if fs.envErr != nil {
		return c, fs.envErr
	}
	if err := fs.Parse(args); err != nil {
		return c, err
	}
	if fs.NArg() > 0 {
		return c, fmt.Errorf("%w: unexpected argument %q", errInvalidConfig, fs.Arg(0))
	}
	return c, c.finish()
}

// finish derives the dependent settings and validates everything, naming
// the setting at fault.
func (c *config) finish() error {
	var err error
	if err := checkNATSURLs(c.NATSURL); err != nil {
		return fmt.Errorf("%w: --nats: %v", errInvalidConfig, err)
	}
	if c.ReapInterval <= 0 || c.OrphanGrace <= 0 {
		return fmt.Errorf("%w: --reap-interval %v and --orphan-grace %v must be positive", errInvalidConfig, c.ReapInterval, c.OrphanGrace)
	}
	if c.OrphanGrace < 2*c.MemberTTL {
		return fmt.Errorf("%w: --orphan-grace %v must be at least twice --member-ttl %v: a live worker may go unlisted that long", errInvalidConfig, c.OrphanGrace, c.MemberTTL)
	}
	if c.NATSConnectTimeout <= 0 {
		return fmt.Errorf("%w: --nats-connect-timeout %v must be positive", errInvalidConfig, c.NATSConnectTimeout)
	}
	if c.natsMaxControlLine < minMaxControlLine || c.natsMaxControlLine > maxMaxControlLine {
		return fmt.Errorf("%w: --max-control-line %d is not in [%d, %d]", errInvalidConfig, c.natsMaxControlLine, minMaxControlLine, maxMaxControlLine)
	}
	if c.Docker.Memory, err = parseBytes(c.memory); err != nil {
		return fmt.Errorf("%w: --memory %q: %v", errInvalidConfig, c.memory, err)
	}
	if c.Docker.TmpfsSize, err = parseBytes(c.tmpfs); err != nil {
		return fmt.Errorf("%w: --tmpfs %q: %v", errInvalidConfig, c.tmpfs, err)
	}
	if c.cpus <= 0 || c.cpus > 64 {
		return fmt.Errorf("%w: --cpus %g is not in (0, 64]", errInvalidConfig, c.cpus)
	}
	c.Docker.NanoCPUs = int64(c.cpus * 1e9)
	switch c.agentSockets {
	case "none":
		c.Docker.AgentSocketDir = ""
	case "auto":
		c.Docker.AgentSocketDir = autoAgentSockets(os.Getenv("DOCKER_HOST"))
	default:
		c.Docker.AgentSocketDir = c.agentSockets
	}
	c.Docker.WorkerID = c.WorkerID
	c.Docker.Concurrency = c.Pool.PerSandbox
	if c.Pool.PerSandbox <= 0 {
		c.Docker.Concurrency = pool.DefaultPerSandbox
	}
	switch c.LogFormat {
	case "json", "console", "auto":
	default:
		return fmt.Errorf("%w: --log-format %q: want json, console or auto", errInvalidConfig, c.LogFormat)
	}
	if c.Heartbeat <= 0 || c.MemberTTL < 2*c.Heartbeat {
		return fmt.Errorf("%w: --member-ttl %v must be at least twice --heartbeat %v", errInvalidConfig, c.MemberTTL, c.Heartbeat)
	}
	if c.Grace < 0 {
		return fmt.Errorf("%w: --grace %v is negative", errInvalidConfig, c.Grace)
	}
	c.Pool.CloseGrace = c.Grace
	c.Fleet.WorkerID = c.WorkerID
	c.Fleet.Prefix = c.Prefix
	c.Fleet.Shards = c.Shards
	c.Fleet.Heartbeat = c.Heartbeat
	c.Fleet.MemberTTL = c.MemberTTL
	c.Fleet.MaxControlLine = c.natsMaxControlLine
	if err := c.Pool.Validate(); err != nil {
		return fmt.Errorf("%w: %w", errInvalidConfig, err)
	}
	if err := c.Docker.Validate(); err != nil {
		return fmt.Errorf("%w: %w", errInvalidConfig, err)
	}
	return nil
}

// checkNATSURLs checks that every URL of a comma-separated list parses as
// nats.go will parse it. Its error shows the URL redacted: url.Parse's
// own error would quote it, password and all.
func checkNATSURLs(list string) error {
	if list == "" {
		return nil
	}
	for _, s := range strings.Split(list, ",") {
		s = strings.TrimSpace(s)
		if s == "" {
			continue // nats.go skips empty entries too
		}
		u, _, err := parseNATSURL(s)
		var ue *url.Error
		switch {
		case errors.As(err, &ue):
			return fmt.Errorf("%s is not a URL: %v", redactURL(s), ue.Err)
		case err != nil:
			return fmt.Errorf("%s is not a URL", redactURL(s))
		case u.Host == "":
			return fmt.Errorf("%s has no host", redactURL(s))
		}
	}
	return nil
}

// parseBytes reads sizes such as 512, 64k, 128MiB, 1G.
func parseBytes(s string) (int64, error) {
	t := strings.TrimSpace(strings.ToLower(s))
	mult := int64(1)
	for _, u := range []struct {
		suffix string
		mult   int64
	}{
		{"gib", 1 << 30}, {"mib", 1 << 20}, {"kib", 1 << 10},
		{"gb", 1 << 30}, {"mb", 1 << 20}, {"kb", 1 << 10},
		{"g", 1 << 30}, {"m", 1 << 20}, {"k", 1 << 10}, {"b", 1},
	} {
		if rest, ok := strings.CutSuffix(t, u.suffix); ok {
			t, mult = strings.TrimSpace(rest), u.mult
			break
		}
	}
	n, err := strconv.ParseInt(t, 10, 64)
	if err != nil || n <= 0 {
		return 0, errors.New("want a positive size such as 128MiB")
	}
	return n * mult, nil
}

// autoAgentSockets is the directory of --agent-sockets auto: one under the
// temporary directory, private to this user, when the engine is reached
// over a unix socket (dockerHost is DOCKER_HOST), "" (the attach streams)
// for a remote engine. A local engine may still not see the directory (a
// worker in a container without it shared): its first sandbox shows it,
// and the worker goes back to the attach streams (pkg/dockerx).
func autoAgentSockets(dockerHost string) string {
	if dockerHost != "" && !strings.HasPrefix(dockerHost, "unix://") {
		return ""
	}
	return filepath.Join(os.TempDir(), fmt.Sprintf("isode-agents-%d", os.Getuid()))
}
