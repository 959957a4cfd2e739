package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"runtime/pprof"
	"strconv"
	"strings"

	"github.com/imd-dev/imd/bench/scenario"
)

// Each scenario command binds its flags to the fields of the scenario's
// options (whose defaults come from the library), runs it and prints the
// report: the table on stdout, then the JSON document and the chart.

// outFlags choose where a report's files go.
type outFlags struct {
	json  string
	chart string
	dir   string
}

func (o *outFlags) bind(fs *flag.FlagSet, chartHelp string) {
	fs.StringVar(&o.json, "json", "", "also write the report as JSON to `FILE` (a bare file name goes into --results-dir)")
	if chartHelp != "" {
		fs.StringVar(&o.chart, "chart", "", chartHelp)
	}
	fs.StringVar(&o.dir, "results-dir", "results", "folder for --json and --chart files given without a directory")
}

// writeJSON writes the report when --json asks for it.
func (o *outFlags) writeJSON(name string, v any, stderr io.Writer) error {
	if o.json == "" {
		return nil
	}
	path, err := scenario.WriteJSON(o.json, o.dir, v)
	if err != nil {
		return err
	}
	fmt.Fprintf(stderr, "imbench %s: report written to %s\n", name, path)
	return nil
}

// bindLoad adds the flags every load scenario has; unit names what --rate
// counts. The defaults are o's values.
func bindLoad(fs *flag.FlagSet, o *scenario.LoadOptions, unit string) {
	fs.Float64Var(&o.Rate, "rate", o.Rate, "offered load in "+unit+"/s over all senders (open loop)")
	fs.Var((*floatList)(&o.Rates), "rates", "comma-separated offered rates, e.g. 1000,2000,4000: one run per rate on the same server and clients, and a chart of latency against achieved throughput")
	fs.DurationVar(&o.Duration, "duration", o.Duration, "length of the send schedule of one run (-n wins)")
	fs.Int64Var(&o.N, "n", o.N, unit+" per run (0: rate x duration)")
	fs.IntVar(&o.Repeat, "repeat", o.Repeat, "runs per rate (the table gives min/median/max over them)")
	fs.DurationVar(&o.Warmup, "warmup", o.Warmup, "an unrecorded run at the first rate before measuring")
	fs.DurationVar(&o.Settle, "settle", o.Settle, "wait after the clients logged in, before the first run")
	fs.DurationVar(&o.Pause, "pause", o.Pause, "wait between runs")
	fs.DurationVar(&o.Drain, "drain", o.Drain, "after the schedule ends, how long a run waits for outstanding sends and deliveries")
	fs.DurationVar(&o.Timeout, "timeout", o.Timeout, "bound on the whole scenario")
	fs.IntVar(&o.Size, "size", o.Size, "content bytes per message")
	fs.IntVar(&o.LoginConc, "login-c", o.LoginConc, "logins in flight while the clients connect")
	fs.Uint64Var(&o.UIDBase, "uid-base", o.UIDBase, "first uid the scenario's clients log in as")
	fs.StringVar(&o.ProfileDir, "profile-dir", "", "take a CPU profile of the server (imd all, or the logic node) over each measured run into this `folder` (<scenario>-<rate>-<run>.pprof; read with go tool pprof)")
}

// runLoadCmd parses args, runs a load scenario and prints its report.
func runLoadCmd(ctx context.Context, name, synopsis string, args []string, stdout, stderr io.Writer,
	bind func(fs *flag.FlagSet, sf *serverFlags), load *scenario.LoadOptions, validate func() error,
	run func(context.Context, scenario.Launcher, scenario.Env) (*scenario.LoadReport, error)) error {
	var sf serverFlags
	var out outFlags
	var selfProfile string
	fs := newFlagSet(name, synopsis, stdout, stderr)
	sf.bind(fs)
	out.bind(fs, "with --rates: the SVG chart `FILE` (default: --json with .svg, else <scenario>-latency.svg in --results-dir)")
	fs.StringVar(&selfProfile, "client-profile", "", "write a CPU profile of imbench itself (the clients) to `FILE`, for go tool pprof")
	bind(fs, &sf)
	if err := parseFlags(fs, args, os.LookupEnv); err != nil {
		return err
	}
	if err := validate(); err != nil {
		fmt.Fprintf(stderr, "imbench %s: %v\n", name, err)
		return errUsage
	}
	if selfProfile != "" {
		stop, err := startSelfProfile(selfProfile)
		if err != nil {
			return err
		}
		defer stop()
	}
	rep, err := run(ctx, &sf, scenario.Env{Log: stderr, Command: append([]string{"imbench", name}, args...)})
	if rep == nil {
		return err
	}
	if len(load.Rates) > 1 || out.chart != "" {
		path := scenario.ChartFile(out.chart, out.json, out.dir, name+"-latency.svg")
		if cerr := scenario.LatencyChart(rep).WriteFile(path); cerr != nil {
			return cerr
		}
		rep.Chart = path
		fmt.Fprintf(stderr, "imbench %s: chart written to %s\n", name, path)
	}
	rep.WriteTable(stdout)
	if jerr := out.writeJSON(name, rep, stderr); jerr != nil {
		return jerr
	}
	return err
}

func runC2C(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	c := scenario.NewC2C()
	return runLoadCmd(ctx, "c2c", scenario.C2CSynopsis, args, stdout, stderr, func(fs *flag.FlagSet, _ *serverFlags) {
		bindLoad(fs, &c.Load, "msgs")
		fs.IntVar(&c.Pairs, "pairs", c.Pairs, "sender/recipient client pairs")
		fs.IntVar(&c.Load.Inflight, "inflight", c.Load.Inflight, "sends outstanding per sender connection (the gateway allows 64 requests in flight)")
		fs.Var((*uint32Flag)(&c.MsgType), "msgtype", "msgtype of the messages")
	}, &c.Load, c.Validate, c.Run)
}

func runS2C(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	s := scenario.NewS2C()
	return runLoadCmd(ctx, "s2c", scenario.S2CSynopsis, args, stdout, stderr, func(fs *flag.FlagSet, _ *serverFlags) {
		bindLoad(fs, &s.Load, "pushes")
		fs.IntVar(&s.Clients, "clients", s.Clients, "online recipient clients")
		fs.IntVar(&s.Pushers, "pushers", s.Pushers, "concurrent HTTP pushers (app-server connections)")
		fs.IntVar(&s.Fanout, "fanout", s.Fanout, "recipients per push (0: every client for broadcast, 50 for dispatch)")
		fs.StringVar(&s.Shape, "shape", s.Shape, "broadcast, dispatch or rotate (default: broadcast when --fanout is 0, else rotate)")
		fs.StringVar(&s.Endpoint, "endpoint", s.Endpoint, "push (POST /v1/push naming the recipients) or, with --shape broadcast, broadcast (POST /v1/broadcast to every online terminal of the appcode: the server must hold no other) (default push)")
		fs.StringVar(&s.Client, "client", s.Client, "recipient clients: raw (lean: few goroutines, batched acks) or sdk (the Go SDK)")
		fs.IntVar(&s.Loops, "loops", s.Loops, "goroutines reading the raw clients (0: the usable CPUs, at most 4)")
		fs.Uint64Var(&s.Seed, "seed", s.Seed, "seed of the dispatch shape's random recipients")
		fs.BoolVar(&s.NoAcks, "no-acks", s.NoAcks, "with --client raw: never acknowledge a push (what acks cost the server is the difference)")
		fs.DurationVar(&s.AckDelay, "ack-delay", s.AckDelay, "with --client raw: how long push ids wait to be acknowledged in one frame, as the SDK's PushAckDelay (0: at each read)")
		fs.IntVar(&s.Load.Inflight, "inflight", s.Load.Inflight, "requests outstanding per pusher")
		fs.Var((*uint32Flag)(&s.MsgType), "msgtype", "msgtype of the pushes")
	}, &s.Load, s.Validate, s.Run)
}

func runGroup(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	g := scenario.NewGroup()
	return runLoadCmd(ctx, "group", scenario.GroupSynopsis, args, stdout, stderr, func(fs *flag.FlagSet, _ *serverFlags) {
		bindLoad(fs, &g.Load, "msgs")
		fs.IntVar(&g.Members, "members", g.Members, "members of the group (uids --uid-base on); more than 10,000 needs --imd-arg=--group-max-size=N")
		fs.IntVar(&g.Online, "online", g.Online, "members logged in (the first ones)")
		fs.IntVar(&g.Senders, "senders", g.Senders, "online members that send (the first ones; SDK clients)")
		fs.IntVar(&g.Load.Inflight, "inflight", g.Load.Inflight, "sends outstanding per sender (the gateway allows 64 requests in flight)")
		fs.StringVar(&g.Client, "client", g.Client, "the other online members: raw (lean: few goroutines, cursors acked every --ack-delay) or sdk (the Go SDK)")
		fs.DurationVar(&g.AckDelay, "ack-delay", g.AckDelay, "with --client raw: how long a member's cursor waits to be acknowledged (0: at each read)")
		fs.IntVar(&g.Loops, "loops", g.Loops, "goroutines reading the raw clients (0: the usable CPUs, at most 4)")
		fs.Var((*uint32Flag)(&g.MsgType), "msgtype", "msgtype of the messages")
	}, &g.Load, g.Validate, g.Run)
}

func runC2S(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	c := scenario.NewC2S()
	var brokers string
	validate := func() error {
		c.KafkaBrokers = nil
		for _, b := range strings.Split(brokers, ",") {
			if b = strings.TrimSpace(b); b != "" {
				c.KafkaBrokers = append(c.KafkaBrokers, b)
			}
		}
		return c.Validate()
	}
	return runLoadCmd(ctx, "c2s", scenario.C2SSynopsis, args, stdout, stderr, func(fs *flag.FlagSet, _ *serverFlags) {
		bindLoad(fs, &c.Load, "msgs")
		fs.IntVar(&c.Clients, "clients", c.Clients, "clients sending reports")
		fs.IntVar(&c.Load.Inflight, "inflight", c.Load.Inflight, "sends outstanding per client connection (the gateway allows 64 requests in flight)")
		fs.Var((*uint32Flag)(&c.MsgType), "msgtype", "msgtype of the reports (routed to --topic)")
		fs.StringVar(&c.Topic, "topic", c.Topic, "Kafka topic of the route")
		fs.StringVar(&brokers, "kafka-brokers", "", "comma-separated loopback Kafka brokers: a started imd produces there instead of its embedded broker; with --addr, where --verify reads")
		fs.IntVar(&c.Partitions, "partitions", c.Partitions, "partitions per topic of a started imd's embedded broker (0: imd's default)")
		fs.BoolVar(&c.Verify, "verify", c.Verify, "read the topic afterwards and check every acknowledged report is in it")
	}, &c.Load, validate, c.Run)
}

func runOffline(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	o := scenario.NewOffline()
	var sf serverFlags
	var out outFlags
	fs := newFlagSet("offline", scenario.OfflineSynopsis, stdout, stderr)
	sf.bind(fs)
	out.bind(fs, "")
	fs.IntVar(&o.N, "n", o.N, "messages stored for each recipient")
	fs.IntVar(&o.Users, "users", o.Users, "offline recipients (they log in and pull at once)")
	fs.IntVar(&o.Senders, "senders", o.Senders, "sender clients")
	fs.IntVar(&o.C, "c", o.C, "sends in flight over all senders while storing")
	fs.Var((*uint32Flag)(&o.PageSize), "page-size", "offline pull page size the SDK asks for (0: the server's default)")
	fs.IntVar(&o.Size, "size", o.Size, "content bytes per message")
	fs.IntVar(&o.Repeat, "repeat", o.Repeat, "store-then-pull runs, each with new recipients")
	fs.Uint64Var(&o.UIDBase, "uid-base", o.UIDBase, "first uid: the senders, then the recipients of each run")
	fs.DurationVar(&o.Drain, "drain", o.Drain, "how long the pull may take")
	fs.DurationVar(&o.Timeout, "timeout", o.Timeout, "bound on the whole scenario")
	if err := parseFlags(fs, args, os.LookupEnv); err != nil {
		return err
	}
	if err := o.Validate(); err != nil {
		fmt.Fprintf(stderr, "imbench offline: %v\n", err)
		return errUsage
	}
	rep, err := o.Run(ctx, &sf, scenario.Env{Log: stderr, Command: append([]string{"imbench", "offline"}, args...)})
	if rep == nil {
		return err
	}
	rep.WriteTable(stdout)
	if jerr := out.writeJSON("offline", rep, stderr); jerr != nil {
		return jerr
	}
	return err
}

func runConns(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	c := scenario.NewConns()
	var sf serverFlags
	var out outFlags
	fs := newFlagSet("conns", scenario.ConnsSynopsis, stdout, stderr)
	sf.bind(fs)
	sf.bindCluster(fs)
	out.bind(fs, "with --steps: the SVG chart `FILE` (default: --json with .svg, else conns-memory.svg in --results-dir)")
	fs.IntVar(&c.N, "n", c.N, "connections to open and hold")
	fs.IntVar(&c.C, "c", c.C, "logins in flight at once, over all client processes")
	fs.StringVar(&c.Client, "client", c.Client, "client: sdk (the Go SDK) or raw (imbench's minimal login client)")
	fs.IntVar(&c.SrcIPs, "src-ips", c.SrcIPs, "spread over source addresses 127.0.0.1..127.0.0.K (0: as few as -n needs)")
	fs.IntVar(&c.Workers, "workers", c.Workers, "client worker processes (0: none if this process may hold -n connections, else as many as needed)")
	fs.Uint64Var(&c.UIDBase, "uid-base", c.UIDBase, "connection i logs in as uid uid-base+i")
	fs.DurationVar(&c.Settle, "settle", c.Settle, "wait between the last login and the measurement (no GC is forced)")
	fs.DurationVar(&c.BaselineWait, "baseline-wait", c.BaselineWait, "wait between the server being ready and the baseline measurement")
	fs.DurationVar(&c.DialTimeout, "dial-timeout", c.DialTimeout, "bound on one TCP connect")
	fs.DurationVar(&c.LoginTimeout, "login-timeout", c.LoginTimeout, "bound on one login request")
	fs.IntVar(&c.MaxErrors, "max-errors", c.MaxErrors, "stop opening connections after this many failed (0: never)")
	fs.DurationVar(&c.Timeout, "timeout", c.Timeout, "bound on the whole run")
	fs.Var((*intList)(&c.Steps), "steps", "comma-separated connection counts, e.g. 1000,5000,10000: one measurement (own server) per count instead of -n, and a chart of memory per connection against connections")
	if err := parseFlags(fs, args, os.LookupEnv); err != nil {
		return err
	}
	if err := c.Validate(); err != nil {
		fmt.Fprintf(stderr, "imbench conns: %v\n", err)
		return errUsage
	}
	env := scenario.Env{Log: stderr, Command: append([]string{"imbench", "conns"}, args...)}
	if len(c.Steps) == 0 {
		rep, err := c.Run(ctx, &sf, env)
		if rep == nil {
			return err
		}
		rep.WriteTable(stdout)
		if jerr := out.writeJSON("conns", rep, stderr); jerr != nil {
			return jerr
		}
		return err
	}
	doc, err := c.RunSteps(ctx, &sf, env)
	if doc == nil {
		return err
	}
	if len(doc.Runs) > 0 {
		doc.WriteTable(stdout)
		path := scenario.ChartFile(out.chart, out.json, out.dir, "conns-memory.svg")
		if cerr := scenario.MemoryChart(doc).WriteFile(path); cerr != nil {
			return cerr
		}
		doc.Chart = path
		fmt.Fprintf(stderr, "imbench conns: chart written to %s\n", path)
	}
	if jerr := out.writeJSON("conns", doc, stderr); jerr != nil {
		return jerr
	}
	return err
}

func runWorker(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("worker", "Internal: a client process started by a scenario. It reads its plan from\n"+
		scenario.EnvWorkerPlan+" and reports on stdout; closing its stdin ends it.", stdout, stderr)
	if err := parseFlags(fs, args, func(string) (string, bool) { return "", false }); err != nil {
		return err
	}
	return scenario.RunWorker(ctx, os.Getenv(scenario.EnvWorkerPlan), os.Stdin, stdout, stderr)
}

// startSelfProfile profiles imbench's CPU into path until stop.
func startSelfProfile(path string) (stop func(), err error) {
	f, err := os.Create(path)
	if err != nil {
		return nil, err
	}
	if err := pprof.StartCPUProfile(f); err != nil {
		_ = f.Close()
		return nil, err
	}
	return func() {
		pprof.StopCPUProfile()
		_ = f.Close()
	}, nil
}

// uint32Flag is a uint32 flag (msgtypes, page sizes).
type uint32Flag uint32

func (u *uint32Flag) String() string { return strconv.FormatUint(uint64(*u), 10) }
func (u *uint32Flag) Set(v string) error {
	n, err := strconv.ParseUint(v, 0, 32)
	if err != nil {
		return fmt.Errorf("%q is not a 32-bit unsigned integer", v)
	}
	*u = uint32Flag(n)
	return nil
}
