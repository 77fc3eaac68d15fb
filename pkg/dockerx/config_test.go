package dockerx

import (
	"errors"
	"strings"
	"testing"
	"time"
)

func TestValidate(t *testing.T) {
	tests := []struct {
		name    string
		give    func(*Config)
		wantErr string // "" for valid
	}{
		{name: "defaults", give: func(*Config) {}},
		{name: "gvisor", give: func(c *Config) { c.Runtime = "runsc" }},
		{name: "no image", give: func(c *Config) { c.Image = "" }, wantErr: "Image"},
		{name: "bad worker id", give: func(c *Config) { c.WorkerID = "a b" }, wantErr: "WorkerID"},
		{name: "fleet", give: func(c *Config) { c.Fleet = "prod-eu.1_a" }},
		{name: "fleet with a space", give: func(c *Config) { c.Fleet = "prod eu" }, wantErr: "Fleet"},
		{name: "fleet with a slash", give: func(c *Config) { c.Fleet = "prod/eu" }, wantErr: "Fleet"},
		{name: "fleet too long", give: func(c *Config) { c.Fleet = strings.Repeat("f", 65) }, wantErr: "Fleet"},
		{name: "tiny memory", give: func(c *Config) { c.Memory = 1 << 20 }, wantErr: "Memory"},
		{name: "no cpu limit", give: func(c *Config) { c.NanoCPUs = 0 }, wantErr: "NanoCPUs"},
		{name: "pids too low", give: func(c *Config) { c.PidsLimit = 4 }, wantErr: "PidsLimit"},
		{name: "tmpfs over memory", give: func(c *Config) { c.TmpfsSize = c.Memory }, wantErr: "TmpfsSize"},
		{name: "heap over memory", give: func(c *Config) { c.WorkerHeapMB = 128 }, wantErr: "WorkerHeapMB"},
		{name: "zero concurrency", give: func(c *Config) { c.Concurrency = 0 }, wantErr: "Concurrency"},
		{name: "bad runtime", give: func(c *Config) { c.Runtime = "run sc" }, wantErr: "Runtime"},
		{name: "no call timeout", give: func(c *Config) { c.CallTimeout = 0 }, wantErr: "CallTimeout"},
		{name: "margin too long", give: func(c *Config) { c.RunMargin = time.Minute }, wantErr: "RunMargin"},
		{name: "frame too small", give: func(c *Config) { c.MaxFrameBytes = c.MaxResultBytes }, wantErr: "MaxFrameBytes"},
		{name: "request frame too small", give: func(c *Config) { c.MaxRequestBytes = 1 << 20 }, wantErr: "MaxRequestBytes"},
		{name: "two bad fields", give: func(c *Config) { c.Image = ""; c.NoFile = 1 }, wantErr: "NoFile"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := DefaultConfig()
			tt.give(&c)
			err := c.Validate()
			if tt.wantErr == "" {
				if err != nil {
					t.Fatalf("unexpected error: %v", err)
				}
				return
			}
			if !errors.Is(err, ErrInvalidConfig) || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("got %v, want ErrInvalidConfig naming %s", err, tt.wantErr)
			}
		})
	}
}

func TestDefaultConfigWorkerIDsDiffer(t *testing.T) {
	if a, b := DefaultConfig().WorkerID, DefaultConfig().WorkerID; a == b {
		t.Fatalf("two default configs share worker id %s", a)
	}
}

func TestContainerSpecIsHardened(t *testing.T) {
	c := DefaultConfig()
	c.Runtime = "runsc"
	cfg, host := containerSpec(&c, "acme", "", nil)
	checks := []struct {
		name string
		ok   bool
	}{
		{"non-root user", cfg.User == SandboxUser},
		{"attached stdio, stdin once, no tty", cfg.AttachStdin && cfg.AttachStdout && cfg.AttachStderr && cfg.OpenStdin && cfg.StdinOnce && !cfg.Tty},
		{"labels", cfg.Labels[LabelApp] == AppName && cfg.Labels[LabelWorker] == c.WorkerID && cfg.Labels[LabelTenant] == "acme"},
		{"network none", host.NetworkMode == "none" && cfg.NetworkDisabled},
		{"read-only root", host.ReadonlyRootfs},
		{"tmpfs /tmp", strings.Contains(host.Tmpfs["/tmp"], "noexec") && strings.Contains(host.Tmpfs["/tmp"], "nosuid") && strings.Contains(host.Tmpfs["/tmp"], "size=16777216")},
		{"no capabilities", len(host.CapDrop) == 1 && host.CapDrop[0] == "ALL" && len(host.CapAdd) == 0},
		{"no-new-privileges, seccomp untouched", len(host.SecurityOpt) == 1 && host.SecurityOpt[0] == "no-new-privileges"},
		{"init", host.Init != nil && *host.Init},
		{"ipc none", host.IpcMode == "none"},
		{"no swap", host.Memory == c.Memory && host.MemorySwap == c.Memory},
		{"cpu", host.NanoCPUs == c.NanoCPUs},
		{"pids", host.PidsLimit != nil && *host.PidsLimit == c.PidsLimit},
		{"nofile", len(host.Ulimits) > 0 && host.Ulimits[0].Name == "nofile" && host.Ulimits[0].Hard == c.NoFile},
		{"no logs", host.LogConfig.Type == "none"},
		{"no mounts", len(host.Binds) == 0 && len(host.Mounts) == 0 && len(host.VolumesFrom) == 0},
		{"not privileged", !host.Privileged && host.PidMode == "" && host.UsernsMode == ""},
		{"auto remove", host.AutoRemove},
		{"oci runtime", host.Runtime == "runsc"},
	}
	for _, ch := range checks {
		if !ch.ok {
			t.Errorf("%s: not as required", ch.name)
		}
	}
	if cfg, _ := containerSpec(&c, "", "", nil); cfg.Labels[LabelTenant] != "" {
		t.Errorf("a free sandbox has a tenant label")
	}
	if _, ok := cfg.Labels[LabelFleet]; ok {
		t.Errorf("a sandbox of a runtime with no Fleet has a fleet label")
	}
	c.Fleet = "prod"
	if cfg, _ := containerSpec(&c, "", "", nil); cfg.Labels[LabelFleet] != "prod" {
		t.Errorf("fleet label %q, want %q", cfg.Labels[LabelFleet], "prod")
	}
}
