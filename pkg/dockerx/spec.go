package dockerx

import (
	"strconv"

	"github.com/docker/docker/api/types/container"
	"github.com/docker/docker/api/types/mount"
	"github.com/docker/go-units"

	"github.com/isode-run/isode/sandbox"
)

// SandboxUser is the numeric user and group the agent runs as. The image's
// /etc/passwd names it "sandbox"; numbers keep it non-root even with an
// image that lacks the entry.
const SandboxUser = "10001:10001"

// containerSpec returns the container and host configuration of a sandbox:
// the whole hardening of this package is in here. The image supplies node
// only: its entrypoint, command, user and working directory are replaced,
// and the agent's source is on node's command line (package sandbox).
// socketDir, when not "", is the directory of the sandbox's agent socket on
// the engine's host (agentsock.go): it is mounted into this sandbox alone.
// shared, when not nil, is the volume of the image's node directory,
// mounted read-only over it (nodevolume.go).
func containerSpec(c *Config, tenant, socketDir string, shared *nodeVolume) (*container.Config, *container.HostConfig) {
	return spec(c, tenant, socketDir, shared, sandbox.Args())
}

// spec is containerSpec with node's arguments given.
func spec(c *Config, tenant, socketDir string, shared *nodeVolume, nodeArgs []string) (*container.Config, *container.HostConfig) {
	labels := map[string]string{LabelApp: AppName, LabelWorker: c.WorkerID}
	if tenant != "" {
		labels[LabelTenant] = tenant
	}
	if c.Fleet != "" {
		labels[LabelFleet] = c.Fleet
	}
	yes := true
	pids := c.PidsLimit
	cfg := &container.Config{
		Image:      c.Image,
		Entrypoint: []string{c.Node},
		Cmd:        nodeArgs,
		User:       SandboxUser,
		WorkingDir: "/tmp",
		Env: []string{
			"ISODE_CONCURRENCY=" + strconv.Itoa(c.Concurrency),
			"ISODE_WORKER_HEAP_MB=" + strconv.Itoa(c.WorkerHeapMB),
			"ISODE_MAX_FRAME_BYTES=" + strconv.Itoa(c.MaxFrameBytes),
			"ISODE_MAX_REQUEST_BYTES=" + strconv.Itoa(c.MaxRequestBytes),
			// Processes a snippet leaves running are killed once its
			// tenant has no request in flight (sandbox/agent.js).
			"ISODE_KILL_LEFTOVERS=1",
		},
		Labels: labels,
		// The protocol: attached stdin and stdout, no TTY. StdinOnce closes
		// the container's stdin when the attached client goes: the agent
		// then exits (the dead-man switch), unless a snippet holds another
		// write end of the pipe open; StartReaper removes those.
		AttachStdin:     true,
		AttachStdout:    true,
		AttachStderr:    true,
		OpenStdin:       true,
		StdinOnce:       true,
		Tty:             false,
		NetworkDisabled: true,
	}
	host := &container.HostConfig{
		NetworkMode:    "none",
		ReadonlyRootfs: true,
		Tmpfs: map[string]string{
			"/tmp": "rw,noexec,nosuid,nodev,size=" + strconv.FormatInt(c.TmpfsSize, 10) + ",mode=1777",
		},
		CapDrop: []string{"ALL"},
		// The default seccomp profile stays on: it is never named here.
		SecurityOpt:  []string{"no-new-privileges"},
		Init:         &yes,
		IpcMode:      "none",
		CgroupnsMode: "private",
		AutoRemove:   true,
		LogConfig:    container.LogConfig{Type: "none"},
		Runtime:      c.Runtime,
		Resources: container.Resources{
			Memory:     c.Memory,
			MemorySwap: c.Memory, // no swap
			NanoCPUs:   c.NanoCPUs,
			PidsLimit:  &pids,
			Ulimits: []*units.Ulimit{
				{Name: "nofile", Soft: c.NoFile, Hard: c.NoFile},
				{Name: "core", Soft: 0, Hard: 0}, // an abort must not dump into /tmp
			},
		},
	}
	if socketDir != "" {
		cfg.Env = append(cfg.Env, "ISODE_AGENT_SOCKET="+agentSocketMount+"/"+agentSocketName)
		host.Mounts = append(host.Mounts, mount.Mount{
			Type:     mount.TypeBind,
			Source:   socketDir,
			Target:   agentSocketMount,
			ReadOnly: true,
		})
	}
	if shared != nil {
		host.Mounts = append(host.Mounts, shared.mount())
	}
	return cfg, host
}
