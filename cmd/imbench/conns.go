package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"runtime"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/imd-dev/imd/bench"
)

const connsSynopsis = `Measure what an idle logged-in connection costs the gateway, and how fast
logins go. imbench takes a baseline of the server (VmRSS, Go heap and stacks,
goroutines), opens -n connections that each log in as their own uid with -c
logins in flight, waits --settle, measures again and reports the difference
per connection. The number of connections held is checked against the
server's imd_gateway_connections gauge. The run fails (exit 1) unless all -n
connections are held at the end.

Clients: --client sdk uses the real Go SDK (sdk.Dial + Login); the kernel
picks the source address, so one run holds at most about one ephemeral port
range of connections (see /proc/sys/net/ipv4/ip_local_port_range). --client
raw is a minimal login client in imbench that spreads connections over the
source addresses 127.0.0.1..127.0.0.K (--src-ips), for more connections than
that. When -n exceeds what one process may hold (open files), imbench runs
its clients in several worker processes.

Past one process's open-file limit on the server side too, --gateways K
starts a logic node and K gateway processes (` + "`imd logic`, `imd gateway`" + `) and spreads
the connections over them; the memory figures then add up the gateways, and
the logic node's growth (its router holds every session) is shown apart.`

// fdReserve is kept free of connections in each client process.
const fdReserve = 200

type connsFlags struct {
	server       serverFlags
	n, c         int
	client       string
	srcIPs       int
	workers      int
	uidBase      uint64
	settle       time.Duration
	baselineWait time.Duration
	dialTimeout  time.Duration
	loginTimeout time.Duration
	maxErrors    int
	timeout      time.Duration
	jsonPath     string
	resultsDir   string
	steps        intList
	chartPath    string
}

func (f *connsFlags) validate() error {
	var errs []error
	if f.n < 1 {
		errs = append(errs, errors.New("-n must be >= 1"))
	}
	if f.c < 1 {
		errs = append(errs, errors.New("-c must be >= 1"))
	}
	if f.client != clientSDK && f.client != clientRaw {
		errs = append(errs, fmt.Errorf("--client %q: want sdk or raw", f.client))
	}
	if f.srcIPs < 0 || f.srcIPs > 254 {
		errs = append(errs, errors.New("--src-ips must be in [0, 254]"))
	}
	if len(f.steps) > 0 {
		f.n = slices.Min(f.steps) // the checks below hold for every step
	}
	if f.workers < 0 || f.workers > f.n {
		errs = append(errs, errors.New("--workers must be in [0, n]"))
	}
	if f.uidBase < 1 {
		errs = append(errs, errors.New("--uid-base must be >= 1"))
	}
	if f.settle < 0 || f.baselineWait < 0 || f.dialTimeout <= 0 || f.loginTimeout <= 0 || f.timeout <= 0 {
		errs = append(errs, errors.New("durations must be positive"))
	}
	return errors.Join(errs...)
}

func runConns(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	var f connsFlags
	fs := newFlagSet("conns", connsSynopsis, stdout, stderr)
	f.server.bind(fs)
	f.server.bindCluster(fs)
	fs.IntVar(&f.n, "n", 10000, "connections to open and hold")
	fs.IntVar(&f.c, "c", 200, "logins in flight at once, over all client processes")
	fs.StringVar(&f.client, "client", clientSDK, "client: sdk (the Go SDK) or raw (imbench's minimal login client)")
	fs.IntVar(&f.srcIPs, "src-ips", 0, "spread over source addresses 127.0.0.1..127.0.0.K (0: as few as -n needs)")
	fs.IntVar(&f.workers, "workers", 0, "client worker processes (0: none if this process may hold -n connections, else as many as needed)")
	fs.Uint64Var(&f.uidBase, "uid-base", 1, "connection i logs in as uid uid-base+i")
	fs.DurationVar(&f.settle, "settle", 15*time.Second, "wait between the last login and the measurement (no GC is forced)")
	fs.DurationVar(&f.baselineWait, "baseline-wait", 2*time.Second, "wait between the server being ready and the baseline measurement")
	fs.DurationVar(&f.dialTimeout, "dial-timeout", 10*time.Second, "bound on one TCP connect")
	fs.DurationVar(&f.loginTimeout, "login-timeout", 10*time.Second, "bound on one login request")
	fs.IntVar(&f.maxErrors, "max-errors", 100, "stop opening connections after this many failed (0: never)")
	fs.DurationVar(&f.timeout, "timeout", 10*time.Minute, "bound on the whole run")
	fs.StringVar(&f.jsonPath, "json", "", "also write the report as JSON to `FILE` (a bare file name goes into --results-dir)")
	fs.StringVar(&f.resultsDir, "results-dir", "results", "folder for --json and --chart files given without a directory")
	fs.Var(&f.steps, "steps", "comma-separated connection counts, e.g. 1000,5000,10000: one measurement (own server) per count instead of -n, and a chart of memory per connection against connections")
	fs.StringVar(&f.chartPath, "chart", "", "with --steps: the SVG chart `FILE` (default: --json with .svg, else conns-memory.svg in --results-dir)")
	if err := parseFlags(fs, args, os.LookupEnv); err != nil {
		return err
	}
	if err := f.validate(); err != nil {
		fmt.Fprintf(stderr, "imbench conns: %v\n", err)
		return errUsage
	}
	command := append([]string{"imbench", "conns"}, args...)
	if len(f.steps) > 0 {
		return connsSteps(ctx, &f, command, stdout, stderr)
	}
	return conns(ctx, &f, command, stdout, stderr)
}

// conns measures -n connections once.
func conns(ctx context.Context, f *connsFlags, command []string, stdout, stderr io.Writer) error {
	rep, err := measureConns(ctx, f, command, stderr)
	if err != nil {
		return err
	}
	writeConnsTable(stdout, rep)
	if f.jsonPath != "" {
		path, err := writeJSON(f.jsonPath, f.resultsDir, rep)
		if err != nil {
			return err
		}
		fmt.Fprintf(stderr, "imbench conns: report written to %s\n", path)
	}
	if !rep.OK {
		return connsNotOK(rep)
	}
	return nil
}

func connsNotOK(rep *connsReport) error {
	return fmt.Errorf("held %d connections by the clients' count and %d by the server's, of %d requested",
		rep.HeldClient, rep.HeldServer, rep.Requested)
}

// connsStepsReport is the JSON document of a --steps run.
type connsStepsReport struct {
	Scenario string         `json:"scenario"`
	Time     time.Time      `json:"time"`
	Command  []string       `json:"command"`
	Steps    []int          `json:"steps"`
	Runs     []*connsReport `json:"runs"` // one per step, each on its own server
	Chart    string         `json:"chart,omitempty"`
	OK       bool           `json:"ok"`
}

// connsSteps measures each step's connection count on a server of its own
// and charts memory per connection against connections.
func connsSteps(ctx context.Context, f *connsFlags, command []string, stdout, stderr io.Writer) error {
	doc := &connsStepsReport{Scenario: "conns", Time: time.Now().UTC(), Command: command, Steps: f.steps, OK: true}
	var failed error
	for i, n := range f.steps {
		g := *f
		g.n = n
		fmt.Fprintf(stderr, "imbench conns: step %d/%d: %d connections\n", i+1, len(f.steps), n)
		rep, err := measureConns(ctx, &g, command, stderr)
		if err != nil {
			failed = fmt.Errorf("step %d connections: %w", n, err)
			doc.OK = false
			break
		}
		if i > 0 {
			fmt.Fprintln(stdout)
		}
		writeConnsTable(stdout, rep)
		doc.Runs = append(doc.Runs, rep)
		if !rep.OK {
			doc.OK = false
			failed = fmt.Errorf("step %d: %w", n, connsNotOK(rep))
		}
	}
	if len(doc.Runs) > 0 {
		writeConnsStepsTable(stdout, doc)
		chart := memoryChart(doc)
		path := chartFile(f.chartPath, f.jsonPath, f.resultsDir, "conns-memory.svg")
		if err := chart.WriteFile(path); err != nil {
			return err
		}
		doc.Chart = path
		fmt.Fprintf(stderr, "imbench conns: chart written to %s\n", path)
	}
	if f.jsonPath != "" {
		path, err := writeJSON(f.jsonPath, f.resultsDir, doc)
		if err != nil {
			return err
		}
		fmt.Fprintf(stderr, "imbench conns: report written to %s\n", path)
	}
	return failed
}

// goalBytesPerConn is the goal for an idle connection's gateway
// user-space memory.
const goalBytesPerConn = 2048

// memoryChart plots the server's memory per held connection against the
// connections held, one point per step.
func memoryChart(doc *connsStepsReport) *bench.Chart {
	var rss, heap, sys, logicRSS []bench.Point
	var maxN float64
	for _, r := range doc.Runs {
		x := float64(r.HeldServer)
		maxN = max(maxN, x)
		rss = append(rss, bench.Point{X: x, Y: r.PerConn.RSS})
		heap = append(heap, bench.Point{X: x, Y: r.PerConn.HeapPlusStacks})
		sys = append(sys, bench.Point{X: x, Y: r.PerConn.GoSys})
		if r.PerConn.LogicRSS != 0 {
			logicRSS = append(logicRSS, bench.Point{X: x, Y: r.PerConn.LogicRSS})
		}
	}
	sub := ""
	if len(doc.Runs) > 0 {
		r := doc.Runs[0]
		sub = fmt.Sprintf("%s, %d CPUs, %s client, %.0fs settle, no forced GC", r.Host.Hostname, r.Host.NumCPU, r.Clients.Kind, r.SettleSeconds)
		if n := len(r.Server.Gateways); n > 1 {
			sub += fmt.Sprintf("; %d gateway processes added up, logic apart", n)
		}
	}
	series := []bench.Series{
		{Name: "RSS / conn", Points: rss},
		{Name: "Go heap+stacks / conn", Points: heap},
		{Name: "Go sys / conn", Points: sys},
	}
	if len(logicRSS) > 0 {
		series = append(series, bench.Series{Name: "logic RSS / session", Points: logicRSS})
	}
	series = append(series, bench.Series{Name: "goal 2 KiB", Points: []bench.Point{{X: 0, Y: goalBytesPerConn}, {X: maxN, Y: goalBytesPerConn}}, Dashed: true})
	return &bench.Chart{
		Title:    "imd gateway: memory per idle logged-in connection",
		Subtitle: sub,
		XLabel:   "connections held",
		YLabel:   "bytes per connection",
		Series:   series,
	}
}

// connsReport is the scenario's result; the JSON document is this struct.
type connsReport struct {
	Scenario string     `json:"scenario"`
	Time     time.Time  `json:"time"`
	Command  []string   `json:"command"`
	Host     hostInfo   `json:"host"`
	Server   *target    `json:"server"`
	Clients  clientInfo `json:"clients"`

	Requested  int            `json:"requested"`
	Opened     int64          `json:"opened"`
	Failed     int64          `json:"failed"`
	Errors     map[string]int `json:"errors,omitempty"`
	Aborted    string         `json:"aborted,omitempty"`
	HeldClient int64          `json:"held_client"` // opened less dropped, as the clients see it
	HeldServer int64          `json:"held_server"` // rise of imd_gateway_connections
	Sessions   int64          `json:"held_sessions"`
	OK         bool           `json:"ok"` // every requested connection is held by both sides

	LoginSeconds float64 `json:"login_seconds"` // first dial to last login
	LoginRate    float64 `json:"logins_per_second"`
	// LoginServerCPU is the server's CPU time while the connections were
	// opened (process_cpu_seconds_total), and per login.
	LoginServerCPU      float64       `json:"login_server_cpu_seconds"`
	LoginServerCPUPerUs float64       `json:"login_server_cpu_us_per_login"`
	Dial                bench.Summary `json:"dial_latency"`
	Login               bench.Summary `json:"login_latency"`

	SettleSeconds float64  `json:"settle_seconds"`
	Before        snapshot `json:"before"`
	After         snapshot `json:"after"`
	PerConn       perConn  `json:"per_conn"`

	ClientRSSBefore  int64   `json:"client_rss_before_bytes"` // over every client process
	ClientRSSBytes   int64   `json:"client_rss_bytes"`
	ClientRSSPerConn float64 `json:"client_rss_per_conn_bytes"` // (after - before) / held

	CloseSeconds     float64 `json:"close_seconds"`      // until the gauge was back at its baseline
	ConnsAfterClose  int64   `json:"conns_after_close"`  // gauge when imbench stopped waiting
	ServerStopResult string  `json:"server_stop_result"` // empty when the server stopped cleanly
}

type hostInfo struct {
	Hostname   string `json:"hostname"`
	NumCPU     int    `json:"num_cpu"`
	GoVersion  string `json:"go_version"`
	OpenFiles  uint64 `json:"open_files_limit"`
	PortRange  string `json:"ephemeral_port_range"`
	LoadBefore string `json:"loadavg_before"`
	LoadAfter  string `json:"loadavg_after"`
}

type clientInfo struct {
	Kind        string `json:"kind"`
	Processes   int    `json:"processes"` // 1: in imbench itself; more: worker processes
	InProcess   bool   `json:"in_process"`
	Concurrency int    `json:"concurrency"`
	SrcIPs      int    `json:"src_ips"`
	UIDBase     uint64 `json:"uid_base"`
}

// perConn is (after - before) / held for each server figure, in bytes
// (goroutines: a count).
type perConn struct {
	RSS            float64 `json:"rss_bytes"`
	HeapInuse      float64 `json:"go_heap_inuse_bytes"`
	StackInuse     float64 `json:"go_stack_inuse_bytes"`
	HeapPlusStacks float64 `json:"go_heap_plus_stacks_bytes"`
	GoSys          float64 `json:"go_sys_bytes"`
	Goroutines     float64 `json:"goroutines"`
	// LogicRSS is the logic node's RSS growth per session when it runs
	// apart from the gateways (--gateways > 1).
	LogicRSS float64 `json:"logic_rss_bytes,omitempty"`
}

func loadavg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return ""
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return ""
	}
	return strings.Join(f[:3], " ")
}

// measureConns runs one conns measurement and returns its report. An error
// means no measurement was made; a report that is not OK is returned
// without one.
func measureConns(ctx context.Context, f *connsFlags, command []string, stderr io.Writer) (_ *connsReport, err error) {
	ctx, cancel := context.WithTimeout(ctx, f.timeout)
	defer cancel()
	rep := &connsReport{Scenario: "conns", Time: time.Now().UTC(), Command: command, Requested: f.n}
	rep.Host = hostInfo{NumCPU: runtime.NumCPU(), GoVersion: runtime.Version(), LoadBefore: loadavg()}
	rep.Host.Hostname, _ = os.Hostname()

	// Raise our open-file limit first: a server we start inherits it.
	soft, _, ferr := bench.RaiseFileLimit()
	if ferr != nil {
		fmt.Fprintln(stderr, "imbench:", ferr)
	}
	rep.Host.OpenFiles = soft
	lo, hi, perr := bench.EphemeralPortRange()
	ports := 28000
	if perr == nil {
		ports = hi - lo + 1
		rep.Host.PortRange = fmt.Sprintf("%d-%d", lo, hi)
	}

	// Plan the clients before starting anything.
	usablePorts := ports * 9 / 10
	srcIPs := f.srcIPs
	if srcIPs == 0 {
		srcIPs = (f.n + usablePorts - 1) / usablePorts
	}
	if srcIPs > 0 && f.n > srcIPs*usablePorts {
		return nil, fmt.Errorf("-n %d needs more than --src-ips %d source addresses (~%d ports each)", f.n, srcIPs, usablePorts)
	}
	perProc := int(soft) - fdReserve
	if soft == 0 || ferr != nil {
		perProc = 1000
	}
	workers := f.workers
	if workers == 0 && f.n > perProc {
		workers = (f.n + perProc - 1) / perProc
	}
	if workers > 0 && (f.n+workers-1)/workers > perProc {
		return nil, fmt.Errorf("--workers %d: %d connections per process exceed the open-file limit %d", workers, (f.n+workers-1)/workers, soft)
	}
	rep.Clients = clientInfo{Kind: f.client, Processes: max(workers, 1), InProcess: workers == 0,
		Concurrency: f.c, SrcIPs: srcIPs, UIDBase: f.uidBase}

	if f.server.addr == "" {
		fmt.Fprintf(stderr, "imbench conns: starting server\n")
	}
	t, err := f.server.open(ctx, nil)
	if err != nil {
		return nil, err
	}
	rep.Server = t
	defer func() {
		if serr := t.stop(); serr != nil {
			rep.ServerStopResult = serr.Error()
			fmt.Fprintln(stderr, "imbench:", serr)
		}
	}()
	if t.Started {
		for _, pr := range t.Procs {
			fmt.Fprintf(stderr, "imbench conns: %s %s pid %d, gateway %q, http %s\n", t.Binary, pr.Role, pr.PID, pr.Gateway, pr.HTTP)
		}
		perGate := (f.n + len(t.gates()) - 1) / len(t.gates())
		if int(soft) > 0 && perGate > int(soft)-256 {
			fmt.Fprintf(stderr, "imbench conns: warning: a gateway's open-file limit %d is below its %d connections plus its reserve: use more --gateways\n", soft, perGate)
		}
	}

	if err := sleepCtx(ctx, f.baselineWait); err != nil {
		return nil, err
	}
	if rep.Before, err = t.snapshot(ctx); err != nil {
		return nil, fmt.Errorf("baseline: %w", err)
	}

	base := plan{Addr: t.Gateway, Addrs: t.Gateways, AppCode: t.AppCode, Secret: t.secret, Client: f.client, N: f.n, UIDBase: f.uidBase,
		Concurrency: f.c, SrcIPs: srcIPs, DialTimeout: f.dialTimeout, LoginTimeout: f.loginTimeout,
		TokenTTL: f.timeout + time.Hour, MaxErrors: f.maxErrors}
	var fl fleet
	if workers == 0 {
		fl = startLocal(ctx, base)
	} else {
		wf, err := startWorkers(splitPlan(base, workers), stderr)
		if err != nil {
			return nil, err
		}
		fl = wf
	}
	closed := false
	closeFleet := func() {
		if closed {
			return
		}
		closed = true
		if cerr := fl.close(); cerr != nil {
			fmt.Fprintln(stderr, "imbench:", cerr)
		}
	}
	defer closeFleet()

	cpu0, cpuErr := t.cpuSeconds(ctx)
	fmt.Fprintf(stderr, "imbench conns: opening %d connections (%s client, %d process(es), %d in flight)\n",
		f.n, f.client, rep.Clients.Processes, f.c)
	start := time.Now()
	var lastOpened int64
	lastAt := start
	stopWatch := watch(stderr, time.Second, func() string {
		p := fl.progress()
		now := time.Now()
		rate := float64(p.Opened) / now.Sub(start).Seconds()
		inst := float64(p.Opened-lastOpened) / now.Sub(lastAt).Seconds()
		lastOpened, lastAt = p.Opened, now
		return fmt.Sprintf("  %5.1fs  opened %d/%d  failed %d  %.0f/s (last second %.0f/s)",
			now.Sub(start).Seconds(), p.Opened, f.n, p.Failed, rate, inst)
	})
	res, err := fl.wait(ctx)
	if cpu1, err := t.cpuSeconds(ctx); err == nil && cpuErr == nil {
		rep.LoginServerCPU = cpu1 - cpu0
	}
	stopWatch()
	if err == nil {
		err = ctx.Err()
	}
	if err != nil {
		p := fl.progress()
		err = fmt.Errorf("opening connections: %w (opened %d of %d, %d failed)", err, p.Opened, f.n, p.Failed)
		if res != nil {
			for _, k := range sortedKeys(res.Errors) {
				err = fmt.Errorf("%w\n  %dx %s", err, res.Errors[k], k)
			}
		}
		return nil, err
	}
	rep.Opened, rep.Failed, rep.Errors, rep.Aborted = res.Opened, res.Failed, res.Errors, res.Aborted
	rep.LoginSeconds = res.End.Sub(res.Start).Seconds()
	if rep.LoginSeconds > 0 {
		rep.LoginRate = float64(res.Opened) / rep.LoginSeconds
	}
	rep.Dial, rep.Login = res.Dial.Summary(), res.Login.Summary()
	if res.Opened > 0 {
		rep.LoginServerCPUPerUs = rep.LoginServerCPU / float64(res.Opened) * 1e6
	}
	fmt.Fprintf(stderr, "imbench conns: %d opened, %d failed in %.2fs (%.0f logins/s); settling %s\n",
		res.Opened, res.Failed, rep.LoginSeconds, rep.LoginRate, f.settle)

	settleStart := time.Now()
	stopWatch = watch(stderr, time.Second, func() string {
		p := fl.progress()
		gauge := "?"
		sctx, cancel := context.WithTimeout(ctx, 500*time.Millisecond)
		if g, err := t.gatewayConns(sctx); err == nil {
			gauge = fmt.Sprint(g - rep.Before.GatewayConns)
		}
		cancel()
		return fmt.Sprintf("  settle %4.0fs/%s  held %d (dropped %d), server %s",
			time.Since(settleStart).Seconds(), f.settle, p.Opened-p.Dropped, p.Dropped, gauge)
	})
	err = sleepCtx(ctx, f.settle)
	stopWatch()
	if err != nil {
		return nil, err
	}
	rep.SettleSeconds = time.Since(settleStart).Seconds()
	if rep.After, err = t.snapshot(ctx); err != nil {
		return nil, fmt.Errorf("measurement: %w", err)
	}
	p := fl.progress()
	rep.HeldClient = p.Opened - p.Dropped
	rep.ClientRSSBytes, rep.ClientRSSBefore = p.ClientRSS, p.ClientRSSBase
	rep.HeldServer = rep.After.GatewayConns - rep.Before.GatewayConns
	rep.Sessions = -1
	if rep.After.Sessions >= 0 && rep.Before.Sessions >= 0 {
		rep.Sessions = rep.After.Sessions - rep.Before.Sessions
	}
	rep.OK = rep.HeldClient == int64(f.n) && rep.HeldServer == int64(f.n)
	if held := rep.HeldServer; held > 0 {
		d := func(a, b int64) float64 { return float64(a-b) / float64(held) }
		b, a := &rep.Before, &rep.After
		rep.PerConn = perConn{
			RSS:            d(a.RSSBytes, b.RSSBytes),
			HeapInuse:      d(a.HeapInuse, b.HeapInuse),
			StackInuse:     d(a.StackInuse, b.StackInuse),
			HeapPlusStacks: d(a.HeapInuse+a.StackInuse, b.HeapInuse+b.StackInuse),
			GoSys:          d(a.GoSys, b.GoSys),
			Goroutines:     d(a.Goroutines, b.Goroutines),
			LogicRSS:       d(a.LogicRSSBytes, b.LogicRSSBytes),
		}
	}
	if rep.HeldClient > 0 {
		rep.ClientRSSPerConn = float64(rep.ClientRSSBytes-rep.ClientRSSBefore) / float64(rep.HeldClient)
	}

	// Close the clients and see the gateway let go of them.
	closeStart := time.Now()
	closeFleet()
	rep.ConnsAfterClose = -1
	for deadline := time.Now().Add(15 * time.Second); ; {
		g, err := t.gatewayConns(ctx)
		if err == nil {
			rep.ConnsAfterClose = g
			if g <= rep.Before.GatewayConns {
				break
			}
		}
		if time.Now().After(deadline) || sleepCtx(ctx, 100*time.Millisecond) != nil {
			break
		}
	}
	rep.CloseSeconds = time.Since(closeStart).Seconds()
	if serr := t.stop(); serr != nil {
		rep.ServerStopResult = serr.Error()
	}
	rep.Host.LoadAfter = loadavg()

	return rep, nil
}

// splitPlan cuts base into n worker plans with consecutive connection
// indexes and a share of the concurrency.
func splitPlan(base plan, n int) []plan {
	plans := make([]plan, n)
	first := 0
	for i := range plans {
		p := base
		p.N = base.N / n
		if i < base.N%n {
			p.N++
		}
		p.First = base.First + first
		p.Concurrency = max(1, (base.Concurrency*p.N+base.N-1)/base.N)
		first += p.N
		plans[i] = p
	}
	return plans
}

func sleepCtx(ctx context.Context, d time.Duration) error {
	if d <= 0 {
		return ctx.Err()
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// watch prints line() to w every interval until the returned stop is
// called (stop waits for the printer to finish).
func watch(w io.Writer, every time.Duration, line func() string) (stop func()) {
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		t := time.NewTicker(every)
		defer t.Stop()
		for {
			select {
			case <-done:
				return
			case <-t.C:
				fmt.Fprintln(w, line())
			}
		}
	})
	return func() {
		close(done)
		wg.Wait()
	}
}
