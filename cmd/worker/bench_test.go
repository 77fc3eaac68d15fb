package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/isode-run/isode/internal/testenv"
	isode "github.com/isode-run/isode/pkg/client"
	"github.com/isode-run/isode/pkg/dockerx"
)

// BenchmarkWorkerMemory measures the resident memory of a worker process
// (connected to an external NATS server, so the server is not counted)
// idle, and again once 50 tenants each have a container; it reports both
// and the increase per tenant:
//
//	go test -run '^$' -bench WorkerMemory -benchtime 1x ./cmd/worker/
func BenchmarkWorkerMemory(b *testing.B) {
	cli := testenv.Docker(b)
	img := testenv.Image(b, cli)
	s := testenv.NATS(b)
	id := "mem-" + randomHex(4)
	b.Cleanup(func() { testenv.RemoveByLabel(b, cli, dockerx.LabelWorker, id) })
	cmd := exec.Command(workerBinary(b), "--nats", s.ClientURL(), "--id", id, "--image", img,
		"--low", "0", "--high", "60", "--log-level", "warn", "--log-format", "json")
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() {
		cmd.Process.Signal(os.Interrupt)
		done := make(chan error, 1)
		go func() { done <- cmd.Wait() }()
		select {
		case <-done:
		case <-time.After(60 * time.Second):
			cmd.Process.Kill()
			<-done
		}
	})
	nc, err := nats.Connect(s.ClientURL())
	if err != nil {
		b.Fatal(err)
	}
	defer nc.Close()
	c, err := isode.New(nc)
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	run := func(key string) {
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		defer cancel()
		if _, err := c.Run(ctx, key, `return function (cb) { cb(null, 1); }`); err != nil {
			b.Fatalf("%s: %v", key, err)
		}
	}
	// The worker is up once it has made the stream and served once.
	for deadline := time.Now().Add(60 * time.Second); ; {
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		_, err := c.Run(ctx, "warm-up", `return function (cb) { cb(null, 1); }`)
		cancel()
		if err == nil {
			break
		}
		if !errors.Is(err, isode.ErrNoStream) || time.Now().After(deadline) {
			b.Fatal(err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	idle := rssKiB(b, cmd.Process.Pid)
	const tenants = 50
	for i := 0; i < tenants; i++ {
		run(fmt.Sprintf("tenant-%d", i))
	}
	for i := 0; i < tenants; i++ { // a second round, on warm containers
		run(fmt.Sprintf("tenant-%d", i))
	}
	loaded := rssKiB(b, cmd.Process.Pid)
	b.ReportMetric(float64(idle)/1024, "idle-MiB")
	b.ReportMetric(float64(loaded)/1024, "50-tenants-MiB")
	b.ReportMetric(float64(loaded-idle)/tenants, "KiB/tenant")
}

// rssKiB reads a process's resident set size.
func rssKiB(b *testing.B, pid int) int {
	f, err := os.Open("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "VmRSS:"); ok {
			n, err := strconv.Atoi(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")))
			if err != nil {
				b.Fatal(err)
			}
			return n
		}
	}
	b.Fatal("no VmRSS")
	return 0
}
