// Package deploy holds the Docker Compose deployment; its test brings the
// deployment up on this machine's engine and tears it down again.
package deploy

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/docker/docker/api/types/container"
	"github.com/docker/docker/api/types/filters"
	"github.com/docker/docker/api/types/image"
	"github.com/docker/docker/api/types/network"
	"github.com/docker/docker/api/types/volume"
	"github.com/docker/docker/client"

	"github.com/isode-run/isode/internal/testenv"
	"github.com/isode-run/isode/pkg/dockerx"
)

// composeTool reports which Compose this machine has, as scripts/compose.sh
// would pick it, or "".
func composeTool() string {
	if exec.Command("docker", "compose", "version").Run() == nil {
		return "docker compose"
	}
	if _, err := exec.LookPath("docker-compose"); err == nil {
		return "docker-compose"
	}
	return ""
}

// TestComposeRoundTrip runs scripts/compose-demo.sh: it builds the images
// (under tags unique to the test), brings up NATS and three workers with
// Compose, runs the original examples as the app user and stats as the ops
// user, tears down and checks that nothing is left. This test checks the
// same again from the outside, and removes its images.
func TestComposeRoundTrip(t *testing.T) {
	if testing.Short() {
		t.Skip("builds images and runs a Compose deployment")
	}
	tool := composeTool()
	if tool == "" {
		if testenv.CI() {
			t.Fatal("CI is set, so this may not be skipped: neither `docker compose` nor `docker-compose` is installed (.ci/run installs docker-compose)")
		}
		t.Skip("neither `docker compose` nor `docker-compose` is installed")
	}
	cli := testenv.Docker(t)
	testenv.Image(t, cli) // the workers' sandbox image must be on the engine

	suffix := randomHex(4)
	project := "isodetest" + suffix
	workerImage := "isode-worker:test-" + suffix
	natsImage := "isode-nats:test-" + suffix
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		for _, img := range []string{workerImage, natsImage} {
			if _, err := cli.ImageRemove(ctx, img, image.RemoveOptions{Force: true, PruneChildren: true}); err != nil && !client.IsErrNotFound(err) {
				t.Logf("remove image %s: %v", img, err)
			}
		}
	})

	env := append(os.Environ(),
		"ISODE_COMPOSE_PROJECT="+project,
		"ISODE_WORKER_IMAGE="+workerImage,
		"ISODE_NATS_IMAGE="+natsImage,
		fmt.Sprintf("ISODE_NATS_PORT=%d", testenv.FreePort(t)),
		"WORKERS=3",
	)
	// Whatever happens to the script, the project goes away.
	t.Cleanup(func() {
		cmd := exec.Command("../scripts/compose.sh", "down", "-v", "--remove-orphans", "-t", "30")
		cmd.Env = append(env, "ISODE_APP_A_PASSWORD=x", "ISODE_APP_B_PASSWORD=x", "ISODE_WORKER_PASSWORD=x", "ISODE_OPS_PASSWORD=x")
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Logf("compose down: %v\n%s", err, out)
		}
	})

	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	began := time.Now()
	cmd := exec.CommandContext(ctx, "../scripts/compose-demo.sh")
	cmd.Env = env
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	cmd.WaitDelay = 10 * time.Second
	err := cmd.Run()
	t.Logf("scripts/compose-demo.sh with %s took %v:\n%s", tool, time.Since(began).Round(time.Millisecond), out.String())
	if err != nil {
		t.Fatalf("scripts/compose-demo.sh: %v", err)
	}
	for _, want := range []string{`"Hello, world!"`, `{"node":"`, "app-b sees: nothing", "every sandbox has its socket", "refused", "nothing left behind"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("the output lacks %q", want)
		}
	}

	// Checked again from here: nothing of the project, no sandbox of its
	// workers.
	var workers []string
	for _, line := range strings.Split(out.String(), "\n") {
		if rest, ok := strings.CutPrefix(line, "workers: "); ok {
			workers = strings.Fields(rest)
		}
	}
	if len(workers) != 3 {
		t.Fatalf("want 3 workers reported, got %q", workers)
	}
	lctx, lcancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer lcancel()
	byProject := filters.NewArgs(filters.Arg("label", "com.docker.compose.project="+project))
	cs, err := cli.ContainerList(lctx, container.ListOptions{All: true, Filters: byProject})
	if err != nil || len(cs) > 0 {
		t.Errorf("containers of the project left: %d (%v)", len(cs), err)
	}
	ns, err := cli.NetworkList(lctx, network.ListOptions{Filters: byProject})
	if err != nil || len(ns) > 0 {
		t.Errorf("networks of the project left: %d (%v)", len(ns), err)
	}
	vs, err := cli.VolumeList(lctx, volume.ListOptions{Filters: byProject})
	if err != nil || len(vs.Volumes) > 0 {
		t.Errorf("volumes of the project left: %d (%v)", len(vs.Volumes), err)
	}
	for _, w := range workers {
		if n := testenv.RemoveByLabel(t, cli, dockerx.LabelWorker, w); n > 0 {
			t.Errorf("%d sandboxes of worker %s were left", n, w)
		}
	}
}

func randomHex(n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return hex.EncodeToString(b)
}
