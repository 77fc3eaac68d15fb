package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/isode-run/isode/pkg/client"
	"github.com/isode-run/isode/pkg/protocol"
)

func runCmd(ctx context.Context, args []string, stdin io.Reader, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("submit run", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var cf connFlags
	cf.register(fs)
	tenant := fs.String("tenant", "", "isolate key of the tenant (required)")
	timeout := fs.Duration("timeout", protocol.DefaultTimeout, "run timeout of the snippet")
	wait := fs.Duration("wait", 0, "how long to wait for the result, queueing included (default: timeout + 30s)")
	input := fs.String("input", "", "JSON input, handed to the snippet as ctx.data")
	file := fs.String("f", "", "read the snippet from this file")
	fs.Usage = func() {
		fmt.Fprintf(stderr, "Usage: submit run --tenant KEY [flags] (CODE | -f FILE | -)\n\nPrints the result as JSON on stdout and console output on stderr. On failure it\nprints the error code and message on stderr and exits with status 1.\n\n")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return err
	}
	code, err := snippet(fs.Args(), *file, stdin)
	if err != nil {
		fs.Usage()
		return &exitError{2, err}
	}
	if *tenant == "" {
		fs.Usage()
		return &exitError{2, errors.New("--tenant is required")}
	}
	opts := []client.RunOption{client.WithTimeout(*timeout)}
	if *input != "" {
		if !json.Valid([]byte(*input)) {
			return &exitError{2, errors.New("--input is not valid JSON")}
		}
		opts = append(opts, client.WithInput(json.RawMessage(*input)))
	}
	if *wait <= 0 {
		*wait = *timeout + 30*time.Second
	}
	_, c, closeAll, err := cf.dial("isode-submit")
	if err != nil {
		return err
	}
	defer closeAll()
	ctx, cancel := context.WithTimeout(ctx, *wait)
	defer cancel()
	res, err := c.Run(ctx, *tenant, code, opts...)
	if res != nil && res.Console != "" {
		fmt.Fprint(stderr, res.Console)
		if res.ConsoleTruncated {
			fmt.Fprintln(stderr, "\n[console output truncated]")
		}
	}
	if err != nil {
		var pe *protocol.Error
		if errors.As(err, &pe) {
			return &exitError{1, fmt.Errorf("error %s: %s", pe.Code, pe.Message)}
		}
		return err
	}
	fmt.Fprintln(stdout, string(res.Value))
	return nil
}

// snippet reads the code from the argument, the file, or stdin ("-").
func snippet(args []string, file string, stdin io.Reader) (string, error) {
	switch {
	case file != "" && len(args) > 0:
		return "", errors.New("give the code either as an argument or with -f, not both")
	case file != "":
		b, err := os.ReadFile(file)
		return string(b), err
	case len(args) == 1 && args[0] == "-":
		b, err := io.ReadAll(io.LimitReader(stdin, protocol.MaxCodeBytes+1))
		return string(b), err
	case len(args) == 1:
		return args[0], nil
	case len(args) == 0:
		return "", errors.New("no code given: pass it as an argument, with -f FILE, or - for stdin")
	}
	return "", errors.New("too many arguments: quote the code as one argument")
}
