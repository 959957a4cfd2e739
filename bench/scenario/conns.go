package scenario

import (
	"context"
	"errors"
	"fmt"
	"os"
	"runtime"
	"slices"
	"time"

	"github.com/imd-dev/imd/bench"
)

// ConnsSynopsis describes the conns scenario (the command's help).
const ConnsSynopsis = `Measure what an idle logged-in connection costs the gateway, and how fast
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

// Conns is the conns scenario: the cost of idle logged-in connections in
// the gateway, and the login rate and its server CPU.
type Conns struct {
	N            int           // connections to open and hold
	C            int           // logins in flight at once, over all client processes
	Client       string        // ClientSDK or ClientRaw
	SrcIPs       int           // spread over source addresses 127.0.0.1..127.0.0.K (0: as few as N needs)
	Workers      int           // client worker processes (0: none if this process may hold N connections, else as many as needed)
	UIDBase      uint64        // connection i logs in as uid UIDBase+i
	Settle       time.Duration // wait between the last login and the measurement (no GC is forced)
	BaselineWait time.Duration // wait between the server being ready and the baseline measurement
	DialTimeout  time.Duration // bound on one TCP connect
	LoginTimeout time.Duration // bound on one login request
	MaxErrors    int           // stop opening connections after this many failed (0: never)
	Timeout      time.Duration // bound on one measurement
	// Steps, for RunSteps: one measurement (own server) per count instead of N.
	Steps []int
}

// NewConns returns the scenario with the command line's defaults.
func NewConns() *Conns {
	return &Conns{N: 10000, C: 200, Client: ClientSDK, UIDBase: 1, Settle: 15 * time.Second, BaselineWait: 2 * time.Second,
		DialTimeout: 10 * time.Second, LoginTimeout: 10 * time.Second, MaxErrors: 100, Timeout: 10 * time.Minute}
}

// Validate checks the options.
func (c *Conns) Validate() error {
	var errs []error
	n := c.N
	if len(c.Steps) > 0 {
		n = slices.Min(c.Steps) // the checks below hold for every step
		if n < 1 {
			errs = append(errs, errors.New("--steps must be >= 1"))
		}
	} else if n < 1 {
		errs = append(errs, errors.New("-n must be >= 1"))
	}
	if c.C < 1 {
		errs = append(errs, errors.New("-c must be >= 1"))
	}
	if c.Client != ClientSDK && c.Client != ClientRaw {
		errs = append(errs, fmt.Errorf("--client %q: want sdk or raw", c.Client))
	}
	if c.SrcIPs < 0 || c.SrcIPs > 254 {
		errs = append(errs, errors.New("--src-ips must be in [0, 254]"))
	}
	if c.Workers < 0 || c.Workers > n {
		errs = append(errs, errors.New("--workers must be in [0, n]"))
	}
	if c.UIDBase < 1 {
		errs = append(errs, errors.New("--uid-base must be >= 1"))
	}
	if c.Settle < 0 || c.BaselineWait < 0 || c.DialTimeout <= 0 || c.LoginTimeout <= 0 || c.Timeout <= 0 {
		errs = append(errs, errors.New("durations must be positive"))
	}
	return errors.Join(errs...)
}

// Run measures N connections once. A report comes back with an error when
// not every connection was held.
func (c *Conns) Run(ctx context.Context, l Launcher, env Env) (*ConnsReport, error) {
	if err := c.Validate(); err != nil {
		return nil, err
	}
	rep, err := c.measure(ctx, l, env, c.N)
	if err != nil {
		return nil, err
	}
	if !rep.OK {
		return rep, connsNotOK(rep)
	}
	return rep, nil
}

func connsNotOK(rep *ConnsReport) error {
	return fmt.Errorf("held %d connections by the clients' count and %d by the server's, of %d requested",
		rep.HeldClient, rep.HeldServer, rep.Requested)
}

// ConnsStepsReport is the result of RunSteps and its JSON document.
type ConnsStepsReport struct {
	Scenario string         `json:"scenario"`
	Time     time.Time      `json:"time"`
	Command  []string       `json:"command"`
	Steps    []int          `json:"steps"`
	Runs     []*ConnsReport `json:"runs"` // one per step, each on its own server
	Chart    string         `json:"chart,omitempty"`
	OK       bool           `json:"ok"`
}

// RunSteps measures each of Steps connections on a server of its own.
// It stops at the first step that fails and returns the steps measured so
// far with the error.
func (c *Conns) RunSteps(ctx context.Context, l Launcher, env Env) (*ConnsStepsReport, error) {
	if err := c.Validate(); err != nil {
		return nil, err
	}
	doc := &ConnsStepsReport{Scenario: "conns", Time: time.Now().UTC(), Command: env.Command, Steps: c.Steps, OK: true}
	for i, n := range c.Steps {
		fmt.Fprintf(env.log(), "imbench conns: step %d/%d: %d connections\n", i+1, len(c.Steps), n)
		rep, err := c.measure(ctx, l, env, n)
		if err != nil {
			doc.OK = false
			return doc, fmt.Errorf("step %d connections: %w", n, err)
		}
		doc.Runs = append(doc.Runs, rep)
		if !rep.OK {
			doc.OK = false
			return doc, fmt.Errorf("step %d: %w", n, connsNotOK(rep))
		}
	}
	return doc, nil
}

// goalBytesPerConn is the goal for an idle connection's gateway
// user-space memory.
const goalBytesPerConn = 2048

// MemoryChart plots the server's memory per held connection against the
// connections held, one point per step.
func MemoryChart(doc *ConnsStepsReport) *bench.Chart {
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

// ConnsReport is the result of one conns measurement and its JSON document.
type ConnsReport struct {
	Scenario string     `json:"scenario"`
	Time     time.Time  `json:"time"`
	Command  []string   `json:"command"`
	Host     HostInfo   `json:"host"`
	Server   *Target    `json:"server"`
	Clients  ClientInfo `json:"clients"`

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
	// opened (LoginServerCPUSource says how it was read), and per login.
	LoginServerCPU       float64       `json:"login_server_cpu_seconds"`
	LoginServerCPUPerUs  float64       `json:"login_server_cpu_us_per_login"`
	LoginServerCPUSource string        `json:"login_server_cpu_source,omitempty"`
	Dial                 bench.Summary `json:"dial_latency"`
	Login                bench.Summary `json:"login_latency"`

	SettleSeconds float64  `json:"settle_seconds"`
	Before        Snapshot `json:"before"`
	After         Snapshot `json:"after"`
	PerConn       PerConn  `json:"per_conn"`

	ClientRSSBefore  int64   `json:"client_rss_before_bytes"` // over every client process
	ClientRSSBytes   int64   `json:"client_rss_bytes"`
	ClientRSSPerConn float64 `json:"client_rss_per_conn_bytes"` // (after - before) / held

	CloseSeconds     float64 `json:"close_seconds"`      // until the gauge was back at its baseline
	ConnsAfterClose  int64   `json:"conns_after_close"`  // gauge when imbench stopped waiting
	ServerStopResult string  `json:"server_stop_result"` // empty when the server stopped cleanly
}

// ClientInfo describes the clients of a conns measurement.
type ClientInfo struct {
	Kind        string `json:"kind"`
	Processes   int    `json:"processes"` // 1: in imbench itself; more: worker processes
	InProcess   bool   `json:"in_process"`
	Concurrency int    `json:"concurrency"`
	SrcIPs      int    `json:"src_ips"`
	UIDBase     uint64 `json:"uid_base"`
}

// PerConn is (after - before) / held for each server figure, in bytes
// (goroutines: a count).
type PerConn struct {
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

// measure runs one conns measurement of n connections and returns its
// report. An error means no measurement was made; a report that is not OK
// is returned without one.
func (f *Conns) measure(ctx context.Context, l Launcher, env Env, n int) (_ *ConnsReport, err error) {
	ctx, cancel := context.WithTimeout(ctx, f.Timeout)
	defer cancel()
	stderr := env.log()
	rep := &ConnsReport{Scenario: "conns", Time: time.Now().UTC(), Command: env.Command, Requested: n}
	rep.Host = HostInfo{NumCPU: runtime.NumCPU(), GoVersion: runtime.Version(), LoadBefore: loadavg()}
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
	srcIPs := f.SrcIPs
	if srcIPs == 0 {
		srcIPs = (n + usablePorts - 1) / usablePorts
	}
	if srcIPs > 0 && n > srcIPs*usablePorts {
		return nil, fmt.Errorf("-n %d needs more than --src-ips %d source addresses (~%d ports each)", n, srcIPs, usablePorts)
	}
	perProc := int(soft) - fdReserve
	if soft == 0 || ferr != nil {
		perProc = 1000
	}
	workers := f.Workers
	if workers == 0 && n > perProc {
		workers = (n + perProc - 1) / perProc
	}
	if workers > 0 && (n+workers-1)/workers > perProc {
		return nil, fmt.Errorf("--workers %d: %d connections per process exceed the open-file limit %d", workers, (n+workers-1)/workers, soft)
	}
	rep.Clients = ClientInfo{Kind: f.Client, Processes: max(workers, 1), InProcess: workers == 0,
		Concurrency: f.C, SrcIPs: srcIPs, UIDBase: f.UIDBase}

	if !l.Attached() {
		fmt.Fprintf(stderr, "imbench conns: starting server\n")
	}
	t, err := l.Open(ctx, ServerNeeds{})
	if err != nil {
		return nil, err
	}
	rep.Server = t
	defer func() {
		if serr := t.Stop(); serr != nil {
			rep.ServerStopResult = serr.Error()
			fmt.Fprintln(stderr, "imbench:", serr)
		}
	}()
	if t.Started {
		for _, pr := range t.Procs {
			fmt.Fprintf(stderr, "imbench conns: %s %s pid %d, gateway %q, http %s\n", t.Binary, pr.Role, pr.PID, pr.Gateway, pr.HTTP)
		}
		perGate := (n + len(t.gates()) - 1) / len(t.gates())
		if int(soft) > 0 && perGate > int(soft)-256 {
			fmt.Fprintf(stderr, "imbench conns: warning: a gateway's open-file limit %d is below its %d connections plus its reserve: use more --gateways\n", soft, perGate)
		}
	}

	if err := sleepCtx(ctx, f.BaselineWait); err != nil {
		return nil, err
	}
	if rep.Before, err = t.Snapshot(ctx); err != nil {
		return nil, fmt.Errorf("baseline: %w", err)
	}

	base := plan{Addr: t.Gateway, Addrs: t.Gateways, AppCode: t.AppCode, Secret: t.Secret, Client: f.Client, N: n, UIDBase: f.UIDBase,
		Concurrency: f.C, SrcIPs: srcIPs, DialTimeout: f.DialTimeout, LoginTimeout: f.LoginTimeout,
		TokenTTL: f.Timeout + time.Hour, MaxErrors: f.MaxErrors}
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

	cpu := startCPU(ctx, t)
	fmt.Fprintf(stderr, "imbench conns: opening %d connections (%s client, %d process(es), %d in flight)\n",
		n, f.Client, rep.Clients.Processes, f.C)
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
			now.Sub(start).Seconds(), p.Opened, n, p.Failed, rate, inst)
	})
	res, err := fl.wait(ctx)
	if secs, src, ok := cpu.since(ctx); ok {
		rep.LoginServerCPU, rep.LoginServerCPUSource = secs, src
	}
	stopWatch()
	if err == nil {
		err = ctx.Err()
	}
	if err != nil {
		p := fl.progress()
		err = fmt.Errorf("opening connections: %w (opened %d of %d, %d failed)", err, p.Opened, n, p.Failed)
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
		res.Opened, res.Failed, rep.LoginSeconds, rep.LoginRate, f.Settle)

	settleStart := time.Now()
	stopWatch = watch(stderr, time.Second, func() string {
		p := fl.progress()
		gauge := "?"
		sctx, cancel := context.WithTimeout(ctx, 500*time.Millisecond)
		if g, err := t.GatewayConns(sctx); err == nil {
			gauge = fmt.Sprint(g - rep.Before.GatewayConns)
		}
		cancel()
		return fmt.Sprintf("  settle %4.0fs/%s  held %d (dropped %d), server %s",
			time.Since(settleStart).Seconds(), f.Settle, p.Opened-p.Dropped, p.Dropped, gauge)
	})
	err = sleepCtx(ctx, f.Settle)
	stopWatch()
	if err != nil {
		return nil, err
	}
	rep.SettleSeconds = time.Since(settleStart).Seconds()
	if rep.After, err = t.Snapshot(ctx); err != nil {
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
	rep.OK = rep.HeldClient == int64(n) && rep.HeldServer == int64(n)
	if held := rep.HeldServer; held > 0 {
		d := func(a, b int64) float64 { return float64(a-b) / float64(held) }
		b, a := &rep.Before, &rep.After
		rep.PerConn = PerConn{
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
		g, err := t.GatewayConns(ctx)
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
	if serr := t.Stop(); serr != nil {
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
