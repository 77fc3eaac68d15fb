package main

import (
	"cmp"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"slices"
	"sort"
	"strings"
	"sync"
	"text/tabwriter"
	"time"

	"github.com/mattn/go-isatty"
	"github.com/nats-io/nats.go"

	"github.com/isode-run/isode/pkg/protocol"
)

// Terminal sequences of the live view: it only redraws a whole screen, on
// the terminal's alternate screen so that the shell's is back on exit.
const (
	enterScreen = "\x1b[?1049h\x1b[?25l" // alternate screen, cursor hidden
	leaveScreen = "\x1b[?25h\x1b[?1049l"
	redraw      = "\x1b[H\x1b[2J" // home, clear
)

func topCmd(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("submit top", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var cf connFlags
	cf.register(fs)
	interval := fs.Duration("interval", time.Second, "how often the view is redrawn")
	window := fs.Duration("window", 10*time.Second, "the last stretch of time runs/s, percentiles, errors and tenants are computed over")
	tenants := fs.Int("tenants", 5, "busiest tenants shown")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *interval < 100*time.Millisecond || *window < *interval {
		return &exitError{2, fmt.Errorf("--interval must be at least 100ms and --window at least --interval")}
	}
	nc, err := cf.connect("isode-top")
	if err != nil {
		return err
	}
	defer nc.Close()
	t := newTopView(*window, *tenants)
	sub, err := nc.Subscribe(protocol.UsageWildcard(cf.prefix), t.record)
	if err != nil {
		return fmt.Errorf("subscribe to usage records: %w", err)
	}
	defer sub.Unsubscribe()
	if err := nc.Flush(); err != nil {
		return fmt.Errorf("subscribe to usage records: %w", err)
	}

	live := false
	if f, ok := stdout.(*os.File); ok && isatty.IsTerminal(f.Fd()) {
		live = true
	}
	gather := min(*interval/2, 500*time.Millisecond)
	if !live {
		// One snapshot: the workers, and the runs of one interval.
		stats, err := gatherStats(ctx, nc, cf.prefix, gather)
		if err != nil {
			return err
		}
		select {
		case <-time.After(*interval - gather):
		case <-ctx.Done():
		}
		t.render(stdout, stats, time.Now(), *interval)
		return nil
	}

	fmt.Fprint(stdout, enterScreen)
	defer fmt.Fprint(stdout, leaveScreen)
	started := time.Now()
	tick := time.NewTicker(*interval)
	defer tick.Stop()
	for {
		stats, err := gatherStats(ctx, nc, cf.prefix, gather)
		if err != nil {
			return err
		}
		var b strings.Builder
		b.WriteString(redraw)
		t.render(&b, stats, time.Now(), min(time.Since(started), *window))
		b.WriteString("\nCtrl-C to quit\n")
		if _, err := io.WriteString(stdout, b.String()); err != nil {
			return fmt.Errorf("draw: %w", err)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-tick.C:
		}
	}
}

// topView keeps the usage records of the last window.
type topView struct {
	window  time.Duration
	tenants int

	mu   sync.Mutex
	recs []topRecord // in arrival order
}

type topRecord struct {
	at     time.Time
	tenant string
	code   string
	ran    bool
	wall   time.Duration
	queue  time.Duration
	cpu    time.Duration
}

func newTopView(window time.Duration, tenants int) *topView {
	return &topView{window: window, tenants: tenants}
}

// record is the usage subscription's handler.
func (t *topView) record(m *nats.Msg) {
	var r protocol.UsageRecord
	if json.Unmarshal(m.Data, &r) != nil || r.IsolateKey == "" {
		return
	}
	now := time.Now()
	t.mu.Lock()
	defer t.mu.Unlock()
	t.recs = append(t.recs, topRecord{at: now, tenant: protocol.TenantKey(r.Application, r.IsolateKey), code: r.Code, ran: r.Start != "",
		wall: time.Duration(r.WallMicros) * time.Microsecond, queue: time.Duration(r.QueueMicros) * time.Microsecond,
		cpu: time.Duration(r.CPUMicros) * time.Microsecond})
	t.trim(now)
}

// trim drops records older than the window. t.mu is held.
func (t *topView) trim(now time.Time) {
	i := sort.Search(len(t.recs), func(i int) bool { return now.Sub(t.recs[i].at) <= t.window })
	if i > 0 {
		t.recs = append(t.recs[:0], t.recs[i:]...)
	}
}

// render writes one screen: the workers, then the runs of the last span
// (the window, or less since the view started).
func (t *topView) render(w io.Writer, stats []protocol.WorkerStats, now time.Time, span time.Duration) {
	t.mu.Lock()
	t.trim(now)
	recs := slices.Clone(t.recs)
	t.mu.Unlock()

	fmt.Fprintf(w, "isode top  %s  %d workers\n\n", now.UTC().Format("15:04:05"), len(stats))
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "WORKER\tSHARDS\tIN FLIGHT\tFREE\tASSIGNED\tBUSY\tCREATING\tQUEUED\tL/H\tDEATHS\tUPTIME")
	var shards int
	for _, s := range stats {
		p := s.Pool
		shards += len(s.Shards)
		fmt.Fprintf(tw, "%s\t%d\t%d\t%d\t%d\t%d\t%d\t%d\t%d/%d\t%d\t%s\n", s.Worker, len(s.Shards), s.InFlight,
			p.Free, p.Assigned, p.Busy, p.Creating, p.Queued, p.Low, p.High, p.Deaths, now.Sub(s.Started).Round(time.Second))
	}
	tw.Flush()

	var walls, queues []time.Duration
	errs := map[string]int{}
	type tenantSum struct {
		key        string
		runs, errs int
		cpu, wall  time.Duration
	}
	byTenant := map[string]*tenantSum{}
	for _, r := range recs {
		if r.ran {
			walls = append(walls, r.wall)
		}
		queues = append(queues, r.queue)
		ts := byTenant[r.tenant]
		if ts == nil {
			ts = &tenantSum{key: r.tenant}
			byTenant[r.tenant] = ts
		}
		ts.runs++
		ts.cpu += r.cpu
		ts.wall += r.wall
		if r.code != protocol.CodeOK {
			errs[r.code]++
			ts.errs++
		}
	}
	slices.Sort(walls)
	slices.Sort(queues)
	secs := max(span.Seconds(), 0.001)
	fmt.Fprintf(w, "\nlast %s: %.1f runs/s  run p50 %s  p99 %s  queue p50 %s  p99 %s  errors %d  shards owned %d\n",
		span.Round(100*time.Millisecond), float64(len(recs))/secs,
		quantile(walls, 0.50), quantile(walls, 0.99), quantile(queues, 0.50), quantile(queues, 0.99), total(errs), shards)
	if len(errs) > 0 {
		codes := make([]string, 0, len(errs))
		for c, n := range errs {
			codes = append(codes, fmt.Sprintf("%s %d", c, n))
		}
		slices.Sort(codes)
		fmt.Fprintf(w, "errors: %s\n", strings.Join(codes, ", "))
	}

	sums := make([]*tenantSum, 0, len(byTenant))
	for _, s := range byTenant {
		sums = append(sums, s)
	}
	slices.SortFunc(sums, func(a, b *tenantSum) int {
		return cmp.Or(cmp.Compare(b.runs, a.runs), cmp.Compare(b.cpu, a.cpu), strings.Compare(a.key, b.key))
	})
	fmt.Fprintln(w, "\nbusiest tenants")
	tw = tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "TENANT\tRUNS/S\tERRORS\tCPU MS\tWALL MS")
	for i, s := range sums {
		if i == t.tenants {
			break
		}
		fmt.Fprintf(tw, "%s\t%.1f\t%d\t%.1f\t%.1f\n", s.key, float64(s.runs)/secs, s.errs,
			float64(s.cpu.Microseconds())/1000, float64(s.wall.Microseconds())/1000)
	}
	tw.Flush()
}

// quantile returns the q-quantile of sorted durations (nearest rank), or
// "-" when there are none.
func quantile(sorted []time.Duration, q float64) string {
	if len(sorted) == 0 {
		return "-"
	}
	i := int(q*float64(len(sorted))+0.5) - 1
	i = min(max(i, 0), len(sorted)-1)
	return fmtDur(sorted[i])
}

func fmtDur(d time.Duration) string {
	switch {
	case d < time.Millisecond:
		return fmt.Sprintf("%dus", d.Microseconds())
	case d < time.Second:
		return fmt.Sprintf("%.1fms", float64(d.Microseconds())/1000)
	}
	return fmt.Sprintf("%.2fs", d.Seconds())
}

func total(m map[string]int) int {
	n := 0
	for _, v := range m {
		n += v
	}
	return n
}
