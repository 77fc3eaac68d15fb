package dockerx_test

import (
	"context"
	"io"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/docker/docker/api/types/container"
	"github.com/docker/docker/pkg/stdcopy"
	"github.com/isode-run/isode/pkg/dockerx"
	"github.com/isode-run/isode/pkg/protocol"
)

// Benchmarks, each next to its baseline measured in the same run:
//
//	go test -bench . -run '^$' ./pkg/dockerx/
//
// BenchmarkWarmRun: one trivial snippet round trip through a ready
// sandbox; baseline: `docker exec <container> node -e ...` over the API
// (exec create, attach, start, wait for exit) into a running container.
// BenchmarkCreateReady: create, attach, start and readiness handshake of
// one sandbox, then its Close; baseline: `docker run --rm` of the same
// image running a trivial node -e, over the API (create, attach, start,
// wait, remove). Each reports its baseline's ns/op and the ratio.

const trivial = `return function (cb) { cb(null, 1) }`

// baselineRounds bounds how often a slow baseline is measured per benchmark.
const baselineRounds = 5

func BenchmarkWarmRun(b *testing.B) {
	e := newEnv(b, nil)
	s := e.create("")
	req := &protocol.Request{Code: trivial, TimeoutMs: 5000}
	ctx := context.Background()
	for range 20 { // warm the V8 caches and the connection
		if _, err := s.Run(ctx, req); err != nil {
			b.Fatal(err)
		}
	}
	b.ResetTimer()
	for b.Loop() {
		if _, err := s.Run(ctx, req); err != nil {
			b.Fatal(err)
		}
	}
	b.StopTimer()
	agent := float64(b.Elapsed().Nanoseconds()) / float64(b.N)

	var base time.Duration
	for range baselineRounds {
		base += dockerExec(b, e, s.ID(), `console.log(1)`)
	}
	baseNs := float64(base.Nanoseconds()) / baselineRounds
	b.ReportMetric(baseNs, "docker-exec-ns/op")
	b.ReportMetric(baseNs/agent, "x-faster")
}

// dockerExec runs node -e code in a running container and waits for it.
func dockerExec(b *testing.B, e *env, id, code string) time.Duration {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	start := time.Now()
	ex, err := e.cli.ContainerExecCreate(ctx, id, container.ExecOptions{
		Cmd: []string{"/usr/bin/node", "-e", code}, AttachStdout: true, AttachStderr: true,
	})
	if err != nil {
		b.Fatal(err)
	}
	hr, err := e.cli.ContainerExecAttach(ctx, ex.ID, container.ExecAttachOptions{})
	if err != nil {
		b.Fatal(err)
	}
	var out strings.Builder
	_, err = stdcopy.StdCopy(&out, io.Discard, hr.Reader)
	hr.Close()
	if err != nil {
		b.Fatal(err)
	}
	insp, err := e.cli.ContainerExecInspect(ctx, ex.ID)
	if err != nil || insp.ExitCode != 0 || strings.TrimSpace(out.String()) != "1" {
		b.Fatalf("docker exec: exit %d, output %q, %v", insp.ExitCode, out.String(), err)
	}
	return time.Since(start)
}

func BenchmarkCreateReady(b *testing.B) {
	e := newEnv(b, nil)
	ctx := context.Background()
	var ready time.Duration
	var idle *dockerx.MemoryStats
	for b.Loop() {
		start := time.Now()
		s := e.create("")
		ready += time.Since(start)
		b.StopTimer()
		if idle == nil {
			if m, err := s.Memory(ctx); err == nil {
				idle = &m
			}
		}
		if err := s.Close(ctx); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
	}
	b.StopTimer()
	readyNs := float64(ready.Nanoseconds()) / float64(b.N)
	b.ReportMetric(readyNs, "ns/op")
	if idle != nil {
		b.ReportMetric(float64(idle.WorkingSet)/dockerx.MiB, "idle-ws-MiB")
		b.ReportMetric(float64(idle.Usage)/dockerx.MiB, "idle-usage-MiB")
	}

	var base time.Duration
	for range baselineRounds {
		base += dockerRun(b, e)
	}
	baseNs := float64(base.Nanoseconds()) / baselineRounds
	b.ReportMetric(baseNs, "docker-run-ns/op")
	b.ReportMetric(baseNs/readyNs, "x-faster")
}

// dockerRun is `docker run --rm <image> node -e ...` over the API.
func dockerRun(b *testing.B, e *env) time.Duration {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	start := time.Now()
	resp, err := e.cli.ContainerCreate(ctx, &container.Config{
		Image:        e.cfg.Image,
		Entrypoint:   []string{"/usr/bin/node"},
		Cmd:          []string{"-e", "console.log(1)"},
		AttachStdout: true, AttachStderr: true,
		Labels: map[string]string{dockerx.LabelApp: dockerx.AppName, dockerx.LabelWorker: e.cfg.WorkerID},
	}, &container.HostConfig{NetworkMode: "none", AutoRemove: true}, nil, nil, "")
	if err != nil {
		b.Fatal(err)
	}
	hr, err := e.cli.ContainerAttach(ctx, resp.ID, container.AttachOptions{Stream: true, Stdout: true, Stderr: true})
	if err != nil {
		b.Fatal(err)
	}
	defer hr.Close()
	wait, werr := e.cli.ContainerWait(ctx, resp.ID, container.WaitConditionRemoved)
	if err := e.cli.ContainerStart(ctx, resp.ID, container.StartOptions{}); err != nil {
		b.Fatal(err)
	}
	var out strings.Builder
	if _, err := stdcopy.StdCopy(&out, io.Discard, hr.Reader); err != nil {
		b.Fatal(err)
	}
	select {
	case w := <-wait:
		if w.StatusCode != 0 || strings.TrimSpace(out.String()) != "1" {
			b.Fatalf("docker run: exit %d, output %q", w.StatusCode, out.String())
		}
	case err := <-werr:
		b.Fatal(err)
	}
	return time.Since(start)
}

// BenchmarkDockerRunCLI is the same baseline through the docker CLI, for
// a figure anyone can reproduce by hand.
func BenchmarkDockerRunCLI(b *testing.B) {
	e := newEnv(b, nil)
	if _, err := exec.LookPath("docker"); err != nil {
		b.Skip("no docker CLI")
	}
	for b.Loop() {
		out, err := exec.Command("docker", "run", "--rm", "--network=none", "--label", dockerx.LabelWorker+"="+e.cfg.WorkerID,
			"--entrypoint", "/usr/bin/node", e.cfg.Image, "-e", "console.log(1)").CombinedOutput()
		if err != nil || strings.TrimSpace(string(out)) != "1" {
			b.Fatalf("docker run: %v: %s", err, out)
		}
	}
}
