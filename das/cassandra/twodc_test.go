package cassandra

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"maps"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	gocql "github.com/apache/cassandra-gocql-driver/v2"

	"github.com/imd-dev/imd/internal/testenv"
)

// The two-DC tests use the loopback world of scripts/services.sh: DC1's
// node (data center dc1) at IMD_TEST_CASSANDRA, DC2's (dc2) at
// IMD_TEST_CASSANDRA_DC2 (default 127.0.0.2:9042), one cluster. Without
// DC2's node they skip, and fail under CI=true.

// hostLog is a gocql observer that records the data center and address
// of the node every statement ran on.
type hostLog struct {
	mu    sync.Mutex
	hosts map[string]int // "dc address" -> statements
}

func (l *hostLog) add(h *gocql.HostInfo) {
	if h == nil {
		return
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.hosts == nil {
		l.hosts = map[string]int{}
	}
	l.hosts[h.DataCenter()+" "+h.ConnectAddress().String()]++
}

func (l *hostLog) ObserveQuery(_ context.Context, q gocql.ObservedQuery) { l.add(q.Host) }
func (l *hostLog) ObserveBatch(_ context.Context, b gocql.ObservedBatch) { l.add(b.Host) }

func (l *hostLog) snapshot() map[string]int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return maps.Clone(l.hosts)
}

// dropKeyspaceOf drops the keyspace of cfg, a Config without defaults.
func dropKeyspaceOf(cfg Config) {
	cfg.observer = nil
	if cfg.setDefaults() == nil {
		dropKeyspace(cfg)
	}
}

// needDC2 returns the contact points of DC1's and DC2's nodes.
func needDC2(t *testing.T) (dc1, dc2 string) {
	t.Helper()
	needCassandra(t)
	return testAddr, testenv.CassandraDC2(t)
}

// TestTwoDCLocalDC: each node answers for its own data center, whichever
// node the driver's policy would pick (the session discovers both); the
// suites' own keyspace is in dc1 only, so DC2's node going away never
// touches it.
func TestTwoDCLocalDC(t *testing.T) {
	a1, a2 := needDC2(t)
	for _, tc := range []struct {
		hosts []string
		want  string
	}{
		{[]string{a1}, "dc1"},
		{[]string{a2}, "dc2"},
		{[]string{a2, a1}, "dc2"},
		{[]string{a1, a2}, "dc1"},
	} {
		for range 4 { // a round-robin pick would show within a few tries
			dc, err := LocalDC(ctx, Config{Hosts: tc.hosts})
			if err != nil || dc != tc.want {
				t.Fatalf("LocalDC(%v) = %q, %v; want %s", tc.hosts, dc, err, tc.want)
			}
		}
	}
	if testCfg.LocalDC != "dc1" {
		t.Fatalf("the suites' keyspace is in data center %q, want dc1", testCfg.LocalDC)
	}
	cfg := testCfg
	if err := cfg.setDefaults(); err != nil {
		t.Fatal(err)
	}
	repl, _, err := keyspaceExists(ctx, cfg, cfg.Logger)
	if err != nil || !maps.Equal(repl, map[string]int{"dc1": 1}) {
		t.Fatalf("replication of the suites' keyspace %s = %v, %v; want dc1:1 only", testCfg.Keyspace, repl, err)
	}
}

// TestTwoDCReplication: a keyspace with replicas in both data centers;
// a store of each DC (LocalDC dc1 through DC1's node, dc2 through DC2's).
// Messages written through DC1's store at LOCAL_QUORUM show up in DC2's
// store within a bounded time (the asynchronous replication between DCs,
// measured), and the DC-aware policy runs every statement of a store on
// its own DC's node.
func TestTwoDCReplication(t *testing.T) {
	a1, a2 := needDC2(t)
	var b [4]byte
	_, _ = rand.Read(b[:])
	ks := "imd_test2dc_" + hex.EncodeToString(b[:])
	cfg1 := Config{Hosts: []string{a1}, Keyspace: ks, LocalDC: "dc1", Timeout: 10 * time.Second, observer: &hostLog{}}
	cfg2 := Config{Hosts: []string{a2}, Keyspace: ks, LocalDC: "dc2", Timeout: 10 * time.Second, observer: &hostLog{}}
	start := time.Now()
	mcfg := cfg1
	mcfg.observer = nil // Migrate asks every node for its schema version
	if err := Migrate(ctx, mcfg, map[string]int{"dc1": 1, "dc2": 1}); err != nil {
		t.Fatalf("migrate %s with dc1:1, dc2:1: %v", ks, err)
	}
	t.Cleanup(func() { dropKeyspaceOf(cfg1) })
	t.Logf("keyspace %s (dc1:1, dc2:1) migrated through DC1 in %v", ks, time.Since(start).Round(time.Millisecond))

	s1 := openTest(t, cfg1)
	if s1.cfg.Consistency != "LOCAL_QUORUM" {
		t.Fatalf("store consistency %s, want LOCAL_QUORUM", s1.cfg.Consistency)
	}
	// DC2's store checks the migrations DC1 recorded: they reach DC2 by
	// the same replication, so opening it may take a few tries.
	var s2 *Store
	for deadline := time.Now().Add(30 * time.Second); s2 == nil; {
		s, err := Open(ctx, cfg2)
		switch {
		case err == nil:
			s2 = s
			t.Cleanup(func() { _ = s.Close() })
		case errors.Is(err, ErrSchema) && time.Now().Before(deadline):
			time.Sleep(50 * time.Millisecond)
		default:
			t.Fatalf("open DC2's store: %v", err)
		}
	}

	const n = 20
	from, to := newUser(), newUser()
	rcpt := term(to, 101)
	var delays []time.Duration
	for i := range n {
		m := newMsg(msgidAround(time.Now()), from, to, fmt.Sprint("dc-", i))
		mustPut(t, s1, m, 101)
		written := time.Now()
		for {
			msgs, _, err := s2.InboxPage(ctx, rcpt, m.Msgid-1, 10)
			if err != nil {
				t.Fatalf("DC2 InboxPage: %v", err)
			}
			if len(msgs) > 0 && msgs[0].Msgid == m.Msgid {
				if string(msgs[0].Content) != string(m.Content) {
					t.Fatalf("DC2 read %q, DC1 wrote %q", msgs[0].Content, m.Content)
				}
				break
			}
			if time.Since(written) > 10*time.Second {
				t.Fatalf("message %d written in DC1 not in DC2 after 10s", i)
			}
			time.Sleep(time.Millisecond)
		}
		delays = append(delays, time.Since(written))
	}
	slices.Sort(delays)
	t.Logf("DC1 -> DC2 replication of %d messages, written at LOCAL_QUORUM in DC1 until read at LOCAL_QUORUM in DC2 (1 ms polls): min %v, median %v, max %v",
		n, delays[0].Round(10*time.Microsecond), delays[n/2].Round(10*time.Microsecond), delays[n-1].Round(10*time.Microsecond))
	all, _, err := s2.History(ctx, from, &to, 0, 100)
	if err != nil || len(all) != n {
		t.Fatalf("DC2 history of the sender: %d messages, %v; want %d", len(all), err, n)
	}

	for _, st := range []struct {
		s    *Store
		dc   string
		addr string
	}{{s1, "dc1", a1}, {s2, "dc2", a2}} {
		hosts := st.s.cfg.observer.(*hostLog).snapshot()
		want := st.dc + " " + strings.Split(st.addr, ":")[0]
		if len(hosts) != 1 || hosts[want] == 0 {
			t.Fatalf("statements of %s's store ran on %v; want only %s", st.dc, hosts, want)
		}
		t.Logf("%s's store: %d statements, all on %s", st.dc, hosts[want], want)
	}
}

// TestFaultDC2Down stops DC2's node and checks that the single-DC suites'
// work goes on in dc1: a new keyspace (dc1:1), a store on it, a message
// stored and read; only TRUNCATE (the suites' reset between tests), which
// Cassandra runs with every node up only, fails, and says why. Then it
// starts the node again. It restarts a shared server, so it runs only
// with IMD_TEST_CASSANDRA_FAULT=1.
func TestFaultDC2Down(t *testing.T) {
	if os.Getenv("IMD_TEST_CASSANDRA_FAULT") != "1" {
		t.Skip("set IMD_TEST_CASSANDRA_FAULT=1 to run (it stops and restarts DC2's Cassandra node of scripts/services.sh)")
	}
	a1, _ := needDC2(t)
	down := testenv.Services(t, "down", "cassandra2")
	t.Cleanup(func() {
		up := testenv.Services(t, "up", "cassandra2")
		t.Logf("cassandra2 down in %v, up again in %v", down.Round(time.Millisecond), up.Round(time.Millisecond))
	})
	var b [4]byte
	_, _ = rand.Read(b[:])
	cfg := Config{Hosts: []string{a1}, Keyspace: "imd_test_dc2down_" + hex.EncodeToString(b[:]), Timeout: 10 * time.Second}
	dc, err := LocalDC(ctx, cfg)
	if err != nil || dc != "dc1" {
		t.Fatalf("LocalDC with DC2 down = %q, %v", dc, err)
	}
	cfg.LocalDC = dc
	start := time.Now()
	if err := Migrate(ctx, cfg, map[string]int{dc: 1}); err != nil {
		t.Fatalf("migrate a dc1 keyspace with DC2 down: %v", err)
	}
	t.Cleanup(func() { dropKeyspaceOf(cfg) })
	t.Logf("keyspace %s migrated with DC2 down in %v", cfg.Keyspace, time.Since(start).Round(time.Millisecond))
	s := openTest(t, cfg)
	a, bu := newUser(), newUser()
	m := newMsg(msgidAround(time.Now()), a, bu, "dc2-down")
	mustPut(t, s, m, 101)
	wantIDs(t, "inbox with DC2 down", page(t, s, term(bu, 101), 0, 10), m.Msgid)
	if err := TruncateAll(ctx, cfg); err == nil || !strings.Contains(err.Error(), "every node") {
		t.Fatalf("TruncateAll with DC2 down = %v; want an error saying that TRUNCATE needs every node", err)
	}
}
