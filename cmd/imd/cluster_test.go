package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"syscall"
	"testing"
	"time"

	"github.com/imd-dev/imd/internal/testenv"
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
// other gateway's clients go on being served.
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
	if err := g2.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for sessionsAt(t, lg) != 5 {
		if time.Now().After(deadline) {
			t.Fatalf("sessions %d 10s after the gateway died, want 5", sessionsAt(t, lg))
		}
		time.Sleep(50 * time.Millisecond)
	}
	if !lg.logged("gateway stopped heartbeating; purging its sessions") {
		t.Fatal("the purge was not logged")
	}
	// The other gateway's clients are still served through logic.
	for _, c := range on1 {
		if _, err := c.OfflineCount(context.Background()); err != nil {
			t.Fatalf("a client of the live gateway: %v", err)
		}
	}
}
