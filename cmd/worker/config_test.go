package main

import (
	"bytes"
	"errors"
	"flag"
	"os"
	"strings"
	"testing"
	"time"
)

func TestParseConfig(t *testing.T) {
	tests := []struct {
		name    string
		env     map[string]string
		args    []string
		check   func(t *testing.T, c config)
		wantErr string
	}{
		{name: "defaults", check: func(t *testing.T, c config) {
			if c.NATSURL != "" || c.Pool.Low != 2 || c.Pool.High != 16 || c.Docker.Image != "isode-sandbox:latest" || c.Shards != 64 {
				t.Errorf("defaults: %+v", c)
			}
			if c.WorkerID == "" || c.Docker.WorkerID != c.WorkerID || c.Fleet.WorkerID != c.WorkerID {
				t.Errorf("worker id not propagated: %q %q %q", c.WorkerID, c.Docker.WorkerID, c.Fleet.WorkerID)
			}
			if c.Docker.Memory != 128<<20 || c.Docker.NanoCPUs != 1e9 || c.Docker.Concurrency != c.Pool.PerSandbox {
				t.Errorf("sandbox limits: %+v", c.Docker)
			}
			if c.NATSConnectTimeout != 60*time.Second || c.natsMaxControlLine != 4096 {
				t.Errorf("NATS defaults: connect timeout %v, max control line %d", c.NATSConnectTimeout, c.natsMaxControlLine)
			}
		}},
		{name: "agent sockets off", args: []string{"--agent-sockets", "none"}, check: func(t *testing.T, c config) {
			if c.Docker.AgentSocketDir != "" {
				t.Errorf("--agent-sockets none gave %q", c.Docker.AgentSocketDir)
			}
		}},
		{name: "agent sockets in a directory", env: map[string]string{"ISODE_AGENT_SOCKETS": "/run/isode/agents"}, check: func(t *testing.T, c config) {
			if c.Docker.AgentSocketDir != "/run/isode/agents" {
				t.Errorf("ISODE_AGENT_SOCKETS gave %q", c.Docker.AgentSocketDir)
			}
		}},
		{name: "agent sockets relative", args: []string{"--agent-sockets", "run/agents"}, wantErr: "AgentSocketDir"},
		{name: "agent sockets too deep", args: []string{"--agent-sockets", "/" + strings.Repeat("d", 90)}, wantErr: "AgentSocketDir"},
		{name: "max pending calls", args: []string{"--max-pending-calls", "7"}, check: func(t *testing.T, c config) {
			if c.Fleet.MaxPendingCalls != 7 {
				t.Errorf("max pending calls %d", c.Fleet.MaxPendingCalls)
			}
		}},
		{name: "NATS settings from the environment", env: map[string]string{"ISODE_NATS_CONNECT_TIMEOUT": "5m", "ISODE_NATS_MAX_CONTROL_LINE": "8192"},
			check: func(t *testing.T, c config) {
				if c.NATSConnectTimeout != 5*time.Minute || c.natsMaxControlLine != 8192 {
					t.Errorf("env not applied: connect timeout %v, max control line %d", c.NATSConnectTimeout, c.natsMaxControlLine)
				}
			}},
		{name: "NATS settings from flags", args: []string{"--nats-connect-timeout", "1s", "--max-control-line", "1024", "--nats", "a:s3cret@n1:4222, nats://n2:4222,"},
			check: func(t *testing.T, c config) {
				if c.NATSConnectTimeout != time.Second || c.natsMaxControlLine != 1024 {
					t.Errorf("flags not applied: connect timeout %v, max control line %d", c.NATSConnectTimeout, c.natsMaxControlLine)
				}
			}},
		{name: "max control line at the top", args: []string{"--max-control-line", "1048576"},
			check: func(t *testing.T, c config) {
				if c.natsMaxControlLine != 1<<20 {
					t.Errorf("max control line %d", c.natsMaxControlLine)
				}
			}},
		{name: "max control line too small", args: []string{"--max-control-line", "1023"}, wantErr: "--max-control-line"},
		{name: "max control line too large", args: []string{"--max-control-line", "1048577"}, wantErr: "--max-control-line"},
		{name: "bad max control line in the environment", env: map[string]string{"ISODE_NATS_MAX_CONTROL_LINE": "4k"}, wantErr: "ISODE_NATS_MAX_CONTROL_LINE"},
		{name: "zero connect timeout", args: []string{"--nats-connect-timeout", "0s"}, wantErr: "--nats-connect-timeout"},
		{name: "negative connect timeout", env: map[string]string{"ISODE_NATS_CONNECT_TIMEOUT": "-1s"}, wantErr: "--nats-connect-timeout"},
		{name: "bad connect timeout in the environment", env: map[string]string{"ISODE_NATS_CONNECT_TIMEOUT": "soon"}, wantErr: "ISODE_NATS_CONNECT_TIMEOUT"},
		{name: "NATS URL without a host", args: []string{"--nats", "nats://"}, wantErr: "--nats"},
		{name: "environment", env: map[string]string{"ISODE_NATS_URL": "nats://n:4222", "ISODE_LOW": "3", "ISODE_IMAGE": "img:1", "ISODE_IDLE_TIMEOUT": "30s", "ISODE_MEMORY": "256MiB", "ISODE_STREAM_MEMORY": "true"},
			check: func(t *testing.T, c config) {
				if c.NATSURL != "nats://n:4222" || c.Pool.Low != 3 || c.Docker.Image != "img:1" || c.Pool.IdleTimeout != 30*time.Second || c.Docker.Memory != 256<<20 || !c.Fleet.StreamMemory {
					t.Errorf("env not applied: %+v", c)
				}
			}},
		{name: "flag wins over environment", env: map[string]string{"ISODE_LOW": "3"}, args: []string{"--low", "1", "--high", "4", "--cpus", "0.5", "--stream-memory"},
			check: func(t *testing.T, c config) {
				if c.Pool.Low != 1 || c.Pool.High != 4 || c.Docker.NanoCPUs != 5e8 || !c.Fleet.StreamMemory {
					t.Errorf("flags not applied: low %d high %d cpus %d", c.Pool.Low, c.Pool.High, c.Docker.NanoCPUs)
				}
			}},
		{name: "bad environment value names the variable", env: map[string]string{"ISODE_HIGH": "many"}, wantErr: "ISODE_HIGH"},
		{name: "bad size", args: []string{"--memory", "lots"}, wantErr: "--memory"},
		{name: "low over high", args: []string{"--low", "5", "--high", "2"}, wantErr: "Low"},
		{name: "bad log format", args: []string{"--log-format", "xml"}, wantErr: "--log-format"},
		{name: "member ttl too short", args: []string{"--heartbeat", "1s", "--member-ttl", "1s"}, wantErr: "--member-ttl"},
		{name: "stray argument", args: []string{"oops"}, wantErr: "unexpected argument"},
		{name: "bad cpus", args: []string{"--cpus", "0"}, wantErr: "--cpus"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			// Only the case's own environment: make test exports
			// ISODE_IMAGE, and a developer's shell may set others.
			for _, kv := range os.Environ() {
				if k, _, _ := strings.Cut(kv, "="); strings.HasPrefix(k, "ISODE_") {
					t.Setenv(k, "") // restored after the case
					os.Unsetenv(k)
				}
			}
			for k, v := range tt.env {
				t.Setenv(k, v)
			}
			var stderr bytes.Buffer
			c, err := parseConfig(tt.args, &stderr)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("err = %v, want it to name %q", err, tt.wantErr)
				}
				if !errors.Is(err, errInvalidConfig) {
					t.Errorf("err = %v does not wrap errInvalidConfig", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			tt.check(t, c)
		})
	}
}

func TestHelpListsEverySetting(t *testing.T) {
	var stderr bytes.Buffer
	_, err := parseConfig([]string{"--help"}, &stderr)
	if !errors.Is(err, flag.ErrHelp) {
		t.Fatalf("err = %v", err)
	}
	help := stderr.String()
	for _, want := range []string{"--nats", "ISODE_NATS_URL", "--id", "ISODE_WORKER_ID", "--low", "--high", "--idle", "--concurrency",
		"--queue", "--tenant-queue", "ISODE_IMAGE", "--memory", "--cpus", "--pids", "--runtime", "default 16",
		"--nats-connect-timeout", "ISODE_NATS_CONNECT_TIMEOUT", "default 1m0s", "--max-control-line", "ISODE_NATS_MAX_CONTROL_LINE", "default 4096"} {
		if !strings.Contains(help, strings.TrimPrefix(want, "-")) {
			t.Errorf("help does not mention %s", want)
		}
	}
	for _, want := range []string{"ISODE_SOCKET_PATH", "DOCKER_HOST"} {
		if !strings.Contains(help, want) {
			t.Errorf("help does not say how the Docker engine is found (%s)", want)
		}
	}
}

func TestDefaultWorkerID(t *testing.T) {
	a, b := defaultWorkerID("my host.example"), defaultWorkerID("my host.example")
	if a == b {
		t.Errorf("two default ids are equal: %s", a)
	}
	if !strings.HasPrefix(a, "my-host.example-") {
		t.Errorf("id %q does not start with the host name", a)
	}
	if id := defaultWorkerID(""); !strings.HasPrefix(id, "worker-") {
		t.Errorf("id without host: %q", id)
	}
}

func TestAutoAgentSockets(t *testing.T) {
	local := autoAgentSockets("")
	if !strings.HasPrefix(local, os.TempDir()+"/isode-agents-") {
		t.Errorf("local engine: %q, want a directory under %s", local, os.TempDir())
	}
	if d := autoAgentSockets("unix:///var/run/docker.sock"); d != local {
		t.Errorf("DOCKER_HOST a unix socket: %q, want %q", d, local)
	}
	for _, host := range []string{"tcp://10.0.0.1:2376", "ssh://me@host"} {
		if d := autoAgentSockets(host); d != "" {
			t.Errorf("DOCKER_HOST %q: %q, want the attach streams", host, d)
		}
	}
}

func TestWorkerProcsLeavesHalfTheCPUsToTheSandboxes(t *testing.T) {
	for _, c := range []struct{ cpus, want int }{{1, 1}, {2, 1}, {3, 1}, {4, 2}, {16, 8}} {
		if got := workerProcs(c.cpus); got != c.want {
			t.Errorf("workerProcs(%d) = %d, want %d", c.cpus, got, c.want)
		}
	}
}
