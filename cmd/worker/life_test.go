package main

// Tests of the worker's life cycle around NATS: redaction of NATS URLs, the
// embedded server's warning, waiting for NATS at start, and exiting when
// the connection is closed for good (life_process_test.go).

import (
	"bytes"
	"fmt"
	"path/filepath"
	"strings"
	"testing"

	"github.com/rs/zerolog"

	"github.com/isode-run/isode/internal/testenv"
)

func TestLifeRedactURLs(t *testing.T) {
	tests := []struct {
		name, give, want string
	}{
		{name: "no credentials", give: "nats://127.0.0.1:4222", want: "nats://127.0.0.1:4222"},
		{name: "user and password", give: "nats://worker:s3cret@nats:4222", want: "nats://worker:xxxxx@nats:4222"},
		{name: "token", give: "nats://s3cret@nats:4222", want: "nats://xxxxx@nats:4222"},
		{name: "empty password", give: "nats://worker:@nats:4222", want: "nats://worker:xxxxx@nats:4222"},
		{name: "no scheme", give: "worker:s3cret@nats:4222", want: "worker:xxxxx@nats:4222"},
		{name: "tls", give: "tls://worker:s3cret@nats.example:4443", want: "tls://worker:xxxxx@nats.example:4443"},
		{name: "escaped password", give: "nats://worker:s%2F3cret%40@nats:4222", want: "nats://worker:xxxxx@nats:4222"},
		{name: "@ inside the password", give: "nats://worker:s3@cret@nats:4222", want: "nats://worker:xxxxx@nats:4222"},
		{name: "list", give: "nats://a:s3cret@n1:4222, nats://n2:4222,s3cret@n3:4222",
			want: "nats://a:xxxxx@n1:4222,nats://n2:4222,xxxxx@n3:4222"},
		{name: "not a URL", give: "nats://worker:s3cret@nats:port", want: "nats://xxxxx@nats:port"},
		{name: "not a URL, no scheme", give: "worker:s3cret@ho st", want: "xxxxx@ho st"},
		{name: "empty", give: "", want: ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := redactURLs(tt.give)
			if got != tt.want {
				t.Errorf("redactURLs(%q) = %q, want %q", tt.give, got, tt.want)
			}
			if strings.Contains(got, "s3") || strings.Contains(got, "cret") {
				t.Errorf("redactURLs(%q) = %q still shows the secret", tt.give, got)
			}
		})
	}
}

// TestLifeBadNATSURLHidesThePassword: a --nats URL that does not parse is
// refused with the password hidden (url.Parse's own error quotes it).
func TestLifeBadNATSURLHidesThePassword(t *testing.T) {
	var stderr bytes.Buffer
	_, err := parseConfig([]string{"--nats", "nats://worker:s3cret@nats:port"}, &stderr)
	if err == nil || !strings.Contains(err.Error(), "--nats") || !strings.Contains(err.Error(), "nats://xxxxx@nats:port") {
		t.Fatalf("err = %v, want it to name --nats and the redacted URL", err)
	}
	if strings.Contains(err.Error(), "s3cret") {
		t.Errorf("the error shows the password: %v", err)
	}
}

// TestLifeEmbeddedWarnsBeyondLoopback: the embedded server has no
// authentication, so listening beyond loopback earns a warning that says
// what to do instead; on loopback it stays quiet.
func TestLifeEmbeddedWarnsBeyondLoopback(t *testing.T) {
	for _, tt := range []struct {
		host string
		warn bool
	}{
		{host: "127.0.0.1", warn: false},
		{host: "localhost", warn: false},
		{host: "0.0.0.0", warn: true},
		{host: "", warn: true},
	} {
		t.Run(fmt.Sprintf("%q", tt.host), func(t *testing.T) {
			var buf testenv.SyncBuffer
			log := zerolog.New(&buf)
			listen := fmt.Sprintf("%s:%d", tt.host, testenv.FreePort(t))
			s, err := startEmbedded(listen, filepath.Join(t.TempDir(), "nats"), 2048, log)
			if err != nil {
				t.Fatal(err)
			}
			defer func() { s.Shutdown(); s.WaitForShutdown() }()
			warned := strings.Contains(buf.String(), "without authentication")
			if warned != tt.warn {
				t.Fatalf("listen %s: warned %v, want %v; log:\n%s", listen, warned, tt.warn, buf.String())
			}
			if tt.warn {
				for _, want := range []string{`"level":"warn"`, "--nats", "deploy/nats.conf", "127.0.0.1"} {
					if !strings.Contains(buf.String(), want) {
						t.Errorf("the warning does not say %q:\n%s", want, buf.String())
					}
				}
			}
			if v, err := s.Varz(nil); err != nil {
				t.Error(err)
			} else if v.MaxControlLine != 2048 {
				t.Errorf("embedded server's max_control_line = %d, want the setting, 2048", v.MaxControlLine)
			}
		})
	}
}
