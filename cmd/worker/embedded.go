package main

import (
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/rs/zerolog"
)

// startEmbedded starts a JetStream-enabled NATS server in this process, so
// that one machine needs nothing else. Its store lives under dataDir; its
// max_control_line is maxControlLine. It has no authentication: it warns
// when it listens on anything but loopback.
func startEmbedded(listen, dataDir string, maxControlLine int, log zerolog.Logger) (*server.Server, error) {
	host, portStr, err := net.SplitHostPort(listen)
	if err != nil {
		return nil, fmt.Errorf("%w: --listen %q: %v", errInvalidConfig, listen, err)
	}
	port, err := strconv.Atoi(portStr)
	if err != nil || port < 0 || port > 65535 {
		return nil, fmt.Errorf("%w: --listen %q: bad port", errInvalidConfig, listen)
	}
	// Say plainly when the port is taken, typically by another worker with
	// its own embedded server: connect to that one instead.
	if l, err := net.Listen("tcp", listen); err != nil {
		return nil, fmt.Errorf("embedded NATS server cannot listen on %s (%v): another server runs there? pass --nats nats://%s to use it", listen, err, listen)
	} else {
		l.Close()
	}
	if !loopback(host) {
		log.Warn().Str("listen", listen).
			Msg("the embedded NATS server listens beyond loopback without authentication: anyone who reaches this port can submit snippets, read every reply and change or delete the request stream. Keep --listen on 127.0.0.1, or run a NATS server with users and permissions (see deploy/nats.conf) and pass it to every worker with --nats")
	}
	if err := os.MkdirAll(dataDir, 0o750); err != nil {
		return nil, fmt.Errorf("embedded NATS data directory: %w", err)
	}
	s, err := server.NewServer(&server.Options{
		ServerName: "isode-embedded",
		Host:       host,
		Port:       port,
		JetStream:  true,
		StoreDir:   dataDir,
		NoSigs:     true,
		// The setting says what the server enforces; here the worker sets it.
		MaxControlLine: int32(maxControlLine),
	})
	if err != nil {
		return nil, fmt.Errorf("embedded NATS server: %w", err)
	}
	s.SetLoggerV2(natsLogger{log.With().Str("component", "nats-server").Logger()}, false, false, false)
	s.Start()
	if !s.ReadyForConnections(10 * time.Second) {
		s.Shutdown()
		return nil, errors.New("embedded NATS server did not become ready within 10s")
	}
	return s, nil
}

// loopback reports whether host (of a listen address) is a loopback
// address or localhost; "" and 0.0.0.0 listen on every interface.
func loopback(host string) bool {
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// natsLogger sends the embedded server's log to zerolog.
type natsLogger struct{ log zerolog.Logger }

func (l natsLogger) Noticef(format string, v ...any) { l.log.Debug().Msgf(format, v...) }
func (l natsLogger) Warnf(format string, v ...any)   { l.log.Warn().Msgf(format, v...) }
func (l natsLogger) Fatalf(format string, v ...any)  { l.log.Error().Msgf(format, v...) }
func (l natsLogger) Errorf(format string, v ...any)  { l.log.Error().Msgf(format, v...) }
func (l natsLogger) Debugf(format string, v ...any)  { l.log.Trace().Msgf(format, v...) }
func (l natsLogger) Tracef(format string, v ...any)  { l.log.Trace().Msgf(format, v...) }
