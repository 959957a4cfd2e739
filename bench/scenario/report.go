package scenario

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"text/tabwriter"

	"github.com/imd-dev/imd/bench"
)

// mib formats a byte count in MiB.
func mib(b int64) string { return fmt.Sprintf("%.1f MiB", float64(b)/(1<<20)) }

// signedMiB formats a byte delta in MiB with its sign.
func signedMiB(b int64) string { return fmt.Sprintf("%+.1f MiB", float64(b)/(1<<20)) }

func latencyRow(w io.Writer, name string, s bench.Summary) {
	fmt.Fprintf(w, "  %s\t%d\t%.2f\t%.2f\t%.2f\t%.2f\t%.2f\t%.2f\t\n",
		name, s.Count, s.MinMs, s.P50Ms, s.P90Ms, s.P99Ms, s.P999Ms, s.MaxMs)
}

// WriteTable prints the report as imbench does.
func (r *ConnsReport) WriteTable(out io.Writer) {
	status := "OK"
	if !r.OK {
		status = "NOT OK"
	}
	srv := r.Server
	origin := "attached"
	if srv.Started {
		origin = "started by imbench: " + srv.Binary
	}
	fmt.Fprintf(out, "imbench conns  %s  %s\n", r.Time.Format("2006-01-02 15:04:05Z"), commandArgs(r.Command))
	if len(srv.Gateways) > 1 {
		fmt.Fprintf(out, "server   logic pid %d, http %s, and %d gateways %s (%s); server figures below add up the gateways\n",
			srv.PID, srv.HTTP, len(srv.Gateways), strings.Join(srv.Gateways, " "), origin)
	} else {
		fmt.Fprintf(out, "server   pid %d, gateway %s, http %s (%s)\n", srv.PID, srv.Gateway, srv.HTTP, origin)
	}
	fmt.Fprintf(out, "clients  %s, %d process(es)%s, %d logins in flight, src addresses %d, uids %d..%d\n",
		r.Clients.Kind, r.Clients.Processes, map[bool]string{true: " (in imbench)", false: " (workers)"}[r.Clients.InProcess],
		r.Clients.Concurrency, max(r.Clients.SrcIPs, 1), r.Clients.UIDBase, r.Clients.UIDBase+uint64(r.Requested)-1)
	fmt.Fprintf(out, "host     %d CPUs, %s, open files %d, loadavg %s -> %s\n\n",
		r.Host.NumCPU, r.Host.GoVersion, r.Host.OpenFiles, r.Host.LoadBefore, r.Host.LoadAfter)

	fmt.Fprintf(out, "connections  requested %d, opened %d, failed %d; held: clients %d, server %d (%s %d -> %d), sessions %d  %s\n",
		r.Requested, r.Opened, r.Failed, r.HeldClient, r.HeldServer, MetricGatewayConns,
		r.Before.GatewayConns, r.After.GatewayConns, r.Sessions, status)
	if r.Aborted != "" {
		fmt.Fprintf(out, "aborted      %s\n", r.Aborted)
	}
	for _, k := range sortedKeys(r.Errors) {
		fmt.Fprintf(out, "error        %dx %s\n", r.Errors[k], k)
	}
	fmt.Fprintf(out, "logins       %d in %.2fs = %.0f logins/s; server CPU %.2fs, %.0f us per login (%s)\n\n",
		r.Opened, r.LoginSeconds, r.LoginRate, r.LoginServerCPU, r.LoginServerCPUPerUs, cpuSourceName(r.LoginServerCPUSource))

	tw := tabwriter.NewWriter(out, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintf(tw, "  latency (ms)\tcount\tmin\tp50\tp90\tp99\tp99.9\tmax\t\n")
	latencyRow(tw, "tcp connect", r.Dial)
	latencyRow(tw, "login", r.Login)
	_ = tw.Flush()
	fmt.Fprintln(out)

	b, a, pc := &r.Before, &r.After, &r.PerConn
	tw = tabwriter.NewWriter(out, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintf(tw, "  server, after %.0fs settle\tbefore\tafter\tdelta\tper conn\t\n", r.SettleSeconds)
	row := func(name string, before, after int64, per float64) {
		fmt.Fprintf(tw, "  %s\t%s\t%s\t%s\t%.0f B\t\n", name, mib(before), mib(after), signedMiB(after-before), per)
	}
	row("RSS ("+a.RSSSource+")", b.RSSBytes, a.RSSBytes, pc.RSS)
	row("Go heap in use", b.HeapInuse, a.HeapInuse, pc.HeapInuse)
	row("Go stacks in use", b.StackInuse, a.StackInuse, pc.StackInuse)
	row("Go heap + stacks", b.HeapInuse+b.StackInuse, a.HeapInuse+a.StackInuse, pc.HeapPlusStacks)
	row("Go sys (from OS)", b.GoSys, a.GoSys, pc.GoSys)
	fmt.Fprintf(tw, "  goroutines\t%d\t%d\t%+d\t%.2f\t\n", b.Goroutines, a.Goroutines, a.Goroutines-b.Goroutines, pc.Goroutines)
	if a.Threads > 0 {
		fmt.Fprintf(tw, "  OS threads\t%d\t%d\t%+d\t\t\n", b.Threads, a.Threads, a.Threads-b.Threads)
	}
	if a.LogicRSSBytes > 0 {
		fmt.Fprintf(tw, "  logic node RSS (router)\t%s\t%s\t%s\t%.0f B\t\n", mib(b.LogicRSSBytes), mib(a.LogicRSSBytes),
			signedMiB(a.LogicRSSBytes-b.LogicRSSBytes), r.PerConn.LogicRSS)
	}
	_ = tw.Flush()
	fmt.Fprintf(out, "\nclient   RSS %s -> %s over %d process(es), %.0f B per held connection (%s client)\n",
		mib(r.ClientRSSBefore), mib(r.ClientRSSBytes), r.Clients.Processes, r.ClientRSSPerConn, r.Clients.Kind)
	fmt.Fprintf(out, "close    gateway back to %d connections %.2fs after the clients closed\n", r.ConnsAfterClose, r.CloseSeconds)
	if r.ServerStopResult != "" {
		fmt.Fprintf(out, "server stop: %s\n", r.ServerStopResult)
	}
}

// WriteJSON writes v as indented JSON to path; a bare file name goes into
// dir. It returns the path written.
func WriteJSON(path, dir string, v any) (string, error) {
	if filepath.Base(path) == path && dir != "" {
		path = filepath.Join(dir, path)
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return "", err
	}
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return "", err
	}
	return path, os.WriteFile(path, append(b, '\n'), 0o644)
}

// WriteTable prints each step's table, then one line per step.
func (doc *ConnsStepsReport) WriteTable(out io.Writer) {
	for i, r := range doc.Runs {
		if i > 0 {
			fmt.Fprintln(out)
		}
		r.WriteTable(out)
	}
	if len(doc.Runs) == 0 {
		return
	}
	fmt.Fprintf(out, "\nimbench conns --steps  memory per held connection (server; no forced GC)\n")
	tw := tabwriter.NewWriter(out, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintf(tw, "  connections\theld\tlogins/s\tsrv us/login\tRSS/conn\theap+stacks/conn\tGo sys/conn\tgoroutines/conn\tclient RSS/conn\t\n")
	for _, r := range doc.Runs {
		fmt.Fprintf(tw, "  %d\t%d\t%.0f\t%.0f\t%.0f B\t%.0f B\t%.0f B\t%.2f\t%.0f B\t\n", r.Requested, r.HeldServer, r.LoginRate, r.LoginServerCPUPerUs,
			r.PerConn.RSS, r.PerConn.HeapPlusStacks, r.PerConn.GoSys, r.PerConn.Goroutines, r.ClientRSSPerConn)
	}
	_ = tw.Flush()
}

// ChartFile picks a chart's path: the --chart flag, else the --json path
// with .svg in place of its extension, else def in dir.
func ChartFile(flagVal, jsonPath, dir, def string) string {
	switch {
	case flagVal != "":
		if filepath.Base(flagVal) == flagVal && dir != "" {
			return filepath.Join(dir, flagVal)
		}
		return flagVal
	case jsonPath != "":
		p := strings.TrimSuffix(jsonPath, filepath.Ext(jsonPath)) + ".svg"
		if filepath.Base(p) == p && dir != "" {
			p = filepath.Join(dir, p)
		}
		return p
	}
	return filepath.Join(dir, def)
}

// WriteTable prints a load scenario's report: one line per run, then
// min/median/max per rate when a rate ran more than once.
func (r *LoadReport) WriteTable(out io.Writer) {
	srv := r.Server
	origin := "attached"
	if srv.Started {
		origin = "started by imbench: " + srv.Binary
	}
	fmt.Fprintf(out, "imbench %s  %s  %s\n", r.Scenario, r.Time.Format("2006-01-02 15:04:05Z"), commandArgs(r.Command))
	if len(srv.Gateways) > 1 {
		fmt.Fprintf(out, "server   logic pid %d, http %s, and %d gateways %s (%s); server figures below add up the gateways\n",
			srv.PID, srv.HTTP, len(srv.Gateways), strings.Join(srv.Gateways, " "), origin)
	} else {
		fmt.Fprintf(out, "server   pid %d, gateway %s, http %s (%s)\n", srv.PID, srv.Gateway, srv.HTTP, origin)
	}
	if setup, err := json.Marshal(r.Setup); err == nil {
		fmt.Fprintf(out, "setup    %s\n", setup)
	}
	fmt.Fprintf(out, "host     %s, %d CPUs, %s, loadavg %s -> %s\n", r.Host.Hostname, r.Host.NumCPU, r.Host.GoVersion, r.Host.LoadBefore, r.Host.LoadAfter)
	fmt.Fprintf(out, "latency  from the scheduled send time (open loop); svc: from the real send call; ack: send call to its response\n")
	src := ""
	for _, run := range r.Runs {
		if run.ServerCPUSource != "" {
			src = run.ServerCPUSource
		}
	}
	fmt.Fprintf(out, "cpu      server: %s; client: imbench's own (getrusage)\n\n", cpuSourceName(src))

	du, ou := Singular(r.DeliveryUnit), Singular(r.OpUnit)
	// The server CPU per operation gets a column of its own when an
	// operation is not one delivery (a push, a group message).
	perOp := r.OpUnit != r.DeliveryUnit
	opHead := ""
	if perOp {
		opHead = "\tsrv us/" + ou
	}
	tw := tabwriter.NewWriter(out, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintf(tw, "  offered %s/s\tissued/s\t%s/s\tfailed\tmissing\tp50 ms\tp90\tp99\tp99.9\tmax\tsvc p99\tack p99\tsrv cores\tsrv us/%s%s\tclient cores\tclient us/%s\t\n",
		r.OpUnit, r.DeliveryUnit, du, opHead, du)
	for _, run := range r.Runs {
		status := ""
		if !run.OK {
			status = "  NOT OK"
		}
		if run.Saturated {
			status += "  saturated"
		}
		if run.Unsent > 0 {
			status += fmt.Sprintf(" (%d unsent)", run.Unsent)
		}
		l := run.Latency
		op := ""
		if perOp {
			op = fmt.Sprintf("\t%.1f", run.ServerUsPerOp)
		}
		fmt.Fprintf(tw, "  %.0f\t%.0f\t%.0f\t%d\t%d\t%.2f\t%.2f\t%.2f\t%.2f\t%.2f\t%.2f\t%.2f\t%.2f\t%.1f%s\t%.2f\t%.1f\t%s\n",
			run.Rate, run.IssueRate, run.Throughput, run.Failed, run.Missing, l.P50Ms, l.P90Ms, l.P99Ms, l.P999Ms, l.MaxMs,
			run.Service.P99Ms, run.Ack.P99Ms, run.ServerCores, run.ServerUsPerDeliv, op, run.ClientCores, run.ClientUsPerDeliv, status)
	}
	_ = tw.Flush()
	if len(r.Rates) < len(r.Runs) {
		fmt.Fprintf(out, "\n  per rate, min / median / max over its runs:\n")
		tw = tabwriter.NewWriter(out, 0, 0, 2, ' ', tabwriter.AlignRight)
		fmt.Fprintf(tw, "  offered/s\truns\t%s/s\tp50 ms\tp99 ms\tp99.9 ms\tsrv us/%s\tclient us/%s\t\n", r.DeliveryUnit, du, du)
		mmm := func(v [3]float64, prec int) string {
			return fmt.Sprintf("%.*f / %.*f / %.*f", prec, v[0], prec, v[1], prec, v[2])
		}
		for _, s := range r.Rates {
			fmt.Fprintf(tw, "  %.0f\t%d\t%s\t%s\t%s\t%s\t%s\t%s\t\n", s.Rate, s.Runs, mmm(s.Throughput, 0), mmm(s.P50Ms, 2), mmm(s.P99Ms, 2), mmm(s.P999Ms, 2),
				mmm(s.ServerUsPerDeliv, 1), mmm(s.ClientUsPerDeliv, 1))
		}
		_ = tw.Flush()
	}
	for _, run := range r.Runs {
		if run.Profile != "" {
			fmt.Fprintf(out, "  at %.0f/s, run %d: server CPU profile %s\n", run.Rate, run.Repeat, run.Profile)
		}
		for _, k := range sortedKeys(run.Errors) {
			fmt.Fprintf(out, "  at %.0f/s: %dx %s\n", run.Rate, run.Errors[k], k)
		}
		if run.Duplicates > 0 || run.Stray > 0 {
			fmt.Fprintf(out, "  at %.0f/s: %d duplicate and %d stray deliveries\n", run.Rate, run.Duplicates, run.Stray)
		}
	}
	for _, n := range r.Notes {
		fmt.Fprintf(out, "  %s\n", n)
	}
	if r.Chart != "" {
		fmt.Fprintf(out, "\nchart    %s\n", r.Chart)
	}
	if r.ServerStopResult != "" {
		fmt.Fprintf(out, "server stop: %s\n", r.ServerStopResult)
	}
}

// cpuSourceName says where a server CPU figure comes from.
func cpuSourceName(src string) string {
	switch src {
	case CPUFromProc:
		return "CPU time of the server processes from " + CPUFromProc
	case CPUFromMetrics:
		return "CPU time of the server processes from their " + CPUFromMetrics
	}
	return "not measured"
}

// commandArgs is the command line after "imbench <scenario>".
func commandArgs(cmd []string) string {
	if len(cmd) <= 2 {
		return ""
	}
	return strings.Join(cmd[2:], " ")
}
