// Package testenv gives tests the real Docker engine and a real NATS server.
//
// Without a Docker daemon a test skips on a developer's machine, but when
// the CI environment variable is set a missing daemon (or a missing sandbox
// image) fails the test: a CI run that skipped the real thing is not green.
package testenv

import (
	"context"
	"net"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/docker/docker/api/types/container"
	"github.com/docker/docker/api/types/filters"
	"github.com/docker/docker/api/types/volume"
	"github.com/docker/docker/client"
	natsserver "github.com/nats-io/nats-server/v2/server"
	natstest "github.com/nats-io/nats-server/v2/test"
)

// DefaultImage is the sandbox image tests use unless ISODE_IMAGE names another.
const DefaultImage = "isode-sandbox:latest"

// CI reports whether the tests run under CI, where nothing may be skipped.
func CI() bool {
	v := os.Getenv("CI")
	return v != "" && v != "0" && !strings.EqualFold(v, "false")
}

// unavailable skips the test on a laptop and fails it under CI.
func unavailable(t testing.TB, format string, args ...any) {
	t.Helper()
	if CI() {
		t.Fatalf("CI is set, so this may not be skipped: "+format, args...)
	}
	t.Skipf(format, args...)
}

// Docker returns a client of the real engine, or skips/fails (see package
// doc) when there is none. It honours DOCKER_HOST and ISODE_SOCKET_PATH.
func Docker(t testing.TB) *client.Client {
	t.Helper()
	opts := []client.Opt{client.FromEnv, client.WithAPIVersionNegotiation()}
	if p := os.Getenv("ISODE_SOCKET_PATH"); p != "" && os.Getenv("DOCKER_HOST") == "" {
		opts = append(opts, client.WithHost("unix://"+p))
	}
	cli, err := client.NewClientWithOpts(opts...)
	if err != nil {
		unavailable(t, "no Docker client: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := cli.Ping(ctx); err != nil {
		cli.Close()
		unavailable(t, "no Docker daemon: %v", err)
	}
	t.Cleanup(func() { cli.Close() })
	return cli
}

// Image returns the sandbox image to test with, after checking the engine
// has it (built by `make sandbox-image`).
func Image(t testing.TB, cli *client.Client) string {
	t.Helper()
	img := os.Getenv("ISODE_IMAGE")
	if img == "" {
		img = DefaultImage
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := cli.ImageInspect(ctx, img); err != nil {
		unavailable(t, "sandbox image %s is missing (run `make sandbox-image`): %v", img, err)
	}
	return img
}

// RemoveByLabel force-removes every container carrying label key=value and
// returns how many there were. Tests call it in t.Cleanup with a label
// unique to the test, so nothing they create outlives them.
func RemoveByLabel(t testing.TB, cli *client.Client, key, value string) int {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	list, err := cli.ContainerList(ctx, container.ListOptions{
		All:     true,
		Filters: filters.NewArgs(filters.Arg("label", key+"="+value)),
	})
	if err != nil {
		t.Errorf("list containers labelled %s=%s: %v", key, value, err)
		return 0
	}
	for _, c := range list {
		err := cli.ContainerRemove(ctx, c.ID, container.RemoveOptions{Force: true})
		if err != nil && !client.IsErrNotFound(err) && !strings.Contains(err.Error(), "already in progress") {
			t.Errorf("remove container %s: %v", c.ID, err)
		}
	}
	removeVolumesByLabel(ctx, t, cli, key, value)
	return len(list)
}

// removeVolumesByLabel removes the volumes labelled key=value (a killed
// worker's shared node volume), waiting for containers still being
// removed to let go of them.
func removeVolumesByLabel(ctx context.Context, t testing.TB, cli *client.Client, key, value string) {
	t.Helper()
	vols, err := cli.VolumeList(ctx, volume.ListOptions{Filters: filters.NewArgs(filters.Arg("label", key+"="+value))})
	if err != nil {
		t.Errorf("list volumes labelled %s=%s: %v", key, value, err)
		return
	}
	for _, v := range vols.Volumes {
		for {
			err := cli.VolumeRemove(ctx, v.Name, false)
			if err == nil || client.IsErrNotFound(err) {
				break
			}
			if ctx.Err() != nil {
				t.Errorf("remove volume %s: %v", v.Name, err)
				break
			}
			time.Sleep(200 * time.Millisecond) // in use by a container being removed
		}
	}
}

// NATS starts an embedded JetStream-enabled NATS server on a random
// loopback port, with its store under t.TempDir(), and stops it at cleanup.
func NATS(t testing.TB) *natsserver.Server {
	t.Helper()
	opts := NATSOptions(t)
	s := natstest.RunServer(&opts)
	t.Cleanup(s.Shutdown)
	return s
}

// Node returns the path of a node binary on the host, for tests of the
// agent outside a container, or skips/fails when there is none.
func Node(t testing.TB) string {
	t.Helper()
	p, err := exec.LookPath("node")
	if err != nil {
		unavailable(t, "no node binary: %v", err)
	}
	return p
}

// Poll calls f until it returns true or d passes, and reports whether it did.
func Poll(d time.Duration, f func() bool) bool {
	deadline := time.Now().Add(d)
	for {
		if f() {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// NATSOptions are the options of NATS: JetStream on, a random loopback
// port, the store under t.TempDir().
func NATSOptions(t testing.TB) natsserver.Options {
	opts := natstest.DefaultTestOptions
	opts.Port = -1
	opts.JetStream = true
	opts.StoreDir = t.TempDir()
	return opts
}

// FreePort returns a TCP port free on the loopback interface just now.
func FreePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}
