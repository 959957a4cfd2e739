package scenario

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"text/tabwriter"
	"time"

	"github.com/imd-dev/imd/bench"
	"github.com/imd-dev/imd/schema/pb"
	"github.com/imd-dev/imd/sdk"
)

// OfflineSynopsis describes the offline scenario (the command's help).
const OfflineSynopsis = `Offline messages: store, then pull. --senders clients store -n chat
messages for each of --users recipients that are not logged in (-c sends
in flight over all senders; each send returns once the message is stored),
then the recipients log in with the real SDK, which pulls the offline
inbox page by page (--page-size) and hands each message to OnC2C. imbench
times the pull from the first login to the last message delivered and
reports msgs/s, along with the store rate and send latency. Each --repeat
uses new recipients. The run fails (exit 1) when a send fails or a stored
message is not delivered within --drain.`

// Offline is the offline scenario: messages stored for users who are not
// logged in, then pulled by the SDK at their login.
type Offline struct {
	N        int           // messages stored for each recipient
	Users    int           // offline recipients (they log in and pull at once)
	Senders  int           // sender clients
	C        int           // sends in flight over all senders while storing
	PageSize uint32        // offline pull page size the SDK asks for (0: the server's default)
	Size     int           // content bytes per message
	Repeat   int           // store-then-pull runs, each with new recipients
	UIDBase  uint64        // first uid: the senders, then the recipients of each run
	Drain    time.Duration // how long the pull may take
	Timeout  time.Duration // bound on the whole scenario
}

// NewOffline returns the scenario with the command line's defaults.
func NewOffline() *Offline {
	return &Offline{N: 5000, Users: 1, Senders: 4, C: 16, Size: 100, Repeat: 1, UIDBase: 1, Drain: 60 * time.Second, Timeout: 10 * time.Minute}
}

// Validate checks the options.
func (f *Offline) Validate() error {
	var errs []error
	if f.N < 1 || f.Users < 1 || f.Senders < 1 || f.C < 1 || f.Repeat < 1 {
		errs = append(errs, errors.New("-n, --users, --senders, -c and --repeat must be >= 1"))
	}
	if f.Size < MsgHeader || f.Size > 16<<10 {
		errs = append(errs, fmt.Errorf("--size must be in [%d, 16384]", MsgHeader))
	}
	if f.UIDBase < 1 || f.Drain <= 0 || f.Timeout <= 0 {
		errs = append(errs, errors.New("--uid-base, --drain and --timeout must be > 0"))
	}
	return errors.Join(errs...)
}

type offlineSetup struct {
	PerUser  int    `json:"msgs_per_user"`
	Users    int    `json:"users"`
	Senders  int    `json:"senders"`
	InFlight int    `json:"stores_in_flight"`
	PageSize uint32 `json:"page_size"` // 0: the server's default
	Size     int    `json:"content_bytes"`
	UIDs     string `json:"uids"`
}

// OfflineRun is one store-then-pull.
type OfflineRun struct {
	Repeat       int            `json:"repeat"`
	Stored       int64          `json:"stored"`
	StoreFailed  int64          `json:"store_failed"`
	Errors       map[string]int `json:"errors,omitempty"`
	StoreSeconds float64        `json:"store_seconds"`
	StoreRate    float64        `json:"stored_per_second"`
	Store        bench.Summary  `json:"store_latency"` // SendC2C call to "stored"

	Delivered   int64         `json:"delivered"`
	Duplicates  int64         `json:"duplicates"`
	Missing     int64         `json:"missing"`
	LoginMs     float64       `json:"login_ms"`       // first login request to the last login response
	FirstMs     float64       `json:"first_msg_ms"`   // first login request to the first message
	PullSeconds float64       `json:"pull_seconds"`   // first login request to the last message
	PullRate    float64       `json:"pulled_per_sec"` // delivered / pull seconds
	PerUser     bench.Summary `json:"per_user_pull"`  // login request to the user's last message

	ServerCPUSeconds float64 `json:"pull_server_cpu_seconds"`
	ServerUsPerMsg   float64 `json:"pull_server_cpu_us_per_msg"`
	ServerCPUSource  string  `json:"pull_server_cpu_source,omitempty"`
	OK               bool    `json:"ok"`
}

// OfflineReport is the result of the offline scenario and its JSON document.
type OfflineReport struct {
	Scenario string       `json:"scenario"`
	Time     time.Time    `json:"time"`
	Command  []string     `json:"command"`
	Host     HostInfo     `json:"host"`
	Server   *Target      `json:"server"`
	Setup    offlineSetup `json:"setup"`
	Runs     []OfflineRun `json:"runs"`
	// PullRate and StoreRate are min, median and max over the runs.
	PullRate  [3]float64 `json:"pull_rate_min_median_max"`
	StoreRate [3]float64 `json:"store_rate_min_median_max"`
	OK        bool       `json:"ok"`

	ServerStopResult string `json:"server_stop_result,omitempty"`
}

// Run runs the scenario on the server l gives. A report comes back with an
// error when the scenario ran but a send failed or a stored message was
// not delivered.
func (f *Offline) Run(ctx context.Context, l Launcher, env Env) (*OfflineReport, error) {
	if err := f.Validate(); err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(ctx, f.Timeout)
	defer cancel()
	stderr := env.log()
	logf := func(format string, args ...any) { fmt.Fprintf(stderr, "imbench offline: "+format+"\n", args...) }
	last := f.UIDBase + uint64(f.Senders+f.Users*f.Repeat) - 1
	rep := &OfflineReport{Scenario: "offline", Time: time.Now().UTC(), Command: env.Command, OK: true,
		Setup: offlineSetup{PerUser: f.N, Users: f.Users, Senders: f.Senders, InFlight: f.C, PageSize: f.PageSize, Size: f.Size,
			UIDs: fmt.Sprintf("senders %d..%d, recipients %d..%d", f.UIDBase, f.UIDBase+uint64(f.Senders)-1, f.UIDBase+uint64(f.Senders), last)}}
	rep.Host = HostInfo{NumCPU: runtime.NumCPU(), GoVersion: runtime.Version(), LoadBefore: loadavg()}
	rep.Host.Hostname, _ = os.Hostname()
	if soft, _, err := bench.RaiseFileLimit(); err == nil {
		rep.Host.OpenFiles = soft
	}
	if lo, hi, err := bench.EphemeralPortRange(); err == nil {
		rep.Host.PortRange = fmt.Sprintf("%d-%d", lo, hi)
	}
	if !l.Attached() {
		logf("starting server")
	}
	t, err := l.Open(ctx, ServerNeeds{})
	if err != nil {
		return nil, err
	}
	rep.Server = t
	defer func() { _ = t.Stop() }()
	if t.Started {
		logf("%s pid %d, gateway %s, http %s", t.Binary, t.PID, t.Gateway, t.HTTP)
	}
	senders, err := loginClients(ctx, t, uidRange(f.UIDBase, f.Senders), 100,
		func(int) sdk.Options { return sdk.Options{NoReconnect: true} }, stderr, "senders")
	if err != nil {
		return nil, err
	}
	defer closeClients(senders)
	account := senders[0].LoginInfo().GetAccount()

	for r := 1; r <= f.Repeat; r++ {
		first := f.UIDBase + uint64(f.Senders+(r-1)*f.Users)
		run, err := f.once(ctx, t, senders, account, uidRange(first, f.Users), r, stderr)
		if err != nil {
			return nil, err
		}
		rep.Runs = append(rep.Runs, run)
		rep.OK = rep.OK && run.OK
	}
	closeClients(senders)
	if serr := t.Stop(); serr != nil {
		rep.ServerStopResult = serr.Error()
	}
	rep.Host.LoadAfter = loadavg()
	var pull, store []float64
	for _, r := range rep.Runs {
		pull, store = append(pull, r.PullRate), append(store, r.StoreRate)
	}
	rep.PullRate, rep.StoreRate = MinMedMax(pull), MinMedMax(store)
	if !rep.OK {
		return rep, errors.New("some sends failed or stored messages were not delivered (see the table)")
	}
	return rep, nil
}

// once stores f.N messages for each of users, then logs them in and times
// the pull.
func (f *Offline) once(ctx context.Context, t *Target, senders []*sdk.Client, account uint32, users []uint64, repeat int, stderr io.Writer) (OfflineRun, error) {
	run := OfflineRun{Repeat: repeat}
	rs := newRunState(1, int64(f.N*len(users)), 1, false)
	total := rs.slots

	// Store: message k goes to users[k % users] from senders[k % senders].
	fmt.Fprintf(stderr, "imbench offline: run %d: storing %d messages for %d offline user(s)\n", repeat, total, len(users))
	var next, stored, failed atomic.Int64
	storedFor := make([]atomic.Int64, len(users))
	var storeLat shardedHist
	t0 := time.Now()
	stop := watch(stderr, time.Second, func() string {
		return fmt.Sprintf("  %5.1fs  stored %d/%d (%.0f/s)  failed %d", time.Since(t0).Seconds(), stored.Load(), total,
			float64(stored.Load())/time.Since(t0).Seconds(), failed.Load())
	})
	var wg sync.WaitGroup
	for w := range f.C {
		wg.Go(func() {
			content := newContent(f.Size)
			for ctx.Err() == nil {
				k := next.Add(1) - 1
				if k >= total {
					return
				}
				s := time.Now()
				putHeader(content, rs.id, k, 0, mono())
				u := k % int64(len(users))
				to := &pb.User{Account: account, Uid: users[u]}
				if _, err := senders[k%int64(len(senders))].SendC2C(ctx, to, 1, content); err != nil {
					failed.Add(1)
					rs.note(err.Error())
					continue
				}
				storeLat.record(w, time.Since(s))
				stored.Add(1)
				storedFor[u].Add(1)
			}
		})
	}
	wg.Wait()
	stop()
	if err := ctx.Err(); err != nil {
		return run, err
	}
	run.Stored, run.StoreFailed = stored.Load(), failed.Load()
	run.StoreSeconds = time.Since(t0).Seconds()
	run.StoreRate = float64(run.Stored) / run.StoreSeconds
	run.Store = storeLat.merged().Summary()

	// Pull: every user logs in at once; the SDK pulls its inbox.
	fmt.Fprintf(stderr, "imbench offline: run %d: %d stored in %.2fs (%.0f/s); logging in the recipients\n",
		repeat, run.Stored, run.StoreSeconds, run.StoreRate)
	perUser := make([]atomic.Int64, len(users))
	userDone := make([]atomic.Int64, len(users)) // mono ns of the user's last message
	var firstMsg, lastMsg, loginsDone atomic.Int64
	// A user is done once it has what was stored for it (a failed send
	// may have been stored all the same: it comes as a surplus).
	var remaining atomic.Int64
	allDone := make(chan struct{})
	want := make([]int64, len(users))
	for i := range want {
		if want[i] = storedFor[i].Load(); want[i] > 0 {
			remaining.Add(1)
		}
	}
	if remaining.Load() == 0 {
		close(allDone)
	}
	cpu := startCPU(ctx, t)
	pctx, pcancel := context.WithTimeout(ctx, f.Drain)
	defer pcancel()
	start := mono()
	t0 = time.Now()
	stop = watch(stderr, time.Second, func() string {
		return fmt.Sprintf("  %5.1fs  delivered %d/%d (%.0f/s)  logged in %d/%d", time.Since(t0).Seconds(), rs.delivered.Load(), run.Stored,
			float64(rs.delivered.Load())/time.Since(t0).Seconds(), loginsDone.Load(), len(users))
	})
	receivers := make([]*sdk.Client, len(users))
	var loginErr error
	var lmu sync.Mutex
	var lastLogin int64
	for i, uid := range users {
		wg.Go(func() {
			o := sdk.Options{NoReconnect: true, PageSize: f.PageSize, Addrs: []string{t.Gateway},
				DeviceID: fmt.Sprintf("imbench-%d", uid), Platform: "imbench",
				OnC2C: func(m *pb.C2CMessage) {
					run, idx, _, _, ok := getHeader(m.Content)
					if !ok || run != rs.id {
						return
					}
					if !rs.deliver(i, idx, start, start) {
						return // a duplicate
					}
					now := mono()
					firstMsg.CompareAndSwap(0, now)
					lastMsg.Store(now)
					if n := perUser[i].Add(1); n == want[i] {
						userDone[i].Store(now)
						if remaining.Add(-1) == 0 {
							close(allDone)
						}
					}
				}}
			c, err := loginOne(pctx, t, uid, o)
			if err != nil {
				lmu.Lock()
				loginErr = errors.Join(loginErr, fmt.Errorf("log in uid %d: %w", uid, err))
				lmu.Unlock()
				return
			}
			lmu.Lock()
			lastLogin = max(lastLogin, mono())
			receivers[i] = c
			lmu.Unlock()
			loginsDone.Add(1)
		})
	}
	wg.Wait()
	if loginErr != nil {
		stop()
		closeClients(receivers)
		return run, loginErr
	}
	select {
	case <-allDone:
	case <-pctx.Done():
	}
	stop()
	closeClients(receivers)
	if err := ctx.Err(); err != nil {
		return run, err
	}
	run.Delivered, run.Duplicates = rs.delivered.Load(), rs.dups.Load()
	run.Missing = max(0, run.Stored-run.Delivered)
	run.LoginMs = float64(lastLogin-start) / 1e6
	if fm := firstMsg.Load(); fm > 0 {
		run.FirstMs = float64(fm-start) / 1e6
		run.PullSeconds = float64(lastMsg.Load()-start) / 1e9
		run.PullRate = float64(run.Delivered) / run.PullSeconds
	}
	var per bench.Histogram
	for i := range userDone {
		if d := userDone[i].Load(); d > 0 {
			per.Record(time.Duration(d - start))
		}
	}
	run.PerUser = per.Summary()
	if secs, src, ok := cpu.since(ctx); ok && run.Delivered > 0 {
		run.ServerCPUSeconds, run.ServerCPUSource = secs, src
		run.ServerUsPerMsg = run.ServerCPUSeconds / float64(run.Delivered) * 1e6
	}
	rs.errMu.Lock()
	run.Errors = rs.errs
	rs.errMu.Unlock()
	run.OK = run.StoreFailed == 0 && run.Missing == 0 && run.Duplicates == 0
	fmt.Fprintf(stderr, "imbench offline: run %d: %d/%d delivered in %.2fs (%.0f msgs/s), first after %.1f ms\n",
		repeat, run.Delivered, run.Stored, run.PullSeconds, run.PullRate, run.FirstMs)
	return run, nil
}

// WriteTable prints the report as imbench does.
func (r *OfflineReport) WriteTable(out io.Writer) {
	srv := r.Server
	origin := "attached"
	if srv.Started {
		origin = "started by imbench: " + srv.Binary
	}
	fmt.Fprintf(out, "imbench offline  %s  %s\n", r.Time.Format("2006-01-02 15:04:05Z"), commandArgs(r.Command))
	fmt.Fprintf(out, "server   pid %d, gateway %s, http %s (%s)\n", srv.PID, srv.Gateway, srv.HTTP, origin)
	s := r.Setup
	page := "server default"
	if s.PageSize > 0 {
		page = fmt.Sprint(s.PageSize)
	}
	fmt.Fprintf(out, "setup    %d msgs for each of %d offline user(s), %d senders, %d stores in flight, %d-byte content, page size %s; %s\n",
		s.PerUser, s.Users, s.Senders, s.InFlight, s.Size, page, s.UIDs)
	fmt.Fprintf(out, "host     %s, %d CPUs, %s, loadavg %s -> %s\n\n", r.Host.Hostname, r.Host.NumCPU, r.Host.GoVersion, r.Host.LoadBefore, r.Host.LoadAfter)
	tw := tabwriter.NewWriter(out, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintf(tw, "  run\tstored\tstored/s\tstore p50 ms\tstore p99\tdelivered\tmissing\tfirst msg ms\tpull s\tpulled msgs/s\tsrv us/msg\t\n")
	for _, run := range r.Runs {
		status := ""
		if !run.OK {
			status = "  NOT OK"
		}
		fmt.Fprintf(tw, "  %d\t%d\t%.0f\t%.2f\t%.2f\t%d\t%d\t%.1f\t%.3f\t%.0f\t%.1f\t%s\n", run.Repeat, run.Stored, run.StoreRate,
			run.Store.P50Ms, run.Store.P99Ms, run.Delivered, run.Missing, run.FirstMs, run.PullSeconds, run.PullRate, run.ServerUsPerMsg, status)
	}
	_ = tw.Flush()
	if len(r.Runs) > 1 {
		fmt.Fprintf(out, "\n  over %d runs, min / median / max: pulled %.0f / %.0f / %.0f msgs/s, stored %.0f / %.0f / %.0f msgs/s\n", len(r.Runs),
			r.PullRate[0], r.PullRate[1], r.PullRate[2], r.StoreRate[0], r.StoreRate[1], r.StoreRate[2])
	}
	for _, run := range r.Runs {
		for _, k := range sortedKeys(run.Errors) {
			fmt.Fprintf(out, "  run %d: %dx %s\n", run.Repeat, run.Errors[k], k)
		}
	}
	if r.ServerStopResult != "" {
		fmt.Fprintf(out, "server stop: %s\n", r.ServerStopResult)
	}
}
