package platform

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/imd-dev/imd/internal/config"
	"github.com/imd-dev/imd/schema/pb"
	"github.com/imd-dev/imd/sdk"
)

// groupLog records what one terminal was shown of each group, in order.
type groupLog struct {
	mu   sync.Mutex
	msgs map[uint64][]*pb.C2CMessage // group -> shown, in order
}

func (g *groupLog) on(m *pb.C2CMessage) {
	g.mu.Lock()
	if g.msgs == nil {
		g.msgs = map[uint64][]*pb.C2CMessage{}
	}
	g.msgs[m.GroupId] = append(g.msgs[m.GroupId], m)
	g.mu.Unlock()
}

// last is the seq of the last message shown of group id (0: none).
func (g *groupLog) last(id uint64) uint64 {
	g.mu.Lock()
	defer g.mu.Unlock()
	ms := g.msgs[id]
	if len(ms) == 0 {
		return 0
	}
	return ms[len(ms)-1].Seq
}

func (g *groupLog) shown(id uint64) []*pb.C2CMessage {
	g.mu.Lock()
	defer g.mu.Unlock()
	return slices.Clone(g.msgs[id])
}

// soakTerm is one member terminal of the group soak: its client (replaced
// when it goes offline and back), its log and its kept state.
type soakTerm struct {
	uid     uint64
	appcode uint32
	state   string // sdk.FileState path: what was shown survives a new client
	log     *groupLog
	mu      sync.Mutex
	c       *sdk.Client
	from    map[uint64]uint64 // group -> first seq it may see
	to      map[uint64]uint64 // group -> last seq it may see (0: the head)
}

// TestGroupSoak: groups of members on two terminals each and a big group
// with a tenth of its members online exchange messages from many senders
// at once, while connections are cut at random, terminals go offline and
// come back, and members are removed and added mid-stream. Counting, not
// sampling: each member terminal is shown every message of its membership
// period exactly once, in seq order without a gap, and every terminal
// shows the same message at the same seq; every message whose send was
// answered is there, at the seq its answer gave. Full size (3 groups of
// 50 members, one of 2,000 with 200 online) without the race detector;
// a tenth of it with it.
func TestGroupSoak(t *testing.T) {
	small, members, big, bigOnline, senders, perSender := 3, 50, 2000, 200, 5, 60
	if raceEnabled || testing.Short() {
		members, big, bigOnline, perSender = 10, 200, 20, 20
	}
	if v := os.Getenv("IMD_GROUP_SOAK_MESSAGES"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 {
			t.Fatalf("IMD_GROUP_SOAK_MESSAGES=%q: want a count per sender", v)
		}
		perSender = n
	}
	p := start(t, func(c *config.Config) { c.Groups.MaxSize = big + 10 })
	px := newProxy(t, p.GatewayAddr())
	dir := t.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()

	// dialTerm logs tm in through the cutting proxy on its kept state. It
	// may run on any goroutine: it reports, it does not stop the test.
	dialTerm := func(tm *soakTerm) error {
		// A login that timed out on a slow store may still have succeeded
		// on its connection (a second login there would get 1009): each
		// try is a new client, and a failed one is closed.
		var err error
		for attempt := 0; attempt < 5; attempt++ {
			var st *sdk.FileStore
			if st, err = sdk.FileState(tm.state, 1<<16); err != nil {
				return err
			}
			var c *sdk.Client
			c, err = sdk.Dial(ctx, sdk.Options{
				Addrs: []string{px.addr()}, OnGroup: tm.log.on, State: st, PageSize: 50,
				DeviceID:   fmt.Sprintf("soak-%d-%d", tm.uid, tm.appcode),
				BackoffMin: 5 * time.Millisecond, BackoffMax: 50 * time.Millisecond,
				SendBackoffMin: 5 * time.Millisecond, SendBackoffMax: 100 * time.Millisecond,
				SendAttempts: 50, RequestTimeout: 5 * time.Second,
			})
			if err != nil {
				continue
			}
			lctx, lcancel := context.WithTimeout(ctx, 15*time.Second)
			_, err = c.Login(lctx, creds(tm.appcode, tm.uid))
			lcancel()
			if err != nil {
				_ = c.Close()
				continue
			}
			t.Cleanup(func() { _ = c.Close() })
			tm.mu.Lock()
			tm.c = c
			tm.mu.Unlock()
			return nil
		}
		return fmt.Errorf("login %d/%d: %w", tm.appcode, tm.uid, err)
	}
	newTerm := func(uid uint64, appcode uint32) *soakTerm {
		return &soakTerm{uid: uid, appcode: appcode, log: &groupLog{}, from: map[uint64]uint64{}, to: map[uint64]uint64{},
			state: filepath.Join(dir, fmt.Sprintf("%d-%d.state", uid, appcode))}
	}

	// The groups and their terminals.
	type group struct {
		id      uint64
		uids    []uint64
		terms   []*soakTerm
		senders []*soakTerm
	}
	var groups []*group
	create := func(id uint64, uids []uint64) {
		var ms []map[string]any
		for _, u := range uids {
			ms = append(ms, map[string]any{"account": 1, "uid": u})
		}
		var res struct {
			Seq uint64 `json:"seq"`
		}
		if code := api(t, p, "POST", "/v1/groups", testAPIKey, map[string]any{"group_id": strconv.FormatUint(id, 10), "members": ms}, &res); code != 200 || res.Seq != 1 {
			t.Fatalf("create group %d: HTTP %d, seq %d", id, code, res.Seq)
		}
	}
	for g := range small {
		gr := &group{id: uint64(7000 + g)}
		for i := range members {
			gr.uids = append(gr.uids, uint64(100000+g*1000+i))
		}
		create(gr.id, gr.uids)
		for i, u := range gr.uids {
			for _, app := range []uint32{101, 102} {
				tm := newTerm(u, app)
				tm.from[gr.id] = 1
				gr.terms = append(gr.terms, tm)
				if app == 101 && i < senders {
					gr.senders = append(gr.senders, tm)
				}
			}
		}
		groups = append(groups, gr)
	}
	bg := &group{id: 7999}
	for i := range big {
		bg.uids = append(bg.uids, uint64(200000+i))
	}
	create(bg.id, bg.uids)
	for i := range bigOnline {
		tm := newTerm(bg.uids[i*(big/bigOnline)], 101)
		tm.from[bg.id] = 1
		bg.terms = append(bg.terms, tm)
		if i < senders {
			bg.senders = append(bg.senders, tm)
		}
	}
	groups = append(groups, bg)
	var all []*soakTerm
	for _, gr := range groups {
		for _, tm := range gr.terms {
			if err := dialTerm(tm); err != nil {
				t.Fatal(err)
			}
			all = append(all, tm)
		}
	}

	// Chaos: cut a random connection every few milliseconds.
	stop := make(chan struct{})
	var cuts, offline atomic.Int64
	var chaos sync.WaitGroup
	chaos.Add(2)
	go func() {
		defer chaos.Done()
		r := rand.New(rand.NewPCG(3, 4))
		for {
			select {
			case <-stop:
				return
			case <-time.After(time.Duration(2+r.IntN(8)) * time.Millisecond):
				if px.cutOne(r) {
					cuts.Add(1)
				}
			}
		}
	}()
	// Terminals go offline (closed by the app) and come back a moment
	// later as a new client on the same kept state.
	g0 := groups[0]
	var wanderers []*soakTerm // 102 terminals of group 0's non-senders
	for _, tm := range g0.terms[senders*2:] {
		if tm.appcode == 102 {
			wanderers = append(wanderers, tm)
		}
	}
	go func() {
		defer chaos.Done()
		r := rand.New(rand.NewPCG(5, 6))
		for {
			select {
			case <-stop:
				return
			case <-time.After(time.Duration(50+r.IntN(100)) * time.Millisecond):
			}
			tm := wanderers[r.IntN(len(wanderers))]
			tm.mu.Lock()
			c := tm.c
			tm.mu.Unlock()
			_ = c.Close()
			time.Sleep(time.Duration(10+r.IntN(50)) * time.Millisecond)
			if err := dialTerm(tm); err != nil {
				t.Errorf("back online: %v", err)
				return
			}
			offline.Add(1)
		}
	}()

	// Senders, all at once.
	type sentMsg struct {
		seq, msgid uint64
		content    string
	}
	var smu sync.Mutex
	sent := map[uint64][]sentMsg{} // group -> answered sends
	var wg sync.WaitGroup
	var progress atomic.Int64
	for _, gr := range groups {
		for si, tm := range gr.senders {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := range perSender {
					content := fmt.Sprintf("g%d-u%d-%05d", gr.id, tm.uid, i)
					tm.mu.Lock()
					c := tm.c
					tm.mu.Unlock()
					resp, err := c.SendGroupWithID(ctx, gr.id, 0, content, []byte(content))
					if err != nil {
						t.Errorf("send %s: %v", content, err)
						return
					}
					smu.Lock()
					sent[gr.id] = append(sent[gr.id], sentMsg{seq: resp.Seq, msgid: resp.Msgid, content: content})
					smu.Unlock()
					progress.Add(1)
				}
				_ = si
			}()
		}
	}

	// Membership changes mid-stream in group 0: the last member leaves and
	// a new one (on two terminals) joins, once a third has been sent.
	total := int64(len(groups) * senders * perSender)
	eventually(t, 2*time.Minute, "a third of the messages", func() bool { return progress.Load() >= total/3 })
	leaver := g0.uids[len(g0.uids)-1]
	var left struct {
		Seq uint64 `json:"seq"`
	}
	if code := api(t, p, "DELETE", fmt.Sprintf("/v1/groups/%d/members", g0.id), testAPIKey, map[string]any{"members": []map[string]any{{"uid": leaver}}}, &left); code != 200 || left.Seq == 0 {
		t.Fatalf("remove a member: HTTP %d seq %d", code, left.Seq)
	}
	for _, tm := range g0.terms {
		if tm.uid == leaver {
			tm.to[g0.id] = left.Seq
		}
	}
	joiner := uint64(100999)
	var joined struct {
		Seq uint64 `json:"seq"`
	}
	if code := api(t, p, "POST", fmt.Sprintf("/v1/groups/%d/members", g0.id), testAPIKey, map[string]any{"members": []map[string]any{{"uid": joiner}}}, &joined); code != 200 || joined.Seq <= left.Seq {
		t.Fatalf("add a member: HTTP %d seq %d", code, joined.Seq)
	}
	for _, app := range []uint32{101, 102} {
		tm := newTerm(joiner, app)
		tm.from[g0.id] = joined.Seq
		if err := dialTerm(tm); err != nil {
			t.Fatal(err)
		}
		g0.terms = append(g0.terms, tm)
		all = append(all, tm)
	}

	wg.Wait()
	close(stop)
	chaos.Wait()
	if t.Failed() {
		t.FailNow()
	}

	// Every terminal reaches the end of what it may see.
	heads := map[uint64]uint64{}
	for _, gr := range groups {
		var info struct {
			Head uint64 `json:"head"`
		}
		if code := api(t, p, "GET", fmt.Sprintf("/v1/groups/%d", gr.id), testAPIKey, nil, &info); code != 200 {
			t.Fatalf("group %d: HTTP %d", gr.id, code)
		}
		heads[gr.id] = info.Head
	}
	end := func(tm *soakTerm, id uint64) uint64 {
		if tm.to[id] != 0 {
			return tm.to[id]
		}
		return heads[id]
	}
	deadline := time.Now().Add(time.Minute)
	for _, gr := range groups {
		for _, tm := range gr.terms {
			for tm.log.last(gr.id) < end(tm, gr.id) && time.Now().Before(deadline) {
				time.Sleep(10 * time.Millisecond)
			}
		}
	}
	time.Sleep(200 * time.Millisecond) // let duplicates, if any, show up

	for _, gr := range groups {
		bySeq := map[uint64]*pb.C2CMessage{}
		for _, tm := range gr.terms {
			shown := tm.log.shown(gr.id)
			from, to := tm.from[gr.id], end(tm, gr.id)
			if len(shown) == 0 || shown[0].Seq != from || shown[len(shown)-1].Seq != to || uint64(len(shown)) != to-from+1 {
				var seqs []uint64
				for _, m := range shown {
					seqs = append(seqs, m.Seq)
				}
				if len(seqs) > 20 {
					seqs = append(seqs[:10], seqs[len(seqs)-10:]...)
				}
				t.Fatalf("group %d uid %d appcode %d: shown %d messages (seqs %v...), want seqs %d..%d once each", gr.id, tm.uid, tm.appcode, len(shown), seqs, from, to)
			}
			for i, m := range shown {
				if m.Seq != from+uint64(i) {
					t.Fatalf("group %d uid %d appcode %d: message %d has seq %d, want %d (a gap, a duplicate or a reorder)", gr.id, tm.uid, tm.appcode, i, m.Seq, from+uint64(i))
				}
				if o := bySeq[m.Seq]; o == nil {
					bySeq[m.Seq] = m
				} else if o.Msgid != m.Msgid {
					t.Fatalf("group %d seq %d: msgid %d on one terminal, %d on another", gr.id, m.Seq, o.Msgid, m.Msgid)
				}
			}
		}
		for _, s := range sent[gr.id] {
			m := bySeq[s.seq]
			if m == nil || m.Msgid != s.msgid || string(m.Content) != s.content {
				t.Fatalf("group %d: the send of %q was answered seq %d msgid %d; the terminals show %v", gr.id, s.content, s.seq, s.msgid, m)
			}
		}
		if n := len(sent[gr.id]); n != senders*perSender {
			t.Fatalf("group %d: %d sends answered, want %d", gr.id, n, senders*perSender)
		}
	}
	t.Logf("%d group messages to %d terminals (%d groups, the largest of %d members), %d connections cut, %d terminals went offline and back",
		total, len(all), len(groups), big, cuts.Load(), offline.Load())
}
