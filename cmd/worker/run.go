package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/url"
	"runtime"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/rs/zerolog"

	"github.com/isode-run/isode/pkg/dockerx"
	"github.com/isode-run/isode/pkg/fleet"
	"github.com/isode-run/isode/pkg/metrics"
	"github.com/isode-run/isode/pkg/pool"
	"github.com/isode-run/isode/pkg/protocol"
)

// run is the whole worker: it returns when ctx ends (after a graceful
// drain) or on a fatal error, a NATS connection closed for good among
// them. abort ends a drain early.
func run(ctx, abort context.Context, args []string, stdout, stderr io.Writer) error {
	cfg, err := parseConfig(args, stderr)
	if err != nil {
		return err
	}
	log, err := newLogger(stderr, cfg.LogLevel, cfg.LogFormat)
	if err != nil {
		return fmt.Errorf("%w: --log-level %q: %v", errInvalidConfig, cfg.LogLevel, err)
	}
	log = log.With().Str("worker", cfg.WorkerID).Logger()
	cfg.Pool.Logger = log.With().Str("component", "pool").Logger()
	cfg.Fleet.Logger = log.With().Str("component", "fleet").Logger()
	cfg.Docker.Logger = slog.New(zerolog.NewSlogHandler(log.With().Str("component", "docker").Logger()))

	if cfg.DebugAddr != "" {
		stopDebug, err := serveDebug(cfg.DebugAddr, log)
		if err != nil {
			return err
		}
		defer stopDebug()
	}
	// The Prometheus endpoint, from the start (a bad address stops the
	// worker before anything else); the pool's gauges join it later.
	var met *metrics.Metrics
	if cfg.MetricsAddr != "" {
		met = metrics.New()
		srv, err := met.Serve(cfg.MetricsAddr)
		if err != nil {
			return fmt.Errorf("%w: --metrics-addr %q: %w", errInvalidConfig, cfg.MetricsAddr, err)
		}
		log.Info().Str("addr", srv.Addr().String()).Msg("metrics listening")
		defer func() {
			cctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			defer cancel()
			if err := srv.Close(cctx); err != nil {
				log.Warn().Err(err).Msg("metrics listener")
			}
		}()
	}

	// NATS: the embedded server, or the one named.
	var embedded *server.Server
	natsURL := cfg.NATSURL
	if natsURL == "" {
		embedded, err = startEmbedded(cfg.Listen, cfg.DataDir, cfg.natsMaxControlLine, log)
		if err != nil {
			return err
		}
		defer embedded.Shutdown()
		natsURL = embedded.ClientURL()
		log.Info().Str("url", redactURLs(natsURL)).Str("data", cfg.DataDir).Msg("embedded NATS server started")
	}
	nc, ncClosed, err := connectNATS(ctx, natsURL, embedded, cfg, log)
	if err != nil || nc == nil {
		return err // nil: ctx ended while waiting for NATS
	}
	defer nc.Close()

	// The fleet's identity labels every sandbox, so that the reaper only
	// ever removes its own fleet's.
	fctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	cfg.Docker.Fleet, err = fleet.FleetID(fctx, nc, cfg.Fleet)
	cancel()
	if err != nil {
		return fmt.Errorf("set up the request stream: %w", err)
	}

	// Docker and the pool.
	rt, err := dockerx.New(ctx, cfg.Docker)
	if err != nil {
		return err
	}
	defer func() {
		cctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := rt.Close(cctx); err != nil {
			log.Warn().Err(err).Msg("close docker runtime")
		}
	}()
	// The image, once: node must run in it under the full hardening.
	img, err := rt.CheckImage(ctx)
	if err != nil {
		return err
	}
	log.Info().Str("image", img.Image).Str("node", img.Node).Strs("modules", img.Modules).Msg("sandbox image checked")
	if n, err := rt.Reap(ctx, time.Minute); err != nil {
		log.Warn().Err(err).Msg("reap leftover sandboxes")
	} else if n > 0 {
		log.Info().Int("removed", n).Msg("reaped leftover sandboxes")
	}
	p, err := pool.New(pool.RuntimeFunc(func(ctx context.Context, tenant string) (pool.Sandbox, error) {
		sb, err := rt.Create(ctx, tenant)
		if err != nil {
			return nil, err
		}
		return sb, nil
	}), cfg.Pool)
	if err != nil {
		return fmt.Errorf("%w: %w", errInvalidConfig, err)
	}
	poolClosed := false
	defer func() {
		if !poolClosed {
			cctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			p.Close(cctx)
		}
	}()

	// The NATS side.
	cfg.Fleet.Capacity = p.Capacity()
	if err := cfg.Fleet.Validate(); err != nil {
		return fmt.Errorf("%w: %w", errInvalidConfig, err)
	}
	if met != nil {
		cfg.Fleet.OnUsage = met.Observe
	}
	w, err := fleet.New(nc, p, func() protocol.PoolStats { return poolStats(p.Stats()) }, cfg.Fleet)
	if err != nil {
		return err
	}
	sctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	err = w.Start(sctx)
	cancel()
	if err != nil {
		return fmt.Errorf("start consuming: %w", err)
	}
	if met != nil {
		met.Watch(metrics.Sources{
			Pool:       func() metrics.Pool { return poolGauges(p.Stats()) },
			Reconnects: func() uint64 { return nc.Stats().Reconnects },
			Shards:     func() int { return len(w.Owned()) },
		})
	}
	// Sandboxes nobody owns: this worker's leftovers, containers that never
	// started, and running sandboxes of workers that left the fleet (a
	// snippet can keep its agent alive past its worker's death).
	rt.StartReaper(cfg.ReapInterval, cfg.OrphanGrace, w.Alive)
	log.Info().
		Int("shards", len(w.Owned())).Int("low", cfg.Pool.Low).Int("high", cfg.Pool.High).
		Int("capacity", cfg.Fleet.Capacity).Str("image", cfg.Docker.Image).
		Int("gomaxprocs", runtime.GOMAXPROCS(0)).
		Msg("worker ready")

	select {
	case <-ctx.Done():
	case <-ncClosed:
		// Closed while serving, not by us: a fatal -ERR from the server
		// (nats.go does not reconnect after those). Staying up would serve
		// nothing; exit so that a supervisor starts a fresh worker.
		cause := nc.LastError()
		if cause == nil {
			cause = errors.New("no error reported")
		}
		log.Error().Err(cause).Str("url", redactURLs(natsURL)).
			Msg("NATS connection closed for good; it will not reconnect: stopping the worker (its requests are redelivered to others)")
		abandon(w, p, log)
		poolClosed = true
		return fmt.Errorf("%w (%s): %w", errNATSClosed, redactURLs(natsURL), cause)
	}

	// Drain: stop pulling; requests waiting in the pool are handed back to
	// the stream for another worker; runs in flight get the grace period.
	log.Info().Dur("grace", cfg.Grace).Msg("shutting down: no new requests; finishing runs in flight")
	w.StopPulling()
	dctx, cancel := context.WithTimeout(context.Background(), cfg.Grace+5*time.Second)
	defer cancel()
	go func() {
		select {
		case <-abort.Done():
			log.Warn().Msg("second signal: aborting runs in flight; they will be redelivered")
			w.Abort()
			cancel()
		case <-dctx.Done():
		}
	}()
	closeErr := make(chan error, 1)
	go func() { closeErr <- p.Close(dctx) }()
	if err := w.Wait(dctx); err != nil {
		w.Abort()
		log.Warn().Err(err).Msg("runs still in flight after the grace period; left for redelivery")
	}
	if err := <-closeErr; err != nil {
		log.Warn().Err(err).Msg("close pool")
	}
	poolClosed = true
	if err := nc.Drain(); err != nil && !errors.Is(err, nats.ErrConnectionClosed) {
		log.Warn().Err(err).Msg("drain NATS connection")
	}
	select {
	case <-ncClosed:
	case <-time.After(5 * time.Second):
		log.Warn().Msg("NATS connection did not drain within 5s")
	}
	log.Info().Msg("stopped")
	return nil
}

// abandon stops a worker whose NATS connection is closed for good. Nothing
// it runs can be answered or acknowledged any more, so runs in flight are
// cancelled at once (JetStream redelivers their requests to another worker
// after the ack wait) and the pool is closed, each step within a bound; the
// caller then closes the Docker runtime, which removes the containers.
func abandon(w *fleet.Worker, p *pool.Pool, log zerolog.Logger) {
	w.Abort()
	// StopPulling only cancels loops and deletes the members key (which
	// fails at once on a closed connection); bounded all the same, because
	// a worker that hangs here is the failure this path exists to avoid. If
	// it does not return, its goroutine ends with the process.
	stopped := make(chan struct{})
	go func() {
		w.StopPulling()
		close(stopped)
	}()
	select {
	case <-stopped:
	case <-time.After(5 * time.Second):
		log.Warn().Msg("stop pulling: not done within 5s; exiting anyway")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := w.Wait(ctx); err != nil {
		log.Warn().Err(err).Msg("aborted runs did not end within 10s")
	}
	if err := p.Close(ctx); err != nil {
		log.Warn().Err(err).Msg("close pool")
	}
}

func poolStats(s pool.Stats) protocol.PoolStats {
	return protocol.PoolStats{
		Free: s.Free, Assigned: s.Assigned, Busy: s.Busy, Creating: s.Creating,
		Queued: s.Queued, Low: s.Low, High: s.High,
		Hits: s.Hits, PoolHits: s.PoolHits, ColdStarts: s.ColdStarts,
		Evictions: s.Evictions, Recycles: s.Recycles, Deaths: s.Deaths,
		Failures: s.CreateFailures, Rejected: s.Rejections, QueueTimeouts: s.QueueTimeouts,
	}
}

// poolGauges is what the metrics endpoint reads of the pool at a scrape.
func poolGauges(s pool.Stats) metrics.Pool {
	g := metrics.Pool{Free: s.Free, Assigned: s.Assigned, Busy: s.Busy, Creating: s.Creating, Queued: s.Queued,
		// The causes a sandbox dies of, at zero until one does, so that
		// rate() has a series from the start.
		Deaths: map[string]uint64{string(protocol.CodeOutOfMemory): 0, string(protocol.CodeSandboxCrashed): 0}}
	for c, n := range s.DeathCauses {
		g.Deaths[string(c)] = n
	}
	return g
}

// natsPingInterval is how often the worker pings its NATS server; the
// connection is given up (and another server of the cluster tried) after
// two unanswered pings.
const natsPingInterval = 2 * time.Second

// Errors of the worker's NATS connection.
var (
	// errNATSUnreachable: no NATS server was reachable within
	// --nats-connect-timeout of the start.
	errNATSUnreachable = errors.New("NATS server not reachable")
	// errNATSClosed: the connection was closed for good while serving.
	errNATSClosed = errors.New("NATS connection closed for good")
)

// natsWaitProgress is how often the wait for NATS at start says it still waits.
const natsWaitProgress = 10 * time.Second

// connectNATS connects to natsURL (the embedded server when embedded is not
// nil) and waits until it is connected, at most cfg.NATSConnectTimeout: a
// worker started at the same moment as its NATS server, as compose and
// systemd start them, waits for it instead of exiting. Once connected, the
// connection reconnects forever after a network loss. connectNATS returns
// the connection and a channel closed once the connection is closed for
// good, or a nil connection and a nil error when ctx ended while waiting.
func connectNATS(ctx context.Context, natsURL string, embedded *server.Server, cfg config, log zerolog.Logger) (*nats.Conn, <-chan struct{}, error) {
	shown := redactURLs(natsURL)
	var (
		connected, closed       = make(chan struct{}), make(chan struct{})
		connectOnce, closedOnce sync.Once
		mu                      sync.Mutex
		lastErr                 error // of the last failed connection attempt
	)
	last := func() string {
		mu.Lock()
		defer mu.Unlock()
		if lastErr == nil {
			return "none reported"
		}
		return lastErr.Error()
	}
	opts := []nats.Option{
		nats.Name("isode-worker " + cfg.WorkerID),
		// Its own inbox prefix, so a NATS permission can give applications
		// _INBOX.> without letting them read the requests workers pull.
		nats.CustomInboxPrefix("_ISODE_WORKER"),
		nats.RetryOnFailedConnect(true),
		nats.MaxReconnects(-1),
		nats.ReconnectWait(250 * time.Millisecond),
		// A server cut off by the network sends no error: only missed
		// pongs tell. nats.go's default (a ping every 2 minutes, two
		// missed) left a worker attached to a partitioned server for
		// minutes; this way it moves to another server of the cluster
		// within about 6 s.
		nats.PingInterval(natsPingInterval),
		// The same for writes: the flusher holds the connection's lock
		// while it writes, pings included, so a write stuck on a dead
		// peer (nats.go waits a minute by default) also hid it for that long.
		nats.FlusherTimeout(2 * natsPingInterval),
		nats.ConnectHandler(func(nc *nats.Conn) {
			log.Info().Str("url", redactURLs(nc.ConnectedUrl())).Msg("connected to NATS")
			connectOnce.Do(func() { close(connected) })
		}),
		nats.ClosedHandler(func(*nats.Conn) { closedOnce.Do(func() { close(closed) }) }),
		nats.ReconnectErrHandler(func(_ *nats.Conn, err error) {
			mu.Lock()
			lastErr = err
			mu.Unlock()
		}),
		// Asynchronous errors (permission violations, slow consumers, the
		// -ERR before a close) go to the log, not to nats.go's bare stderr line.
		nats.ErrorHandler(func(_ *nats.Conn, sub *nats.Subscription, err error) {
			ev := log.Warn().Err(err)
			if sub != nil {
				ev = ev.Str("subject", sub.Subject)
			}
			ev.Msg("NATS error")
		}),
		nats.DisconnectErrHandler(func(_ *nats.Conn, err error) {
			log.Warn().Err(err).Msg("disconnected from NATS")
		}),
		nats.ReconnectHandler(func(nc *nats.Conn) {
			log.Info().Str("url", redactURLs(nc.ConnectedUrl())).Msg("reconnected to NATS")
		}),
	}
	if embedded != nil {
		opts = append(opts, nats.InProcessServer(embedded))
	}
	nc, err := nats.Connect(natsURL, opts...)
	if err != nil {
		return nil, nil, fmt.Errorf("connect to NATS at %s: %w", shown, err)
	}
	if !nc.IsConnected() {
		log.Info().Str("url", shown).Dur("timeout", cfg.NATSConnectTimeout).Msg("waiting for NATS at " + shown)
	}
	began := time.Now()
	timeout := time.NewTimer(cfg.NATSConnectTimeout)
	defer timeout.Stop()
	progress := time.NewTicker(natsWaitProgress)
	defer progress.Stop()
	for {
		select {
		case <-connected:
			return nc, closed, nil
		case <-closed:
			// Refused for good, e.g. the same authorization error twice.
			cause := nc.LastError()
			if cause == nil {
				cause = errors.New(last())
			}
			return nil, nil, fmt.Errorf("connect to NATS at %s: %w", shown, cause)
		case <-ctx.Done():
			nc.Close()
			log.Info().Str("url", shown).Msg("stopped while waiting for NATS")
			return nil, nil, nil
		case <-progress.C:
			log.Info().Str("url", shown).Dur("waited", time.Since(began).Round(time.Second)).
				Dur("timeout", cfg.NATSConnectTimeout).Str("last_error", last()).Msg("still waiting for NATS")
		case <-timeout.C:
			nc.Close()
			return nil, nil, fmt.Errorf("%w at %s within %v (--nats-connect-timeout); last attempt: %s",
				errNATSUnreachable, shown, cfg.NATSConnectTimeout, last())
		}
	}
}

// redactURLs returns a comma-separated list of NATS URLs fit to log or put
// in an error: each password is replaced as net/url's Redacted does, and a
// user name without a password, which NATS reads as a token, is replaced
// whole. Everything log lines and errors of this package show of a NATS URL
// goes through it.
func redactURLs(list string) string {
	parts := strings.Split(list, ",")
	for i, p := range parts {
		parts[i] = redactURL(strings.TrimSpace(p))
	}
	return strings.Join(parts, ",")
}

const redacted = "xxxxx" // as net/url's URL.Redacted writes a password

func redactURL(s string) string {
	if s == "" {
		return s
	}
	u, schemeless, err := parseNATSURL(s)
	if err != nil {
		// Not a URL: show only what follows the last '@', the host.
		at := strings.LastIndex(s, "@")
		if at < 0 {
			return s
		}
		scheme := ""
		if i := strings.Index(s, "://"); i >= 0 && i < at {
			scheme = s[:i+3]
		}
		return scheme + redacted + "@" + s[at+1:]
	}
	if u.User != nil {
		if _, ok := u.User.Password(); !ok {
			u.User = url.User(redacted) // a token
		}
	}
	out := u.Redacted()
	if schemeless {
		out = strings.TrimPrefix(out, "nats://")
	}
	return out
}

// parseNATSURL parses one NATS URL as nats.go does: "host:port" without a
// scheme is read as nats://host:port (schemeless reports that).
func parseNATSURL(s string) (u *url.URL, schemeless bool, err error) {
	if !strings.Contains(s, "://") {
		s, schemeless = "nats://"+s, true
	}
	u, err = url.Parse(s)
	return u, schemeless, err
}
