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

	// A gateway's heartbeat also carries what clients need to pick it
	// (GET /v1/gateways on logic nodes); other roles leave these empty,
	// and they are left out of the JSON when they are.
	TCPAddr  string `json:",omitempty"` // plain-TCP client address; "" when the gateway has none
	TLSAddr  string `json:",omitempty"` // TLS client address; "" without one
	WebAddr  string `json:",omitempty"` // WebSocket (/ws) and long-poll (/lp/) listener; "" without one
	Load     int64  `json:",omitempty"` // logged-in connections, as of the heartbeat
	Draining bool   `json:",omitempty"` // shutting down: still live, but no client should pick it
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

// Node id leases: each logic node holds a snowflake node id (0-1023) that
// no other live node holds, so msgids never collide (logic/ids.go). Keys,
// all in one hash slot:
//
//	P n:{ids}:<id>     the lease: its holder's token, with the lease's TTL
//	P n:{ids}:<id>:hi  the ceiling (ms since the snowflake epoch) of every
//	                   id minted with <id> so far; no TTL. The next holder
//	                   starts above it.

func (r *Redis) nodeIDPrefix() string { return r.prefix + "n:{ids}:" }

// acquireNodeIDScript takes the lease of id ARGV[3] (-1: the first free id
// from ARGV[7] down to ARGV[6]) for holder ARGV[1] with TTL ARGV[2] ms, and writes its
// ceiling: max(ARGV[4], previous ceiling + ARGV[5]). It returns {id,
// previous ceiling, ceiling}, {-1, holder, pttl} when the id asked for is
// held, or {-2} when every id is.
var acquireNodeIDScript = rueidis.NewLuaScript(`
local function take(n)
  local k = KEYS[1] .. n
  if not redis.call('SET', k, ARGV[1], 'NX', 'PX', ARGV[2]) then return nil end
  local prev = tonumber(redis.call('GET', k .. ':hi') or '0') or 0
  local hi = math.max(tonumber(ARGV[4]), prev + tonumber(ARGV[5]))
  redis.call('SET', k .. ':hi', string.format('%d', hi))
  return {n, string.format('%d', prev), string.format('%d', hi)}
end
local want = tonumber(ARGV[3])
if want >= 0 then
  local got = take(want)
  if got then return got end
  local k = KEYS[1] .. want
  return {-1, redis.call('GET', k) or '', redis.call('PTTL', k)}
end
for n = tonumber(ARGV[7]), tonumber(ARGV[6]), -1 do
  local got = take(n)
  if got then return got end
end
return {-2}
`)

// renewNodeIDScript renews the lease KEYS[1] of holder ARGV[1] for ARGV[2]
// ms and raises its ceiling KEYS[2] to ARGV[3]; it returns the ceiling, or
// -1 when holder does not hold the lease (it lapsed).
var renewNodeIDScript = rueidis.NewLuaScript(`
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
local hi = math.max(tonumber(redis.call('GET', KEYS[2]) or '0') or 0, tonumber(ARGV[3]))
local s = string.format('%d', hi)
redis.call('SET', KEYS[2], s)
return s
`)

// releaseNodeIDScript ends the lease KEYS[1] of holder ARGV[1] and sets
// its ceiling KEYS[2] to ARGV[2], the time of the last id minted.
var releaseNodeIDScript = rueidis.NewLuaScript(`
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[2], ARGV[2])
redis.call('DEL', KEYS[1])
return 1
`)

// NodeIDLease is a node id leased by AcquireNodeID.
type NodeIDLease struct {
	ID int64
	// PrevCeiling is the ceiling the id's previous holders left (ms since
	// the snowflake epoch): mint above it.
	PrevCeiling int64
	// Ceiling is the ceiling written with this lease: mint nothing above
	// it until a renewal raises it.
	Ceiling int64
}

// NodeIDHeldError is AcquireNodeID's error for an id that another holder
// has leased.
type NodeIDHeldError struct {
	ID     int64
	Holder string
	TTL    time.Duration // left on the holder's lease
}

func (e *NodeIDHeldError) Error() string {
	return fmt.Sprintf("node id %d is leased by %s (%v left on its lease)", e.ID, e.Holder, e.TTL.Round(time.Millisecond))
}

// ErrNoNodeID is AcquireNodeID's error when every id of its range is
// leased.
var ErrNoNodeID = errors.New("router: every node id of the range is leased")

// AcquireNodeID leases node id id (-1: any free id, from 1023 down) for
// holder, a token unique to this process, for ttl. The lease's ceiling is
// set to max(ceiling, the previous ceiling + window). An id held by
// another is a *NodeIDHeldError.
func (r *Redis) AcquireNodeID(ctx context.Context, id int64, holder string, ttl time.Duration, ceiling, window int64) (NodeIDLease, error) {
	return r.AcquireNodeIDIn(ctx, id, 0, 1023, holder, ttl, ceiling, window)
}

// AcquireNodeIDIn is AcquireNodeID with the free ids sought from hi down
// to lo only: each DC of a many-DC deployment leases from its own range,
// so msgids of different DCs never collide.
func (r *Redis) AcquireNodeIDIn(ctx context.Context, id, lo, hi int64, holder string, ttl time.Duration, ceiling, window int64) (NodeIDLease, error) {
	if id < -1 || id > 1023 || lo < 0 || hi > 1023 || lo > hi || holder == "" || ttl < time.Millisecond {
		return NodeIDLease{}, fmt.Errorf("router: acquire node id %d: bad arguments", id)
	}
	vals, err := acquireNodeIDScript.Exec(ctx, r.c, []string{r.nodeIDPrefix()}, []string{
		holder, strconv.FormatInt(ttl.Milliseconds(), 10), strconv.FormatInt(id, 10),
		strconv.FormatInt(ceiling, 10), strconv.FormatInt(window, 10),
		strconv.FormatInt(lo, 10), strconv.FormatInt(hi, 10),
	}).ToArray()
	if err != nil {
		return NodeIDLease{}, fmt.Errorf("router: acquire node id %d: %w", id, err)
	}
	n, err := vals[0].AsInt64()
	if err != nil {
		return NodeIDLease{}, fmt.Errorf("router: acquire node id %d: %w", id, err)
	}
	switch {
	case n == -2:
		return NodeIDLease{}, ErrNoNodeID
	case n == -1 && len(vals) == 3:
		h, _ := vals[1].ToString()
		pttl, _ := vals[2].AsInt64()
		return NodeIDLease{}, &NodeIDHeldError{ID: id, Holder: h, TTL: time.Duration(pttl) * time.Millisecond}
	case len(vals) != 3:
		return NodeIDLease{}, fmt.Errorf("router: acquire node id %d: reply of %d values", id, len(vals))
	}
	l := NodeIDLease{ID: n}
	if l.PrevCeiling, err = vals[1].AsInt64(); err == nil {
		l.Ceiling, err = vals[2].AsInt64()
	}
	if err != nil {
		return NodeIDLease{}, fmt.Errorf("router: acquire node id %d: %w", id, err)
	}
	return l, nil
}

// RenewNodeID extends holder's lease of id by ttl and raises its ceiling to
// at least ceiling; it returns the ceiling and held = false when holder no
// longer holds the lease (it lapsed; another node may hold it now).
func (r *Redis) RenewNodeID(ctx context.Context, id int64, holder string, ttl time.Duration, ceiling int64) (stored int64, held bool, err error) {
	k := r.nodeIDPrefix() + strconv.FormatInt(id, 10)
	v, err := renewNodeIDScript.Exec(ctx, r.c, []string{k, k + ":hi"}, []string{
		holder, strconv.FormatInt(ttl.Milliseconds(), 10), strconv.FormatInt(ceiling, 10),
	}).AsInt64()
	if err != nil {
		return 0, false, fmt.Errorf("router: renew node id %d: %w", id, err)
	}
	return v, v >= 0, nil
}

// ReleaseNodeID ends holder's lease of id, leaving lastMS (the time of
// the last id minted with it) as its ceiling for the next holder. A lease
// holder no longer holds is left alone.
func (r *Redis) ReleaseNodeID(ctx context.Context, id int64, holder string, lastMS int64) error {
	k := r.nodeIDPrefix() + strconv.FormatInt(id, 10)
	if err := releaseNodeIDScript.Exec(ctx, r.c, []string{k, k + ":hi"}, []string{holder, strconv.FormatInt(lastMS, 10)}).Error(); err != nil {
		return fmt.Errorf("router: release node id %d: %w", id, err)
	}
	return nil
}

// Announce generation: a logic node asks every gateway of its DC to
// announce its sessions again (another DC's router needs them for its
// mirror) by changing P a:{gen}; gateways read it with each heartbeat.

func (r *Redis) announceKey() string { return r.prefix + "a:{gen}" }

// BumpAnnounce changes the announce generation unless it changed in the
// last quiet (a DC link coming back on many nodes at once asks once), and
// reports whether it did.
func (r *Redis) BumpAnnounce(ctx context.Context, quiet time.Duration) (bool, error) {
	k := r.announceKey()
	ok, err := r.c.Do(ctx, r.c.B().Set().Key(k+":quiet").Value("1").Nx().Px(quiet).Build()).AsBool()
	if rueidis.IsRedisNil(err) {
		return false, nil
	}
	if err != nil || !ok {
		return false, err
	}
	if err := r.c.Do(ctx, r.c.B().Incr().Key(k).Build()).Error(); err != nil {
		return false, fmt.Errorf("router: bump the announce generation: %w", err)
	}
	return true, nil
}

// AnnounceGen returns the announce generation ("" before the first bump,
// or after its Redis master came back empty: a change either way).
func (r *Redis) AnnounceGen(ctx context.Context) (string, error) {
	v, err := r.c.Do(ctx, r.c.B().Get().Key(r.announceKey()).Build()).ToString()
	if rueidis.IsRedisNil(err) {
		return "", nil
	}
	if err != nil {
		return "", fmt.Errorf("router: announce generation: %w", err)
	}
	return v, nil
}
