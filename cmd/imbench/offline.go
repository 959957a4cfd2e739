package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"text/tabwriter"
	"time"

	"github.com/imd-dev/imd/bench"
	"github.com/imd-dev/imd/schema/pb"
	"github.com/imd-dev/imd/sdk"
)

const offlineSynopsis = `Offline messages: store, then pull. --senders clients store -n chat
messages for each of --users recipients that are not logged in (-c sends
in flight over all senders; each send returns once the message is stored),
then the recipients log in with the real SDK, which pulls the offline
inbox page by page (--page-size) and hands each message to OnC2C. imbench
times the pull from the first login to the last message delivered and
reports msgs/s, along with the store rate and send latency. Each --repeat
uses new recipients. The run fails (exit 1) when a send fails or a stored
message is not delivered within --drain.`

type offlineFlags struct {
	server     serverFlags
	n          int
	users      int
	senders    int
	c          int
	pageSize   uint
	size       int
	repeat     int
	uidBase    uint64
	drain      time.Duration
	timeout    time.Duration
	jsonPath   string
	resultsDir string
}

type offlineSetup struct {
	PerUser  int    `json:"msgs_per_user"`
	Users    int    `json:"users"`
	Senders  int    `json:"senders"`
	InFlight int    `json:"stores_in_flight"`
	PageSize uint   `json:"page_size"` // 0: the server's default
	Size     int    `json:"content_bytes"`
	UIDs     string `json:"uids"`
}

// offlineRun is one store-then-pull.
type offlineRun struct {
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
	OK               bool    `json:"ok"`
}

type offlineReport struct {
	Scenario string       `json:"scenario"`
	Time     time.Time    `json:"time"`
	Command  []string     `json:"command"`
	Host     hostInfo     `json:"host"`
	Server   *target      `json:"server"`
	Setup    offlineSetup `json:"setup"`
	Runs     []offlineRun `json:"runs"`
	// PullRate and StoreRate are min, median and max over the runs.
	PullRate  [3]float64 `json:"pull_rate_min_median_max"`
	StoreRate [3]float64 `json:"store_rate_min_median_max"`
	OK        bool       `json:"ok"`

	ServerStopResult string `json:"server_stop_result,omitempty"`
}

func runOffline(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	var f offlineFlags
	fs := newFlagSet("offline", offlineSynopsis, stdout, stderr)
	f.server.bind(fs)
	fs.IntVar(&f.n, "n", 5000, "messages stored for each recipient")
	fs.IntVar(&f.users, "users", 1, "offline recipients (they log in and pull at once)")
	fs.IntVar(&f.senders, "senders", 4, "sender clients")
	fs.IntVar(&f.c, "c", 16, "sends in flight over all senders while storing")
	fs.UintVar(&f.pageSize, "page-size", 0, "offline pull page size the SDK asks for (0: the server's default)")
	fs.IntVar(&f.size, "size", 100, "content bytes per message")
	fs.IntVar(&f.repeat, "repeat", 1, "store-then-pull runs, each with new recipients")
	fs.Uint64Var(&f.uidBase, "uid-base", 1, "first uid: the senders, then the recipients of each run")
	fs.DurationVar(&f.drain, "drain", 60*time.Second, "how long the pull may take")
	fs.DurationVar(&f.timeout, "timeout", 10*time.Minute, "bound on the whole scenario")
	fs.StringVar(&f.jsonPath, "json", "", "also write the report as JSON to `FILE` (a bare file name goes into --results-dir)")
	fs.StringVar(&f.resultsDir, "results-dir", "results", "folder for --json files given without a directory")
	if err := parseFlags(fs, args, os.LookupEnv); err != nil {
		return err
	}
	var errs []error
	if f.n < 1 || f.users < 1 || f.senders < 1 || f.c < 1 || f.repeat < 1 {
		errs = append(errs, errors.New("-n, --users, --senders, -c and --repeat must be >= 1"))
	}
	if f.size < msgHeader || f.size > 16<<10 {
		errs = append(errs, fmt.Errorf("--size must be in [%d, 16384]", msgHeader))
	}
	if f.uidBase < 1 || f.drain <= 0 || f.timeout <= 0 {
		errs = append(errs, errors.New("--uid-base, --drain and --timeout must be > 0"))
	}
	if err := errors.Join(errs...); err != nil {
		fmt.Fprintf(stderr, "imbench offline: %v\n", err)
		return errUsage
	}
	return offline(ctx, &f, append([]string{"imbench", "offline"}, args...), stdout, stderr)
}

func offline(ctx context.Context, f *offlineFlags, command []string, stdout, stderr io.Writer) error {
	ctx, cancel := context.WithTimeout(ctx, f.timeout)
	defer cancel()
	logf := func(format string, args ...any) { fmt.Fprintf(stderr, "imbench offline: "+format+"\n", args...) }
	last := f.uidBase + uint64(f.senders+f.users*f.repeat) - 1
	rep := &offlineReport{Scenario: "offline", Time: time.Now().UTC(), Command: command, OK: true,
		Setup: offlineSetup{PerUser: f.n, Users: f.users, Senders: f.senders, InFlight: f.c, PageSize: f.pageSize, Size: f.size,
			UIDs: fmt.Sprintf("senders %d..%d, recipients %d..%d", f.uidBase, f.uidBase+uint64(f.senders)-1, f.uidBase+uint64(f.senders), last)}}
	rep.Host = hostInfo{NumCPU: runtime.NumCPU(), GoVersion: runtime.Version(), LoadBefore: loadavg()}
	rep.Host.Hostname, _ = os.Hostname()
	if soft, _, err := bench.RaiseFileLimit(); err == nil {
		rep.Host.OpenFiles = soft
	}
	if lo, hi, err := bench.EphemeralPortRange(); err == nil {
		rep.Host.PortRange = fmt.Sprintf("%d-%d", lo, hi)
	}
	if f.server.addr == "" {
		logf("starting server")
	}
	t, err := f.server.open(ctx, nil)
	if err != nil {
		return err
	}
	rep.Server = t
	defer func() { _ = t.stop() }()
	if t.Started {
		logf("%s pid %d, gateway %s, http %s", t.Binary, t.PID, t.Gateway, t.HTTP)
	}
	senders, err := loginClients(ctx, t, uidRange(f.uidBase, f.senders), 100,
		func(int) sdk.Options { return sdk.Options{NoReconnect: true} }, stderr, "senders")
	if err != nil {
		return err
	}
	defer closeClients(senders)
	account := senders[0].LoginInfo().GetAccount()

	for r := 1; r <= f.repeat; r++ {
		first := f.uidBase + uint64(f.senders+(r-1)*f.users)
		run, err := offlineOnce(ctx, f, t, senders, account, uidRange(first, f.users), r, stderr)
		if err != nil {
			return err
		}
		rep.Runs = append(rep.Runs, run)
		rep.OK = rep.OK && run.OK
	}
	closeClients(senders)
	if serr := t.stop(); serr != nil {
		rep.ServerStopResult = serr.Error()
	}
	rep.Host.LoadAfter = loadavg()
	var pull, store []float64
	for _, r := range rep.Runs {
		pull, store = append(pull, r.PullRate), append(store, r.StoreRate)
	}
	rep.PullRate, rep.StoreRate = minMedMax(pull), minMedMax(store)

	writeOfflineTable(stdout, rep)
	if f.jsonPath != "" {
		path, err := writeJSON(f.jsonPath, f.resultsDir, rep)
		if err != nil {
			return err
		}
		logf("report written to %s", path)
	}
	if !rep.OK {
		return errors.New("some sends failed or stored messages were not delivered (see the table)")
	}
	return nil
}

// offlineOnce stores f.n messages for each of users, then logs them in and
// times the pull.
func offlineOnce(ctx context.Context, f *offlineFlags, t *target, senders []*sdk.Client, account uint32, users []uint64, repeat int, stderr io.Writer) (offlineRun, error) {
	run := offlineRun{Repeat: repeat}
	rs := newRunState(1, int64(f.n*len(users)), 1, false)
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
	for w := range f.c {
		wg.Go(func() {
			content := newContent(f.size)
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
	cpu0, cpuErr := t.cpuSeconds(ctx)
	pctx, pcancel := context.WithTimeout(ctx, f.drain)
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
			o := sdk.Options{NoReconnect: true, PageSize: uint32(f.pageSize), Addrs: []string{t.Gateway},
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
	if cpu1, err := t.cpuSeconds(ctx); err == nil && cpuErr == nil && run.Delivered > 0 {
		run.ServerCPUSeconds = cpu1 - cpu0
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

func writeOfflineTable(out io.Writer, r *offlineReport) {
	srv := r.Server
	origin := "attached"
	if srv.Started {
		origin = "started by imbench: " + srv.Binary
	}
	fmt.Fprintf(out, "imbench offline  %s  %s\n", r.Time.Format("2006-01-02 15:04:05Z"), strings.Join(r.Command[2:], " "))
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
