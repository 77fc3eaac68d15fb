// Command submit sends JavaScript to an isode fleet, benchmarks it, and
// shows what the workers report.
//
//	submit run --tenant KEY [--nats URL] [--timeout D] [--input JSON] (CODE | -f FILE | -)
//	submit bench [--tenants N] [--concurrency C] [--duration D | --count N] [--json]
//	submit stats [--json] [--tenants]
//	submit top [--interval D] [--window D] [--tenants N]
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
)

// exitError carries a process exit code.
type exitError struct {
	code int
	err  error
}

func (e *exitError) Error() string { return e.err.Error() }
func (e *exitError) Unwrap() error { return e.err }

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Stdin, os.Stdout, os.Stderr)
	stop()
	if err == nil || errors.Is(err, flag.ErrHelp) {
		return
	}
	code := 1
	var ee *exitError
	if errors.As(err, &ee) {
		code = ee.code
	}
	if msg := err.Error(); msg != "" {
		fmt.Fprintln(os.Stderr, "submit:", msg)
	}
	os.Exit(code)
}

const usage = `Usage: submit <command> [flags]

Commands:
  run     run a snippet for a tenant and print its result
  bench   load-test the fleet, next to a NATS request/reply echo baseline
  stats   show what the workers report (pool counters, queue, shards; --tenants: busiest tenants)
  top     a live view of the fleet: workers, pools, runs/s, latency, errors, busiest tenants
          (one snapshot when the output is not a terminal)

Run "submit <command> --help" for the flags of a command.
`

func run(ctx context.Context, args []string, stdin io.Reader, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return &exitError{2, errors.New("")}
	}
	switch args[0] {
	case "run":
		return runCmd(ctx, args[1:], stdin, stdout, stderr)
	case "bench":
		return benchCmd(ctx, args[1:], stdout, stderr)
	case "stats":
		return statsCmd(ctx, args[1:], stdout, stderr)
	case "top":
		return topCmd(ctx, args[1:], stdout, stderr)
	case "-h", "--help", "help":
		fmt.Fprint(stdout, usage)
		return nil
	}
	fmt.Fprint(stderr, usage)
	return &exitError{2, fmt.Errorf("unknown command %q", args[0])}
}
