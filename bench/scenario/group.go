package scenario

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"text/tabwriter"
	"time"

	"github.com/imd-dev/imd/bench"
	"github.com/imd-dev/imd/schema/pb"
	"github.com/imd-dev/imd/sdk"
)

// GroupSynopsis describes the group scenario (the command's help).
const GroupSynopsis = `Group chat fanned out to the online members at a fixed offered rate: the
scenario creates one group of --members users over the HTTP API
(POST /v1/groups with the app's API key), logs in the first --online of
them, and --senders of the online members (the first ones, SDK clients)
send group messages (SendGroup) at --rate msgs/s over all senders
(open loop: message g is due at start + g/rate, each sender keeps up to
--inflight sends outstanding). Every message carries its scheduled and
real send times (monotonic ns) in its content; latency runs from the
scheduled time to each online member's OnGroup (the sender's own copy
reaches its OnGroup from the send's answer, as the SDK does). The other
online members are lean clients by default (--client raw: a few goroutines
read every connection, count each message and move the member's cursor at
most every --ack-delay, 250 ms like the SDK, without catching up on the
group's past) or SDK clients with OnGroup (--client sdk). The table
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
	Client   string `json:"client"` // of the online members that do not send
	// AckDelayMs is how long a lean member's cursor waits to be acknowledged.
	AckDelayMs float64 `json:"lean_ack_delay_ms,omitempty"`
	GroupID    uint64  `json:"group_id,string"`
	CreateMs   int64   `json:"create_ms"` // POST /v1/groups, request to answer
}

// Group is the group scenario: group messages fanned out to the online
// members of one group.
type Group struct {
	Load    LoadOptions
	Members int    // members of the group (uids Load.UIDBase on)
	Online  int    // members logged in (the first ones)
	Senders int    // online members that send (the first ones; SDK clients)
	MsgType uint32 // msgtype of the messages
	Client  string // the other online members: ClientRaw (lean) or ClientSDK
	// AckDelay is how long a lean member's cursor waits to be acknowledged
	// (the SDK's GroupAckDelay is 250 ms).
	AckDelay time.Duration
	Loops    int // goroutines reading the lean clients (0: the usable CPUs, at most 4)
}

// NewGroup returns the scenario with the command line's defaults.
func NewGroup() *Group {
	return &Group{Load: DefaultLoadOptions(10, 100, 8), Members: 10000, Online: 5000, Senders: 4, MsgType: 1,
		Client: ClientRaw, AckDelay: 250 * time.Millisecond}
}

// Validate checks the options (and fills Load.Rates from Load.Rate).
func (o *Group) Validate() error {
	errs := o.Load.validate(MsgHeader)
	if o.Members < 1 || o.Online < 1 || o.Senders < 1 || o.Load.Inflight < 1 {
		errs = append(errs, errors.New("--members, --online, --senders and --inflight must be >= 1"))
	}
	if o.Online > o.Members {
		errs = append(errs, errors.New("--online must be <= --members"))
	}
	if o.Senders > o.Online {
		errs = append(errs, errors.New("--senders must be <= --online (senders are online members)"))
	}
	if o.Client != ClientRaw && o.Client != ClientSDK {
		errs = append(errs, fmt.Errorf("--client %q: want raw or sdk", o.Client))
	}
	if o.AckDelay < 0 || o.Loops < 0 {
		errs = append(errs, errors.New("--ack-delay and --loops must not be negative"))
	}
	return errors.Join(errs...)
}

// Run runs the scenario on the server l gives. A report comes back with an
// error when the scenario ran but a send failed or a delivery went missing.
func (o *Group) Run(ctx context.Context, l Launcher, env Env) (*LoadReport, error) {
	if err := o.Validate(); err != nil {
		return nil, err
	}
	f := &o.Load
	g := &groupBench{o: o, f: f, members: o.Members, online: o.Online, msgtype: o.MsgType}
	g.setup = &groupSetup{Members: o.Members, Online: o.Online, Senders: o.Senders, Inflight: f.Inflight, Size: f.Size,
		MsgType: o.MsgType, Client: o.Client, UIDs: fmt.Sprintf("members %d..%d, online %d..%d, senders %d..%d",
			f.UIDBase, f.UIDBase+uint64(o.Members)-1, f.UIDBase, f.UIDBase+uint64(o.Online)-1, f.UIDBase, f.UIDBase+uint64(o.Senders)-1)}
	if o.Client == ClientRaw {
		g.setup.AckDelayMs = float64(o.AckDelay) / 1e6
	}
	sc := &loadScenario{
		name: "group", opUnit: "msgs", deliveryUnit: "deliveries", senders: o.Senders, inflight: f.Inflight, perOp: int64(o.Online),
		setup: g.setup,
		// The default maximum is 10,000 (a larger group needs a larger one,
		// unless --imd-arg sets it, which wins over the file); the create
		// request names every member (~30 bytes each).
		needs:   ServerNeeds{GroupMaxSize: o.Members, MaxBody: max(1<<20, o.Members*48+4096)},
		prepare: g.prepare,
		begin:   g.begin,
		op:      g.op,
		finish:  g.finish,
		close: func() {
			if g.lean != nil {
				_ = g.lean.Close()
			}
			closeClients(g.clients)
		},
	}
	return runLoad(ctx, sc, f, l, env)
}

type groupBench struct {
	o               *Group
	f               *LoadOptions
	members, online int
	msgtype         uint32
	setup           *groupSetup

	t       *Target
	gid     uint64
	clients []*sdk.Client // the senders, or every online member with --client sdk
	lean    *LeanFleet    // the other online members
	cur     atomic.Pointer[groupRun]

	mu   sync.Mutex
	runs []GroupRunStats // finished runs, the warm-up excluded, in order
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

// GroupRunStats are the group-specific results of one run.
type GroupRunStats struct {
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

// GroupExtra is the group scenario's part of the JSON report.
type GroupExtra struct {
	GroupID uint64          `json:"group_id,string"`
	Runs    []GroupRunStats `json:"runs"`
	// LastMemberP99Ms is min / median / max over the runs of each rate.
	LastMemberP99Ms []RateTriple `json:"last_member_p99_ms"`
	Errors          []string     `json:"errors,omitempty"`
	// Lean counts what the lean members read and wrote over the whole
	// scenario, the warm-up included.
	Lean *LeanStats `json:"lean_client,omitempty"`
}

// RateTriple is min / median / max of a figure over the runs of a rate.
type RateTriple struct {
	Rate float64    `json:"offered_rate"`
	V    [3]float64 `json:"min_median_max"`
}

func (g *groupBench) prepare(ctx context.Context, t *Target, stderr io.Writer) error {
	if t.APIKey == "" {
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
	sdkMembers := g.online
	if g.o.Client == ClientRaw {
		sdkMembers = g.o.Senders
	}
	g.clients, err = loginClients(ctx, t, uidRange(g.f.UIDBase, sdkMembers), g.f.LoginConc, func(i int) sdk.Options {
		return sdk.Options{NoReconnect: true, OnGroup: func(m *pb.C2CMessage) { g.received(i, m) }}
	}, stderr, "members")
	if err != nil || sdkMembers == g.online {
		return err
	}
	base := sdkMembers
	g.lean, err = DialLean(ctx, LeanOptions{Addrs: []string{t.Gateway}, AppCode: t.AppCode, Secret: t.Secret,
		UIDs: uidRange(g.f.UIDBase+uint64(base), g.online-base), LoginConc: g.f.LoginConc, Loops: g.o.Loops, Log: stderr,
		GroupAckDelay: g.o.AckDelay,
		OnGroup: func(conn, loop int, _, _ uint64, content []byte, event bool) {
			if !event {
				g.receivedContent(base+conn, loop, content)
			}
		}})
	return err
}

// createGroup creates the group over the HTTP API and returns its id.
func (g *groupBench) createGroup(ctx context.Context, t *Target) (uint64, error) {
	var b bytes.Buffer
	b.WriteString(`{"members":[`)
	for i := range g.members {
		if i > 0 {
			b.WriteByte(',')
		}
		fmt.Fprintf(&b, `{"uid":%d}`, g.f.UIDBase+uint64(i))
	}
	b.WriteString(`]}`)
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, "http://"+t.HTTP+"/v1/groups", &b)
	if err != nil {
		return 0, err
	}
	req.Header.Set("Authorization", "Bearer "+t.APIKey)
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
	m, err := g.t.Scrape(ctx, g.t.HTTP)
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
	st := GroupRunStats{Rate: rs.rate, Messages: rs.ok.Load(), StoreBatchesPerMs: storeBatchesNote}
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
	g.receivedContent(i, i, m.Content)
}

// receivedContent counts a message that reached online member i; shard
// spreads the bookkeeping of concurrent receivers.
func (g *groupBench) receivedContent(i, shard int, content []byte) {
	r := g.cur.Load()
	run, idx, at, sent, ok := getHeader(content)
	if !ok || r == nil || run != r.rs.id {
		return // a late message of an earlier run
	}
	if idx < 0 || idx >= r.rs.n {
		r.rs.stray.Add(1)
		return
	}
	if !r.rs.deliver(shard, idx*int64(g.online)+int64(i), at, sent) {
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
	content := newContent(g.f.Size)
	putHeader(content, rs.id, idx, at, mono())
	if _, err := g.clients[s].SendGroup(ctx, g.gid, g.msgtype, content); err != nil {
		return err
	}
	rs.expected.Add(int64(g.online))
	return nil
}

// finish ends the last run's bookkeeping and puts the group figures in
// the report: the extra document and the lines under the table.
func (g *groupBench) finish(ctx context.Context, rep *LoadReport) (any, error) {
	m := g.scrape(ctx)
	if prev := g.cur.Swap(nil); prev != nil {
		g.end(prev, m)
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	ex := &GroupExtra{GroupID: g.gid, Runs: g.runs, Errors: g.errs}
	if g.lean != nil {
		st := g.lean.Stats()
		ex.Lean = &st
	}
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
		ex.LastMemberP99Ms = append(ex.LastMemberP99Ms, RateTriple{Rate: rt.Rate, V: MinMedMax(v)})
	}
	rep.Notes = append(rep.Notes, groupNotes(ex, g.online)...)
	return ex, nil
}

// groupNotes formats the group figures as lines under the load table.
func groupNotes(ex *GroupExtra, online int) []string {
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
	if ex.Lean != nil {
		fmt.Fprintf(&b, "\n%s", leanNote(ex.Lean))
	}
	for _, e := range ex.Errors {
		fmt.Fprintf(&b, "\n%s", e)
	}
	return strings.Split(b.String(), "\n")
}
