package router_test

import (
	"context"
	"fmt"
	"maps"
	"math/rand/v2"
	"os"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/redis/rueidis"

	"github.com/imd-dev/imd/internal/testenv"
	"github.com/imd-dev/imd/router"
)

// IMD_TEST_REDIS_MODE=cluster runs this package's Redis tests (the
// conformance suite among them) on DC1's Redis Cluster of
// scripts/services.sh (testenv.RedisCluster) instead of the single Redis.
// The tests below run on the clusters whatever the mode.
var testRedisMode = os.Getenv("IMD_TEST_REDIS_MODE")

// testRedisAddrs returns the seeds of the Redis that newTestRedis uses.
func testRedisAddrs(tb testing.TB) []string {
	tb.Helper()
	if testRedisMode == "cluster" {
		return testenv.RedisCluster(tb, "dc1")
	}
	return []string{testenv.Redis(tb)}
}

// skipOnCluster skips a test whose set-up a Redis Cluster defeats.
func skipOnCluster(t *testing.T, why string) {
	t.Helper()
	if testRedisMode == "cluster" {
		t.Skipf("not on a Redis Cluster: %s", why)
	}
}

// newClusterRedis is newTestRedis on the Redis Cluster of dc.
func newClusterRedis(tb testing.TB, dc string) (*router.Redis, rueidis.Client, string) {
	tb.Helper()
	addrs := testenv.RedisCluster(tb, dc)
	prefix := fmt.Sprintf("imdtest:%016x:", rand.Uint64())
	r, err := router.NewRedis(router.RedisOptions{Addrs: addrs, Prefix: prefix, DialTimeout: 2 * time.Second})
	if err != nil {
		tb.Fatalf("router on the Redis Cluster at %v: %v", addrs, err)
	}
	raw, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: addrs, DisableCache: true})
	if err != nil {
		r.Close()
		tb.Fatalf("raw client: %v", err)
	}
	if raw.Mode() != rueidis.ClientModeCluster {
		tb.Fatalf("the Redis at %v is not a cluster", addrs)
	}
	tb.Cleanup(func() {
		r.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		keys := prefixKeys(tb, raw, prefix)
		cmds := make(rueidis.Commands, len(keys))
		for i, k := range keys {
			cmds[i] = raw.B().Unlink().Key(k).Build()
		}
		for _, res := range raw.DoMulti(ctx, cmds...) {
			_ = res.Error() // a master restarted by the test may have lost them already
		}
		raw.Close()
	})
	return r, raw, prefix
}

// keySlot asks the cluster for the hash slot of key.
func keySlot(t *testing.T, raw rueidis.Client, key string) int64 {
	t.Helper()
	n, err := raw.Do(t.Context(), raw.B().ClusterKeyslot().Key(key).Build()).AsInt64()
	if err != nil {
		t.Fatalf("CLUSTER KEYSLOT %s: %v", key, err)
	}
	return n
}

// slotMasters maps each hash slot to the address of its master.
func slotMasters(t *testing.T, raw rueidis.Client) [16384]string {
	t.Helper()
	var out [16384]string
	ranges, err := raw.Do(t.Context(), raw.B().ClusterSlots().Build()).ToArray()
	if err != nil {
		t.Fatalf("CLUSTER SLOTS: %v", err)
	}
	for _, r := range ranges {
		f, err := r.ToArray()
		if err != nil || len(f) < 3 {
			t.Fatalf("CLUSTER SLOTS entry %v: %v", r, err)
		}
		lo, _ := f[0].AsInt64()
		hi, _ := f[1].AsInt64()
		node, _ := f[2].ToArray()
		host, _ := node[0].ToString()
		port, _ := node[1].AsInt64()
		for s := lo; s <= hi; s++ {
			out[s] = host + ":" + strconv.FormatInt(port, 10)
		}
	}
	return out
}

// TestRedisClusterUserSlot: every key of a user (sessions, presence
// version, followers, the follow lists of its sessions) hashes to one slot,
// the slot of the user's hash tag, so the per-user scripts run on one
// master; users spread over every master.
func TestRedisClusterUserSlot(t *testing.T) {
	r, raw, p := newClusterRedis(t, "dc1")
	ctx := t.Context()
	masters := slotMasters(t, raw)
	seen := map[string]int{}
	for uid := range uint64(60) {
		s := mkSession(1, uid, "gw-1", uid, 100+uid)
		mustRegister(t, r, s, 1)
		other := router.User{Account: 7, UID: uid + 1000}
		if err := r.Follow(ctx, s, []router.User{other}); err != nil {
			t.Fatalf("Follow: %v", err)
		}
		tag := fmt.Sprintf("{7:%d}", uid)
		want := keySlot(t, raw, tag)
		var keys []string
		for _, k := range prefixKeys(t, raw, p) {
			if strings.Contains(k, tag) {
				keys = append(keys, k)
			}
		}
		if len(keys) < 3 {
			t.Fatalf("user %d has keys %v; want its sessions, version and follow list", uid, keys)
		}
		for _, k := range keys {
			if got := keySlot(t, raw, k); got != want {
				t.Fatalf("key %s is in slot %d, the user's tag %s in %d", k, got, tag, want)
			}
		}
		seen[masters[want]]++
		if ss, err := r.Lookup(ctx, s.User()); err != nil || len(ss) != 1 {
			t.Fatalf("Lookup = %+v, %v", ss, err)
		}
		if err := r.Unfollow(ctx, s); err != nil {
			t.Fatalf("Unfollow: %v", err)
		}
	}
	if len(seen) != len(testenv.RedisCluster(t, "dc1")) {
		t.Fatalf("60 users landed on %d masters: %v", len(seen), seen)
	}
	if n, err := r.PurgeGate(ctx, "gw-1"); err != nil || n != 60 {
		t.Fatalf("PurgeGate across masters = %d, %v; want 60", n, err)
	}
}

// TestRedisClusterDCsApart: the Redis Clusters of the two loopback DCs
// are two clusters (same ports, other address), not one that mixed up
// nodes of both: each knows only its own masters, and a key written in
// one is not in the other.
func TestRedisClusterDCsApart(t *testing.T) {
	_, raw1, p := newClusterRedis(t, "dc1")
	_, raw2, _ := newClusterRedis(t, "dc2")
	ctx := t.Context()
	for dc, raw := range map[string]rueidis.Client{"dc1": raw1, "dc2": raw2} {
		host := strings.Split(testenv.RedisCluster(t, dc)[0], ":")[0]
		for addr, n := range raw.Nodes() {
			nodes, err := n.Do(ctx, n.B().ClusterNodes().Build()).ToString()
			if err != nil {
				t.Fatalf("CLUSTER NODES of %s: %v", addr, err)
			}
			for line := range strings.Lines(nodes) {
				if f := strings.Fields(line); len(f) > 1 && !strings.HasPrefix(f[1], host+":") {
					t.Fatalf("%s node %s knows a node of the other DC: %s", dc, addr, line)
				}
			}
		}
	}
	key := p + "apart"
	if err := raw1.Do(ctx, raw1.B().Set().Key(key).Value("dc1").Build()).Error(); err != nil {
		t.Fatal(err)
	}
	if n, err := raw2.Do(ctx, raw2.B().Exists().Key(key).Build()).AsInt64(); err != nil || n != 0 {
		t.Fatalf("EXISTS in dc2 of a key of dc1 = %d, %v", n, err)
	}
	if err := raw1.Do(ctx, raw1.B().Del().Key(key).Build()).Error(); err != nil {
		t.Fatal(err)
	}
}

var runID = regexp.MustCompile(`^[0-9a-f]{40}$`)

// TestRedisShardRuns: one run id per master, the one INFO server shows,
// the same from call to call; on a single Redis, one entry.
func TestRedisShardRuns(t *testing.T) {
	r, raw, _ := newClusterRedis(t, "dc1")
	ctx := t.Context()
	runs, err := r.ShardRuns(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(runs) != len(testenv.RedisCluster(t, "dc1")) {
		t.Fatalf("ShardRuns = %v; want one per master", runs)
	}
	nodes := raw.Nodes()
	for addr, id := range runs {
		if !runID.MatchString(id) {
			t.Fatalf("run id of %s: %q", addr, id)
		}
		n := nodes[addr]
		if n == nil {
			t.Fatalf("ShardRuns names %s, which the cluster does not", addr)
		}
		info, err := n.Do(ctx, n.B().Info().Section("server").Build()).ToString()
		if err != nil || !strings.Contains(info, "run_id:"+id) {
			t.Fatalf("INFO server of %s (%v) lacks run_id:%s", addr, err, id)
		}
	}
	again, err := r.ShardRuns(ctx)
	if err != nil || !maps.Equal(runs, again) {
		t.Fatalf("second ShardRuns = %v, %v; want %v", again, err, runs)
	}
	if got := router.ShardRestarts(runs, again); len(got) != 0 {
		t.Fatalf("ShardRestarts of the same runs = %v", got)
	}

	single, _, _ := newTestRedis(t)
	if testRedisMode != "cluster" {
		one, err := single.ShardRuns(ctx)
		if err != nil || len(one) != 1 {
			t.Fatalf("ShardRuns of a single Redis = %v, %v; want one entry", one, err)
		}
	}
}

func TestShardRestarts(t *testing.T) {
	known := map[string]string{"a:1": "r1", "b:1": "r2", "c:1": "r3"}
	for _, tc := range []struct {
		known, now map[string]string
		want       []string
	}{
		{nil, known, nil},                            // nothing known yet
		{known, known, nil},                          // nothing changed
		{known, map[string]string{"a:1": "r1"}, nil}, // two down: not a restart (yet)
		{known, map[string]string{"b:1": "x", "a:1": "r1"}, []string{"b:1"}}, // b restarted while c is down
		{known, map[string]string{"c:1": "y", "b:1": "x", "d:1": "r4"}, []string{"b:1", "c:1", "d:1"}},
	} {
		if got := router.ShardRestarts(tc.known, tc.now); !slices.Equal(got, tc.want) {
			t.Errorf("ShardRestarts(%v, %v) = %v, want %v", tc.known, tc.now, got, tc.want)
		}
	}
}

// TestRedisClusterMasterRestart kills a master of DC1's cluster with
// SIGKILL and starts it again (scripts/services.sh up rcluster): it comes
// back empty, with its slots. ShardRuns shows its new run id (and an error
// naming it while it is down); the users of its slots have lost their
// sessions, the others kept theirs; registering again restores them. It
// restarts a shared server, so it runs only with
// IMD_TEST_REDIS_CLUSTER_FAULT=1.
func TestRedisClusterMasterRestart(t *testing.T) {
	if os.Getenv("IMD_TEST_REDIS_CLUSTER_FAULT") != "1" {
		t.Skip("set IMD_TEST_REDIS_CLUSTER_FAULT=1 to run (it kills and restarts a master of the rcluster of scripts/services.sh)")
	}
	r, raw, _ := newClusterRedis(t, "dc1")
	ctx := t.Context()
	masters := slotMasters(t, raw)
	before, err := r.ShardRuns(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var all []router.Session
	onMaster := map[string][]router.Session{}
	for uid := range uint64(90) {
		s := mkSession(1, uid, fmt.Sprintf("gw-%d", uid%2), uid, 100+uid)
		mustRegister(t, r, s, 1)
		all = append(all, s)
		m := masters[keySlot(t, raw, fmt.Sprintf("{7:%d}", uid))]
		onMaster[m] = append(onMaster[m], s)
	}
	victim := slices.Sorted(maps.Keys(onMaster))[1]
	lost := onMaster[victim]
	t.Logf("killing master %s, which holds %d of %d users", victim, len(lost), len(all))

	pid := testenv.KillRedis(t, victim)
	restarted := false
	t.Cleanup(func() {
		if !restarted {
			testenv.Services(t, "up", "rcluster")
		}
	})
	runs, err := r.ShardRuns(ctx)
	if err == nil || !strings.Contains(err.Error(), victim) {
		t.Fatalf("ShardRuns with %s down: %v, %v; want an error naming it", victim, runs, err)
	}
	if _, ok := runs[victim]; ok || len(runs) != len(before)-1 {
		t.Fatalf("ShardRuns with %s down = %v", victim, runs)
	}
	if got := router.ShardRestarts(before, runs); len(got) != 0 {
		t.Fatalf("a master down is not yet a restart: %v", got)
	}
	took := testenv.Services(t, "up", "rcluster")
	restarted = true
	t.Logf("master %s (pid %d) killed; services.sh up rcluster took %v", victim, pid, took.Round(time.Millisecond))

	deadline := time.Now().Add(15 * time.Second)
	for {
		runs, err = r.ShardRuns(ctx)
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("ShardRuns after the restart: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if got := router.ShardRestarts(before, runs); !slices.Equal(got, []string{victim}) {
		t.Fatalf("ShardRestarts after the restart = %v, want [%s] (before %v, now %v)", got, victim, before, runs)
	}
	for _, s := range all {
		var ss []router.Session
		for {
			ss, err = r.Lookup(ctx, s.User())
			if err == nil || time.Now().After(deadline) {
				break
			}
			time.Sleep(100 * time.Millisecond) // the client may still be reconnecting
		}
		if err != nil {
			t.Fatalf("Lookup(%v) after the restart: %v", s.User(), err)
		}
		wantLost := slices.Contains(lost, s)
		if wantLost != (len(ss) == 0) {
			t.Fatalf("user %v (on the restarted master: %v) has %+v", s.User(), wantLost, ss)
		}
	}
	for _, s := range lost { // what a gateway's announce does
		mustRegister(t, r, s, 1)
	}
	got, err := r.LookupMany(ctx, userList(all))
	if err != nil {
		t.Fatal(err)
	}
	for i, ss := range got {
		if !slices.Equal(ss, []router.Session{all[i]}) {
			t.Fatalf("after registering again, user %v has %+v", all[i].User(), ss)
		}
	}
	if n, err := r.PurgeGate(ctx, "gw-0"); err != nil || n != len(all)/2 {
		t.Fatalf("PurgeGate(gw-0) = %d, %v; want %d", n, err, len(all)/2)
	}
}

func userList(ss []router.Session) []router.User {
	out := make([]router.User, len(ss))
	for i := range ss {
		out[i] = ss[i].User()
	}
	return out
}
