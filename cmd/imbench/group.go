package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"text/tabwriter"
	"time"

	"github.com/imd-dev/imd/bench"
	"github.com/imd-dev/imd/internal/config"
	"github.com/imd-dev/imd/schema/pb"
	"github.com/imd-dev/imd/sdk"
)

const groupSynopsis = `Group chat fanned out to the online members at a fixed offered rate: the
scenario creates one group of --members users over the HTTP API
(POST /v1/groups with the app's API key), logs in the first --online of
them as SDK clients with an OnGroup callback, and --senders of the online
members send group messages (SendGroup) at --rate msgs/s over all senders
(open loop: message g is due at start + g/rate, each sender keeps up to
--inflight sends outstanding). Every message carries its scheduled and
real send times (monotonic ns) in its content; latency runs from the
scheduled time to each online member's OnGroup (the sender's own copy
reaches its OnGroup from the send's answer, as the SDK does). The table
gives deliveries/s, failed sends and latency percentiles to each member;
under it, per run, the latency to the last member of each message (the
slowest delivery of each message, then its percentiles), server CPU per
message, and from the server's /metrics the store appends and cursor
writes per message, cursor writes per ack batch, the members cache hit
rate and the member rows read. The run fails (exit 1) when a send fails
or a delivery is missing after --drain.`

// Metric names the group scenario reads from the server's /metrics.
const (
	mGroupStored        = `imd_logic_group_sends_total{result="stored"}`
	mGroupDuplicate     = `imd_logic_group_sends_total{result="duplicate"}`
	mGroupRefused       = `imd_logic_group_sends_total{result="refused"}`
	mGroupNotifies      = "imd_logic_group_notifies_total"
	mGroupCursorWrites  = "imd_logic_group_cursor_writes_total"
	mGroupCacheHits     = "imd_das_group_cache_hits_total"
	mGroupCacheMisses   = "imd_das_group_cache_misses_total"
	mGroupCacheRowsRead = "imd_das_group_cache_member_rows_read_total"
	mGatewayFramesIn    = "imd_gateway_frames_in_total"
)

// storeBatchesNote says what the report gives for the embedded store's
// writes per message: the server exports no Pebble commit counter, and
// AppendGroup commits exactly one synced batch per stored message.
const storeBatchesNote = "1 by design (one synced batch per append; the embedded store exports no batch-commit metric)"

type groupSetup struct {
	Members  int    `json:"members"`
	Online   int    `json:"online"`
	Senders  int    `json:"senders"`
	Inflight int    `json:"inflight_per_sender"`
	Size     int    `json:"content_bytes"`
	MsgType  uint32 `json:"msgtype"`
	UIDs     string `json:"uids"`
	GroupID  uint64 `json:"group_id,string"`
	CreateMs int64  `json:"create_ms"` // POST /v1/groups, request to answer
}

func runGroup(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	var f loadFlags
	var members, online, senders int
	var msgtype uint
	fs := newFlagSet("group", groupSynopsis, stdout, stderr)
	f.bind(fs, "msgs", 10, 100)
	fs.IntVar(&members, "members", 10000, "members of the group (uids --uid-base on); more than 10,000 needs --imd-arg=--group-max-size=N")
	fs.IntVar(&online, "online", 5000, "members logged in as SDK clients (the first ones)")
	fs.IntVar(&senders, "senders", 4, "online members that send (the first ones)")
	fs.IntVar(&f.inflight, "inflight", 8, "sends outstanding per sender (the gateway allows 64 requests in flight)")
	fs.UintVar(&msgtype, "msgtype", 1, "msgtype of the messages")
	if err := parseFlags(fs, args, os.LookupEnv); err != nil {
		return err
	}
	errs := f.validate(msgHeader)
	if members < 1 || online < 1 || senders < 1 || f.inflight < 1 {
		errs = append(errs, errors.New("--members, --online, --senders and --inflight must be >= 1"))
	}
	if online > members {
		errs = append(errs, errors.New("--online must be <= --members"))
	}
	if senders > online {
		errs = append(errs, errors.New("--senders must be <= --online (senders are online members)"))
	}
	if err := errors.Join(errs...); err != nil {
		fmt.Fprintf(stderr, "imbench group: %v\n", err)
		return errUsage
	}
	g := &groupBench{f: &f, members: members, online: online, msgtype: uint32(msgtype)}
	g.setup = &groupSetup{Members: members, Online: online, Senders: senders, Inflight: f.inflight, Size: f.size,
		MsgType: uint32(msgtype), UIDs: fmt.Sprintf("members %d..%d, online %d..%d, senders %d..%d",
			f.uidBase, f.uidBase+uint64(members)-1, f.uidBase, f.uidBase+uint64(online)-1, f.uidBase, f.uidBase+uint64(senders)-1)}
	sc := &loadScenario{
		name: "group", opUnit: "msgs", deliveryUnit: "deliveries", senders: senders, inflight: f.inflight, perOp: int64(online),
		setup: g.setup,
		tweak: func(c *config.Config) error {
			// The default maximum is 10,000; a larger group needs a larger
			// one (unless --imd-arg sets it, which wins over the file).
			if members > max(c.Groups.MaxSize, 10000) {
				c.Groups.MaxSize = members
			}
			// The create request names every member (~30 bytes each).
			c.S2C.MaxBody = max(c.S2C.MaxBody, 1<<20, members*48+4096)
			return nil
		},
		prepare: g.prepare,
		begin:   g.begin,
		op:      g.op,
		finish:  g.finish,
		close:   func() { closeClients(g.clients) },
	}
	return runLoad(ctx, sc, &f, append([]string{"imbench", "group"}, args...), stdout, stderr)
}

type groupBench struct {
	f               *loadFlags
	members, online int
	msgtype         uint32
	setup           *groupSetup

	t       *target
	gid     uint64
	clients []*sdk.Client
	cur     atomic.Pointer[groupRun]

	mu   sync.Mutex
	runs []groupRunStats // finished runs, the warm-up excluded, in order
	errs []string        // metrics that could not be read
}

// groupRun tracks one run: per message, the deliveries so far and the
// time of the latest, and the server's counters at its start.
type groupRun struct {
	rs   *runState
	got  []atomic.Int32
	last []atomic.Int64 // mono ns of the message's latest delivery
	m0   bench.Metrics
}

// groupRunStats are the group-specific results of one run.
type groupRunStats struct {
	Rate     float64 `json:"offered_rate"`
	Repeat   int     `json:"repeat"`
	Messages int64   `json:"messages"` // sends answered "stored"
	// LastMember is the latency from a message's scheduled send to its
	// delivery to the last online member, over the messages every online
	// member received.
	LastMember bench.Summary `json:"last_member_latency"`
	Incomplete int64         `json:"incomplete_messages"` // messages some member did not receive

	ServerCPUUsPerMsg float64 `json:"server_cpu_us_per_msg"`

	// From the server's /metrics, over the run (to the start of the next).
	StoredAppends     float64 `json:"store_appends"`
	DuplicateSends    float64 `json:"duplicate_sends"`
	RefusedSends      float64 `json:"refused_sends"`
	StoreBatchesPerMs string  `json:"store_batches_per_msg"`
	ServerNotifies    float64 `json:"server_notifies"`
	CursorWrites      float64 `json:"cursor_writes"`
	CursorWritesPerMs float64 `json:"cursor_writes_per_msg"`
	// AckBatches estimates the group-ack requests: frames read from
	// clients less the sends (keepalives and gap pulls are in it too).
	AckBatches         float64 `json:"ack_batches_est"`
	CursorWritesPerAck float64 `json:"cursor_writes_per_ack_batch"`
	CacheHits          float64 `json:"cache_hits"`
	CacheMisses        float64 `json:"cache_misses"`
	CacheHitRate       float64 `json:"cache_hit_rate"`
	MemberRowsRead     float64 `json:"member_rows_read"`
}

// groupExtra is the scenario's part of the JSON report.
type groupExtra struct {
	GroupID uint64          `json:"group_id,string"`
	Runs    []groupRunStats `json:"runs"`
	// LastMemberP99Ms is min / median / max over the runs of each rate.
	LastMemberP99Ms []rateTriple `json:"last_member_p99_ms"`
	Errors          []string     `json:"errors,omitempty"`
}

type rateTriple struct {
	Rate float64    `json:"offered_rate"`
	V    [3]float64 `json:"min_median_max"`
}

func (g *groupBench) prepare(ctx context.Context, t *target, stderr io.Writer) error {
	if t.apiKey == "" {
		return errors.New("group needs the server's API key: --api-key with --addr")
	}
	g.t = t
	fmt.Fprintf(stderr, "imbench group: creating a group of %d members\n", g.members)
	t0 := time.Now()
	id, err := g.createGroup(ctx, t)
	if err != nil {
		return err
	}
	g.gid, g.setup.GroupID, g.setup.CreateMs = id, id, time.Since(t0).Milliseconds()
	g.clients, err = loginClients(ctx, t, uidRange(g.f.uidBase, g.online), g.f.loginConc, func(i int) sdk.Options {
		return sdk.Options{NoReconnect: true, OnGroup: func(m *pb.C2CMessage) { g.received(i, m) }}
	}, stderr, "members")
	return err
}

// createGroup creates the group over the HTTP API and returns its id.
func (g *groupBench) createGroup(ctx context.Context, t *target) (uint64, error) {
	var b bytes.Buffer
	b.WriteString(`{"members":[`)
	for i := range g.members {
		if i > 0 {
			b.WriteByte(',')
		}
		fmt.Fprintf(&b, `{"uid":%d}`, g.f.uidBase+uint64(i))
	}
	b.WriteString(`]}`)
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, "http://"+t.HTTP+"/v1/groups", &b)
	if err != nil {
		return 0, err
	}
	req.Header.Set("Authorization", "Bearer "+t.apiKey)
	req.Header.Set("Content-Type", "application/json")
	resp, err := (&http.Client{Timeout: 2 * time.Minute}).Do(req)
	if err != nil {
		return 0, fmt.Errorf("create group: %w", err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if err != nil {
		return 0, fmt.Errorf("create group: %w", err)
	}
	if resp.StatusCode != http.StatusOK {
		return 0, fmt.Errorf("create group: HTTP %s: %s", resp.Status, bytes.TrimSpace(body[:min(len(body), 300)]))
	}
	var res struct {
		GroupID string `json:"group_id"`
		Members []any  `json:"members"`
	}
	if err := json.Unmarshal(body, &res); err != nil {
		return 0, fmt.Errorf("create group: answer: %w", err)
	}
	id, err := strconv.ParseUint(res.GroupID, 10, 64)
	if err != nil || id == 0 {
		return 0, fmt.Errorf("create group: answer has group_id %q", res.GroupID)
	}
	if len(res.Members) != g.members {
		return 0, fmt.Errorf("create group: %d members created, want %d", len(res.Members), g.members)
	}
	return id, nil
}

// scrape reads the server's /metrics, or nil (and notes why) on failure.
func (g *groupBench) scrape(ctx context.Context) bench.Metrics {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	m, err := g.t.scrapeAt(ctx, g.t.HTTP)
	if err != nil {
		g.mu.Lock()
		g.errs = append(g.errs, "metrics: "+err.Error())
		g.mu.Unlock()
		return nil
	}
	return m
}

// begin ends the previous run's bookkeeping (its counters run up to now,
// so the acks that follow its last delivery count) and starts rs's.
func (g *groupBench) begin(rs *runState) {
	m := g.scrape(context.Background())
	if prev := g.cur.Load(); prev != nil {
		g.end(prev, m)
	}
	g.cur.Store(&groupRun{rs: rs, got: make([]atomic.Int32, rs.n), last: make([]atomic.Int64, rs.n), m0: m})
}

// end digests run r; m1 is the scrape at its end.
func (g *groupBench) end(r *groupRun, m1 bench.Metrics) {
	rs := r.rs
	if rs.warmup {
		return
	}
	st := groupRunStats{Rate: rs.rate, Messages: rs.ok.Load(), StoreBatchesPerMs: storeBatchesNote}
	interval := 1e9 / rs.rate
	var h bench.Histogram
	for i := range r.got {
		if int(r.got[i].Load()) < g.online {
			st.Incomplete++
			continue
		}
		at := rs.startM + int64(float64(i)*interval)
		h.Record(time.Duration(r.last[i].Load() - at))
	}
	st.LastMember = h.Summary()
	if r.m0 != nil && m1 != nil {
		d := func(name string) float64 {
			v1, _ := m1.Get(name)
			v0, _ := r.m0.Get(name)
			return v1 - v0
		}
		st.StoredAppends, st.DuplicateSends, st.RefusedSends = d(mGroupStored), d(mGroupDuplicate), d(mGroupRefused)
		st.ServerNotifies, st.CursorWrites = d(mGroupNotifies), d(mGroupCursorWrites)
		st.CacheHits, st.CacheMisses, st.MemberRowsRead = d(mGroupCacheHits), d(mGroupCacheMisses), d(mGroupCacheRowsRead)
		st.AckBatches = max(0, d(mGatewayFramesIn)-float64(rs.issued.Load()))
		if st.Messages > 0 {
			st.CursorWritesPerMs = st.CursorWrites / float64(st.Messages)
		}
		if st.AckBatches > 0 {
			st.CursorWritesPerAck = st.CursorWrites / st.AckBatches
		}
		if n := st.CacheHits + st.CacheMisses; n > 0 {
			st.CacheHitRate = st.CacheHits / n
		}
	}
	g.mu.Lock()
	g.runs = append(g.runs, st)
	g.mu.Unlock()
}

// received is online member i's OnGroup: message g reached slot
// g*online + i.
func (g *groupBench) received(i int, m *pb.C2CMessage) {
	if m.Event != nil {
		return // the group's creation, from the catch-up after login
	}
	r := g.cur.Load()
	run, idx, at, sent, ok := getHeader(m.Content)
	if !ok || r == nil || run != r.rs.id {
		return // a late message of an earlier run
	}
	if idx < 0 || idx >= r.rs.n {
		r.rs.stray.Add(1)
		return
	}
	if !r.rs.deliver(i, idx*int64(g.online)+int64(i), at, sent) {
		return
	}
	now := mono()
	for {
		last := r.last[idx].Load()
		if now <= last || r.last[idx].CompareAndSwap(last, now) {
			break
		}
	}
	r.got[idx].Add(1)
}

func (g *groupBench) op(ctx context.Context, rs *runState, s int, idx int64, at int64) error {
	content := newContent(g.f.size)
	putHeader(content, rs.id, idx, at, mono())
	if _, err := g.clients[s].SendGroup(ctx, g.gid, g.msgtype, content); err != nil {
		return err
	}
	rs.expected.Add(int64(g.online))
	return nil
}

// finish ends the last run's bookkeeping and puts the group figures in
// the report: the extra document and the lines under the table.
func (g *groupBench) finish(ctx context.Context, rep *loadReport) (any, error) {
	m := g.scrape(ctx)
	if prev := g.cur.Swap(nil); prev != nil {
		g.end(prev, m)
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	ex := &groupExtra{GroupID: g.gid, Runs: g.runs, Errors: g.errs}
	if len(ex.Runs) != len(rep.Runs) {
		return ex, fmt.Errorf("group: %d runs tracked, %d in the report", len(ex.Runs), len(rep.Runs))
	}
	for i := range ex.Runs {
		r, lr := &ex.Runs[i], &rep.Runs[i]
		r.Repeat = lr.Repeat
		if r.Messages > 0 {
			r.ServerCPUUsPerMsg = lr.ServerCPUSeconds / float64(r.Messages) * 1e6
		}
	}
	for _, rt := range rep.Rates {
		var v []float64
		for _, r := range ex.Runs {
			if r.Rate == rt.Rate {
				v = append(v, r.LastMember.P99Ms)
			}
		}
		ex.LastMemberP99Ms = append(ex.LastMemberP99Ms, rateTriple{Rate: rt.Rate, V: minMedMax(v)})
	}
	rep.Notes = append(rep.Notes, groupNotes(ex, g.online)...)
	return ex, nil
}

// groupNotes formats the group figures as lines under the load table.
func groupNotes(ex *groupExtra, online int) []string {
	var b strings.Builder
	fmt.Fprintf(&b, "\ngroup %d, %d online members; latency to the LAST member of each message, and per message:\n", ex.GroupID, online)
	tw := tabwriter.NewWriter(&b, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintf(tw, "offered msgs/s\tmsgs\tlast p50 ms\tlast p99\tlast max\tincomplete\tsrv us/msg\tnotifies/msg\tcursor writes/msg\tcursor writes/ack batch\tcache hit rate\tmember rows read\t\n")
	for _, r := range ex.Runs {
		perMsg := func(v float64) float64 {
			if r.Messages == 0 {
				return 0
			}
			return v / float64(r.Messages)
		}
		fmt.Fprintf(tw, "%.0f\t%d\t%.2f\t%.2f\t%.2f\t%d\t%.0f\t%.0f\t%.0f\t%.2f\t%.4f\t%.0f\t\n", r.Rate, r.Messages,
			r.LastMember.P50Ms, r.LastMember.P99Ms, r.LastMember.MaxMs, r.Incomplete, r.ServerCPUUsPerMsg,
			perMsg(r.ServerNotifies), r.CursorWritesPerMs, r.CursorWritesPerAck, r.CacheHitRate, r.MemberRowsRead)
	}
	_ = tw.Flush()
	if len(ex.LastMemberP99Ms) > 0 && len(ex.Runs) > len(ex.LastMemberP99Ms) {
		fmt.Fprintf(&b, "last-member p99 ms, min / median / max over the runs of each rate:")
		for _, rt := range ex.LastMemberP99Ms {
			fmt.Fprintf(&b, "  %.0f/s: %.2f / %.2f / %.2f", rt.Rate, rt.V[0], rt.V[1], rt.V[2])
		}
		b.WriteByte('\n')
	}
	fmt.Fprintf(&b, "store writes per group message: %s\n", storeBatchesNote)
	fmt.Fprintf(&b, "cursor writes per ack batch: %s over group-ack requests estimated as frames in less sends", mGroupCursorWrites)
	for _, e := range ex.Errors {
		fmt.Fprintf(&b, "\n%s", e)
	}
	return strings.Split(b.String(), "\n")
}
