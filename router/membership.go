package router

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/redis/rueidis"
)

// Node is a member of the deployment: a gateway, logic or router process.
type Node struct {
	ID   string // unique within its role, e.g. the gateway id
	Role string // "gateway", "logic", ...
	Addr string // where the other nodes reach it
	DC   string // data center ("room")
}

// Membership keys, both in the role's hash slot so that scripts can change
// them together (the key layout is in redis.go):
//
//	P m:{<role>}       set of the ids ever heartbeating in role and not yet
//	                   reported by Expired or removed by Leave
//	P m:{<role>}:<id>  the node as JSON, with the heartbeat's TTL

func (r *Redis) roleKey(role string) string { return r.prefix + "m:{" + role + "}" }

// heartbeatScript: SET KEYS[1] ARGV[1] PX ARGV[2]; SADD KEYS[2] ARGV[3].
var heartbeatScript = rueidis.NewLuaScript(`
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return redis.call('SADD', KEYS[2], ARGV[3])
`)

// leaveScript: DEL KEYS[1]; SREM KEYS[2] ARGV[1].
var leaveScript = rueidis.NewLuaScript(`
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[1])
return 1
`)

// expiredScript removes from the role set KEYS[1] the ids whose heartbeat
// key ARGV[1]..id is gone, and returns them. The heartbeat keys share the
// set's hash slot, so a cluster runs this on one node.
var expiredScript = rueidis.NewLuaScript(`
local gone = {}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if redis.call('EXISTS', ARGV[1] .. id) == 0 then
    redis.call('SREM', KEYS[1], id)
    gone[#gone + 1] = id
  end
end
return gone
`)

func checkNode(n *Node) error {
	if n.ID == "" || n.Role == "" {
		return errors.New("node needs an id and a role")
	}
	return nil
}

// Heartbeat announces n as live for ttl: it sets n's heartbeat key with
// that TTL and adds n.ID to its role's set, in one script. Call it again
// well within ttl (a third of it, say); a node that stops disappears from
// Live once ttl has passed and is then reported once by Expired.
//
// joined reports that n was not in its role's set: its first heartbeat,
// or one after Expired reported it (its heartbeats lapsed, and logic
// purged its sessions: a gateway must announce them again) or after it
// left.
func (r *Redis) Heartbeat(ctx context.Context, n Node, ttl time.Duration) (joined bool, err error) {
	if err := checkNode(&n); err != nil {
		return false, fmt.Errorf("router: redis heartbeat: %w", err)
	}
	if ttl < time.Millisecond {
		return false, fmt.Errorf("router: redis heartbeat: ttl %v is under 1ms", ttl)
	}
	v, err := json.Marshal(n)
	if err != nil {
		return false, fmt.Errorf("router: redis heartbeat: %w", err)
	}
	rk := r.roleKey(n.Role)
	added, err := heartbeatScript.Exec(ctx, r.c, []string{rk + ":" + n.ID, rk},
		[]string{string(v), strconv.FormatInt(ttl.Milliseconds(), 10), n.ID}).AsInt64()
	if err != nil {
		return false, fmt.Errorf("router: redis heartbeat %s/%s: %w", n.Role, n.ID, err)
	}
	return added == 1, nil
}

// Live returns the nodes of role whose heartbeat has not expired, of every
// DC, sorted by id. Filter by DC at the caller.
func (r *Redis) Live(ctx context.Context, role string) ([]Node, error) {
	rk := r.roleKey(role)
	ids, err := r.c.Do(ctx, r.c.B().Smembers().Key(rk).Build()).AsStrSlice()
	if err != nil {
		return nil, fmt.Errorf("router: redis live %s: %w", role, err)
	}
	if len(ids) == 0 {
		return nil, nil
	}
	keys := make([]string, len(ids))
	for i, id := range ids {
		keys[i] = rk + ":" + id
	}
	// One MGET: the keys share the role's hash slot.
	vals, err := r.c.Do(ctx, r.c.B().Mget().Key(keys...).Build()).ToArray()
	if err != nil {
		return nil, fmt.Errorf("router: redis live %s: %w", role, err)
	}
	out := make([]Node, 0, len(vals))
	for i, v := range vals {
		s, err := v.ToString()
		if rueidis.IsRedisNil(err) {
			continue // expired
		}
		var n Node
		if err == nil {
			err = json.Unmarshal([]byte(s), &n)
		}
		if err == nil && (n.ID != ids[i] || n.Role != role) {
			err = fmt.Errorf("heartbeat of %s/%s names %s/%s", role, ids[i], n.Role, n.ID)
		}
		if err != nil {
			r.badEntry(keys[i], s, err)
			continue
		}
		out = append(out, n)
	}
	slices.SortFunc(out, func(a, b Node) int { return strings.Compare(a.ID, b.ID) })
	return out, nil
}

// Leave removes n at once, for a clean shutdown: it no longer shows in
// Live, and Expired will not report it.
func (r *Redis) Leave(ctx context.Context, n Node) error {
	if err := checkNode(&n); err != nil {
		return fmt.Errorf("router: redis leave: %w", err)
	}
	rk := r.roleKey(n.Role)
	if err := leaveScript.Exec(ctx, r.c, []string{rk + ":" + n.ID, rk}, []string{n.ID}).Error(); err != nil {
		return fmt.Errorf("router: redis leave %s/%s: %w", n.Role, n.ID, err)
	}
	return nil
}

// Retire ends n's heartbeat at once but leaves n for Expired to report at
// its next call. A gateway that stops retires rather than leaves, so that
// logic purges whatever of its sessions is left in the router (a
// disconnect that never reached logic) instead of keeping it for good.
func (r *Redis) Retire(ctx context.Context, n Node) error {
	if err := checkNode(&n); err != nil {
		return fmt.Errorf("router: redis retire: %w", err)
	}
	if err := r.c.Do(ctx, r.c.B().Del().Key(r.roleKey(n.Role)+":"+n.ID).Build()).Error(); err != nil {
		return fmt.Errorf("router: redis retire %s/%s: %w", n.Role, n.ID, err)
	}
	return nil
}

// Expired returns the ids of role that stopped heartbeating (their
// heartbeat key expired without a Leave) and removes them from the role's
// set in the same script, so that among concurrent callers exactly one
// gets each id. Logic nodes call it periodically with role "gateway" and
// PurgeGate every id it returns. A node that heartbeats again afterwards
// is a new member: its sessions were purged and it must re-announce them.
func (r *Redis) Expired(ctx context.Context, role string) ([]string, error) {
	rk := r.roleKey(role)
	ids, err := expiredScript.Exec(ctx, r.c, []string{rk}, []string{rk + ":"}).AsStrSlice()
	if err != nil {
		return nil, fmt.Errorf("router: redis expired %s: %w", role, err)
	}
	slices.Sort(ids)
	return ids, nil
}
