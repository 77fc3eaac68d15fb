// Command echofloor measures what the process-per-tenant shape costs by
// itself, without isode: N node processes that echo 64-byte frames over
// unix sockets, driven by 32 callers that take the processes in turn (as
// submit bench's callers take tenants), the machine's CPU per message read
// from /proc/stat over a 10 s window after a 5 s warm-up:
//
//	go run ./scripts/echofloor -n 1 -mode hop
//	go run ./scripts/echofloor -n 50 -mode hop
//
// -mode direct answers on node's main thread; -mode hop passes each message
// to a worker thread and back, as the agent does (JSON in and out). The
// ratio of -n 50 to -n 1 is the floor of the sandboxes' "CPU per run at
// many tenants over one" on this machine: see README, Benchmarks.
package main

import (
	_ "embed"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

//go:embed echo.js
var echoJS []byte

// busyTicks is the machine's busy time (all but idle and iowait) in clock
// ticks.
func busyTicks() (int64, error) {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0, err
	}
	f := strings.Fields(strings.SplitN(string(b), "\n", 2)[0])
	var t int64
	for i, x := range f[1:] {
		if i == 3 || i == 4 { // idle, iowait
			continue
		}
		v, err := strconv.ParseInt(x, 10, 64)
		if err != nil {
			return 0, fmt.Errorf("/proc/stat: %w", err)
		}
		t += v
	}
	return t, nil
}

func main() {
	n := flag.Int("n", 1, "echo processes (tenants)")
	mode := flag.String("mode", "hop", "direct: the main thread answers; hop: through a worker thread")
	callers := flag.Int("callers", 32, "concurrent callers")
	window := flag.Duration("window", 10*time.Second, "measurement window, after a 5 s warm-up")
	flag.Parse()
	if *n < 1 || *callers < 1 || (*mode != "direct" && *mode != "hop") {
		log.Fatal("echofloor: want -n >= 1, -callers >= 1, -mode direct|hop")
	}
	dir, err := os.MkdirTemp("", "echofloor")
	if err != nil {
		log.Fatal(err)
	}
	script := filepath.Join(dir, "echo.js")
	if err := os.WriteFile(script, echoJS, 0o600); err != nil {
		_ = os.RemoveAll(dir)
		log.Fatal(err)
	}
	var procs []*exec.Cmd
	stopAll := func() {
		for _, c := range procs {
			_ = c.Process.Kill()
			_ = c.Wait()
		}
		_ = os.RemoveAll(dir)
	}
	defer stopAll()
	for i := 0; i < *n; i++ {
		p := filepath.Join(dir, fmt.Sprintf("s%d", i))
		c := exec.Command("node", script, p, *mode)
		c.Env = []string{"PATH=" + os.Getenv("PATH")} // no NODE_OPTIONS, no extra CA certificates
		c.Stderr = os.Stderr
		if err := c.Start(); err != nil {
			log.Fatal(err)
		}
		procs = append(procs, c)
		deadline := time.Now().Add(10 * time.Second)
		for {
			if _, err := os.Stat(p); err == nil {
				break
			}
			if time.Now().After(deadline) {
				stopAll()
				log.Fatalf("echofloor: %s did not start", p)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	var (
		count atomic.Int64
		stop  atomic.Bool
		wg    sync.WaitGroup
		fail  = make(chan error, *callers)
	)
	msg := []byte(fmt.Sprintf("%-64s", `{"x":1}`))
	for c := 0; c < *callers; c++ {
		wg.Add(1)
		go func(c int) {
			defer wg.Done()
			conns := map[int]net.Conn{}
			defer func() {
				for _, cn := range conns {
					_ = cn.Close()
				}
			}()
			buf := make([]byte, len(msg))
			for k := 0; !stop.Load(); k++ {
				t := (c + *callers*k) % *n
				cn := conns[t]
				if cn == nil {
					var err error
					if cn, err = net.Dial("unix", filepath.Join(dir, fmt.Sprintf("s%d", t))); err != nil {
						fail <- err
						return
					}
					conns[t] = cn
				}
				if _, err := cn.Write(msg); err != nil {
					fail <- err
					return
				}
				if _, err := io.ReadFull(cn, buf); err != nil {
					fail <- err
					return
				}
				count.Add(1)
			}
		}(c)
	}
	time.Sleep(5 * time.Second)
	b0, err0 := busyTicks()
	c0 := count.Load()
	time.Sleep(*window)
	b1, err1 := busyTicks()
	c1 := count.Load()
	stop.Store(true)
	wg.Wait()
	close(fail)
	if err := errors.Join(err0, err1, <-fail); err != nil {
		stopAll()
		log.Fatal(err)
	}
	msgs := c1 - c0
	if msgs == 0 {
		stopAll()
		log.Fatal("echofloor: no message was echoed in the window")
	}
	secs := window.Seconds()
	// /proc/stat counts in USER_HZ (100 a second): 10 ms a tick.
	fmt.Printf("n=%d mode=%s callers=%d msgs/s=%.0f cpu/msg=%.1fus cores=%.2f\n",
		*n, *mode, *callers, float64(msgs)/secs, float64(b1-b0)*1e4/float64(msgs), float64(b1-b0)/100/secs)
}
