// Command imbench measures the platform for capacity planners. Each
// scenario is a subcommand (`imbench conns`, `c2c`, `s2c`, `group`,
// `c2s`, `offline`); by default a scenario starts its own `imd all` on loopback
// with a throw-away data dir, drives it with clients on the same machine,
// prints a table and can save a JSON document; sweeps (`--rates`,
// `conns --steps`) also write an SVG chart. Run `imbench help`.
//
// The scenarios themselves are the library bench/scenario; imbench parses
// their flags, starts the server (the one thing the library cannot do, as
// only imbench may depend on the server's configuration) and prints.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"syscall"
)

type command struct {
	name    string
	summary string
	hidden  bool
	run     func(ctx context.Context, args []string, stdout, stderr io.Writer) error
}

func commands() []command {
	return []command{
		{name: "conns", summary: "cost of idle logged-in connections in the gateway, and login rate", run: runConns},
		{name: "c2c", summary: "durable chat messages end to end at an offered rate: msgs/s and latency", run: runC2C},
		{name: "s2c", summary: "HTTP pushes fanned out to online clients at an offered rate: deliveries/s and latency", run: runS2C},
		{name: "group", summary: "group messages fanned out to online members at an offered rate: deliveries/s, latency to each and the last", run: runGroup},
		{name: "c2s", summary: "client reports into the Kafka bus at an offered rate: acks/s and latency, topic verified", run: runC2S},
		{name: "offline", summary: "store messages for offline users, then time their pull at login", run: runOffline},
		{name: "worker", summary: "client worker process (started by the scenarios)", hidden: true, run: runWorker},
	}
}

func usage(w io.Writer) {
	fmt.Fprintf(w, "imbench: benchmarks of the imd platform\n\nUsage:\n  imbench <scenario> [flags]\n\nScenarios:\n")
	for _, c := range commands() {
		if !c.hidden {
			fmt.Fprintf(w, "  %-8s %s\n", c.name, c.summary)
		}
	}
	fmt.Fprintf(w, "\nRun `imbench <scenario> --help` for its flags. Every flag can also be set by\n"+
		"the environment (-n is IMBENCH_N, --settle is IMBENCH_SETTLE); flags win.\n"+
		"By default a scenario starts its own server from an `imd` binary found next\n"+
		"to imbench or in PATH (--imd to choose one), on loopback ports, and stops it\n"+
		"at the end; --addr/--http/--pid target a server that is already running.\n"+
		"The load scenarios (c2c, s2c, group, c2s) are open loop at --rate; --rates 1000,2000\n"+
		"runs one rate after another and charts latency against throughput; conns\n"+
		"--steps 1000,5000 charts memory per connection against connections.\n")
}

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 || args[0] == "help" || args[0] == "-h" || args[0] == "--help" || args[0] == "-help" {
		if len(args) == 0 {
			usage(stderr)
			return 2
		}
		usage(stdout)
		return 0
	}
	for _, c := range commands() {
		if c.name != args[0] {
			continue
		}
		err := c.run(ctx, args[1:], stdout, &lockedWriter{w: stderr})
		switch {
		case err == nil:
			return 0
		case errors.Is(err, flag.ErrHelp):
			return 0
		case errors.Is(err, errUsage):
			return 2
		}
		fmt.Fprintln(stderr, "imbench:", err)
		return 1
	}
	fmt.Fprintf(stderr, "imbench: unknown scenario %q\n\n", args[0])
	usage(stderr)
	return 2
}

var errUsage = errors.New("usage")

// newFlagSet returns a flag set that prints its usage with a synopsis.
func newFlagSet(name, synopsis string, stdout, stderr io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet("imbench "+name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fs.SetOutput(stdout)
		fmt.Fprintf(stdout, "Usage: imbench %s [flags]\n\n%s\n\nFlags (each also IMBENCH_<FLAG> in the environment):\n", name, synopsis)
		fs.PrintDefaults()
	}
	return fs
}

// envName is the environment variable that sets flag name.
func envName(flagName string) string {
	return "IMBENCH_" + strings.ToUpper(strings.ReplaceAll(flagName, "-", "_"))
}

// parseFlags parses args, then sets every flag not given on the command
// line from its IMBENCH_* environment variable.
func parseFlags(fs *flag.FlagSet, args []string, env func(string) (string, bool)) error {
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return errUsage
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(fs.Output(), "%s: unexpected arguments: %s\n", fs.Name(), strings.Join(fs.Args(), " "))
		return errUsage
	}
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	var errs []error
	fs.VisitAll(func(f *flag.Flag) {
		if set[f.Name] {
			return
		}
		if v, ok := env(envName(f.Name)); ok {
			if err := fs.Set(f.Name, v); err != nil {
				errs = append(errs, fmt.Errorf("%s=%q: %w", envName(f.Name), v, err))
			}
		}
	})
	if err := errors.Join(errs...); err != nil {
		fmt.Fprintf(fs.Output(), "%s: %v\n", fs.Name(), err)
		return errUsage
	}
	return nil
}

// lockedWriter serialises writes: progress lines, worker processes' stderr
// and the scenario itself share one stderr.
type lockedWriter struct {
	mu sync.Mutex
	w  io.Writer
}

func (l *lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}

// stringsFlag is a repeatable string flag.
type stringsFlag []string

func (s *stringsFlag) String() string { return strings.Join(*s, " ") }
func (s *stringsFlag) Set(v string) error {
	*s = append(*s, v)
	return nil
}

// intList is a comma-separated list of positive integers (--steps).
type intList []int

func (l *intList) String() string {
	s := make([]string, len(*l))
	for i, v := range *l {
		s[i] = strconv.Itoa(v)
	}
	return strings.Join(s, ",")
}

func (l *intList) Set(v string) error {
	var out intList
	for _, f := range strings.Split(v, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n < 1 {
			return fmt.Errorf("%q is not a positive integer", f)
		}
		out = append(out, n)
	}
	*l = out
	return nil
}

// floatList is a comma-separated list of positive numbers (--rates).
type floatList []float64

func (l *floatList) String() string {
	s := make([]string, len(*l))
	for i, v := range *l {
		s[i] = strconv.FormatFloat(v, 'g', -1, 64)
	}
	return strings.Join(s, ",")
}

func (l *floatList) Set(v string) error {
	var out floatList
	for _, f := range strings.Split(v, ",") {
		n, err := strconv.ParseFloat(strings.TrimSpace(f), 64)
		if err != nil || !(n > 0) || math.IsInf(n, 0) {
			return fmt.Errorf("%q is not a positive number", f)
		}
		out = append(out, n)
	}
	*l = out
	return nil
}
