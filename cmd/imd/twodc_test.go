package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"maps"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/imd-dev/imd/das/cassandra"
	"github.com/imd-dev/imd/internal/testenv"
	"github.com/imd-dev/imd/internal/testnet"
	"github.com/imd-dev/imd/schema/pb"
	"github.com/imd-dev/imd/sdk"
)

// freeAddrOn is freeAddr on another loopback address (DC2 lives on
// 127.0.0.2).
func freeAddrOn(t *testing.T, host string) string {
	t.Helper()
	l, err := net.Listen("tcp", net.JoinHostPort(host, "0"))
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// twoDCWorld is two data centers of real processes on loopback: DC1 on
// 127.0.0.1 (two logic nodes, two gateways, its Redis Cluster, Cassandra
// node dc1), DC2 on 127.0.0.2 (one logic node, one gateway, its Redis
// Cluster, Cassandra node dc2), one keyspace replicated to both, and the
// logic tiers linked through proxies that play the WAN.
type twoDCWorld struct {
	t                *testing.T
	cfg, key, secret string
	lg1a, lg1b, lg2  *proc
	gw1a, gw1b, gw2  *proc
	wan              []*testnet.Proxy
}

func (w *twoDCWorld) token(app uint32, uid uint64) string {
	code, out, errOut := runCmd("token", "--config", w.cfg, "--appcode", fmt.Sprint(app), "--uid", fmt.Sprint(uid))
	if code != 0 {
		w.t.Fatalf("imd token: %s", errOut)
	}
	return strings.TrimSpace(out)
}

func (w *twoDCWorld) cutWAN() {
	for _, px := range w.wan {
		px.Cut()
	}
}

func (w *twoDCWorld) restoreWAN() {
	for _, px := range w.wan {
		px.Restore()
	}
}

// metric sums the samples of a metric (name{labels} matching) on p.
func metric(t *testing.T, p *proc, name string, labels ...string) float64 {
	t.Helper()
	code, body, err := p.get("/metrics")
	if err != nil || code != 200 {
		t.Fatalf("/metrics: %d %v", code, err)
	}
	var sum float64
	re := regexp.MustCompile(`^` + regexp.QuoteMeta(name) + `(\{[^}]*\})? ([0-9.e+-]+)$`)
	for _, line := range strings.Split(body, "\n") {
		m := re.FindStringSubmatch(line)
		if m == nil {
			continue
		}
		ok := true
		for _, l := range labels {
			ok = ok && strings.Contains(m[1], l)
		}
		if ok {
			v, _ := strconv.ParseFloat(m[2], 64)
			sum += v
		}
	}
	return sum
}

func startTwoDCWorld(t *testing.T) *twoDCWorld {
	t.Helper()
	rc1 := strings.Join(testenv.RedisCluster(t, "dc1"), ",")
	rc2 := strings.Join(testenv.RedisCluster(t, "dc2"), ",")
	cass1 := needCassandra(t)
	cass2 := testenv.CassandraDC2(t)

	var b [4]byte
	_, _ = rand.Read(b[:])
	tag := hex.EncodeToString(b[:])
	ks := "imd_twodc_" + tag
	began := time.Now()
	if code, _, errOut := runCmd("migrate", "--cassandra-hosts", cass1, "--cassandra-keyspace", ks, "--cassandra-dc", "dc1", "--replication", "dc1:1,dc2:1", "--log-level", "warn"); code != 0 {
		t.Fatalf("imd migrate: exit %d: %s", code, errOut)
	}
	t.Logf("keyspace %s (dc1:1, dc2:1) migrated in %s", ks, time.Since(began).Round(time.Millisecond))
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		cc := cassandra.Config{Hosts: []string{cass1}, Keyspace: ks, LocalDC: "dc1", Timeout: 20 * time.Second}
		if err := cassandra.DropKeyspace(ctx, cc); err != nil {
			t.Logf("drop keyspace %s: %v", ks, err)
		}
	})

	w := &twoDCWorld{t: t, key: "two-dc-api-key-0123456789", secret: "two-dc-secret-" + tag}
	w.cfg = filepath.Join(t.TempDir(), "imd.yaml")
	yaml := fmt.Sprintf("apps:\n"+
		"  - {appcode: 101, name: a, account: 1, secrets: [%q], api_keys: [%q]}\n"+
		"  - {appcode: 102, name: b, account: 1, secrets: [%q]}\n", w.secret, w.key, w.secret)
	if err := os.WriteFile(w.cfg, []byte(yaml), 0o600); err != nil {
		t.Fatal(err)
	}
	// Each logic node's peer port sits behind a proxy: the WAN.
	p1a, p1b, p2 := freeAddr(t), freeAddr(t), freeAddrOn(t, "127.0.0.2")
	proxy := func(host, target string) *testnet.Proxy {
		px, err := testnet.NewProxy(host, target, 0)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = px.Close() })
		w.wan = append(w.wan, px)
		return px
	}
	x1a, x1b, x2 := proxy("127.0.0.1", p1a), proxy("127.0.0.1", p1b), proxy("127.0.0.2", p2)
	rooms := fmt.Sprintf("dc1=0-511@%s,%s;dc2=512-1023@%s", x1a.Addr(), x1b.Addr(), x2.Addr())
	common := []string{"--config", w.cfg, "--rpc-secret", "two-dc-cluster-secret-" + tag, "--heartbeat", "200ms", "--node-ttl", "2s",
		"--redis-prefix", "imdtest:" + tag + ":", "--rooms", rooms}
	dc1 := append([]string{"--dc", "dc1", "--redis-addrs", rc1}, common...)
	dc2 := append([]string{"--dc", "dc2", "--redis-addrs", rc2, "--gateway-addr", "127.0.0.2:0", "--web-addr", "127.0.0.2:0",
		"--http-addr", "127.0.0.2:0", "--kafka-addr", "127.0.0.2:0", "--rpc-addr", "127.0.0.2:0"}, common...)
	store := func(host, dc string) []string {
		return []string{"--store", "cassandra", "--cassandra-hosts", host, "--cassandra-keyspace", ks, "--cassandra-dc", dc}
	}
	w.lg1a = startRole(t, "logic", t.TempDir(), 0, slices.Concat(dc1, store(cass1, "dc1"), []string{"--peer-addr", p1a})...)
	w.lg1b = startRole(t, "logic", t.TempDir(), 0, slices.Concat(dc1, store(cass1, "dc1"), []string{"--peer-addr", p1b})...)
	w.lg2 = startRole(t, "logic", t.TempDir(), 0, slices.Concat(dc2, store(cass2, "dc2"), []string{"--peer-addr", p2})...)
	w.gw1a = startRole(t, "gateway", t.TempDir(), 0, dc1...)
	w.gw1b = startRole(t, "gateway", t.TempDir(), 0, dc1...)
	w.gw2 = startRole(t, "gateway", t.TempDir(), 0, dc2...)
	// Every logic node linked to the other DC, every gateway to its DC's
	// logic nodes.
	if !waitFor(20*time.Second, func() bool {
		for _, p := range []*proc{w.lg1a, w.lg1b, w.lg2} {
			if code, body, err := p.get("/metrics"); err != nil || code != 200 || !strings.Contains(body, "imd_dc_link_up{dc=") || strings.Contains(body, "imd_dc_link_up{dc=\"dc1\"} 0") || strings.Contains(body, "imd_dc_link_up{dc=\"dc2\"} 0") {
				return false
			}
		}
		return true
	}) {
		t.Fatal("the DC links did not open within 20s")
	}
	return w
}

// dcTerm is a terminal of the drill: a member of the group, a c2c sender
// to one user in the other DC and one in its own, and a c2c recipient.
type dcTerm struct {
	*crashTerm
	dc    string
	addrs []string
}

// c2cSenders sends numbered c2c messages from each terminal to its
// recipients, one at a time per terminal (each send retried with the same
// client message id until answered), and keeps how many each pair had
// answered.
type c2cSenders struct {
	mu       sync.Mutex
	answered map[[2]uint64]int // (from uid, to uid) -> sends answered
	failed   atomic.Int64
	wg       sync.WaitGroup
}

func (cs *c2cSenders) run(ctx context.Context, t *testing.T, stop <-chan struct{}, from *dcTerm, to []uint64, phase int) {
	cs.wg.Add(1)
	go func() {
		defer cs.wg.Done()
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			dst := to[i%len(to)]
			pair := [2]uint64{from.uid, dst}
			cs.mu.Lock()
			n := cs.answered[pair]
			cs.mu.Unlock()
			content := fmt.Sprintf("%d>%d:%05d", from.uid, dst, n)
			cmid := fmt.Sprintf("dc-%d-%d-%05d", from.uid, dst, n)
			for {
				_, err := from.client().SendC2CWithID(ctx, &pb.User{Account: 1, Uid: dst}, 1, cmid, []byte(content))
				if err == nil {
					break
				}
				if ctx.Err() != nil {
					t.Errorf("phase %d: send %s still failing when the time ran out: %v", phase, content, err)
					return
				}
				if !sdk.IsRetryable(err) && !errors.Is(err, sdk.ErrSendFailed) {
					t.Errorf("phase %d: send %s: %v", phase, content, err)
					return
				}
				cs.failed.Add(1)
				time.Sleep(50 * time.Millisecond)
			}
			cs.mu.Lock()
			cs.answered[pair]++
			cs.mu.Unlock()
			time.Sleep(20 * time.Millisecond) // a chat's pace, and the box's two cores
		}
	}()
}

// checkC2C waits until every recipient was shown every answered message
// and then counts, per (sender, recipient): messages 0..n-1 once each and
// in the sender's order, nothing else.
func checkC2C(t *testing.T, phase string, terms []*dcTerm, answered map[[2]uint64]int) {
	t.Helper()
	byUID := map[uint64]*dcTerm{}
	for _, tm := range terms {
		byUID[tm.uid] = tm
	}
	shownBy := func(tm *dcTerm) map[uint64][]string {
		tm.mu.Lock()
		defer tm.mu.Unlock()
		out := map[uint64][]string{}
		for _, m := range tm.c2c {
			out[m.From.GetUid()] = append(out[m.From.GetUid()], string(m.Content))
		}
		return out
	}
	complete := func() bool {
		for pair, n := range answered {
			if len(shownBy(byUID[pair[1]])[pair[0]]) < n {
				return false
			}
		}
		return true
	}
	if !waitFor(60*time.Second, complete) {
		t.Errorf("%s: not every answered message shown within 60s", phase)
	}
	time.Sleep(500 * time.Millisecond) // let copies, if any, show up
	total := 0
	for pair, n := range answered {
		got := shownBy(byUID[pair[1]])[pair[0]]
		total += n
		for i, c := range got {
			want := fmt.Sprintf("%d>%d:%05d", pair[0], pair[1], i)
			if c != want {
				t.Fatalf("%s: uid %d shows %q as message %d from uid %d, want %q (lost, shown twice or out of order; %d answered, %d shown)",
					phase, pair[1], c, i, pair[0], want, n, len(got))
			}
		}
		if len(got) != n {
			t.Fatalf("%s: uid %d shows %d messages from uid %d, %d were answered", phase, pair[1], len(got), pair[0], n)
		}
	}
	t.Logf("%s: %d c2c messages over %d sender-recipient pairs, each shown once and in order", phase, total, len(answered))
}

// pusher sends s2c pushes (kept for offline terminals) through one
// logic node's HTTP API to the drill's users in turn, numbered per phase,
// one at a time, and keeps which recipient each answered push went to.
type pusher struct {
	mu   sync.Mutex
	sent map[uint64][]string // uid -> contents of the answered pushes, in order
	wg   sync.WaitGroup
}

func (ps *pusher) run(t *testing.T, w *twoDCWorld, via *proc, stop <-chan struct{}, uids []uint64, phase int) {
	ps.wg.Add(1)
	go func() {
		defer ps.wg.Done()
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			uid := uids[i%len(uids)]
			content := fmt.Sprintf("p%d-%05d", phase, i)
			var res struct {
				Online int `json:"online"`
				Stored int `json:"stored"`
			}
			code := httpJSON(t, via.http, "POST", "/v1/push", w.key, map[string]any{
				"to": []map[string]any{{"appcode": 101, "uid": uid}}, "msgtype": 9, "content": []byte(content), "store_offline": true,
			}, &res)
			if code != 200 || res.Online+res.Stored != 1 {
				t.Errorf("phase %d: push %s to %d: HTTP %d, %+v", phase, content, uid, code, res)
				return
			}
			ps.mu.Lock()
			ps.sent[uid] = append(ps.sent[uid], content)
			ps.mu.Unlock()
			time.Sleep(30 * time.Millisecond)
		}
	}()
}

// check waits until every terminal shows the pushes it was sent in this
// phase and counts them: each once, in the order sent.
func (ps *pusher) check(t *testing.T, phase string, prefix string, terms []*dcTerm) {
	t.Helper()
	shown := func(tm *dcTerm) []string {
		tm.mu.Lock()
		defer tm.mu.Unlock()
		var out []string
		for _, n := range tm.s2c {
			if strings.HasPrefix(string(n.Content), prefix) {
				out = append(out, string(n.Content))
			}
		}
		return out
	}
	ps.mu.Lock()
	defer ps.mu.Unlock()
	total := 0
	for _, tm := range terms {
		want := ps.sent[tm.uid]
		total += len(want)
		waitFor(30*time.Second, func() bool { return len(shown(tm)) >= len(want) })
		time.Sleep(100 * time.Millisecond)
		if got := shown(tm); !slices.Equal(got, want) {
			t.Fatalf("%s: uid %d (%s) shows pushes %v, was sent %v (lost, shown twice or out of order)", phase, tm.uid, tm.dc, got, want)
		}
	}
	t.Logf("%s: %d pushes through DC1's API to both DCs' users, each shown once and in order", phase, total)
}

// TestTwoDCDrills (IMD_TEST_TWO_DC=1; make test-real): users of two data centers chat one to one (within and
// across the DCs) and in a group with members in both, while, one at a
// time: a DC1 gateway is SIGKILLed, a DC1 logic node is SIGKILLed, a
// master of DC1's Redis Cluster is SIGKILLed and comes back empty, DC2's
// Cassandra node is SIGKILLed and restarted, and the link between the DCs
// is cut and restored. After each drill every message is counted: no
// loss, nothing shown twice, each sender's order kept; the metrics show
// what happened.
func TestTwoDCDrills(t *testing.T) {
	if os.Getenv("IMD_TEST_TWO_DC") != "1" {
		// make test-real runs it alone, with the services' environment.
		t.Skip("set IMD_TEST_TWO_DC=1 to run (it SIGKILLs a master of DC1's Redis Cluster and DC2's Cassandra node of scripts/services.sh)")
	}
	w := startTwoDCWorld(t)
	ctx, cancel := context.WithTimeout(context.Background(), 12*time.Minute)
	defer cancel()
	const perDC = 4
	stateDir := t.TempDir()
	var terms []*dcTerm
	for i := range perDC {
		for _, dc := range []string{"dc1", "dc2"} {
			uid, addrs := uint64(1001+i), []string{w.gw1a.gateway, w.gw1b.gateway}
			if i%2 == 1 {
				addrs[0], addrs[1] = addrs[1], addrs[0] // spread over both gateways
			}
			if dc == "dc2" {
				uid, addrs = uint64(2001+i), []string{w.gw2.gateway}
			}
			tm := &dcTerm{crashTerm: &crashTerm{uid: uid, appcode: 101, state: filepath.Join(stateDir, fmt.Sprint(uid))}, dc: dc, addrs: addrs}
			if err := tm.dialAt(ctx, t, addrs, w.token(101, uid)); err != nil {
				t.Fatal(err)
			}
			terms = append(terms, tm)
		}
	}
	// The group lives in its home DC: DC1's API answers 421 for a group
	// DC2 orders, and the test then creates it through DC2's.
	const group = 777001
	var uids []uint64
	for _, tm := range terms {
		uids = append(uids, tm.uid)
	}
	ms := make([]map[string]any, 0, len(uids))
	for _, u := range uids {
		ms = append(ms, map[string]any{"account": 1, "uid": u})
	}
	home := w.lg1a
	if code := httpJSON(t, w.lg1a.http, "POST", "/v1/groups", w.key, map[string]any{"group_id": strconv.Itoa(group), "members": ms}, nil); code == 421 {
		home = w.lg2
		createGroup(t, w.lg2.http, w.key, group, uids)
	} else if code != 200 {
		t.Fatalf("create group: HTTP %d", code)
	}
	t.Logf("group %d is ordered by %s", group, map[*proc]string{w.lg1a: "dc1", w.lg2: "dc2"}[home])

	cs := &c2cSenders{answered: map[[2]uint64]int{}}
	// Pushes run in the phases where every push answered must be shown
	// (a push queued on a gateway that then dies is lost by design: live
	// pushes are at most once).
	pushPhases := map[int]bool{1: true, 6: true}
	gs := &groupSenders{}
	var groupTotal int
	phase := func(n int, name string, drill func()) {
		t.Helper()
		began := time.Now()
		stop := make(chan struct{})
		for i, tm := range terms {
			// one recipient in the other DC, one in its own
			other := terms[i^1].uid
			same := terms[(i+2)%len(terms)].uid
			cs.run(ctx, t, stop, tm, []uint64{other, same}, n)
		}
		// two group senders, one per DC, a few messages each
		var senders []*crashTerm
		for _, tm := range terms[:2] {
			senders = append(senders, tm.crashTerm)
		}
		const perSender = 10
		gsPhase := &groupSenders{prefix: fmt.Sprintf("p%d-", n)}
		gsPhase.run(ctx, t, senders, group, perSender)
		ps := &pusher{sent: map[uint64][]string{}}
		if pushPhases[n] {
			ps.run(t, w, w.lg1b, stop, uids, n)
		}
		time.Sleep(1500 * time.Millisecond)
		if drill != nil {
			drill()
		}
		time.Sleep(1500 * time.Millisecond)
		close(stop)
		cs.wg.Wait()
		gsPhase.wg.Wait()
		ps.wg.Wait()
		if t.Failed() {
			t.FailNow()
		}
		gs.mu.Lock()
		gs.sent = append(gs.sent, gsPhase.sent...)
		gs.mu.Unlock()
		groupTotal += len(senders) * perSender
		cs.mu.Lock()
		answered := maps.Clone(cs.answered)
		cs.mu.Unlock()
		checkC2C(t, fmt.Sprintf("phase %d (%s)", n, name), terms, answered)
		if pushPhases[n] {
			ps.check(t, fmt.Sprintf("phase %d (%s)", n, name), fmt.Sprintf("p%d-", n), terms)
		}
		head := groupHead(t, home.http, w.key, group)
		var cts []*crashTerm
		for _, tm := range terms {
			cts = append(cts, tm.crashTerm)
		}
		gs.mu.Lock()
		sent := slices.Clone(gs.sent)
		gs.mu.Unlock()
		checkGroupCounts(t, cts, group, head, sent, groupTotal)
		t.Logf("phase %d (%s): group at seq %d, every member shows 1..%d once and in order; %d c2c tries failed and were retried; %s",
			n, name, head, head, cs.failed.Load(), time.Since(began).Round(time.Millisecond))
	}

	phase(1, "steady", nil)

	phase(2, "SIGKILL of a DC1 gateway", func() {
		_ = w.gw1a.cmd.Process.Signal(syscall.SIGKILL)
		<-w.gw1a.exited
	})
	if !waitFor(10*time.Second, func() bool {
		return w.lg1b.logged("gateway stopped heartbeating; purging its sessions") || w.lg1a.logged("gateway stopped heartbeating; purging its sessions")
	}) {
		t.Error("no DC1 logic node logged the purge of the dead gateway's sessions")
	}

	phase(3, "SIGKILL of a DC1 logic node", func() {
		_ = w.lg1a.cmd.Process.Signal(syscall.SIGKILL)
		<-w.lg1a.exited
		if home == w.lg1a {
			home = w.lg1b
		}
	})
	if v := metric(t, w.lg2, "imd_dc_link_up", `dc="dc1"`); v != 1 {
		t.Errorf("DC2's link to DC1 is not up after a DC1 logic node died (imd_dc_link_up %v)", v)
	}

	phase(4, "a DC1 Redis master SIGKILLed, back empty", func() {
		killRedisMaster(t, "dc1")
	})
	if v := metric(t, w.lg1b, "imd_router_shard_restarts_total"); v < 1 {
		t.Errorf("imd_router_shard_restarts_total on DC1's logic node is %v after a master restarted empty", v)
	}

	phase(5, "DC2's Cassandra node SIGKILLed and restarted", func() {
		killCassandra2(t)
	})
	if v := metric(t, w.lg2, "imd_logic_c2c_sends_total", `result="store_error"`); v < 1 {
		t.Logf("DC2 logged no store error while its Cassandra node was down (%v)", v)
	}

	phase(6, "the link between the DCs cut and restored", func() {
		w.cutWAN()
		time.Sleep(3 * time.Second)
		w.restoreWAN()
	})
	if v := metric(t, w.lg2, "imd_dc_replayed_total") + metric(t, w.lg1b, "imd_dc_replayed_total"); v < 1 {
		t.Errorf("nothing was kept for the cut link and replayed (imd_dc_replayed_total %v)", v)
	}
}

// killRedisMaster SIGKILLs one master of dc's Redis Cluster and starts it
// again (empty: the test cluster keeps nothing on disk).
func killRedisMaster(t *testing.T, dc string) {
	t.Helper()
	testenv.KillRedis(t, testenv.RedisCluster(t, dc)[0])
	testenv.Services(t, "up", "rcluster")
}

// killCassandra2 SIGKILLs DC2's Cassandra node and starts it again.
func killCassandra2(t *testing.T) {
	t.Helper()
	dir := os.Getenv("IMD_SERVICES_DIR")
	if dir == "" {
		dir = filepath.Join(os.TempDir(), "imd-services")
	}
	b, err := os.ReadFile(filepath.Join(dir, "cassandra2", "cassandra2.pid"))
	if err != nil {
		t.Fatal(err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		t.Fatalf("cassandra2's pid file: %v", err)
	}
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatalf("kill -9 %d (cassandra2): %v", pid, err)
	}
	for i := 0; i < 200 && syscall.Kill(pid, 0) == nil; i++ {
		time.Sleep(50 * time.Millisecond)
	}
	time.Sleep(2 * time.Second) // DC2 runs on without its store meanwhile
	t.Logf("DC2's Cassandra node back in %s", testenv.Services(t, "up", "cassandra2").Round(time.Second))
}
