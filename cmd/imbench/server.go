package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/imd-dev/imd/bench/scenario"
	"github.com/imd-dev/imd/internal/config"
	"github.com/imd-dev/imd/logic"
	"gopkg.in/yaml.v3"
)

// serverFlags choose the server a scenario measures. They are the
// scenarios' Launcher: the one part of imbench that knows the server's
// configuration, which the bench library does not import.
type serverFlags struct {
	imd          string
	addr         string
	http         string
	pid          int
	debugAddr    string
	appcode      uint
	secret       string
	apiKey       string
	idleTimeout  time.Duration
	startTimeout time.Duration
	logLevel     string
	imdArgs      stringsFlag
	gateways     int    // >1: a logic node and this many gateway processes
	redis        string // with gateways: Redis for membership and the router
}

var _ scenario.Launcher = (*serverFlags)(nil)

func (sf *serverFlags) bind(fs *flag.FlagSet) {
	fs.StringVar(&sf.imd, "imd", "", "imd binary `path` to start (default: imd next to imbench, then in PATH)")
	fs.StringVar(&sf.addr, "addr", "", "gateway host:port of a running server to measure instead of starting one (loopback only)")
	fs.StringVar(&sf.http, "http", "", "with --addr: the server's HTTP API host:port (for /metrics)")
	fs.IntVar(&sf.pid, "pid", 0, "with --addr: the server's pid, for VmRSS and CPU time from /proc (default: process_resident_memory_bytes and process_cpu_seconds_total from /metrics)")
	fs.StringVar(&sf.debugAddr, "debug-addr", "", "with --addr: the server's profiler host:port (its --debug-addr), for --profile-dir")
	fs.UintVar(&sf.appcode, "appcode", scenario.BenchAppCode, "with --addr: appcode to log in to")
	fs.StringVar(&sf.secret, "secret", "", "with --addr: the appcode's token secret")
	fs.StringVar(&sf.apiKey, "api-key", "", "with --addr: an HTTP API key of the appcode (s2c pushes, groups)")
	fs.DurationVar(&sf.idleTimeout, "idle-timeout", 10*time.Minute, "idle timeout of a started server (long, so idle connections survive)")
	fs.DurationVar(&sf.startTimeout, "start-timeout", 30*time.Second, "how long a started server may take to become ready")
	fs.StringVar(&sf.logLevel, "imd-log-level", "warn", "log level of a started server (its log goes to a file in its temp dir)")
	fs.Var(&sf.imdArgs, "imd-arg", "extra `flag` for a started imd all (repeatable), e.g. --imd-arg=--max-in-flight=8")
}

// bindCluster binds the flags that start a many-process server.
func (sf *serverFlags) bindCluster(fs *flag.FlagSet) {
	fs.IntVar(&sf.gateways, "gateways", 1, "gateway processes to start: 1 runs one imd all; K > 1 runs one imd logic and K imd gateway processes (each holds at most its open-file limit of connections), and connection i goes to gateway i mod K")
	fs.StringVar(&sf.redis, "redis", "", "with --gateways > 1: Redis host:port for membership and the router (default: the logic node's in-process router, gateways dial it directly)")
}

// Attached reports whether --addr names a running server.
func (sf *serverFlags) Attached() bool { return sf.addr != "" }

// Open starts a server fit for needs or checks the one named by the flags
// (used as it is).
func (sf *serverFlags) Open(ctx context.Context, needs scenario.ServerNeeds) (*scenario.Target, error) {
	if sf.addr != "" {
		return scenario.Attach(ctx, scenario.AttachSpec{Gateway: sf.addr, HTTP: sf.http, PID: sf.pid, AppCode: uint32(sf.appcode),
			Secret: sf.secret, APIKey: sf.apiKey, Debug: sf.debugAddr})
	}
	if sf.http != "" || sf.pid != 0 || sf.secret != "" || sf.apiKey != "" || sf.debugAddr != "" {
		return nil, errors.New("--http, --pid, --secret, --api-key and --debug-addr go with --addr")
	}
	return sf.start(ctx, needs)
}

// applyNeeds adjusts the configuration of a started server to a
// scenario's needs.
func applyNeeds(cfg *config.Config, needs scenario.ServerNeeds) error {
	cfg.S2C.MaxRecipients = max(cfg.S2C.MaxRecipients, needs.MaxRecipients)
	cfg.S2C.MaxBody = max(cfg.S2C.MaxBody, needs.MaxBody)
	// The default maximum is 10,000; --imd-arg, which wins over the file,
	// can still set another.
	if needs.GroupMaxSize > max(cfg.Groups.MaxSize, 10000) {
		cfg.Groups.MaxSize = needs.GroupMaxSize
	}
	if r := needs.Route; r != nil {
		cfg.C2S.Routes = []logic.Route{{AppCode: scenario.BenchAppCode, MsgType: r.MsgType, Topic: r.Topic}}
	}
	if len(needs.KafkaBrokers) > 0 {
		cfg.Bus.Brokers = needs.KafkaBrokers
		cfg.Bus.AutoCreateTopics = true
	} else if needs.EmbeddedKafka {
		addr, err := scenario.FreeLoopbackAddr()
		if err != nil {
			return err
		}
		cfg.Bus.Embedded.Addr = addr
		cfg.Bus.Embedded.Partitions = needs.KafkaPartitions
	}
	return nil
}

func (sf *serverFlags) start(ctx context.Context, needs scenario.ServerNeeds) (t *scenario.Target, err error) {
	bin, err := scenario.FindIMD(sf.imd)
	if err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp("", "imbench-imd-")
	if err != nil {
		return nil, err
	}
	raw := make([]byte, 48)
	_, _ = rand.Read(raw)
	t = scenario.NewStarted(bin, dir, scenario.BenchAppCode, hex.EncodeToString(raw[:32]), "imbench-"+hex.EncodeToString(raw[32:]), sf.idleTimeout)
	defer func() {
		if err != nil {
			_ = t.Stop()
		}
	}()

	cfg := config.Default()
	cfg.DataDir = filepath.Join(dir, "data")
	cfg.Log = config.Log{Level: sf.logLevel, Format: "text"}
	cfg.Gateway.IdleTimeout = sf.idleTimeout
	cfg.Bus.Embedded.Addr = "127.0.0.1:0" // clear of a Kafka on 9092
	cfg.ShutdownGrace = 10 * time.Second
	cfg.Apps = []logic.App{{AppCode: scenario.BenchAppCode, Name: "imbench", Account: 1, Secrets: []string{t.Secret},
		APIKeys: []string{t.APIKey}}}
	if err := applyNeeds(&cfg, needs); err != nil {
		return nil, err
	}
	t.Kafka = cfg.Bus.Brokers
	if len(t.Kafka) == 0 && cfg.Bus.Embedded.Addr != "127.0.0.1:0" {
		t.Kafka = []string{cfg.Bus.Embedded.Addr}
	}
	if sf.redis != "" {
		if sf.gateways <= 1 {
			return nil, errors.New("--redis goes with --gateways > 1")
		}
		if err := scenario.CheckLoopback(sf.redis); err != nil {
			return nil, err
		}
		cfg.Cluster.Redis = config.Redis{Addrs: []string{sf.redis}, Prefix: "imbench:" + hex.EncodeToString(raw[:4]) + ":"}
	}
	if sf.gateways <= 1 {
		if err := sf.startProc(ctx, t, "all", cfg, needs.Profile); err != nil {
			return nil, err
		}
		return t, nil
	}
	// Many processes: the logic node first, then the gateways dialling it.
	lcfg := cfg
	if lcfg.Cluster.RPCAddr, err = scenario.FreeLoopbackAddr(); err != nil {
		return nil, err
	}
	if err := sf.startProc(ctx, t, "logic", lcfg, needs.Profile); err != nil {
		return nil, err
	}
	for i := range sf.gateways {
		gcfg := cfg
		gcfg.Apps = nil // gateways authenticate nothing themselves
		gcfg.DataDir = filepath.Join(dir, fmt.Sprintf("gateway-%d", i))
		gcfg.Cluster.LogicAddrs = []string{lcfg.Cluster.RPCAddr}
		if err := sf.startProc(ctx, t, "gateway", gcfg, false); err != nil {
			return nil, err
		}
	}
	return t, nil
}

// startProc starts one imd process of role with cfg on free loopback
// ports (and a profiler when asked) and waits until it is ready.
func (sf *serverFlags) startProc(ctx context.Context, t *scenario.Target, role string, cfg config.Config, profile bool) error {
	spec := scenario.ProcSpec{Role: role, Args: sf.imdArgs, StartTimeout: sf.startTimeout}
	var err error
	if spec.HTTP, err = scenario.FreeLoopbackAddr(); err != nil {
		return err
	}
	cfg.HTTP.Addr = spec.HTTP
	cfg.Gateway.Addr = ""
	cfg.Gateway.WebAddr = "" // imbench measures the TCP port
	if role != "logic" {
		if spec.Gateway, err = scenario.FreeLoopbackAddr(); err != nil {
			return err
		}
		cfg.Gateway.Addr = spec.Gateway
	}
	if profile {
		if spec.Debug, err = scenario.FreeLoopbackAddr(); err != nil {
			return err
		}
		cfg.HTTP.DebugAddr = spec.Debug
	}
	if spec.Config, err = yaml.Marshal(&cfg); err != nil {
		return err
	}
	_, err = t.StartProc(ctx, spec)
	return err
}
