package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/imd-dev/imd/bench"
	"github.com/imd-dev/imd/internal/config"
	"github.com/imd-dev/imd/logic"
	"gopkg.in/yaml.v3"
)

// Metric names read from the server's /metrics.
const (
	mGatewayConns = "imd_gateway_connections"
	mHeapInuse    = "go_memstats_heap_inuse_bytes"
	mStackInuse   = "go_memstats_stack_inuse_bytes"
	mGoSys        = "go_memstats_sys_bytes"
	mGoroutines   = "go_goroutines"
	mProcessRSS   = "process_resident_memory_bytes"
	mProcessCPU   = "process_cpu_seconds_total"
)

// benchAppCode is the appcode of the one app a started server runs.
const benchAppCode = 101

// serverFlags choose the server a scenario measures.
type serverFlags struct {
	imd          string
	addr         string
	http         string
	pid          int
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

func (sf *serverFlags) bind(fs *flag.FlagSet) {
	fs.StringVar(&sf.imd, "imd", "", "imd binary `path` to start (default: imd next to imbench, then in PATH)")
	fs.StringVar(&sf.addr, "addr", "", "gateway host:port of a running server to measure instead of starting one (loopback only)")
	fs.StringVar(&sf.http, "http", "", "with --addr: the server's HTTP API host:port (for /metrics)")
	fs.IntVar(&sf.pid, "pid", 0, "with --addr: the server's pid, for VmRSS (default: process_resident_memory_bytes from /metrics)")
	fs.UintVar(&sf.appcode, "appcode", benchAppCode, "with --addr: appcode to log in to")
	fs.StringVar(&sf.secret, "secret", "", "with --addr: the appcode's token secret")
	fs.StringVar(&sf.apiKey, "api-key", "", "with --addr: an HTTP API key of the appcode (s2c pushes)")
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

// target is the server under measurement: one `imd all`, or a logic node
// and several gateways.
type target struct {
	Started bool   `json:"started"` // imbench started it
	Binary  string `json:"binary,omitempty"`
	PID     int    `json:"pid,omitempty"` // the process serving HTTP: imd all or the logic node
	Gateway string `json:"gateway"`       // the first gateway
	// Gateways are every gateway's client address when there are several.
	Gateways    []string      `json:"gateways,omitempty"`
	HTTP        string        `json:"http"`
	AppCode     uint32        `json:"appcode"`
	IdleTimeout time.Duration `json:"idle_timeout_ns,omitempty"`
	Kafka       []string      `json:"kafka,omitempty"` // c2s: the brokers imd produces to
	// Procs are the processes imbench started: imd all, or the logic node
	// then the gateways.
	Procs  []*proc `json:"procs,omitempty"`
	secret string
	apiKey string

	http *http.Client
	dir  string

	stopOnce sync.Once
}

// proc is one server process.
type proc struct {
	Role    string `json:"role"` // all, logic or gateway
	PID     int    `json:"pid,omitempty"`
	Gateway string `json:"gateway,omitempty"` // client address, for roles with a gateway
	HTTP    string `json:"http"`

	cmd     *exec.Cmd
	logPath string
	exited  chan struct{}
	waitErr error
}

// open starts a server or checks the one named by the flags. tweak, when
// not nil, adjusts the configuration of a server imbench starts (a
// scenario's routes or limits); an attached server is used as it is.
func (sf *serverFlags) open(ctx context.Context, tweak func(*config.Config) error) (*target, error) {
	if sf.addr != "" {
		return sf.attach(ctx)
	}
	if sf.http != "" || sf.pid != 0 || sf.secret != "" || sf.apiKey != "" {
		return nil, errors.New("--http, --pid, --secret and --api-key go with --addr")
	}
	return sf.start(ctx, tweak)
}

func (sf *serverFlags) attach(ctx context.Context) (*target, error) {
	if sf.http == "" || sf.secret == "" {
		return nil, errors.New("--addr needs --http (for /metrics) and --secret (to mint tokens for --appcode)")
	}
	for _, a := range []string{sf.addr, sf.http} {
		if err := checkLoopback(a); err != nil {
			return nil, err
		}
	}
	t := &target{Gateway: sf.addr, HTTP: sf.http, PID: sf.pid, AppCode: uint32(sf.appcode), secret: sf.secret,
		apiKey: sf.apiKey, http: &http.Client{Timeout: 10 * time.Second}}
	if err := t.ready(ctx); err != nil {
		return nil, fmt.Errorf("server at %s / %s: %w", sf.addr, sf.http, err)
	}
	if t.PID != 0 {
		if _, err := bench.ReadProcStatus(t.PID); err != nil {
			return nil, fmt.Errorf("--pid %d: %w", t.PID, err)
		}
	}
	return t, nil
}

// checkLoopback refuses addresses off this machine: imbench loads what it
// targets hard and must never be pointed at a shared server by mistake.
func checkLoopback(hostport string) error {
	host, _, err := net.SplitHostPort(hostport)
	if err != nil {
		return err
	}
	if host == "localhost" {
		return nil
	}
	ip := net.ParseIP(host)
	if ip == nil || !ip.IsLoopback() {
		return fmt.Errorf("%s is not a loopback address; imbench only measures on this machine", hostport)
	}
	return nil
}

// findIMD resolves the imd binary: the flag, then next to imbench, then PATH.
func findIMD(flagVal string) (string, error) {
	if flagVal != "" {
		p, err := exec.LookPath(flagVal)
		if err != nil {
			return "", fmt.Errorf("--imd: %w", err)
		}
		return filepath.Abs(p)
	}
	if exe, err := os.Executable(); err == nil {
		p := filepath.Join(filepath.Dir(exe), "imd")
		if st, err := os.Stat(p); err == nil && st.Mode().IsRegular() && st.Mode()&0o111 != 0 {
			return p, nil
		}
	}
	if p, err := exec.LookPath("imd"); err == nil {
		return filepath.Abs(p)
	}
	return "", errors.New("no imd binary next to imbench or in PATH: build one (go build -o bin/imd ./cmd/imd) and pass --imd bin/imd")
}

func freeLoopbackAddr() (string, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	addr := ln.Addr().String()
	return addr, ln.Close()
}

func (sf *serverFlags) start(ctx context.Context, tweak func(*config.Config) error) (t *target, err error) {
	bin, err := findIMD(sf.imd)
	if err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp("", "imbench-imd-")
	if err != nil {
		return nil, err
	}
	raw := make([]byte, 48)
	_, _ = rand.Read(raw)
	t = &target{Started: true, Binary: bin, AppCode: benchAppCode, IdleTimeout: sf.idleTimeout,
		secret: hex.EncodeToString(raw[:32]), apiKey: "imbench-" + hex.EncodeToString(raw[32:]),
		http: &http.Client{Timeout: 10 * time.Second}, dir: dir}
	defer func() {
		if err != nil {
			_ = t.stop()
		}
	}()

	cfg := config.Default()
	cfg.DataDir = filepath.Join(dir, "data")
	cfg.Log = config.Log{Level: sf.logLevel, Format: "text"}
	cfg.Gateway.IdleTimeout = sf.idleTimeout
	cfg.Bus.Embedded.Addr = "127.0.0.1:0" // clear of a Kafka on 9092
	cfg.ShutdownGrace = 10 * time.Second
	cfg.Apps = []logic.App{{AppCode: benchAppCode, Name: "imbench", Account: 1, Secrets: []string{t.secret},
		APIKeys: []string{t.apiKey}}}
	if tweak != nil {
		if err := tweak(&cfg); err != nil {
			return nil, err
		}
	}
	t.Kafka = cfg.Bus.Brokers
	if len(t.Kafka) == 0 && cfg.Bus.Embedded.Addr != "127.0.0.1:0" {
		t.Kafka = []string{cfg.Bus.Embedded.Addr}
	}
	if sf.redis != "" {
		if sf.gateways <= 1 {
			return nil, errors.New("--redis goes with --gateways > 1")
		}
		if err := checkLoopback(sf.redis); err != nil {
			return nil, err
		}
		cfg.Cluster.Redis = config.Redis{Addrs: []string{sf.redis}, Prefix: "imbench:" + hex.EncodeToString(raw[:4]) + ":"}
	}
	if sf.gateways <= 1 {
		if _, err := sf.startProc(ctx, t, "all", cfg); err != nil {
			return nil, err
		}
		return t, nil
	}
	// Many processes: the logic node first, then the gateways dialling it.
	lcfg := cfg
	if lcfg.Cluster.RPCAddr, err = freeLoopbackAddr(); err != nil {
		return nil, err
	}
	if _, err := sf.startProc(ctx, t, "logic", lcfg); err != nil {
		return nil, err
	}
	for i := range sf.gateways {
		gcfg := cfg
		gcfg.Apps = nil // gateways authenticate nothing themselves
		gcfg.DataDir = filepath.Join(dir, fmt.Sprintf("gateway-%d", i))
		gcfg.Cluster.LogicAddrs = []string{lcfg.Cluster.RPCAddr}
		if _, err := sf.startProc(ctx, t, "gateway", gcfg); err != nil {
			return nil, err
		}
	}
	return t, nil
}

// startProc starts one imd process of role with cfg on free loopback
// ports, waits until it is ready and adds it to t.
func (sf *serverFlags) startProc(ctx context.Context, t *target, role string, cfg config.Config) (*proc, error) {
	n := len(t.Procs)
	pr := &proc{Role: role, logPath: filepath.Join(t.dir, fmt.Sprintf("imd-%d-%s.log", n, role)), exited: make(chan struct{})}
	var err error
	if pr.HTTP, err = freeLoopbackAddr(); err != nil {
		return nil, err
	}
	cfg.HTTP.Addr = pr.HTTP
	cfg.Gateway.Addr = ""
	cfg.Gateway.WebAddr = "" // imbench measures the TCP port
	if role != "logic" {
		if pr.Gateway, err = freeLoopbackAddr(); err != nil {
			return nil, err
		}
		cfg.Gateway.Addr = pr.Gateway
	}
	y, err := yaml.Marshal(&cfg)
	if err != nil {
		return nil, err
	}
	cfgPath := filepath.Join(t.dir, fmt.Sprintf("imd-%d-%s.yaml", n, role))
	if err := os.WriteFile(cfgPath, y, 0o600); err != nil {
		return nil, err
	}
	logf, err := os.Create(pr.logPath)
	if err != nil {
		return nil, err
	}
	defer logf.Close() // the child holds its own descriptor

	cmd := exec.Command(t.Binary, append([]string{role, "--config", cfgPath}, sf.imdArgs...)...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.Env = serverEnv(os.Environ())
	cmd.SysProcAttr = childAttr()
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s %s: %w", t.Binary, role, err)
	}
	pr.cmd, pr.PID = cmd, cmd.Process.Pid
	go func() { pr.waitErr = cmd.Wait(); close(pr.exited) }()
	t.Procs = append(t.Procs, pr)
	if role != "gateway" {
		t.HTTP, t.PID = pr.HTTP, pr.PID
	}
	if pr.Gateway != "" {
		if t.Gateway == "" {
			t.Gateway = pr.Gateway
		}
		if role == "gateway" {
			t.Gateways = append(t.Gateways, pr.Gateway)
		}
	}
	rctx, cancel := context.WithTimeout(ctx, sf.startTimeout)
	defer cancel()
	if err := t.readyProc(rctx, pr); err != nil {
		return nil, fmt.Errorf("imd %s did not become ready: %w\n%s", role, err, pr.logTail())
	}
	return pr, nil
}

// serverEnv drops IMD_* variables, which would override the config file
// imbench writes (GOGC, GOMAXPROCS and the like pass through).
func serverEnv(env []string) []string {
	out := env[:0:0]
	for _, kv := range env {
		if !strings.HasPrefix(kv, "IMD_") {
			out = append(out, kv)
		}
	}
	return out
}

// ready waits until /readyz answers 200 and the gateway accepts.
func (t *target) ready(ctx context.Context) error {
	return t.readyProc(ctx, &proc{HTTP: t.HTTP, Gateway: t.Gateway})
}

func (t *target) readyProc(ctx context.Context, pr *proc) error {
	var last error
	for {
		if pr.exited != nil {
			select {
			case <-pr.exited:
				return fmt.Errorf("imd exited: %v", pr.waitErr)
			default:
			}
		}
		if last = t.probe(ctx, pr); last == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%w (last: %v)", ctx.Err(), last)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

func (t *target) probe(ctx context.Context, pr *proc) error {
	if _, err := t.readyz(ctx, pr.HTTP); err != nil {
		return err
	}
	if pr.Gateway == "" {
		return nil
	}
	var d net.Dialer
	c, err := d.DialContext(ctx, "tcp", pr.Gateway)
	if err != nil {
		return err
	}
	return c.Close()
}

// sessions returns the router's session count from /readyz.
func (t *target) sessions(ctx context.Context) (int64, error) {
	return t.readyz(ctx, t.HTTP)
}

// readyz checks the /readyz of the server at addr and returns its session
// count (-1 when it does not say: a gateway's).
func (t *target) readyz(ctx context.Context, addr string) (int64, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+addr+"/readyz", nil)
	if err != nil {
		return 0, err
	}
	resp, err := t.http.Do(req)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return 0, fmt.Errorf("readyz: %s", resp.Status)
	}
	var r struct {
		Sessions *int64 `json:"sessions"`
	}
	if err := json.NewDecoder(io.LimitReader(resp.Body, 1<<20)).Decode(&r); err != nil {
		return 0, fmt.Errorf("readyz: %w", err)
	}
	if r.Sessions == nil {
		return -1, nil
	}
	return *r.Sessions, nil
}

func (pr *proc) logTail() string {
	if pr.logPath == "" {
		return ""
	}
	b, err := os.ReadFile(pr.logPath)
	if err != nil {
		return ""
	}
	if len(b) > 4<<10 {
		b = b[len(b)-4<<10:]
	}
	return "imd " + pr.Role + " log (tail):\n" + string(bytes.TrimSpace(b)) + "\n"
}

// stop ends a started server with SIGTERM (SIGKILL if it lingers),
// gateways before the logic node, and removes its temp dir. It leaves an
// attached server alone. Only the first call does anything and reports an
// error.
func (t *target) stop() error {
	if !t.Started {
		return nil
	}
	err := errAlreadyStopped
	t.stopOnce.Do(func() {
		defer os.RemoveAll(t.dir)
		var errs []error
		for i := len(t.Procs) - 1; i >= 0; i-- {
			errs = append(errs, t.Procs[i].terminate())
		}
		err = errors.Join(errs...)
	})
	if err == errAlreadyStopped {
		return nil
	}
	return err
}

var errAlreadyStopped = errors.New("already stopped")

func (pr *proc) terminate() error {
	_ = pr.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-pr.exited:
	case <-time.After(20 * time.Second):
		_ = pr.cmd.Process.Kill()
		<-pr.exited
		return fmt.Errorf("imd %s did not stop within 20s of SIGTERM; killed", pr.Role)
	}
	if pr.waitErr != nil {
		return fmt.Errorf("imd %s: %w\n%s", pr.Role, pr.waitErr, pr.logTail())
	}
	return nil
}

// gates are the processes that hold connections: the started imd all or
// gateways, or the attached server.
func (t *target) gates() []*proc {
	if len(t.Procs) == 0 {
		return []*proc{{Role: "all", PID: t.PID, HTTP: t.HTTP, Gateway: t.Gateway}}
	}
	var out []*proc
	for _, pr := range t.Procs {
		if pr.Gateway != "" {
			out = append(out, pr)
		}
	}
	return out
}

// snapshot is the server's state at one moment.
type snapshot struct {
	At           time.Time `json:"at"`
	RSSBytes     int64     `json:"rss_bytes"`
	RSSSource    string    `json:"rss_source"`
	HWMBytes     int64     `json:"hwm_bytes,omitempty"`
	Threads      int       `json:"threads,omitempty"`
	HeapInuse    int64     `json:"go_heap_inuse_bytes"`
	StackInuse   int64     `json:"go_stack_inuse_bytes"`
	GoSys        int64     `json:"go_sys_bytes"`
	Goroutines   int64     `json:"go_goroutines"`
	GatewayConns int64     `json:"gateway_connections"`
	Sessions     int64     `json:"router_sessions"` // -1 when /readyz does not say
	// LogicRSSBytes is the logic node's RSS when it runs apart from the
	// gateways (its router holds the sessions).
	LogicRSSBytes int64 `json:"logic_rss_bytes,omitempty"`
}

func (t *target) scrapeAt(ctx context.Context, addr string) (bench.Metrics, error) {
	return bench.Scrape(ctx, t.http, "http://"+addr+"/metrics")
}

// gatewayConns reads the gateways' connection gauges and adds them up.
func (t *target) gatewayConns(ctx context.Context) (int64, error) {
	var sum int64
	for _, pr := range t.gates() {
		m, err := t.scrapeAt(ctx, pr.HTTP)
		if err != nil {
			return 0, err
		}
		v, ok := m.Get(mGatewayConns)
		if !ok {
			return 0, fmt.Errorf("/metrics of %s has no %s", pr.HTTP, mGatewayConns)
		}
		sum += int64(v)
	}
	return sum, nil
}

// snapshot adds up the figures of every process that holds connections;
// the session count comes from the node serving the HTTP API, and the
// logic node's RSS is kept apart.
func (t *target) snapshot(ctx context.Context) (snapshot, error) {
	s := snapshot{At: time.Now()}
	for _, pr := range t.gates() {
		one, err := t.snapshotProc(ctx, pr)
		if err != nil {
			return s, err
		}
		s.RSSBytes += one.RSSBytes
		s.RSSSource = one.RSSSource
		s.HWMBytes += one.HWMBytes
		s.Threads += one.Threads
		s.HeapInuse += one.HeapInuse
		s.StackInuse += one.StackInuse
		s.GoSys += one.GoSys
		s.Goroutines += one.Goroutines
		s.GatewayConns += one.GatewayConns
	}
	for _, pr := range t.Procs {
		if pr.Role == "logic" {
			st, err := bench.ReadProcStatus(pr.PID)
			if err != nil {
				return s, err
			}
			s.LogicRSSBytes = st.VmRSS
		}
	}
	var err error
	if s.Sessions, err = t.sessions(ctx); err != nil {
		return s, err
	}
	return s, nil
}

func (t *target) snapshotProc(ctx context.Context, pr *proc) (snapshot, error) {
	s := snapshot{At: time.Now()}
	m, err := t.scrapeAt(ctx, pr.HTTP)
	if err != nil {
		return s, err
	}
	var missing []string
	get := func(name string) int64 {
		v, ok := m.Get(name)
		if !ok {
			missing = append(missing, name)
		}
		return int64(v)
	}
	s.GatewayConns = get(mGatewayConns)
	s.HeapInuse = get(mHeapInuse)
	s.StackInuse = get(mStackInuse)
	s.GoSys = get(mGoSys)
	s.Goroutines = get(mGoroutines)
	if pr.PID != 0 {
		st, err := bench.ReadProcStatus(pr.PID)
		if err != nil {
			return s, err
		}
		s.RSSBytes, s.HWMBytes, s.Threads, s.RSSSource = st.VmRSS, st.VmHWM, st.Threads, "VmRSS"
	} else {
		s.RSSBytes, s.RSSSource = get(mProcessRSS), mProcessRSS
	}
	if len(missing) > 0 {
		return s, fmt.Errorf("/metrics of %s lacks %s", pr.HTTP, strings.Join(missing, ", "))
	}
	return s, nil
}
