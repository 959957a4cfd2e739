package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/imd-dev/imd/internal/testenv"
	"github.com/imd-dev/imd/schema/pb"
	"github.com/imd-dev/imd/sdk"
)

// sessionsAt reads the router's session count from a logic node's /readyz.
func sessionsAt(t *testing.T, p *proc) int {
	t.Helper()
	code, body, err := p.get("/readyz")
	if err != nil || code != 200 {
		t.Fatalf("/readyz: %d %v %s", code, err, body)
	}
	var r struct{ Sessions int }
	if err := json.Unmarshal([]byte(body), &r); err != nil {
		t.Fatal(err)
	}
	return r.Sessions
}

// TestGatewayCrashPurgesSessions: `imd logic` and two `imd gateway`
// processes find each other through Redis; clients log in on both
// gateways; one gateway is killed with SIGKILL (no drain, no goodbye), and
// the logic node purges its sessions once its heartbeat lapses, while the
// other gateway's clients go on being served, and a client that follows
// the dead gateway's users gets exactly one offline change for each.
func TestGatewayCrashPurgesSessions(t *testing.T) {
	redis := testenv.Redis(t)
	var b [4]byte
	_, _ = rand.Read(b[:])
	cluster := []string{"--redis-addrs", redis, "--redis-prefix", "imdtest:" + hex.EncodeToString(b[:]) + ":", "--heartbeat", "100ms", "--node-ttl", "1s", "--rpc-secret", "test-cluster-secret-0123"}
	lg := startRole(t, "logic", t.TempDir(), 0, cluster...)
	g1 := startRole(t, "gateway", t.TempDir(), 0, cluster...)
	g2 := startRole(t, "gateway", t.TempDir(), 0, cluster...)
	for _, g := range []*proc{g1, g2} {
		if code, body, err := g.get("/readyz"); err != nil || code != 200 {
			t.Fatalf("gateway /readyz: %d %v %s", code, err, body)
		}
	}
	login := func(g *proc, uid uint64) *sdk.Client {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		c, err := sdk.Dial(ctx, sdk.Options{Addrs: []string{g.gateway}, NoReconnect: true})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = c.Close() })
		if _, err := c.Login(ctx, sdk.Credentials{AppCode: 101, UID: uid, Token: lg.token(t, 101, uid)}); err != nil {
			t.Fatalf("login uid %d: %v", uid, err)
		}
		return c
	}
	var on1 []*sdk.Client
	for uid := uint64(1); uid <= 5; uid++ {
		on1 = append(on1, login(g1, uid))
		login(g2, 100+uid)
	}
	if n := sessionsAt(t, lg); n != 10 {
		t.Fatalf("sessions %d, want 10", n)
	}
	// uid 1 follows the five users of the gateway that will die.
	var pmu sync.Mutex
	changes := map[uint64][]bool{}
	fctx, fcancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer fcancel()
	fan, err := sdk.Dial(fctx, sdk.Options{Addrs: []string{g1.gateway}, NoReconnect: true, OnPresence: func(n *pb.PresenceNotify) {
		pmu.Lock()
		changes[n.User.GetUid()] = append(changes[n.User.GetUid()], n.Online)
		pmu.Unlock()
	}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = fan.Close() })
	if _, err := fan.Login(fctx, sdk.Credentials{AppCode: 102, UID: 1, Token: lg.token(t, 102, 1)}); err != nil {
		t.Fatal(err)
	}
	var followed []*pb.User
	for uid := uint64(101); uid <= 105; uid++ {
		followed = append(followed, &pb.User{Account: 1, Uid: uid})
	}
	st, err := fan.Follow(fctx, followed)
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range st.States {
		if !s.Online {
			t.Fatalf("followed user %d is offline before the crash", s.User.GetUid())
		}
	}
	if err := g2.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for sessionsAt(t, lg) != 6 { // five clients and the follower on the live gateway
		if time.Now().After(deadline) {
			t.Fatalf("sessions %d 10s after the gateway died, want 6", sessionsAt(t, lg))
		}
		time.Sleep(50 * time.Millisecond)
	}
	if !lg.logged("gateway stopped heartbeating; purging its sessions") {
		t.Fatal("the purge was not logged")
	}
	deadline = time.Now().Add(5 * time.Second)
	for {
		pmu.Lock()
		n := 0
		for _, c := range changes {
			n += len(c)
		}
		pmu.Unlock()
		if n >= 5 || time.Now().After(deadline) {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	time.Sleep(300 * time.Millisecond) // a second offline, if any, shows up
	pmu.Lock()
	for uid := uint64(101); uid <= 105; uid++ {
		if got := changes[uid]; len(got) != 1 || got[0] {
			t.Errorf("followed user %d: changes %v after its gateway died, want exactly one offline", uid, got)
		}
	}
	pmu.Unlock()
	// The other gateway's clients are still served through logic.
	for _, c := range on1 {
		if _, err := c.OfflineCount(context.Background()); err != nil {
			t.Fatalf("a client of the live gateway: %v", err)
		}
	}
}
