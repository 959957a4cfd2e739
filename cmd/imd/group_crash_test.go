package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
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
	"github.com/imd-dev/imd/schema/pb"
	"github.com/imd-dev/imd/sdk"
)

// The group crash tests run the server as child processes, kill one of
// them with SIGKILL while members of a group send to it, and then count,
// the way internal/platform's TestGroupSoak does: every terminal shows
// seqs 1..head exactly once and in order, every terminal shows the same
// message at the same seq, and every send that was answered is there at
// the seq its answer gave. A send that failed because of the kill is
// retried with the same client message id, so the group holds each send
// exactly once and its head is the number of sends plus the CREATED
// message at seq 1.

// freeAddr returns a loopback address nothing listens on now, so that a
// restarted process can be given the address its predecessor had.
func freeAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// httpJSON calls the HTTP API at addr with the API key and decodes a JSON
// answer into out. It returns the status code.
func httpJSON(t *testing.T, addr, method, path, key string, body, out any) int {
	t.Helper()
	var rd io.Reader
	if body != nil {
		raw, err := json.Marshal(body)
		if err != nil {
			t.Fatal(err)
		}
		rd = bytes.NewReader(raw)
	}
	req, err := http.NewRequest(method, "http://"+addr+path, rd)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer "+key)
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	raw, _ := io.ReadAll(resp.Body)
	if resp.StatusCode == 200 && out != nil {
		if err := json.Unmarshal(raw, out); err != nil {
			t.Fatalf("%s %s: %v in %q", method, path, err, raw)
		}
	}
	if resp.StatusCode != 200 {
		t.Logf("%s %s: HTTP %d %s", method, path, resp.StatusCode, raw)
	}
	return resp.StatusCode
}

// createGroup creates group id with members uids (account 1) and checks
// that its CREATED message has seq 1.
func createGroup(t *testing.T, httpAddr, key string, id uint64, uids []uint64) {
	t.Helper()
	ms := make([]map[string]any, 0, len(uids))
	for _, u := range uids {
		ms = append(ms, map[string]any{"account": 1, "uid": u})
	}
	var res struct {
		Seq uint64 `json:"seq"`
	}
	if code := httpJSON(t, httpAddr, "POST", "/v1/groups", key, map[string]any{"group_id": strconv.FormatUint(id, 10), "members": ms}, &res); code != 200 || res.Seq != 1 {
		t.Fatalf("create group %d: HTTP %d, seq %d", id, code, res.Seq)
	}
}

// groupHead reads the newest seq of group id.
func groupHead(t *testing.T, httpAddr, key string, id uint64) uint64 {
	t.Helper()
	var info struct {
		Head uint64 `json:"head"`
	}
	if code := httpJSON(t, httpAddr, "GET", fmt.Sprintf("/v1/groups/%d", id), key, nil, &info); code != 200 {
		t.Fatalf("group %d: HTTP %d", id, code)
	}
	return info.Head
}

// crashTerm is one member terminal: what it was shown of the group, in
// order, its state file (which outlives its clients) and its current
// client.
type crashTerm struct {
	uid     uint64
	appcode uint32
	state   string
	mu      sync.Mutex
	shown   []*pb.C2CMessage
	c2c     []*pb.C2CMessage // one-to-one messages shown
	s2c     []*pb.S2CNotify  // pushes shown
	c       *sdk.Client
}

func (tm *crashTerm) onC2C(m *pb.C2CMessage) {
	tm.mu.Lock()
	tm.c2c = append(tm.c2c, m)
	tm.mu.Unlock()
}

func (tm *crashTerm) onS2C(n *pb.S2CNotify) {
	tm.mu.Lock()
	tm.s2c = append(tm.s2c, n)
	tm.mu.Unlock()
}

func (tm *crashTerm) on(m *pb.C2CMessage) {
	tm.mu.Lock()
	tm.shown = append(tm.shown, m)
	tm.mu.Unlock()
}

// last is the seq of the last message shown (0: none).
func (tm *crashTerm) last() uint64 {
	tm.mu.Lock()
	defer tm.mu.Unlock()
	if len(tm.shown) == 0 {
		return 0
	}
	return tm.shown[len(tm.shown)-1].Seq
}

func (tm *crashTerm) client() *sdk.Client {
	tm.mu.Lock()
	defer tm.mu.Unlock()
	return tm.c
}

// dial logs tm in at addr on a new client over its kept state. The token
// stays valid across restarts: the secret that signs it is in the config
// or the data directory, not in the process.
func (tm *crashTerm) dial(ctx context.Context, t *testing.T, addr, token string) error {
	return tm.dialAt(ctx, t, []string{addr}, token)
}

// dialAt is dial with a list of gateways to rotate through.
func (tm *crashTerm) dialAt(ctx context.Context, t *testing.T, addrs []string, token string) error {
	st, err := sdk.FileState(tm.state, 1<<16)
	if err != nil {
		return err
	}
	c, err := sdk.Dial(ctx, sdk.Options{
		Addrs: addrs, OnGroup: tm.on, OnC2C: tm.onC2C, OnS2C: tm.onS2C, State: st, PageSize: 50,
		DeviceID:   fmt.Sprintf("crash-%d-%d", tm.uid, tm.appcode),
		BackoffMin: 20 * time.Millisecond, BackoffMax: 200 * time.Millisecond,
		// One try per SendGroupWithID: the test retries failed sends
		// itself, with the same client message id, and counts them.
		SendAttempts: 1, RequestTimeout: 5 * time.Second,
	})
	if err != nil {
		return err
	}
	t.Cleanup(func() { _ = c.Close() })
	for attempt := 0; ; attempt++ {
		lctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		_, err = c.Login(lctx, sdk.Credentials{AppCode: tm.appcode, UID: tm.uid, Token: token})
		cancel()
		if err == nil || attempt == 10 || ctx.Err() != nil {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	if err != nil {
		_ = c.Close()
		return fmt.Errorf("login %d/%d: %w", tm.appcode, tm.uid, err)
	}
	tm.mu.Lock()
	tm.c = c
	tm.mu.Unlock()
	return nil
}

// answeredSend is a group send the platform answered.
type answeredSend struct {
	seq, msgid uint64
	content    string
}

// groupSenders sends perSender messages from each sender terminal at once
// and keeps every answer.
type groupSenders struct {
	prefix   string // of every content and client message id: one per round of sends
	mu       sync.Mutex
	sent     []answeredSend
	answered atomic.Int64 // sends answered
	failed   atomic.Int64 // tries that failed and were retried
	retried  atomic.Int64 // sends answered after at least one failed try
	dups     atomic.Int64 // answers that said the message was stored before
	wg       sync.WaitGroup
}

// run starts the senders. A send whose try fails with an error that may
// pass (the server died, the link moved) is tried again with the same
// client message id until ctx ends; one that cannot pass fails the test.
func (gs *groupSenders) run(ctx context.Context, t *testing.T, senders []*crashTerm, group uint64, perSender int) {
	for _, tm := range senders {
		gs.wg.Add(1)
		go func() {
			defer gs.wg.Done()
			for i := range perSender {
				content := fmt.Sprintf("%su%d-%05d", gs.prefix, tm.uid, i)
				cmid := fmt.Sprintf("crash-%s%d-%d-%05d", gs.prefix, group, tm.uid, i)
				for try := 0; ; try++ {
					resp, err := tm.client().SendGroupWithID(ctx, group, 0, cmid, []byte(content))
					if err == nil {
						if try > 0 {
							gs.retried.Add(1)
						}
						if resp.Duplicate {
							gs.dups.Add(1)
						}
						gs.mu.Lock()
						gs.sent = append(gs.sent, answeredSend{seq: resp.Seq, msgid: resp.Msgid, content: content})
						gs.mu.Unlock()
						gs.answered.Add(1)
						break
					}
					if ctx.Err() != nil {
						t.Errorf("send %s: still failing when the time ran out: %v", content, err)
						return
					}
					if !sdk.IsRetryable(err) && !errors.Is(err, sdk.ErrSendFailed) {
						t.Errorf("send %s: %v", content, err)
						return
					}
					gs.failed.Add(1)
					time.Sleep(20 * time.Millisecond)
				}
			}
		}()
	}
}

// waitFor polls cond every 20ms until it holds or d has passed.
func waitFor(d time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(20 * time.Millisecond)
	}
	return true
}

// checkGroupCounts waits until every terminal was shown the group up to
// head and then counts: seqs 1..head once each and in order on every
// terminal, one msgid per seq over all terminals, every answered send at
// its seq, each send stored once (the head is one CREATED message plus
// total sends).
func checkGroupCounts(t *testing.T, terms []*crashTerm, group, head uint64, sent []answeredSend, total int) {
	t.Helper()
	for _, tm := range terms {
		if !waitFor(30*time.Second, func() bool { return tm.last() >= head }) {
			break // the count below says what is missing
		}
	}
	time.Sleep(300 * time.Millisecond) // let duplicates, if any, show up
	bySeq := map[uint64]*pb.C2CMessage{}
	for _, tm := range terms {
		tm.mu.Lock()
		shown := slices.Clone(tm.shown)
		tm.mu.Unlock()
		for i, m := range shown {
			if m.GroupId != group || m.Seq != uint64(i)+1 {
				var seqs []uint64
				for _, m := range shown[max(0, i-5):min(len(shown), i+5)] {
					seqs = append(seqs, m.Seq)
				}
				t.Fatalf("uid %d appcode %d: message %d of group %d has seq %d, want %d (a gap, a copy or a reorder; seqs around it %v)",
					tm.uid, tm.appcode, i, m.GroupId, m.Seq, i+1, seqs)
			}
			if o := bySeq[m.Seq]; o == nil {
				bySeq[m.Seq] = m
			} else if o.Msgid != m.Msgid {
				t.Fatalf("seq %d: msgid %d on one terminal, %d on another", m.Seq, o.Msgid, m.Msgid)
			}
		}
		if uint64(len(shown)) != head {
			t.Fatalf("uid %d appcode %d: shown seqs 1..%d, want 1..%d", tm.uid, tm.appcode, len(shown), head)
		}
	}
	if first := bySeq[1]; first == nil || first.Event == nil {
		t.Fatalf("seq 1 is %v, want the CREATED event", first)
	}
	if len(sent) != total {
		t.Fatalf("%d sends answered, want %d", len(sent), total)
	}
	stored := map[string]uint64{} // content -> seq
	for s := uint64(2); s <= head; s++ {
		m := bySeq[s]
		if m.Event != nil {
			t.Fatalf("seq %d is an event %v; only CREATED was expected", s, m.Event)
		}
		if prev, ok := stored[string(m.Content)]; ok {
			t.Fatalf("%q stored twice, at seqs %d and %d: a retry with the same client message id was stored again", m.Content, prev, s)
		}
		stored[string(m.Content)] = s
	}
	for _, s := range sent {
		m := bySeq[s.seq]
		if m == nil || m.Msgid != s.msgid || string(m.Content) != s.content {
			t.Fatalf("the send of %q was answered seq %d msgid %d; the terminals show %v there", s.content, s.seq, s.msgid, m)
		}
	}
	if head != uint64(total)+1 {
		t.Fatalf("head %d, want %d: the CREATED message and %d sends, each once", head, total+1, total)
	}
}

// TestGroupCrashKeepsOrder: `imd all` (embedded store) is killed with
// SIGKILL while ten members of a 20-member group send to it at once, and
// restarted on the same data directory and the same ports. The members'
// terminals (two each) reconnect on their own, except a few that are
// closed during the outage and come back as new clients over their state
// files; senders retry the sends the kill cut with the same client
// message id. Counted at the end: every terminal shows seqs 1..head once
// each in order with the same msgid at each seq, and every answered send
// is at its seq.
func TestGroupCrashKeepsOrder(t *testing.T) {
	const (
		group     = 4242
		members   = 20
		senders   = 10
		perSender = 30
	)
	dir := t.TempDir()
	stateDir := t.TempDir()
	addrs := []string{"--gateway-addr", freeAddr(t), "--web-addr", "127.0.0.1:0", "--http-addr", freeAddr(t)}
	p := startImdIn(t, dir, 0, addrs...)
	code, out, errOut := runCmd("token", "--api-key", "--data-dir", dir, "--appcode", "101")
	if code != 0 {
		t.Fatalf("imd token --api-key: %s", errOut)
	}
	key := strings.TrimSpace(out)
	gw := p.gateway
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()

	var uids []uint64
	for i := range members {
		uids = append(uids, uint64(3000+i))
	}
	createGroup(t, p.http, key, group, uids)
	tokens := map[*crashTerm]string{}
	var terms []*crashTerm
	var sending []*crashTerm
	for i, u := range uids {
		for _, app := range []uint32{101, 102} {
			tm := &crashTerm{uid: u, appcode: app, state: filepath.Join(stateDir, fmt.Sprintf("%d-%d.state", u, app))}
			tokens[tm] = p.token(t, app, u)
			if err := tm.dial(ctx, t, gw, tokens[tm]); err != nil {
				t.Fatal(err)
			}
			terms = append(terms, tm)
			if app == 101 && i < senders {
				sending = append(sending, tm)
			}
		}
	}

	var gs groupSenders
	total := senders * perSender
	gs.run(ctx, t, sending, group, perSender)
	if !waitFor(60*time.Second, func() bool { return gs.answered.Load() >= int64(total/3) }) {
		t.Fatalf("%d of %d sends answered within 60s", gs.answered.Load(), total)
	}
	if err := p.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	<-p.exited
	atKill := gs.answered.Load()
	// While the server is down, the 102 terminals of the members who do
	// not send close; they come back after the restart as new clients
	// over their state files, which must neither show again what was shown
	// nor skip anything.
	var closed []*crashTerm
	var cwg sync.WaitGroup
	for _, tm := range terms {
		if tm.appcode == 102 && tm.uid >= uids[senders] && tm.uid%2 == 0 {
			closed = append(closed, tm)
			cwg.Add(1)
			go func() { defer cwg.Done(); _ = tm.client().Close() }()
		}
	}
	cwg.Wait()
	p2 := startImdIn(t, dir, 0, addrs...)
	if p2.gateway != gw {
		t.Fatalf("the restarted imd listens at %s, not %s", p2.gateway, gw)
	}
	for _, tm := range closed {
		if err := tm.dial(ctx, t, gw, tokens[tm]); err != nil {
			t.Fatal(err)
		}
	}
	gs.wg.Wait()
	if t.Failed() {
		t.FailNow()
	}
	head := groupHead(t, p2.http, key, group)
	checkGroupCounts(t, terms, group, head, gs.sent, total)
	t.Logf("%d sends, %d answered before SIGKILL; %d tries failed and were retried, %d sends answered after a retry (%d as duplicates); %d terminals (%d came back as new clients) show seqs 1..%d",
		total, atKill, gs.failed.Load(), gs.retried.Load(), gs.dups.Load(), len(terms), len(closed), head)
}

// needCassandra returns the address of the test Cassandra
// (IMD_TEST_CASSANDRA, else 127.0.0.1:9042) once it accepts a connection:
// without one the test fails under CI=true, as internal/testenv does for
// Redis, and skips otherwise.
func needCassandra(t *testing.T) string {
	t.Helper()
	addr := os.Getenv("IMD_TEST_CASSANDRA")
	if addr == "" {
		addr = "127.0.0.1:9042"
	}
	c, err := net.DialTimeout("tcp", addr, 2*time.Second)
	if err == nil {
		_ = c.Close()
		return addr
	}
	if os.Getenv("CI") == "true" {
		t.Fatalf("CI=true and no Cassandra at %s (IMD_TEST_CASSANDRA): %v", addr, err)
	}
	t.Skipf("no Cassandra at %s (%v): run `scripts/services.sh up cassandra` (or set IMD_TEST_CASSANDRA)", addr, err)
	return ""
}

// TestGroupLogicNodeKilled: the many-process shape (two `imd logic` nodes
// on the test Cassandra, in a keyspace `imd migrate` creates for the test,
// and one `imd gateway`, all finding each other through Redis). Members of
// a group created through one logic node's HTTP API are online through the
// gateway and send at once; one logic node is killed with SIGKILL midway.
// The gateway moves its links to the other node, sends cut by the kill are
// retried with the same client message id, and the same count as in
// TestGroupCrashKeepsOrder holds at the end.
func TestGroupLogicNodeKilled(t *testing.T) {
	const (
		group     = 4343
		members   = 20
		senders   = 10
		perSender = 20
	)
	redis := testenv.Redis(t)
	cass := needCassandra(t)

	// A keyspace of its own, migrated by `imd migrate`, dropped at the end.
	var b [4]byte
	_, _ = rand.Read(b[:])
	ks := "imd_grpcrash_" + hex.EncodeToString(b[:])
	cc := cassandra.Config{Hosts: []string{cass}, Keyspace: ks, Timeout: 10 * time.Second}
	mctx, mcancel := context.WithTimeout(context.Background(), time.Minute)
	dc, err := cassandra.LocalDC(mctx, cc)
	mcancel()
	if err != nil {
		t.Fatalf("Cassandra at %s: %v", cass, err)
	}
	began := time.Now()
	if code, _, errOut := runCmd("migrate", "--cassandra-hosts", cass, "--cassandra-keyspace", ks, "--replication", dc+":1", "--log-level", "warn"); code != 0 {
		t.Fatalf("imd migrate: exit %d: %s", code, errOut)
	}
	t.Logf("keyspace %s migrated in %s", ks, time.Since(began).Round(time.Millisecond))
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if err := cassandra.DropKeyspace(ctx, cc); err != nil {
			t.Logf("drop keyspace %s: %v", ks, err)
		}
	})

	// Both logic nodes verify the same tokens and API key: the apps come
	// from one config file, not from secrets generated per data directory.
	const key = "group-crash-api-key-0123456789"
	secret := "group-crash-secret-" + hex.EncodeToString(b[:])
	cfg := filepath.Join(t.TempDir(), "imd.yaml")
	yaml := fmt.Sprintf("apps:\n"+
		"  - {appcode: 101, name: a, account: 1, secrets: [%q], api_keys: [%q]}\n"+
		"  - {appcode: 102, name: b, account: 1, secrets: [%q]}\n", secret, key, secret)
	if err := os.WriteFile(cfg, []byte(yaml), 0o600); err != nil {
		t.Fatal(err)
	}
	cluster := []string{"--redis-addrs", redis, "--redis-prefix", "imdtest:" + hex.EncodeToString(b[:]) + ":",
		"--heartbeat", "100ms", "--node-ttl", "1s", "--rpc-secret", "test-cluster-secret-0123"}
	logicArgs := append([]string{"--config", cfg, "--store", "cassandra", "--cassandra-hosts", cass, "--cassandra-keyspace", ks, "--cassandra-dc", dc}, cluster...)
	lg1 := startRole(t, "logic", t.TempDir(), 0, logicArgs...)
	lg2 := startRole(t, "logic", t.TempDir(), 0, logicArgs...)
	gwp := startRole(t, "gateway", t.TempDir(), 0, cluster...)
	// The gateway links to both logic nodes before anyone logs in, so that
	// the logins and sends are spread over both.
	linked := func(addr string) bool {
		for _, l := range gwp.log() {
			if l["msg"] == "logic link open" && l["addr"] == addr {
				return true
			}
		}
		return false
	}
	if !waitFor(10*time.Second, func() bool { return linked(lg1.rpc) && linked(lg2.rpc) }) {
		t.Fatalf("the gateway did not link to both logic nodes (%s, %s) within 10s", lg1.rpc, lg2.rpc)
	}
	token := func(app uint32, uid uint64) string {
		code, out, errOut := runCmd("token", "--config", cfg, "--appcode", fmt.Sprint(app), "--uid", fmt.Sprint(uid))
		if code != 0 {
			t.Fatalf("imd token: %s", errOut)
		}
		return strings.TrimSpace(out)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()

	var uids []uint64
	for i := range members {
		uids = append(uids, uint64(4000+i))
	}
	createGroup(t, lg1.http, key, group, uids)
	stateDir := t.TempDir()
	var terms, sending []*crashTerm
	for i, u := range uids {
		for _, app := range []uint32{101, 102} {
			tm := &crashTerm{uid: u, appcode: app, state: filepath.Join(stateDir, fmt.Sprintf("%d-%d.state", u, app))}
			if err := tm.dial(ctx, t, gwp.gateway, token(app, u)); err != nil {
				t.Fatal(err)
			}
			terms = append(terms, tm)
			if app == 101 && i < senders {
				sending = append(sending, tm)
			}
		}
	}

	var gs groupSenders
	total := senders * perSender
	gs.run(ctx, t, sending, group, perSender)
	if !waitFor(60*time.Second, func() bool { return gs.answered.Load() >= int64(total/3) }) {
		t.Fatalf("%d of %d sends answered within 60s", gs.answered.Load(), total)
	}
	if err := lg1.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	<-lg1.exited
	atKill := gs.answered.Load()
	gs.wg.Wait()
	moved := false
	for _, l := range gwp.log() {
		if l["msg"] == "logic link closed; redialling" && l["addr"] == lg1.rpc {
			moved = true
		}
	}
	if !moved {
		t.Errorf("the gateway did not log the loss of its link to %s", lg1.rpc)
	}
	if t.Failed() {
		t.FailNow()
	}
	head := groupHead(t, lg2.http, key, group)
	checkGroupCounts(t, terms, group, head, gs.sent, total)
	t.Logf("%d sends, %d answered before logic node %s was killed; %d tries failed and were retried, %d sends answered after a retry (%d as duplicates); %d terminals show seqs 1..%d",
		total, atKill, lg1.rpc, gs.failed.Load(), gs.retried.Load(), gs.dups.Load(), len(terms), head)
}
