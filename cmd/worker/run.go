package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/url"
	"strings"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/rs/zerolog"

	"github.com/isode-run/isode/pkg/dockerx"
	"github.com/isode-run/isode/pkg/fleet"
	"github.com/isode-run/isode/pkg/pool"
	"github.com/isode-run/isode/pkg/protocol"
)

// run is the whole worker: it returns when ctx ends (after a graceful
// drain) or on a fatal error. abort ends a drain early.
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

	// NATS: the embedded server, or the one named.
	var embedded *server.Server
	ncClosed := make(chan struct{})
	natsOpts := []nats.Option{
		nats.ClosedHandler(func(*nats.Conn) { close(ncClosed) }),
		nats.Name("isode-worker " + cfg.WorkerID),
		// Its own inbox prefix, so a NATS permission can give applications
		// _INBOX.> without letting them read the requests workers pull.
		nats.CustomInboxPrefix("_ISODE_WORKER"),
		nats.MaxReconnects(-1),
		nats.ReconnectWait(250 * time.Millisecond),
		nats.DisconnectErrHandler(func(_ *nats.Conn, err error) {
			log.Warn().Err(err).Msg("disconnected from NATS")
		}),
		nats.ReconnectHandler(func(nc *nats.Conn) {
			log.Info().Str("url", redactURLs(nc.ConnectedUrl())).Msg("reconnected to NATS")
		}),
	}
	natsURL := cfg.NATSURL
	if natsURL == "" {
		embedded, err = startEmbedded(cfg.Listen, cfg.DataDir, cfg.natsMaxControlLine, log)
		if err != nil {
			return err
		}
		defer embedded.Shutdown()
		natsURL = embedded.ClientURL()
		natsOpts = append(natsOpts, nats.InProcessServer(embedded))
		log.Info().Str("url", redactURLs(natsURL)).Str("data", cfg.DataDir).Msg("embedded NATS server started")
	}
	nc, err := nats.Connect(natsURL, natsOpts...)
	if err != nil {
		return fmt.Errorf("connect to NATS at %s: %w", redactURLs(natsURL), err)
	}
	defer nc.Close()

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
	log.Info().
		Int("shards", len(w.Owned())).Int("low", cfg.Pool.Low).Int("high", cfg.Pool.High).
		Int("capacity", cfg.Fleet.Capacity).Str("image", cfg.Docker.Image).
		Msg("worker ready")

	<-ctx.Done()

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

func poolStats(s pool.Stats) protocol.PoolStats {
	return protocol.PoolStats{
		Free: s.Free, Assigned: s.Assigned, Busy: s.Busy, Creating: s.Creating,
		Queued: s.Queued, Low: s.Low, High: s.High,
		Hits: s.Hits, PoolHits: s.PoolHits, ColdStarts: s.ColdStarts,
		Evictions: s.Evictions, Recycles: s.Recycles, Deaths: s.Deaths,
		Failures: s.CreateFailures, Rejected: s.Rejections, QueueTimeouts: s.QueueTimeouts,
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
