package main

import (
	"cmp"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/isode-run/isode/pkg/protocol"
)

func statsCmd(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("submit stats", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var cf connFlags
	cf.register(fs)
	wait := fs.Duration("wait", 500*time.Millisecond, "how long to gather answers")
	asJSON := fs.Bool("json", false, "print JSON, one object per worker in an array")
	tenants := fs.Bool("tenants", false, "print the busiest tenants' totals, over all workers, instead of the workers")
	if err := fs.Parse(args); err != nil {
		return err
	}
	nc, err := cf.connect("isode-stats")
	if err != nil {
		return err
	}
	defer nc.Close()
	all, err := gatherStats(ctx, nc, cf.prefix, *wait)
	if err != nil {
		return err
	}
	if *asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(all)
	}
	if len(all) == 0 {
		fmt.Fprintln(stdout, "no worker answered")
		return nil
	}
	if *tenants {
		return printTenants(stdout, mergeTenants(all), 0)
	}
	tw := tabwriter.NewWriter(stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "WORKER\tSHARDS\tIN FLIGHT\tFREE\tASSIGNED\tBUSY\tCREATING\tQUEUED\tL/H\tHITS\tPOOL HITS\tCOLD\tEVICT\tRECYCLE\tDEATHS\tFAILED\tREJECTED\tUPTIME")
	for _, s := range all {
		p := s.Pool
		fmt.Fprintf(tw, "%s\t%d %s\t%d\t%d\t%d\t%d\t%d\t%d\t%d/%d\t%d\t%d\t%d\t%d\t%d\t%d\t%d\t%d\t%s\n",
			s.Worker, len(s.Shards), shardRanges(s.Shards), s.InFlight, p.Free, p.Assigned, p.Busy, p.Creating, p.Queued, p.Low, p.High,
			p.Hits, p.PoolHits, p.ColdStarts, p.Evictions, p.Recycles, p.Deaths, p.Failures, p.Rejected,
			time.Since(s.Started).Round(time.Second))
	}
	return tw.Flush()
}

// gatherStats asks every worker for its stats and collects the answers
// that arrive within wait.
func gatherStats(ctx context.Context, nc *nats.Conn, prefix string, wait time.Duration) ([]protocol.WorkerStats, error) {
	inbox := nc.NewInbox()
	sub, err := nc.SubscribeSync(inbox)
	if err != nil {
		return nil, err
	}
	defer sub.Unsubscribe()
	if err := nc.PublishRequest(protocol.StatsSubject(prefix), inbox, nil); err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(ctx, wait)
	defer cancel()
	var all []protocol.WorkerStats
	for {
		m, err := sub.NextMsgWithContext(ctx)
		if err != nil {
			break
		}
		var s protocol.WorkerStats
		if json.Unmarshal(m.Data, &s) == nil && s.Worker != "" {
			all = append(all, s)
		}
	}
	slices.SortFunc(all, func(a, b protocol.WorkerStats) int { return strings.Compare(a.Worker, b.Worker) })
	return all, nil
}

// mergeTenants adds up the tenants' totals the workers reported (a tenant
// may have run on several, after its shard moved), busiest (most CPU)
// first, the folded others last.
func mergeTenants(all []protocol.WorkerStats) []protocol.TenantStats {
	byKey := map[string]*protocol.TenantStats{}
	var order []string
	for _, w := range all {
		for _, t := range w.Tenants {
			m := byKey[t.Key()]
			if m == nil {
				m = &protocol.TenantStats{IsolateKey: t.IsolateKey, Application: t.Application}
				byKey[t.Key()] = m
				order = append(order, t.Key())
			}
			m.Runs += t.Runs
			m.CPUMicros += t.CPUMicros
			m.WallMicros += t.WallMicros
			for code, n := range t.Errors {
				if m.Errors == nil {
					m.Errors = map[string]uint64{}
				}
				m.Errors[code] += n
			}
		}
	}
	out := make([]protocol.TenantStats, 0, len(order))
	for _, k := range order {
		out = append(out, *byKey[k])
	}
	slices.SortStableFunc(out, func(a, b protocol.TenantStats) int {
		if (a.IsolateKey == protocol.OtherTenants) != (b.IsolateKey == protocol.OtherTenants) {
			if a.IsolateKey == protocol.OtherTenants {
				return 1
			}
			return -1
		}
		return cmp.Or(cmp.Compare(b.CPUMicros, a.CPUMicros), cmp.Compare(b.Runs, a.Runs), strings.Compare(a.Key(), b.Key()))
	})
	return out
}

// printTenants prints a table of tenants' totals, at most limit rows of
// them (0: all).
func printTenants(w io.Writer, ts []protocol.TenantStats, limit int) error {
	if len(ts) == 0 {
		_, err := fmt.Fprintln(w, "no runs yet")
		return err
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "TENANT\tRUNS\tERRORS\tCPU MS\tWALL MS\tERRORS BY CODE")
	for i, t := range ts {
		if limit > 0 && i == limit {
			break
		}
		var errs uint64
		codes := make([]string, 0, len(t.Errors))
		for code, n := range t.Errors {
			errs += n
			codes = append(codes, fmt.Sprintf("%s:%d", code, n))
		}
		slices.Sort(codes)
		fmt.Fprintf(tw, "%s\t%d\t%d\t%.1f\t%.1f\t%s\n", t.Key(), t.Runs, errs,
			float64(t.CPUMicros)/1000, float64(t.WallMicros)/1000, strings.Join(codes, " "))
	}
	return tw.Flush()
}

// shardRanges prints [0-3,7,9-10].
func shardRanges(s []int) string {
	if len(s) == 0 {
		return "[]"
	}
	var b strings.Builder
	b.WriteByte('[')
	for i := 0; i < len(s); {
		j := i
		for j+1 < len(s) && s[j+1] == s[j]+1 {
			j++
		}
		if b.Len() > 1 {
			b.WriteByte(',')
		}
		if j > i {
			fmt.Fprintf(&b, "%d-%d", s[i], s[j])
		} else {
			fmt.Fprintf(&b, "%d", s[i])
		}
		i = j + 1
	}
	b.WriteByte(']')
	return b.String()
}
