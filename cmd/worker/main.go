// Command worker runs isode sandboxes for requests taken from NATS.
//
// With no --nats URL it starts an embedded JetStream-enabled NATS server on
// 127.0.0.1:4222, so one machine needs nothing else. See `worker --help`.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"runtime"
	"syscall"
)

func main() {
	if os.Getenv("GOMAXPROCS") == "" {
		runtime.GOMAXPROCS(workerProcs(runtime.GOMAXPROCS(0)))
	}
	// The first SIGINT/SIGTERM drains gracefully; a second one aborts.
	ctx, stop := context.WithCancel(context.Background())
	abort, kill := context.WithCancel(context.Background())
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM)
	go func() {
		<-sigs
		stop()
		<-sigs
		kill()
	}()

	err := run(ctx, abort, os.Args[1:], os.Stdout, os.Stderr)
	switch {
	case err == nil, errors.Is(err, flag.ErrHelp):
		os.Exit(0)
	case errors.Is(err, errInvalidConfig):
		fmt.Fprintln(os.Stderr, "worker:", err)
		os.Exit(2)
	default:
		fmt.Fprintln(os.Stderr, "worker:", err)
		os.Exit(1)
	}
}

// workerProcs is the worker's GOMAXPROCS on a machine where Go would use n
// (its CPUs, or its cgroup's CPU limit): half of them, at least one. The
// worker routes runs between NATS and its sandboxes, which do the other
// half of a run's work on the same CPUs; given all of them, the Go runtime
// spent them spinning for work and waking threads across Ps while the
// sandboxes waited. With 50 tenants x 32 callers on 2 CPUs, GOMAXPROCS 1
// gave 1.20x and 1.24x the runs/s and 0.73-0.82x the worker's CPU per run,
// and no change with one tenant (README, Benchmarks). GOMAXPROCS in the
// environment overrides it, as for any Go program.
func workerProcs(n int) int {
	return max(1, n/2)
}
