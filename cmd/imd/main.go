// Command imd is the platform's server. `imd all` runs every tier in one
// process; `imd token` mints a login token for testing. Run `imd help`.
package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"

	"github.com/imd-dev/imd/internal/config"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

type command struct {
	name    string
	summary string
	run     func(args []string, stdout, stderr io.Writer) error
}

func commands() []command {
	return []command{
		{"all", "run every tier (gateway, logic, router, HTTP API) in one process", runAll},
		{"logic", "run a logic node (many-process deployment)", runLogic},
		{"gateway", "run a gateway (many-process deployment)", runGateway},
		{"migrate", "create or upgrade the Cassandra schema", runMigrate},
		{"token", "mint a login token for an appcode and uid (for testing)", runToken},
		{"version", "print the version", runVersion},
	}
}

func usage(w io.Writer) {
	fmt.Fprintf(w, "imd %s: real-time messaging platform server\n\nUsage:\n  imd <command> [flags]\n\nCommands:\n", version)
	for _, c := range commands() {
		fmt.Fprintf(w, "  %-8s %s\n", c.name, c.summary)
	}
	fmt.Fprintf(w, "\nRun `imd <command> --help` for a command's flags. Every flag can also be set\n"+
		"by the environment (--gateway-addr is IMD_GATEWAY_ADDR) or by the YAML file\n"+
		"given with --config; flags win over the environment, which wins over the file.\n")
}

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 || args[0] == "help" || args[0] == "-h" || args[0] == "--help" || args[0] == "-help" {
		if len(args) == 0 {
			usage(stderr)
			return 2
		}
		usage(stdout)
		return 0
	}
	for _, c := range commands() {
		if c.name == args[0] {
			err := c.run(args[1:], stdout, stderr)
			switch {
			case err == nil:
				return 0
			case errors.Is(err, flag.ErrHelp):
				return 0
			case errors.Is(err, errUsage):
				return 2
			}
			fmt.Fprintln(stderr, "imd:", err)
			return 1
		}
	}
	fmt.Fprintf(stderr, "imd: unknown command %q\n\n", args[0])
	usage(stderr)
	return 2
}

var errUsage = errors.New("usage")

func runVersion(args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("version", "Print the version of this binary.", stdout, stderr)
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return errUsage
	}
	fmt.Fprintln(stdout, "imd", version)
	return nil
}

// newFlagSet returns a flag set that prints its usage with a header.
func newFlagSet(name, synopsis string, stdout, stderr io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet("imd "+name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fs.SetOutput(stdout)
		fmt.Fprintf(stdout, "Usage: imd %s [flags]\n\n%s\n\nFlags (each also IMD_<FLAG> in the environment):\n", name, synopsis)
		fs.PrintDefaults()
	}
	return fs
}

// loadConfig parses args into a config (defaults < file < env < flags).
func loadConfig(fs *flag.FlagSet, cfg *config.Config, path *string, args []string) error {
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return errUsage
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(fs.Output(), "imd: unexpected arguments: %s\n", strings.Join(fs.Args(), " "))
		return errUsage
	}
	return cfg.Load(fs, path, args, os.LookupEnv)
}

func newLogger(c config.Log, w io.Writer) (*slog.Logger, error) {
	var lvl slog.Level
	if err := lvl.UnmarshalText([]byte(c.Level)); err != nil {
		return nil, fmt.Errorf("log level %q: want debug, info, warn or error", c.Level)
	}
	o := &slog.HandlerOptions{Level: lvl}
	switch c.Format {
	case "text", "":
		return slog.New(slog.NewTextHandler(w, o)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(w, o)), nil
	}
	return nil, fmt.Errorf("log format %q: want text or json", c.Format)
}
