package main

// Tests of the worker's life cycle around NATS: redaction of NATS URLs, the
// embedded server's warning, waiting for NATS at start, and exiting when
// the connection is closed for good (life_process_test.go).

import (
	"bytes"
	"strings"
	"testing"
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
