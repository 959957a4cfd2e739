package platform

import (
	"context"
	"fmt"
	"os"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/redis/rueidis"

	"github.com/imd-dev/imd/internal/config"
	"github.com/imd-dev/imd/internal/testenv"
	"github.com/imd-dev/imd/router"
)

// clusterSlots maps each hash slot of the Redis Cluster at addrs to the
// address of its master, and returns a function giving the master of a
// hash tag ("{1:42}").
func clusterSlots(t *testing.T, addrs []string) func(tag string) string {
	t.Helper()
	c, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: addrs, DisableCache: true})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx := context.Background()
	var masters [16384]string
	ranges, err := c.Do(ctx, c.B().ClusterSlots().Build()).ToArray()
	if err != nil {
		t.Fatalf("CLUSTER SLOTS: %v", err)
	}
	for _, r := range ranges {
		f, _ := r.ToArray()
		lo, _ := f[0].AsInt64()
		hi, _ := f[1].AsInt64()
		node, _ := f[2].ToArray()
		host, _ := node[0].ToString()
		port, _ := node[1].AsInt64()
		for s := lo; s <= hi; s++ {
			masters[s] = host + ":" + strconv.FormatInt(port, 10)
		}
	}
	slots := map[string]int64{}
	return func(tag string) string {
		s, ok := slots[tag]
		if !ok {
			c, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: addrs, DisableCache: true})
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			if s, err = c.Do(ctx, c.B().ClusterKeyslot().Key(tag).Build()).AsInt64(); err != nil {
				t.Fatalf("CLUSTER KEYSLOT %s: %v", tag, err)
			}
			slots[tag] = s
		}
		return masters[s]
	}
}

// TestClusterRedisMasterRestart: the router on DC1's Redis Cluster
// (scripts/services.sh up rcluster), one logic node and one gateway (and
// again one `imd all` node, whose gateway announces to its own logic), 60
// drivers logged in. The master that holds some of their sessions (not
// the one of the gateways' membership keys, so that only the watch of
// the masters' run ids can tell) is killed with SIGKILL while the
// gateway's membership rounds are held, and started again: it comes back
// empty, and those users are unreachable. Once its rounds resume the
// gateway sees the master's new run id and announces its sessions again:
// within a bounded time every user has its session back, and one push to
// all of them reaches each exactly once. Both nodes count the restart in
// imd_router_shard_restarts_total. It restarts a shared server, so it runs
// only with IMD_TEST_REDIS_CLUSTER_FAULT=1.
func TestClusterRedisMasterRestart(t *testing.T) {
	if os.Getenv("IMD_TEST_REDIS_CLUSTER_FAULT") != "1" {
		t.Skip("set IMD_TEST_REDIS_CLUSTER_FAULT=1 to run (it kills and restarts a master of the rcluster of scripts/services.sh)")
	}
	addrs := testenv.RedisCluster(t, "dc1")
	onCluster := func() func(c *config.Config) {
		rc := config.Redis{Addrs: addrs, Prefix: fmt.Sprintf("%s%d:", testRedis.Prefix, redisPrefixes.Add(1))}
		return func(c *config.Config) {
			c.Cluster.Redis = rc
			c.Cluster.Heartbeat = 200 * time.Millisecond
			c.Cluster.NodeTTL = 30 * time.Second // no lapse while the gateway's rounds are held
		}
	}
	t.Run("split", func(t *testing.T) {
		onCluster := onCluster()
		lg := startNode(t, RoleLogic, onCluster)
		gw := startNode(t, RoleGateway, onCluster)
		eventually(t, 5*time.Second, "the gateway to link to logic", func() bool { return gw.rpcClient.Links() == 1 })
		masterRestart(t, addrs, lg, gw)
	})
	t.Run("all", func(t *testing.T) {
		p := startNode(t, RoleAll, onCluster())
		masterRestart(t, addrs, p, p)
	})
}

func masterRestart(t *testing.T, addrs []string, lg, gw *Platform) {

	// The victim: a master that holds users but neither the gateways'
	// membership (whose loss the heartbeat notices by itself) nor, if it
	// can be helped, the logic nodes' membership and node id leases.
	masterOf := clusterSlots(t, addrs)
	const n = 60
	users := map[string][]uint64{}
	for uid := uint64(1); uid <= n; uid++ {
		m := masterOf(fmt.Sprintf("{1:%d}", uid))
		users[m] = append(users[m], uid)
	}
	var victim string
	for _, m := range slices.Sorted(func(yield func(string) bool) {
		for m := range users {
			if !yield(m) {
				return
			}
		}
	}) {
		if m == masterOf("{gateway}") {
			continue
		}
		if victim == "" || (m != masterOf("{logic}") && m != masterOf("{ids}")) {
			victim = m
		}
	}
	lost := users[victim]
	if victim == "" || len(lost) == 0 {
		t.Fatalf("no master to kill: users per master %v, gateway membership on %s", users, masterOf("{gateway}"))
	}

	ps := make([]pushes, n+1)
	for uid := uint64(1); uid <= n; uid++ {
		driver(t, gw, 101, uid, &ps[uid])
	}
	lookup := func(uid uint64) ([]router.Session, error) {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		return lg.Router.Lookup(ctx, router.User{Account: 1, UID: uid})
	}
	online := func() (int, error) {
		k := 0
		for uid := uint64(1); uid <= n; uid++ {
			ss, err := lookup(uid)
			if err != nil {
				return k, err
			}
			if len(ss) == 1 && ss[0].Gate == gw.Gateway.ID() {
				k++
			}
		}
		return k, nil
	}
	eventually(t, 5*time.Second, "every driver in the router", func() bool { k, err := online(); return err == nil && k == n })

	gw.members.paused.Store(true)
	time.Sleep(300 * time.Millisecond) // a round under way ends
	pid := testenv.KillRedis(t, victim)
	restarted := false
	t.Cleanup(func() {
		if !restarted {
			testenv.Services(t, "up", "rcluster")
		}
	})
	took := testenv.Services(t, "up", "rcluster")
	restarted = true
	t.Logf("killed master %s (pid %d), holding %d of %d users; services.sh up rcluster took %v", victim, pid, len(lost), n, took.Round(time.Millisecond))

	// The loss is real: the restarted master has none of its users.
	eventually(t, 10*time.Second, "the router to answer again", func() bool { _, err := online(); return err == nil })
	for uid := uint64(1); uid <= n; uid++ {
		ss, err := lookup(uid)
		if err != nil {
			t.Fatal(err)
		}
		if want := !slices.Contains(lost, uid); want != (len(ss) == 1) {
			t.Fatalf("uid %d (kept: %v) has %+v after the restart", uid, want, ss)
		}
	}

	resumed := time.Now()
	gw.members.paused.Store(false)
	eventually(t, 10*time.Second, "every user reachable again", func() bool { k, err := online(); return err == nil && k == n })
	back := time.Since(resumed)
	// The announce counts itself once it returned, which may be a moment
	// after its last session became visible in the router.
	eventually(t, 5*time.Second, "the gateway's announce to count itself", func() bool { return gw.members.reannounced.Load() >= 1 })
	if got := gw.members.reannounced.Load(); got != 1 {
		t.Fatalf("the gateway announced its sessions %d times, want once", got)
	}

	to := make([]map[string]any, 0, n)
	for uid := 1; uid <= n; uid++ {
		to = append(to, map[string]any{"appcode": 101, "uid": uid})
	}
	var res struct {
		Online int `json:"online"`
	}
	if code := api(t, lg, "POST", "/v1/push", testAPIKey, map[string]any{"to": to, "text": "after the restart"}, &res); code != 200 || res.Online != n {
		t.Fatalf("push to all: %d, online %d; want 200 and %d", code, res.Online, n)
	}
	eventually(t, 5*time.Second, "every driver to get the push", func() bool {
		for uid := 1; uid <= n; uid++ {
			if ps[uid].len() != 1 {
				return false
			}
		}
		return true
	})
	time.Sleep(200 * time.Millisecond)
	for uid := 1; uid <= n; uid++ {
		if k := ps[uid].len(); k != 1 {
			t.Fatalf("uid %d got %d pushes, want 1", uid, k)
		}
	}
	for _, p := range slices.Compact([]*Platform{lg, gw}) {
		if v := metricValue(t, p.Registry, "imd_router_shard_restarts_total"); v != 1 {
			t.Errorf("%s: imd_router_shard_restarts_total = %v, want 1", p.Role, v)
		}
	}
	t.Logf("%d users unreachable after the restart; all %d reachable %v after the gateway's rounds resumed (heartbeat %v); one push reached each of them once",
		len(lost), n, back.Round(time.Millisecond), 200*time.Millisecond)
}
