package scenario

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/imd-dev/imd/bench"
	"github.com/imd-dev/imd/sdk"
)

// LoadOptions are the options every load scenario (C2C, S2C, Group, C2S)
// has. DefaultLoadOptions gives the defaults of the command line.
type LoadOptions struct {
	Rate     float64       // offered operations per second over all senders (open loop), when Rates is empty
	Rates    []float64     // one run per rate on the same server and clients
	Duration time.Duration // length of the send schedule of one run (N wins)
	N        int64         // operations per run (0: rate x duration)
	Repeat   int           // runs per rate (min/median/max over them)
	Warmup   time.Duration // an unrecorded run at the first rate before measuring
	Settle   time.Duration // wait after the clients logged in, before the first run
	Pause    time.Duration // wait between runs
	Drain    time.Duration // after the schedule, how long a run waits for outstanding operations and deliveries
	Timeout  time.Duration // bound on the whole scenario
	Size     int           // content bytes per message
	Inflight int           // operations outstanding per sender
	// LoginConc is the logins in flight while the clients connect.
	LoginConc int
	UIDBase   uint64 // first uid of the scenario's clients
	// ProfileDir, when set, takes a CPU profile of the server process that
	// serves HTTP (imd all, or the logic node) over each measured run and
	// writes it there as <scenario>-<rate>-<repeat>.pprof. A started server
	// gets a profiler on a free port; an attached one needs its address.
	ProfileDir string
}

// DefaultLoadOptions returns the defaults: rate and size are the
// scenario's own.
func DefaultLoadOptions(rate float64, size, inflight int) LoadOptions {
	return LoadOptions{Rate: rate, Duration: 5 * time.Second, Repeat: 1, Warmup: time.Second, Settle: time.Second,
		Pause: time.Second, Drain: 15 * time.Second, Timeout: 10 * time.Minute, Size: size, Inflight: inflight,
		LoginConc: 100, UIDBase: 1}
}

// validate checks o and fills Rates from Rate when it is empty.
func (o *LoadOptions) validate(minSize int) []error {
	var errs []error
	if len(o.Rates) == 0 {
		if !(o.Rate > 0) || math.IsInf(o.Rate, 0) {
			errs = append(errs, errors.New("--rate must be > 0"))
		}
		o.Rates = []float64{o.Rate}
	}
	for _, r := range o.Rates {
		if !(r > 0) || math.IsInf(r, 0) {
			errs = append(errs, fmt.Errorf("rate %v must be > 0", r))
		}
	}
	if o.N < 0 || (o.N == 0 && o.Duration <= 0) {
		errs = append(errs, errors.New("give -n > 0 or --duration > 0"))
	}
	if o.Repeat < 1 {
		errs = append(errs, errors.New("--repeat must be >= 1"))
	}
	if o.Warmup < 0 || o.Settle < 0 || o.Pause < 0 || o.Drain <= 0 || o.Timeout <= 0 {
		errs = append(errs, errors.New("durations must not be negative (--drain and --timeout > 0)"))
	}
	if o.Size < minSize || o.Size > 16<<10 {
		errs = append(errs, fmt.Errorf("--size must be in [%d, 16384]", minSize))
	}
	if o.LoginConc < 1 {
		errs = append(errs, errors.New("--login-c must be >= 1"))
	}
	if o.UIDBase < 1 {
		errs = append(errs, errors.New("--uid-base must be >= 1"))
	}
	return errs
}

// ops returns the operations of one run at rate.
func (o *LoadOptions) ops(rate float64) int64 {
	if o.N > 0 {
		return o.N
	}
	return max(1, int64(math.Round(rate*o.Duration.Seconds())))
}

// monoBase anchors mono: every timestamp imbench puts in a message is
// nanoseconds since this process started, on the monotonic clock, so a
// latency is a difference of two readings of one clock.
var monoBase = time.Now()

func mono() int64 { return int64(time.Since(monoBase)) }

// MsgHeader is the length of the header that messages of the c2c, s2c,
// group and offline scenarios start with: run id, index (the message's or
// push's number in its run), scheduled send time and real send time (mono
// ns). The rest is padding.
const MsgHeader = 28

func putHeader(b []byte, run uint32, idx int64, at, sent int64) {
	binary.BigEndian.PutUint32(b[0:], run)
	binary.BigEndian.PutUint64(b[4:], uint64(idx))
	binary.BigEndian.PutUint64(b[12:], uint64(at))
	binary.BigEndian.PutUint64(b[20:], uint64(sent))
}

func getHeader(b []byte) (run uint32, idx int64, at, sent int64, ok bool) {
	if len(b) < MsgHeader {
		return 0, 0, 0, 0, false
	}
	return binary.BigEndian.Uint32(b[0:]), int64(binary.BigEndian.Uint64(b[4:])),
		int64(binary.BigEndian.Uint64(b[12:])), int64(binary.BigEndian.Uint64(b[20:])), true
}

// newContent returns size bytes: room for the header, then readable padding.
func newContent(size int) []byte {
	b := make([]byte, size)
	for i := MsgHeader; i < size; i++ {
		b[i] = 'a' + byte(i%26)
	}
	return b
}

// shardedHist is a histogram that many goroutines record into at once;
// each records into the shard of its own number.
type shardedHist struct {
	shards [16]struct {
		mu sync.Mutex
		h  bench.Histogram
		_  [40]byte // keep shards off each other's cache lines
	}
}

func (s *shardedHist) record(shard int, d time.Duration) {
	sh := &s.shards[uint(shard)%uint(len(s.shards))]
	sh.mu.Lock()
	sh.h.Record(d)
	sh.mu.Unlock()
}

func (s *shardedHist) merged() *bench.Histogram {
	var h bench.Histogram
	for i := range s.shards {
		sh := &s.shards[i]
		sh.mu.Lock()
		h.Merge(&sh.h)
		sh.mu.Unlock()
	}
	return &h
}

// runState is one run's bookkeeping, shared by the driver, the operations
// and the receiving callbacks.
type runState struct {
	id     uint32
	rate   float64 // operations per second
	n      int64   // operations scheduled
	slots  int64   // possible deliveries: n x deliveries per operation
	start  time.Time
	startM int64 // start in mono ns
	warmup bool

	issued, ok, failed atomic.Int64
	expected           atomic.Int64 // deliveries the successful operations call for
	delivered, dups    atomic.Int64
	stray              atomic.Int64 // deliveries that name no slot of the run
	firstIssue         atomic.Int64 // mono ns
	lastIssue          atomic.Int64
	lastDelivery       atomic.Int64
	maxBehind          atomic.Int64 // ns the driver issued an operation after its scheduled time
	issuing            atomic.Bool  // false once the driver stopped issuing

	seen          []atomic.Uint64 // a bit per slot: delivered
	lat, svc, ack shardedHist

	errMu sync.Mutex
	errs  map[string]int
}

var runIDs atomic.Uint32

func newRunState(rate float64, n, perOp int64, warmup bool) *runState {
	rs := &runState{id: runIDs.Add(1), rate: rate, n: n, slots: n * perOp, warmup: warmup}
	rs.seen = make([]atomic.Uint64, (rs.slots+63)/64)
	return rs
}

// deliver records the arrival of slot idx (a message at a recipient, or an
// acknowledgement) that was scheduled at at and sent at sent (mono ns). It
// reports whether this was the slot's first arrival.
func (rs *runState) deliver(shard int, idx, at, sent int64) bool {
	now := mono()
	if idx < 0 || idx >= rs.slots {
		rs.stray.Add(1)
		return false
	}
	mask := uint64(1) << (idx % 64)
	if rs.seen[idx/64].Or(mask)&mask != 0 {
		rs.dups.Add(1)
		return false
	}
	rs.lat.record(shard, time.Duration(now-at))
	rs.svc.record(shard, time.Duration(now-sent))
	rs.delivered.Add(1)
	for {
		last := rs.lastDelivery.Load()
		if now <= last || rs.lastDelivery.CompareAndSwap(last, now) {
			return true
		}
	}
}

func (rs *runState) isDelivered(idx int64) bool {
	return idx >= 0 && idx < rs.slots && rs.seen[idx/64].Load()&(uint64(1)<<(idx%64)) != 0
}

// fail counts a failed operation by its error text.
func (rs *runState) fail(err error) {
	rs.failed.Add(1)
	rs.note(err.Error())
}

// note counts a problem that is not a failed operation.
func (rs *runState) note(msg string) {
	rs.errMu.Lock()
	defer rs.errMu.Unlock()
	if rs.errs == nil {
		rs.errs = map[string]int{}
	}
	if _, ok := rs.errs[msg]; ok || len(rs.errs) < maxDistinctErrors {
		rs.errs[msg]++
	} else {
		rs.errs["(other errors)"]++
	}
}

// opFunc performs operation g for sender, scheduled at at (mono ns), and
// returns once its response came. It records its deliveries in rs (or
// rs.expected, for deliveries that arrive elsewhere).
type opFunc func(ctx context.Context, rs *runState, sender int, g int64, at int64) error

// drive issues rs.n operations at rs.rate from senders goroutines, each
// keeping at most inflight of its operations outstanding, and returns when
// every issued operation returned. Operation g belongs to sender g %
// senders. A sender that has inflight operations outstanding waits for one
// to return, and then issues what is due at once. It stops issuing when
// ctx ends; what was not issued by then counts as unsent.
func drive(ctx context.Context, rs *runState, senders, inflight int, op opFunc) {
	var ops, ss sync.WaitGroup
	interval := 1e9 / rs.rate
	rs.issuing.Store(true)
	for s := range senders {
		ss.Go(func() {
			sem := make(chan struct{}, inflight)
			for g := int64(s); g < rs.n; g += int64(senders) {
				at := rs.startM + int64(float64(g)*interval)
				if d := time.Duration(at - mono()); d > 0 {
					if sleepCtx(ctx, d) != nil {
						return
					}
				}
				select {
				case sem <- struct{}{}:
				case <-ctx.Done():
					return
				}
				now := mono()
				rs.firstIssue.CompareAndSwap(0, now)
				for behind := now - at; ; {
					if old := rs.maxBehind.Load(); behind <= old || rs.maxBehind.CompareAndSwap(old, behind) {
						break
					}
				}
				rs.issued.Add(1)
				ops.Go(func() {
					defer func() { <-sem }()
					t0 := mono()
					err := op(ctx, rs, s, g, at)
					t1 := mono()
					if err != nil {
						rs.fail(err)
					} else {
						rs.ok.Add(1)
						rs.ack.record(s, time.Duration(t1-t0))
					}
				})
			}
		})
	}
	ss.Wait()
	rs.lastIssue.Store(mono())
	rs.issuing.Store(false)
	ops.Wait()
}

// LoadRun is the result of one run.
type LoadRun struct {
	Rate       float64 `json:"offered_rate"` // operations per second
	Repeat     int     `json:"repeat"`       // 1-based, within the rate
	Scheduled  int64   `json:"scheduled"`
	Issued     int64   `json:"issued"`
	Unsent     int64   `json:"unsent"` // scheduled but not issued before the run's deadline
	OKOps      int64   `json:"ok_ops"`
	Failed     int64   `json:"failed"`
	Expected   int64   `json:"expected_deliveries"`
	Delivered  int64   `json:"delivered"`
	Missing    int64   `json:"missing"` // expected but not delivered within --drain
	Duplicates int64   `json:"duplicates"`
	Stray      int64   `json:"stray,omitempty"`

	Errors map[string]int `json:"errors,omitempty"`

	OfferedDeliveries float64 `json:"offered_deliveries_per_second"`
	IssueSeconds      float64 `json:"issue_seconds"` // first to last operation issued
	IssueRate         float64 `json:"issued_per_second"`
	Seconds           float64 `json:"seconds"` // schedule start to last delivery
	Throughput        float64 `json:"throughput"`
	MaxBehindMs       float64 `json:"max_behind_schedule_ms"`

	Latency bench.Summary `json:"latency"`         // scheduled send -> delivered: what a user waits
	Service bench.Summary `json:"service_latency"` // real send -> delivered
	Ack     bench.Summary `json:"ack_latency"`     // real send -> the send's response

	// ServerCPUSeconds is the CPU time of the server's processes over the
	// run (ServerCPUSource says how it was read); per delivery and per
	// operation (a push, a message) in µs.
	ServerCPUSeconds float64 `json:"server_cpu_seconds"`
	ServerCPUSource  string  `json:"server_cpu_source,omitempty"`
	ServerCores      float64 `json:"server_cores"` // ServerCPUSeconds over the run's wall time
	ServerUsPerDeliv float64 `json:"server_cpu_us_per_delivery"`
	ServerUsPerOp    float64 `json:"server_cpu_us_per_op"`
	ClientCPUSeconds float64 `json:"client_cpu_seconds"` // imbench itself
	ClientCores      float64 `json:"client_cores"`
	ClientUsPerDeliv float64 `json:"client_cpu_us_per_delivery"`

	Profile string `json:"cpu_profile,omitempty"` // the server's CPU profile over the run

	Saturated bool `json:"saturated"` // behind the offered rate: unsent, or throughput < 90% of offered
	OK        bool `json:"ok"`        // nothing failed and nothing went missing
}

// LoadReport is the result of a load scenario and its JSON document.
type LoadReport struct {
	Scenario     string      `json:"scenario"`
	Time         time.Time   `json:"time"`
	Command      []string    `json:"command"`
	Host         HostInfo    `json:"host"`
	Server       *Target     `json:"server"`
	Setup        any         `json:"setup"`
	OpUnit       string      `json:"op_unit"`       // what the rate counts
	DeliveryUnit string      `json:"delivery_unit"` // what throughput counts
	Warmup       *LoadRun    `json:"warmup,omitempty"`
	Runs         []LoadRun   `json:"runs"`
	Rates        []RateStats `json:"rates"`
	Chart        string      `json:"chart,omitempty"` // set by whoever draws LatencyChart
	Extra        any         `json:"extra,omitempty"` // scenario-specific results (c2s: verification)
	Notes        []string    `json:"notes,omitempty"` // printed under the table
	OK           bool        `json:"ok"`

	ServerStopResult string `json:"server_stop_result,omitempty"`
}

// Passed reports whether every run was clean.
func (r *LoadReport) Passed() bool { return r.OK }

// RateStats sums up the runs of one rate: min, median and max over them.
type RateStats struct {
	Rate       float64    `json:"offered_rate"`
	Runs       int        `json:"runs"`
	Saturated  int        `json:"saturated_runs"`
	Throughput [3]float64 `json:"throughput_min_median_max"`
	P50Ms      [3]float64 `json:"p50_ms_min_median_max"`
	P99Ms      [3]float64 `json:"p99_ms_min_median_max"`
	P999Ms     [3]float64 `json:"p999_ms_min_median_max"`
	// ServerUsPerDeliv is the server CPU per delivery over the runs.
	ServerUsPerDeliv [3]float64 `json:"server_cpu_us_per_delivery_min_median_max"`
	ClientUsPerDeliv [3]float64 `json:"client_cpu_us_per_delivery_min_median_max"`
}

func summarizeRates(runs []LoadRun) []RateStats {
	var out []RateStats
	for _, r := range runs {
		if len(out) == 0 || out[len(out)-1].Rate != r.Rate {
			out = append(out, RateStats{Rate: r.Rate})
		}
	}
	for i := range out {
		var tp, p50, p99, p999, srv, cli []float64
		for _, r := range runs {
			if r.Rate == out[i].Rate {
				tp = append(tp, r.Throughput)
				p50 = append(p50, r.Latency.P50Ms)
				p99 = append(p99, r.Latency.P99Ms)
				p999 = append(p999, r.Latency.P999Ms)
				srv = append(srv, r.ServerUsPerDeliv)
				cli = append(cli, r.ClientUsPerDeliv)
				if r.Saturated {
					out[i].Saturated++
				}
			}
		}
		out[i].Runs = len(tp)
		out[i].Throughput, out[i].P50Ms, out[i].P99Ms, out[i].P999Ms = MinMedMax(tp), MinMedMax(p50), MinMedMax(p99), MinMedMax(p999)
		out[i].ServerUsPerDeliv, out[i].ClientUsPerDeliv = MinMedMax(srv), MinMedMax(cli)
	}
	return out
}

// loadScenario is what a load scenario plugs into runLoad.
type loadScenario struct {
	name         string
	opUnit       string // "msgs", "pushes"
	deliveryUnit string // "msgs", "deliveries", "acks"
	senders      int
	inflight     int
	perOp        int64 // deliveries per operation
	setup        any   // goes into the report
	needs        ServerNeeds
	// prepare connects the clients once the server is up.
	prepare func(ctx context.Context, t *Target, log io.Writer) error
	// begin makes rs the current run (receivers match it by id).
	begin func(rs *runState)
	op    opFunc
	// finish runs after the last run, before the server stops; its result
	// goes into the report's extra, its error fails the scenario.
	finish func(ctx context.Context, rep *LoadReport) (any, error)
	// close closes the clients.
	close func()
}

// errNotOK is what a load scenario returns, with its report, when a run
// was not clean.
var errNotOK = errors.New("some sends failed or deliveries went missing (see the table)")

// runLoad starts (or attaches to) the server, prepares the scenario, runs
// it once per rate and repeat, and returns the report. A report comes back
// with an error when the scenario ran but failed (a send, a delivery, a
// verification); without one when it could not run.
func runLoad(ctx context.Context, sc *loadScenario, o *LoadOptions, l Launcher, env Env) (_ *LoadReport, err error) {
	ctx, cancel := context.WithTimeout(ctx, o.Timeout)
	defer cancel()
	log := env.log()
	logf := func(format string, args ...any) { fmt.Fprintf(log, "imbench "+sc.name+": "+format+"\n", args...) }
	rep := &LoadReport{Scenario: sc.name, Time: time.Now().UTC(), Command: env.Command, Setup: sc.setup,
		OpUnit: sc.opUnit, DeliveryUnit: sc.deliveryUnit, OK: true}
	rep.Host = HostInfo{NumCPU: runtime.NumCPU(), GoVersion: runtime.Version(), LoadBefore: loadavg()}
	rep.Host.Hostname, _ = os.Hostname()
	soft, _, ferr := bench.RaiseFileLimit()
	if ferr != nil {
		logf("%v", ferr)
	}
	rep.Host.OpenFiles = soft
	if lo, hi, err := bench.EphemeralPortRange(); err == nil {
		rep.Host.PortRange = fmt.Sprintf("%d-%d", lo, hi)
	}

	if !l.Attached() {
		logf("starting server")
	}
	needs := sc.needs
	needs.Profile = needs.Profile || o.ProfileDir != ""
	t, err := l.Open(ctx, needs)
	if err != nil {
		return nil, err
	}
	rep.Server = t
	defer func() {
		if serr := t.Stop(); serr != nil {
			rep.ServerStopResult = serr.Error()
			logf("%v", serr)
		}
	}()
	if t.Started {
		logf("%s pid %d, gateway %s, http %s", t.Binary, t.PID, t.Gateway, t.HTTP)
	}
	if o.ProfileDir != "" && t.Debug == "" {
		return nil, errors.New("--profile-dir needs the server's profiler: start it with imbench, or give --debug-addr with --addr")
	}
	defer func() {
		if sc.close != nil {
			sc.close()
		}
	}()
	if err := sc.prepare(ctx, t, log); err != nil {
		return nil, err
	}
	if err := sleepCtx(ctx, o.Settle); err != nil {
		return nil, err
	}

	if o.Warmup > 0 {
		rate := o.Rates[0]
		n := max(1, int64(rate*o.Warmup.Seconds()))
		logf("warm-up: %d %s at %.0f/s (not recorded)", n, sc.opUnit, rate)
		w := runOnce(ctx, sc, o, t, rate, n, 0, log)
		rep.Warmup = &w
		if err := sleepCtx(ctx, o.Pause); err != nil {
			return nil, err
		}
	}
	for i, rate := range o.Rates {
		for r := 1; r <= o.Repeat; r++ {
			if ctx.Err() != nil {
				return nil, ctx.Err()
			}
			if i > 0 || r > 1 {
				if err := sleepCtx(ctx, o.Pause); err != nil {
					return nil, err
				}
			}
			n := o.ops(rate)
			logf("run at %.0f %s/s: %d %s (%.0f %s/s offered)", rate, sc.opUnit, n, sc.opUnit, rate*float64(sc.perOp), sc.deliveryUnit)
			run := runOnce(ctx, sc, o, t, rate, n, r, log)
			rep.Runs = append(rep.Runs, run)
			rep.OK = rep.OK && run.OK
		}
	}
	rep.Rates = summarizeRates(rep.Runs)
	var finishErr error
	if sc.finish != nil {
		rep.Extra, finishErr = sc.finish(ctx, rep)
		if finishErr != nil {
			rep.OK = false
		}
	}
	if sc.close != nil {
		sc.close()
		sc.close = nil
	}
	if serr := t.Stop(); serr != nil {
		rep.ServerStopResult = serr.Error()
	}
	rep.Host.LoadAfter = loadavg()
	if finishErr != nil {
		return rep, finishErr
	}
	if !rep.OK {
		return rep, errNotOK
	}
	return rep, nil
}

// runOnce runs n operations at rate and waits for their deliveries.
func runOnce(ctx context.Context, sc *loadScenario, o *LoadOptions, t *Target, rate float64, n int64, repeat int, log io.Writer) LoadRun {
	rs := newRunState(rate, n, sc.perOp, repeat == 0)
	sc.begin(rs)
	cpu := startCPU(ctx, t)
	self0 := selfCPU()

	schedule := time.Duration(float64(n) / rate * 1e9)
	rs.start = time.Now().Add(20 * time.Millisecond) // time to get every sender going
	rs.startM = int64(rs.start.Sub(monoBase))
	deadline := rs.start.Add(schedule + o.Drain)
	rctx, cancel := context.WithDeadline(ctx, deadline)
	defer cancel()

	var profile func() (string, error)
	if o.ProfileDir != "" && repeat > 0 {
		name := fmt.Sprintf("%s-%s-%d.pprof", sc.name, strconv.FormatFloat(rate, 'f', -1, 64), repeat)
		profile = takeProfile(rctx, t, filepath.Join(o.ProfileDir, name), schedule)
	}

	var lastIssued, lastDelivered int64
	lastAt := time.Now()
	stopWatch := watch(log, time.Second, func() string {
		now := time.Now()
		is, dl := rs.issued.Load(), rs.delivered.Load()
		dt := now.Sub(lastAt).Seconds()
		// How late the next operation to issue is against its schedule.
		behind := time.Duration(0)
		if is < n {
			behind = time.Duration(max(0, mono()-(rs.startM+int64(float64(is)/rate*1e9))))
		}
		line := fmt.Sprintf("  %5.1fs  issued %d/%d %s (%.0f/s)  delivered %d %s (%.0f/s)  failed %d  behind schedule %s",
			now.Sub(rs.start).Seconds(), is, n, sc.opUnit, float64(is-lastIssued)/dt,
			dl, sc.deliveryUnit, float64(dl-lastDelivered)/dt, rs.failed.Load(), behind.Round(time.Millisecond))
		lastIssued, lastDelivered, lastAt = is, dl, now
		return line
	})
	drive(rctx, rs, sc.senders, sc.inflight, sc.op)
	// Wait for the deliveries the successful operations call for.
	for rs.delivered.Load() < rs.expected.Load() && rctx.Err() == nil {
		time.Sleep(2 * time.Millisecond)
	}
	stopWatch()

	run := LoadRun{Rate: rate, Repeat: repeat, Scheduled: n, Issued: rs.issued.Load(), OKOps: rs.ok.Load(),
		Failed: rs.failed.Load(), Expected: rs.expected.Load(), Delivered: rs.delivered.Load(),
		Duplicates: rs.dups.Load(), Stray: rs.stray.Load(), OfferedDeliveries: rate * float64(sc.perOp)}
	run.Unsent = run.Scheduled - run.Issued
	run.Missing = max(0, run.Expected-run.Delivered)
	rs.errMu.Lock()
	run.Errors = rs.errs
	rs.errMu.Unlock()
	if first := rs.firstIssue.Load(); first > 0 {
		run.IssueSeconds = float64(rs.lastIssue.Load()-first) / 1e9
		if run.IssueSeconds > 0 {
			run.IssueRate = float64(run.Issued-1) / run.IssueSeconds
		}
	}
	if last := rs.lastDelivery.Load(); last > rs.startM {
		run.Seconds = float64(last-rs.startM) / 1e9
		run.Throughput = float64(run.Delivered) / run.Seconds
	}
	run.MaxBehindMs = float64(rs.maxBehind.Load()) / 1e6
	run.Latency, run.Service, run.Ack = rs.lat.merged().Summary(), rs.svc.merged().Summary(), rs.ack.merged().Summary()
	wall := time.Since(rs.start).Seconds()
	if secs, src, ok := cpu.since(ctx); ok {
		run.ServerCPUSeconds, run.ServerCPUSource = secs, src
		run.ServerCores = secs / wall
		if run.Delivered > 0 {
			run.ServerUsPerDeliv = secs / float64(run.Delivered) * 1e6
		}
		if run.OKOps > 0 {
			run.ServerUsPerOp = secs / float64(run.OKOps) * 1e6
		}
	}
	run.ClientCPUSeconds = (selfCPU() - self0).Seconds()
	run.ClientCores = run.ClientCPUSeconds / wall
	if run.Delivered > 0 {
		run.ClientUsPerDeliv = run.ClientCPUSeconds / float64(run.Delivered) * 1e6
	}
	run.Saturated = run.Unsent > 0 || run.Throughput < 0.9*run.OfferedDeliveries
	run.OK = run.Failed == 0 && run.Missing == 0 && run.Duplicates == 0 && run.Stray == 0
	if profile != nil {
		path, err := profile()
		if err != nil {
			run.Errors = withNote(run.Errors, "cpu profile: "+err.Error())
		} else {
			run.Profile = path
		}
	}

	status := "ok"
	if !run.OK {
		status = "NOT OK"
	}
	if run.Saturated {
		status += ", saturated"
	}
	fmt.Fprintf(log, "  done: %d/%d %s in %.2fs = %.0f %s/s, p50 %.2f ms, p99 %.2f ms, failed %d, missing %d, server %.1f us/%s (%s)\n",
		run.Delivered, run.Expected, sc.deliveryUnit, run.Seconds, run.Throughput, sc.deliveryUnit,
		run.Latency.P50Ms, run.Latency.P99Ms, run.Failed, run.Missing, run.ServerUsPerDeliv, Singular(sc.deliveryUnit), status)
	return run
}

func withNote(m map[string]int, note string) map[string]int {
	if m == nil {
		m = map[string]int{}
	}
	m[note]++
	return m
}

// takeProfile starts fetching a CPU profile of t's HTTP process over d (at
// least a second) into path; the returned function waits for it.
func takeProfile(ctx context.Context, t *Target, path string, d time.Duration) func() (string, error) {
	secs := max(1, int(math.Ceil(d.Seconds())))
	done := make(chan error, 1)
	go func() {
		done <- func() error {
			url := "http://" + t.Debug + "/debug/pprof/profile?seconds=" + strconv.Itoa(secs)
			req, err := http.NewRequestWithContext(context.WithoutCancel(ctx), http.MethodGet, url, nil)
			if err != nil {
				return err
			}
			resp, err := (&http.Client{Timeout: time.Duration(secs)*time.Second + 30*time.Second}).Do(req)
			if err != nil {
				return err
			}
			defer resp.Body.Close()
			if resp.StatusCode != http.StatusOK {
				return fmt.Errorf("%s: %s", url, resp.Status)
			}
			if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
				return err
			}
			f, err := os.Create(path)
			if err != nil {
				return err
			}
			if _, err := io.Copy(f, resp.Body); err != nil {
				_ = f.Close()
				return err
			}
			return f.Close()
		}()
	}()
	return func() (string, error) {
		if err := <-done; err != nil {
			return "", err
		}
		return path, nil
	}
}

// LatencyChart plots each rate's median p50, p99 and p99.9 (from the
// scheduled send time) against the median achieved throughput.
func LatencyChart(rep *LoadReport) *bench.Chart {
	var p50, p99, p999 []bench.Point
	lo, hi := math.Inf(1), 0.0
	for _, r := range rep.Rates {
		x := r.Throughput[1]
		p50 = append(p50, bench.Point{X: x, Y: r.P50Ms[1]})
		p99 = append(p99, bench.Point{X: x, Y: r.P99Ms[1]})
		p999 = append(p999, bench.Point{X: x, Y: r.P999Ms[1]})
		if r.P50Ms[1] > 0 {
			lo = min(lo, r.P50Ms[1])
		}
		hi = max(hi, r.P999Ms[1])
	}
	offered := make([]string, len(rep.Rates))
	var saturated []string
	for i, r := range rep.Rates {
		offered[i] = fmt.Sprintf("%.0f", r.Rate)
		if r.Saturated > 0 {
			saturated = append(saturated, offered[i])
		}
	}
	sat := ""
	if len(saturated) > 0 {
		sat = "; saturated at " + strings.Join(saturated, ", ")
	}
	runs := 1
	if len(rep.Rates) > 0 {
		runs = max(1, rep.Rates[0].Runs)
	}
	title := rep.Scenario
	if s, ok := rep.Setup.(interface{ chartName() string }); ok {
		title = s.chartName()
	}
	return &bench.Chart{
		Title: fmt.Sprintf("imd %s: latency against throughput (open loop)", title),
		Subtitle: fmt.Sprintf("%s, %d CPUs; offered %s %s/s%s; latency from the scheduled send; median of %d run(s) per rate",
			rep.Host.Hostname, rep.Host.NumCPU, strings.Join(offered, ", "), rep.OpUnit, sat, runs),
		XLabel: "achieved throughput (" + rep.DeliveryUnit + "/s)",
		YLabel: "latency (ms)",
		LogY:   lo > 0 && hi/lo > 30,
		Series: []bench.Series{{Name: "p50", Points: p50}, {Name: "p99", Points: p99}, {Name: "p99.9", Points: p999}},
	}
}

// Singular turns a unit of the reports into its singular.
func Singular(unit string) string {
	if u, ok := strings.CutSuffix(unit, "ies"); ok {
		return u + "y"
	}
	for _, es := range []string{"shes", "ches", "xes", "sses"} {
		if strings.HasSuffix(unit, es) {
			return unit[:len(unit)-2]
		}
	}
	return strings.TrimSuffix(unit, "s")
}

// loginClients dials and logs in one SDK client per uid, conc at a time;
// opts returns client i's options (Addrs and credentials are filled in).
func loginClients(ctx context.Context, t *Target, uids []uint64, conc int, opts func(i int) sdk.Options, log io.Writer, what string) ([]*sdk.Client, error) {
	clients := make([]*sdk.Client, len(uids))
	err := loginEach(ctx, len(uids), conc, log, what, func(ctx context.Context, i int) error {
		o := sdk.Options{}
		if opts != nil {
			o = opts(i)
		}
		o.Addrs = []string{t.Gateway}
		if o.DeviceID == "" {
			o.DeviceID = fmt.Sprintf("imbench-%d", uids[i])
		}
		if o.Platform == "" {
			o.Platform = "imbench"
		}
		c, err := loginOne(ctx, t, uids[i], o)
		if err != nil {
			return fmt.Errorf("log in uid %d: %w", uids[i], err)
		}
		clients[i] = c
		return nil
	})
	if err != nil {
		for _, c := range clients {
			if c != nil {
				_ = c.Close()
			}
		}
		return nil, err
	}
	return clients, nil
}

// loginEach runs login(i) for every i below n, conc at a time, with a
// progress line on log every second. The first error stops the rest and
// is returned (or ctx's error when it ended first).
func loginEach(ctx context.Context, n, conc int, log io.Writer, what string, login func(ctx context.Context, i int) error) error {
	var next, done atomic.Int64
	var errMu sync.Mutex
	var firstErr error
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stop := watch(log, time.Second, func() string {
		return fmt.Sprintf("  logging in %s: %d/%d", what, done.Load(), n)
	})
	var wg sync.WaitGroup
	for range min(conc, n) {
		wg.Go(func() {
			for ctx.Err() == nil {
				i := int(next.Add(1) - 1)
				if i >= n {
					return
				}
				if err := login(ctx, i); err != nil {
					errMu.Lock()
					if firstErr == nil {
						firstErr = err
					}
					errMu.Unlock()
					cancel()
					return
				}
				done.Add(1)
			}
		})
	}
	wg.Wait()
	stop()
	if firstErr == nil && ctx.Err() != nil {
		firstErr = ctx.Err()
	}
	return firstErr
}

func loginOne(ctx context.Context, t *Target, uid uint64, o sdk.Options) (*sdk.Client, error) {
	dctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	c, err := sdk.Dial(dctx, o)
	if err != nil {
		return nil, err
	}
	tok := MintToken(t.Secret, t.AppCode, uid, time.Now().Add(24*time.Hour))
	if _, err := c.Login(dctx, sdk.Credentials{AppCode: t.AppCode, UID: uid, Token: tok}); err != nil {
		_ = c.Close()
		return nil, err
	}
	return c, nil
}

// closeClients closes clients several at a time.
func closeClients(clients []*sdk.Client) {
	var wg sync.WaitGroup
	const parts = 8
	for p := range parts {
		wg.Go(func() {
			for i := p; i < len(clients); i += parts {
				if clients[i] != nil {
					_ = clients[i].Close()
				}
			}
		})
	}
	wg.Wait()
}
