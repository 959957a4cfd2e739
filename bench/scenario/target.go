package scenario

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
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
)

// Metric names read from the server's /metrics.
const (
	MetricGatewayConns = "imd_gateway_connections"
	MetricHeapInuse    = "go_memstats_heap_inuse_bytes"
	MetricStackInuse   = "go_memstats_stack_inuse_bytes"
	MetricGoSys        = "go_memstats_sys_bytes"
	MetricGoroutines   = "go_goroutines"
	MetricProcessRSS   = "process_resident_memory_bytes"
	MetricProcessCPU   = "process_cpu_seconds_total"
)

// BenchAppCode is the appcode of the one app a started server runs.
const BenchAppCode = 101

// CPU sources of a report's server CPU figures.
const (
	CPUFromProc    = "/proc/<pid>/stat"
	CPUFromMetrics = MetricProcessCPU
)

// ServerNeeds is what a scenario asks of a server that its Launcher
// starts; an attached server is used as it is. Zero fields ask nothing.
type ServerNeeds struct {
	// MaxRecipients is the least s2c.max_recipients (recipients of one push).
	MaxRecipients int
	// MaxBody is the least s2c.max_body (an HTTP API request body, bytes).
	MaxBody int
	// GroupMaxSize is the least groups.max_size.
	GroupMaxSize int
	// Route, when set, routes c2s reports of BenchAppCode to a topic.
	Route *Route
	// KafkaBrokers, when set, are where the server produces instead of its
	// embedded broker (auto-creating topics).
	KafkaBrokers []string
	// EmbeddedKafka gives the embedded broker a free loopback port of its
	// own, reported in Target.Kafka; KafkaPartitions, when > 0, its
	// partitions per topic.
	EmbeddedKafka   bool
	KafkaPartitions int
	// Profile serves Go's profiler on a free loopback port (Target.Debug).
	Profile bool
}

// Route sends the c2s reports of one msgtype to a Kafka topic.
type Route struct {
	MsgType uint32
	Topic   string
}

// Launcher gives a scenario its server.
type Launcher interface {
	// Open starts a server fit for needs, or checks the running one it
	// was told to attach to.
	Open(ctx context.Context, needs ServerNeeds) (*Target, error)
	// Attached reports whether Open attaches to a running server.
	Attached() bool
}

// Env is what a scenario needs of its caller besides its options.
type Env struct {
	// Log gets the progress lines (the command's stderr); nil discards them.
	Log io.Writer
	// Command is the command line recorded in the report.
	Command []string
}

func (e Env) log() io.Writer {
	if e.Log == nil {
		return io.Discard
	}
	return e.Log
}

// Target is the server under measurement: one `imd all`, or a logic node
// and several gateways, started by a Launcher or attached to.
type Target struct {
	Started bool   `json:"started"` // imbench started it
	Binary  string `json:"binary,omitempty"`
	PID     int    `json:"pid,omitempty"` // the process serving HTTP: imd all or the logic node
	Gateway string `json:"gateway"`       // the first gateway
	// Gateways are every gateway's client address when there are several.
	Gateways    []string      `json:"gateways,omitempty"`
	HTTP        string        `json:"http"`
	Debug       string        `json:"debug,omitempty"` // Go's profiler (/debug/pprof/) of the HTTP process
	AppCode     uint32        `json:"appcode"`
	IdleTimeout time.Duration `json:"idle_timeout_ns,omitempty"`
	Kafka       []string      `json:"kafka,omitempty"` // c2s: the brokers imd produces to
	// Procs are the processes started: imd all, or the logic node then the
	// gateways.
	Procs []*Proc `json:"procs,omitempty"`
	// Secret mints login tokens for AppCode; APIKey calls its HTTP API.
	Secret string `json:"-"`
	APIKey string `json:"-"`

	client   *http.Client
	dir      string
	stopOnce sync.Once
}

// Proc is one server process.
type Proc struct {
	Role    string `json:"role"` // all, logic or gateway
	PID     int    `json:"pid,omitempty"`
	Gateway string `json:"gateway,omitempty"` // client address, for roles with a gateway
	HTTP    string `json:"http"`

	cmd     *exec.Cmd
	logPath string
	exited  chan struct{}
	waitErr error
}

// NewStarted returns an empty target for a server to be started from
// binary, in dir (removed by Stop), with an app of appcode that accepts
// tokens signed with secret and HTTP calls with apiKey.
func NewStarted(binary, dir string, appcode uint32, secret, apiKey string, idleTimeout time.Duration) *Target {
	return &Target{Started: true, Binary: binary, dir: dir, AppCode: appcode, Secret: secret, APIKey: apiKey,
		IdleTimeout: idleTimeout, client: &http.Client{Timeout: 10 * time.Second}}
}

// Dir is the started server's scratch folder.
func (t *Target) Dir() string { return t.dir }

// AttachSpec names a running server.
type AttachSpec struct {
	Gateway, HTTP string
	PID           int // for VmRSS and CPU from /proc; 0 reads them from /metrics
	AppCode       uint32
	Secret        string
	APIKey        string
	Debug         string // its profiler's address, if it serves one
}

// Attach checks that the server named by s answers on loopback.
func Attach(ctx context.Context, s AttachSpec) (*Target, error) {
	if s.HTTP == "" || s.Secret == "" {
		return nil, errors.New("--addr needs --http (for /metrics) and --secret (to mint tokens for --appcode)")
	}
	for _, a := range []string{s.Gateway, s.HTTP} {
		if err := CheckLoopback(a); err != nil {
			return nil, err
		}
	}
	t := &Target{Gateway: s.Gateway, HTTP: s.HTTP, PID: s.PID, AppCode: s.AppCode, Secret: s.Secret,
		APIKey: s.APIKey, Debug: s.Debug, client: &http.Client{Timeout: 10 * time.Second}}
	if err := t.readyProc(ctx, &Proc{HTTP: t.HTTP, Gateway: t.Gateway}); err != nil {
		return nil, fmt.Errorf("server at %s / %s: %w", s.Gateway, s.HTTP, err)
	}
	if t.PID != 0 {
		if _, err := bench.ReadProcStatus(t.PID); err != nil {
			return nil, fmt.Errorf("--pid %d: %w", t.PID, err)
		}
	}
	return t, nil
}

// CheckLoopback refuses addresses off this machine: imbench loads what it
// targets hard and must never be pointed at a shared server by mistake.
func CheckLoopback(hostport string) error {
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

// FindIMD resolves the imd binary: flagVal, then next to the running
// executable, then PATH.
func FindIMD(flagVal string) (string, error) {
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

// FreeLoopbackAddr returns a 127.0.0.1 port that was free a moment ago.
func FreeLoopbackAddr() (string, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	addr := ln.Addr().String()
	return addr, ln.Close()
}

// ProcSpec is one imd process to start.
type ProcSpec struct {
	Role    string // the imd subcommand: all, logic or gateway
	HTTP    string // its HTTP address, as in Config
	Gateway string // its client address, as in Config; empty for logic
	Debug   string // its profiler's address, as in Config, if any
	Config  []byte // YAML configuration (--config)
	Args    []string
	// StartTimeout bounds the wait for /readyz (and the gateway's port).
	StartTimeout time.Duration
}

// StartProc starts one process of a started target, waits until it is
// ready and adds it to t. Its log goes to a file in t's folder, shown when
// it fails to start.
func (t *Target) StartProc(ctx context.Context, s ProcSpec) (*Proc, error) {
	n := len(t.Procs)
	pr := &Proc{Role: s.Role, HTTP: s.HTTP, Gateway: s.Gateway, exited: make(chan struct{}),
		logPath: filepath.Join(t.dir, fmt.Sprintf("imd-%d-%s.log", n, s.Role))}
	cfgPath := filepath.Join(t.dir, fmt.Sprintf("imd-%d-%s.yaml", n, s.Role))
	if err := os.WriteFile(cfgPath, s.Config, 0o600); err != nil {
		return nil, err
	}
	logf, err := os.Create(pr.logPath)
	if err != nil {
		return nil, err
	}
	defer logf.Close() // the child holds its own descriptor

	cmd := exec.Command(t.Binary, append([]string{s.Role, "--config", cfgPath}, s.Args...)...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.Env = serverEnv(os.Environ())
	cmd.SysProcAttr = childAttr()
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s %s: %w", t.Binary, s.Role, err)
	}
	pr.cmd, pr.PID = cmd, cmd.Process.Pid
	go func() { pr.waitErr = cmd.Wait(); close(pr.exited) }()
	t.Procs = append(t.Procs, pr)
	if s.Role != "gateway" {
		t.HTTP, t.PID = pr.HTTP, pr.PID
		if s.Debug != "" {
			t.Debug = s.Debug
		}
	}
	if pr.Gateway != "" {
		if t.Gateway == "" {
			t.Gateway = pr.Gateway
		}
		if s.Role == "gateway" {
			t.Gateways = append(t.Gateways, pr.Gateway)
		}
	}
	timeout := s.StartTimeout
	if timeout <= 0 {
		timeout = 30 * time.Second
	}
	rctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	if err := t.readyProc(rctx, pr); err != nil {
		return nil, fmt.Errorf("imd %s did not become ready: %w\n%s", s.Role, err, pr.logTail())
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

func (t *Target) readyProc(ctx context.Context, pr *Proc) error {
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

func (t *Target) probe(ctx context.Context, pr *Proc) error {
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

// Sessions returns the router's session count from /readyz (-1 when it
// does not say).
func (t *Target) Sessions(ctx context.Context) (int64, error) {
	return t.readyz(ctx, t.HTTP)
}

// readyz checks the /readyz of the server at addr and returns its session
// count (-1 when it does not say: a gateway's).
func (t *Target) readyz(ctx context.Context, addr string) (int64, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+addr+"/readyz", nil)
	if err != nil {
		return 0, err
	}
	resp, err := t.httpClient().Do(req)
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

func (t *Target) httpClient() *http.Client {
	if t.client == nil {
		t.client = &http.Client{Timeout: 10 * time.Second}
	}
	return t.client
}

func (pr *Proc) logTail() string {
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

// Stop ends a started server with SIGTERM (SIGKILL if it lingers),
// gateways before the logic node, and removes its folder. It leaves an
// attached server alone. Only the first call does anything and reports an
// error.
func (t *Target) Stop() error {
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

func (pr *Proc) terminate() error {
	if pr.cmd == nil {
		return nil
	}
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
func (t *Target) gates() []*Proc {
	if len(t.Procs) == 0 {
		return []*Proc{{Role: "all", PID: t.PID, HTTP: t.HTTP, Gateway: t.Gateway}}
	}
	var out []*Proc
	for _, pr := range t.Procs {
		if pr.Gateway != "" {
			out = append(out, pr)
		}
	}
	return out
}

// Snapshot is the server's state at one moment.
type Snapshot struct {
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

// Scrape reads the /metrics of the server process at addr.
func (t *Target) Scrape(ctx context.Context, addr string) (bench.Metrics, error) {
	return bench.Scrape(ctx, t.httpClient(), "http://"+addr+"/metrics")
}

// GatewayConns reads the gateways' connection gauges and adds them up.
func (t *Target) GatewayConns(ctx context.Context) (int64, error) {
	var sum int64
	for _, pr := range t.gates() {
		m, err := t.Scrape(ctx, pr.HTTP)
		if err != nil {
			return 0, err
		}
		v, ok := m.Get(MetricGatewayConns)
		if !ok {
			return 0, fmt.Errorf("/metrics of %s has no %s", pr.HTTP, MetricGatewayConns)
		}
		sum += int64(v)
	}
	return sum, nil
}

// Snapshot adds up the figures of every process that holds connections;
// the session count comes from the node serving the HTTP API, and the
// logic node's RSS is kept apart.
func (t *Target) Snapshot(ctx context.Context) (Snapshot, error) {
	s := Snapshot{At: time.Now()}
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
	if s.Sessions, err = t.Sessions(ctx); err != nil {
		return s, err
	}
	return s, nil
}

func (t *Target) snapshotProc(ctx context.Context, pr *Proc) (Snapshot, error) {
	s := Snapshot{At: time.Now()}
	m, err := t.Scrape(ctx, pr.HTTP)
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
	s.GatewayConns = get(MetricGatewayConns)
	s.HeapInuse = get(MetricHeapInuse)
	s.StackInuse = get(MetricStackInuse)
	s.GoSys = get(MetricGoSys)
	s.Goroutines = get(MetricGoroutines)
	if pr.PID != 0 {
		st, err := bench.ReadProcStatus(pr.PID)
		if err != nil {
			return s, err
		}
		s.RSSBytes, s.HWMBytes, s.Threads, s.RSSSource = st.VmRSS, st.VmHWM, st.Threads, "VmRSS"
	} else {
		s.RSSBytes, s.RSSSource = get(MetricProcessRSS), MetricProcessRSS
	}
	if len(missing) > 0 {
		return s, fmt.Errorf("/metrics of %s lacks %s", pr.HTTP, strings.Join(missing, ", "))
	}
	return s, nil
}

// CPUSeconds is the CPU time of every server process so far and where it
// was read: CPUFromProc when imbench can see each process (it started them,
// or --pid names the attached one), which costs the server nothing, else
// CPUFromMetrics, each process's process_cpu_seconds_total (a scrape, so
// it works for any server on loopback).
func (t *Target) CPUSeconds(ctx context.Context) (float64, string, error) {
	var pids []int
	for _, pr := range t.Procs {
		pids = append(pids, pr.PID)
	}
	if len(t.Procs) == 0 && t.PID != 0 {
		pids = []int{t.PID}
	}
	if len(pids) > 0 {
		var sum time.Duration
		var err error
		for _, pid := range pids {
			var c bench.ProcCPU
			if c, err = bench.ReadProcCPU(pid); err != nil {
				break
			}
			sum += c.Total()
		}
		if err == nil {
			return sum.Seconds(), CPUFromProc, nil
		}
	}
	addrs := []string{t.HTTP}
	if len(t.Procs) > 0 {
		addrs = addrs[:0]
		for _, pr := range t.Procs {
			addrs = append(addrs, pr.HTTP)
		}
	}
	var sum float64
	for _, a := range addrs {
		m, err := t.Scrape(ctx, a)
		if err != nil {
			return 0, "", err
		}
		v, ok := m.Get(MetricProcessCPU)
		if !ok {
			return 0, "", fmt.Errorf("/metrics of %s has no %s", a, MetricProcessCPU)
		}
		sum += v
	}
	return sum, CPUFromMetrics, nil
}

// cpuMeter takes the server's CPU time at the start of a measurement.
type cpuMeter struct {
	t      *Target
	start  float64
	source string
	err    error
}

func startCPU(ctx context.Context, t *Target) cpuMeter {
	v, src, err := t.CPUSeconds(ctx)
	return cpuMeter{t: t, start: v, source: src, err: err}
}

// since returns the server CPU seconds since the meter started; ok is
// false when either reading failed.
func (m cpuMeter) since(ctx context.Context) (secs float64, source string, ok bool) {
	if m.err != nil {
		return 0, "", false
	}
	v, src, err := m.t.CPUSeconds(ctx)
	if err != nil || src != m.source {
		return 0, "", false
	}
	return v - m.start, src, true
}
