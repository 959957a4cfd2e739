package router

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/redis/rueidis"
)

// Key layout under the prefix P (default "imd:"):
//
//	P u:{<account>:<uid>}        hash, one per user; field per session
//	    field  "<appcode>:<epoch, 20 digits>:<conn>:<gate>"
//	    value  "<loginMS>:<deviceID>"
//	P g:{<gate>}                 set of "<account>:<uid>" with sessions on gate
//	P v:{<account>:<uid>}        presence version of the user (luaBump)
//	P pf:{<account>:<uid>}       presence: sessions following the user
//	P pl:{<account>:<uid>}:<f>   presence: users that the user's session f follows
//	P m:{<role>}                 set of node ids of a role (membership.go)
//	P m:{<role>}:<id>            a node's heartbeat, with a TTL (membership.go)
//
// The hash tag of a user key is the user, so a Redis Cluster shards the
// table by user and every per-user script touches one slot. The field is
// the login's identity (Session.Same), so Unregister deletes exactly that
// login. The epoch is zero-padded to the 20 digits of the largest uint64:
// the Lua scripts order logins by comparing these strings, never as Lua
// numbers, which are doubles and cannot tell epochs above 2^53 apart.
//
// The gate index P g:{gate} lives in the gate's slot, not the user's, so
// it cannot change atomically with the user's hash. Its invariant is one
// way: every user with a session on gate is in the set (stale extra
// members are allowed and PurgeGate skips them). Register adds to the set
// after its script, and a removal from the set is always followed by a
// re-check of the user's hash and a re-add if a session on the gate
// appeared meanwhile; see forget.

const epochWidth = 20 // decimal digits of math.MaxUint64

// luaOnGate counts the sessions of KEYS[1] held by gate, deleting them when
// del is true; without del it stops at the first one.
const luaOnGate = `
local function onGate(key, gate, del)
  local n = 0
  for _, f in ipairs(redis.call('HKEYS', key)) do
    if string.match(f, '^%d+:%d+:%d+:(.*)$') == gate then
      n = n + 1
      if not del then return n end
      redis.call('HDEL', key, f)
    end
  end
  return n
end
`

// luaBump gives the user a new presence version, above the last one and at
// least the server's clock in microseconds, so that a version key that
// expired (they expire a week after the user went offline) never comes back
// lower. The key has no TTL while the user is online. It returns {version,
// unix milliseconds}, as strings: Lua numbers are doubles.
const luaBump = `
local function bump(vkey, online)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
  local v = (tonumber(redis.call('GET', vkey)) or 0) + 1
  if now > v then v = now end
  local s = string.format('%.0f', v)
  if online then
    redis.call('SET', vkey, s)
  else
    redis.call('SET', vkey, s, 'EX', 604800)
  end
  return {s, string.format('%.0f', math.floor(now / 1000))}
end
`

// registerScript adds field ARGV[2] = ARGV[3] to the user hash KEYS[1] and
// evicts the oldest other sessions of appcode ARGV[1] beyond ARGV[4]. It
// returns {evicted field/value pairs oldest first, gates the user no longer
// holds any session on, the presence change (luaBump of KEYS[2]) when the
// user had no session}.
var registerScript = rueidis.NewLuaScript(luaOnGate + luaBump + `
local key, app, new, max = KEYS[1], ARGV[1], ARGV[2], tonumber(ARGV[4])
local first = redis.call('EXISTS', key) == 0
local same = {}
for _, f in ipairs(redis.call('HKEYS', key)) do
  local a, e = string.match(f, '^(%d+):(%d+):%d+:')
  if a == app and f ~= new and #e == 20 then
    same[#same + 1] = {e, f}
  end
end
local evicted, gone, gates = {}, {}, {}
local over = #same + 1 - max
if over > 0 then
  table.sort(same, function(x, y)
    if x[1] ~= y[1] then return x[1] < y[1] end
    return x[2] < y[2]
  end)
  for i = 1, over do
    local f = same[i][2]
    evicted[#evicted + 1] = f
    evicted[#evicted + 1] = redis.call('HGET', key, f)
    redis.call('HDEL', key, f)
    gates[string.match(f, '^%d+:%d+:%d+:(.*)$')] = true
  end
end
redis.call('HSET', key, new, ARGV[3])
for g in pairs(gates) do
  if onGate(key, g, false) == 0 then gone[#gone + 1] = g end
end
local ver = {}
if first then ver = bump(KEYS[2], true) end
return {evicted, gone, ver}
`)

// unregisterScript deletes field ARGV[1] from KEYS[1] and returns {0} when
// it was not there, {1, change} when deleted, {2, change} when deleted and
// the user has no session left on gate ARGV[2]; change is the presence
// change (luaBump of KEYS[2]) when that was the user's last session, else
// empty.
var unregisterScript = rueidis.NewLuaScript(luaOnGate + luaBump + `
if redis.call('HDEL', KEYS[1], ARGV[1]) == 0 then return {0} end
local ver = {}
if redis.call('EXISTS', KEYS[1]) == 0 then ver = bump(KEYS[2], false) end
if onGate(KEYS[1], ARGV[2], false) == 0 then return {2, ver} end
return {1, ver}
`)

// purgeScript deletes the sessions of KEYS[1] on gate ARGV[1] and returns
// {their field/value pairs, the presence change when none is left}.
var purgeScript = rueidis.NewLuaScript(luaBump + `
local out = {}
for _, f in ipairs(redis.call('HKEYS', KEYS[1])) do
  if string.match(f, '^%d+:%d+:%d+:(.*)$') == ARGV[1] then
    out[#out + 1] = f
    out[#out + 1] = redis.call('HGET', KEYS[1], f)
    redis.call('HDEL', KEYS[1], f)
  end
end
local ver = {}
if #out > 0 and redis.call('EXISTS', KEYS[1]) == 0 then ver = bump(KEYS[2], false) end
return {out, ver}
`)

// hasGateScript reports (1 or 0) whether KEYS[1] has a session on ARGV[1].
var hasGateScript = rueidis.NewLuaScriptReadOnly(luaOnGate + `
return onGate(KEYS[1], ARGV[1], false)
`)

// RedisOptions configures NewRedis.
type RedisOptions struct {
	// Addrs are host:port seeds: one for a single Redis, any nodes of a
	// Redis Cluster (detected automatically).
	Addrs []string
	// Password is the AUTH password; empty for none.
	Password string
	// Prefix starts every key, so several deployments or tests can share
	// a Redis. Default "imd:".
	Prefix string
	// DialTimeout bounds each connection attempt. Default 5s.
	DialTimeout time.Duration
	// Logger receives warnings about corrupt entries; default slog.Default().
	Logger *slog.Logger
}

// Redis is a Router, and the node membership, kept in Redis through
// rueidis. Every method is safe for concurrent use. Per-user changes are
// atomic Lua scripts on that user's hash; see the key layout above.
type Redis struct {
	c       rueidis.Client
	prefix  string
	log     *slog.Logger
	corrupt atomic.Uint64
}

var _ Presence = (*Redis)(nil)

// NewRedis connects to Redis and returns a router on it. It fails when no
// address answers.
func NewRedis(opts RedisOptions) (*Redis, error) {
	if len(opts.Addrs) == 0 {
		return nil, errors.New("router: redis: no address")
	}
	if opts.Prefix == "" {
		opts.Prefix = "imd:"
	}
	if opts.DialTimeout <= 0 {
		opts.DialTimeout = 5 * time.Second
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	c, err := rueidis.NewClient(rueidis.ClientOption{
		InitAddress:  opts.Addrs,
		Password:     opts.Password,
		Dialer:       net.Dialer{Timeout: opts.DialTimeout},
		DisableCache: true, // no client-side caching: the table changes all the time
	})
	if err != nil {
		return nil, fmt.Errorf("router: redis connect %v: %w", opts.Addrs, err)
	}
	return &Redis{c: c, prefix: opts.Prefix, log: opts.Logger}, nil
}

// Close closes the connections. The Redis must not be used afterwards.
func (r *Redis) Close() { r.c.Close() }

// Corrupt returns how many unreadable entries (session fields, membership
// values) the router has met in Redis and skipped since it started.
func (r *Redis) Corrupt() uint64 { return r.corrupt.Load() }

func (r *Redis) badEntry(key, entry string, err error) {
	n := r.corrupt.Add(1)
	if n&(n-1) == 0 { // log the 1st, 2nd, 4th, 8th... so a flood stays quiet
		r.log.Warn("router: skipped a corrupt redis entry", "key", key, "entry", entry, "err", err, "corrupt_total", n)
	}
}

func userMember(u User) string {
	b := make([]byte, 0, 32)
	b = strconv.AppendUint(b, uint64(u.Account), 10)
	b = append(b, ':')
	return string(strconv.AppendUint(b, u.UID, 10))
}

func (r *Redis) userKey(u User) string     { return r.memberKey(userMember(u)) }
func (r *Redis) memberKey(m string) string { return r.prefix + "u:{" + m + "}" }
func (r *Redis) gateKey(gate string) string {
	return r.prefix + "g:{" + gate + "}"
}

func sessionField(s *Session) string {
	b := make([]byte, 0, 48+len(s.Gate))
	b = strconv.AppendUint(b, uint64(s.AppCode), 10)
	b = append(b, ':')
	var digits [epochWidth]byte
	d := strconv.AppendUint(digits[:0], s.Epoch, 10)
	for range epochWidth - len(d) {
		b = append(b, '0')
	}
	b = append(b, d...)
	b = append(b, ':')
	b = strconv.AppendUint(b, s.Conn, 10)
	b = append(b, ':')
	return string(append(b, s.Gate...))
}

func sessionValue(s *Session) string {
	return strconv.FormatInt(s.LoginMS, 10) + ":" + s.DeviceID
}

var errField = errors.New("malformed session field")

// decodeSession rebuilds a session of u from its hash field and value.
func decodeSession(u User, field, value string) (Session, error) {
	s := Session{Account: u.Account, UID: u.UID}
	app, rest, ok1 := strings.Cut(field, ":")
	epoch, rest, ok2 := strings.Cut(rest, ":")
	conn, gate, ok3 := strings.Cut(rest, ":")
	login, device, ok4 := strings.Cut(value, ":")
	if !ok1 || !ok2 || !ok3 || !ok4 || len(epoch) != epochWidth {
		return s, errField
	}
	a, err1 := strconv.ParseUint(app, 10, 32)
	e, err2 := strconv.ParseUint(epoch, 10, 64)
	c, err3 := strconv.ParseUint(conn, 10, 64)
	l, err4 := strconv.ParseInt(login, 10, 64)
	if err := errors.Join(err1, err2, err3, err4); err != nil {
		return s, fmt.Errorf("%w: %w", errField, err)
	}
	s.AppCode, s.Epoch, s.Conn, s.LoginMS = uint32(a), e, c, l
	s.Gate, s.DeviceID = gate, device
	return s, nil
}

// decodeHash turns a user's hash into its sessions in login (epoch) order,
// skipping corrupt fields.
func (r *Redis) decodeHash(u User, h map[string]string) []Session {
	if len(h) == 0 {
		return nil
	}
	out := make([]Session, 0, len(h))
	for f, v := range h {
		s, err := decodeSession(u, f, v)
		if err != nil {
			r.badEntry(r.userKey(u), f, err)
			continue
		}
		out = append(out, s)
	}
	slices.SortFunc(out, func(a, b Session) int {
		return cmp.Or(cmp.Compare(a.Epoch, b.Epoch), cmp.Compare(a.Gate, b.Gate), cmp.Compare(a.Conn, b.Conn), cmp.Compare(a.AppCode, b.AppCode))
	})
	return out
}

// Register implements Router. The eviction and the insert are one Lua
// script on the user's hash; the gate index is updated after it. Logins
// are ordered by epoch, and s itself is never evicted; registering the
// same login again replaces it and evicts nothing for it. When indexing
// the gate fails after the script ran, Register takes s back out and
// returns the error together with the sessions the script evicted, so
// the caller can still kick them.
func (r *Redis) Register(ctx context.Context, s Session, maxPerTerminal int) ([]Session, error) {
	evicted, _, err := r.RegisterChange(ctx, s, maxPerTerminal)
	return evicted, err
}

// RegisterChange implements Presence; see Register.
func (r *Redis) RegisterChange(ctx context.Context, s Session, maxPerTerminal int) ([]Session, Change, error) {
	maxPerTerminal = max(maxPerTerminal, 1)
	u := s.User()
	key, field, member := r.userKey(u), sessionField(&s), userMember(u)
	res, err := registerScript.Exec(ctx, r.c, []string{key, r.verKey(u)},
		[]string{strconv.FormatUint(uint64(s.AppCode), 10), field, sessionValue(&s), strconv.Itoa(maxPerTerminal)}).ToArray()
	if err != nil {
		return nil, Change{}, fmt.Errorf("router: redis register: %w", err)
	}
	var evicted []Session
	var gone []string
	var ch Change
	if len(res) == 3 {
		if ch = decodeChange(u, true, res[2]); ch.Changed() {
			ch.Apps = []uint32{s.AppCode}
		}
		pairs, _ := res[0].AsStrSlice()
		for i := 0; i+1 < len(pairs); i += 2 {
			e, derr := decodeSession(u, pairs[i], pairs[i+1])
			if derr != nil {
				r.badEntry(key, pairs[i], derr)
				continue
			}
			evicted = append(evicted, e)
		}
		gone, _ = res[1].AsStrSlice()
	}
	if err := r.c.Do(ctx, r.c.B().Sadd().Key(r.gateKey(s.Gate)).Member(member).Build()).Error(); err != nil {
		// Without its index entry the session would survive a purge of
		// its gate: take it back out before failing.
		undo, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Second)
		defer cancel()
		_, uerr := r.Unregister(undo, s)
		return evicted, Change{}, errors.Join(fmt.Errorf("router: redis register: index gate %q: %w", s.Gate, err), uerr)
	}
	for _, g := range gone {
		if g == s.Gate {
			continue
		}
		if err := r.forget(ctx, g, member); err != nil {
			return evicted, ch, fmt.Errorf("router: redis register: %w", err)
		}
	}
	return evicted, ch, nil
}

// forget removes members from the index of gate after scripts found they
// have no session there, then re-adds those that gained one meanwhile (a
// Register racing the removal). Stale members it fails to remove only cost
// space; PurgeGate skips them.
func (r *Redis) forget(ctx context.Context, gate string, members ...string) error {
	gk := r.gateKey(gate)
	if err := r.c.Do(ctx, r.c.B().Srem().Key(gk).Member(members...).Build()).Error(); err != nil {
		return fmt.Errorf("unindex gate %q: %w", gate, err)
	}
	calls := make([]rueidis.LuaExec, len(members))
	for i, m := range members {
		calls[i] = rueidis.LuaExec{Keys: []string{r.memberKey(m)}, Args: []string{gate}}
	}
	var back []string
	for i, res := range execScript(ctx, r.c, hasGateScript, calls) {
		n, err := res.AsInt64()
		if err != nil || n > 0 {
			back = append(back, members[i]) // on doubt, keep it indexed
		}
	}
	if len(back) > 0 {
		if err := r.c.Do(ctx, r.c.B().Sadd().Key(gk).Member(back...).Build()).Error(); err != nil {
			return fmt.Errorf("reindex gate %q: %w", gate, err)
		}
	}
	return nil
}

// execScript runs s once per call, pipelined: a single call by EVALSHA,
// several through ExecMulti (which loads the script on every node first).
func execScript(ctx context.Context, c rueidis.Client, s *rueidis.Lua, calls []rueidis.LuaExec) []rueidis.RedisResult {
	if len(calls) == 1 {
		return []rueidis.RedisResult{s.Exec(ctx, c, calls[0].Keys, calls[0].Args)}
	}
	return s.ExecMulti(ctx, c, calls...)
}

// Unregister implements Router.
func (r *Redis) Unregister(ctx context.Context, s Session) (bool, error) {
	ok, _, err := r.UnregisterChange(ctx, s)
	return ok, err
}

// UnregisterChange implements Presence; see Unregister.
func (r *Redis) UnregisterChange(ctx context.Context, s Session) (bool, Change, error) {
	u := s.User()
	res, err := unregisterScript.Exec(ctx, r.c, []string{r.userKey(u), r.verKey(u)}, []string{sessionField(&s), s.Gate}).ToArray()
	if err != nil || len(res) == 0 {
		return false, Change{}, fmt.Errorf("router: redis unregister: %w (%d replies)", err, len(res))
	}
	n, err := res[0].AsInt64()
	if err != nil {
		return false, Change{}, fmt.Errorf("router: redis unregister: %w", err)
	}
	var ch Change
	if len(res) == 2 {
		ch = decodeChange(u, false, res[1])
	}
	if n == 2 {
		if err := r.forget(ctx, s.Gate, userMember(u)); err != nil {
			return true, ch, fmt.Errorf("router: redis unregister: %w", err)
		}
	}
	return n > 0, ch, nil
}

// Lookup implements Router.
func (r *Redis) Lookup(ctx context.Context, u User) ([]Session, error) {
	h, err := r.c.Do(ctx, r.c.B().Hgetall().Key(r.userKey(u)).Build()).AsStrMap()
	if err != nil {
		return nil, fmt.Errorf("router: redis lookup: %w", err)
	}
	return r.decodeHash(u, h), nil
}

// LookupMany implements Router with one pipelined HGETALL per user, sent
// together (in a cluster, to each node in parallel).
func (r *Redis) LookupMany(ctx context.Context, us []User) ([][]Session, error) {
	out := make([][]Session, len(us))
	if len(us) == 0 {
		return out, nil
	}
	cmds := make(rueidis.Commands, len(us))
	for i, u := range us {
		cmds[i] = r.c.B().Hgetall().Key(r.userKey(u)).Build()
	}
	for i, res := range r.c.DoMulti(ctx, cmds...) {
		h, err := res.AsStrMap()
		if err != nil {
			return nil, fmt.Errorf("router: redis lookup many: %w", err)
		}
		out[i] = r.decodeHash(us[i], h)
	}
	return out, nil
}

// purgeBatch is how many index members PurgeGate handles per round trip.
const purgeBatch = 256

// PurgeGate implements Router. It walks the gate's index with SSCAN, so it
// costs O(users that had a session on gate), not O(table). Members without
// a session on gate (stale entries) are skipped and dropped.
func (r *Redis) PurgeGate(ctx context.Context, gate string) (int, error) {
	n, _, _, err := r.purgeGate(ctx, gate)
	return n, err
}

// PurgeGateChanges implements Presence; see PurgeGate.
func (r *Redis) PurgeGateChanges(ctx context.Context, gate string) ([]Session, []Change, error) {
	_, purged, offline, err := r.purgeGate(ctx, gate)
	return purged, offline, err
}

// purgeGate returns how many fields it deleted (unreadable ones included),
// the sessions among them and the users left without a session.
func (r *Redis) purgeGate(ctx context.Context, gate string) (n int, purged []Session, offline []Change, _ error) {
	gk := r.gateKey(gate)
	var cursor uint64
	for {
		e, err := r.c.Do(ctx, r.c.B().Sscan().Key(gk).Cursor(cursor).Count(purgeBatch).Build()).AsScanEntry()
		if err != nil {
			return n, purged, offline, fmt.Errorf("router: redis purge gate %q: %w", gate, err)
		}
		if len(e.Elements) > 0 {
			// A member that names no user is only dropped: no session
			// can be stored under it, and in a Redis Cluster its two
			// keys need not share a slot (an empty hash tag, "{}").
			users := make([]User, 0, len(e.Elements))
			calls := make([]rueidis.LuaExec, 0, len(e.Elements))
			for _, m := range e.Elements {
				u, uerr := parseMember(m)
				if uerr != nil {
					r.badEntry(gk, m, uerr)
					continue
				}
				users = append(users, u)
				calls = append(calls, rueidis.LuaExec{Keys: []string{r.memberKey(m), r.prefix + "v:{" + m + "}"}, Args: []string{gate}})
			}
			var results []rueidis.RedisResult
			if len(calls) > 0 {
				results = execScript(ctx, r.c, purgeScript, calls)
			}
			for i, res := range results {
				arr, err := res.ToArray()
				if err != nil || len(arr) != 2 {
					return n, purged, offline, fmt.Errorf("router: redis purge gate %q: %w (%d replies)", gate, err, len(arr))
				}
				u := users[i]
				pairs, _ := arr[0].AsStrSlice()
				n += len(pairs) / 2
				for j := 0; j+1 < len(pairs); j += 2 {
					s, derr := decodeSession(u, pairs[j], pairs[j+1])
					if derr != nil {
						r.badEntry(r.userKey(u), pairs[j], derr)
						continue
					}
					purged = append(purged, s)
				}
				if ch := decodeChange(u, false, arr[1]); ch.Changed() {
					offline = append(offline, ch)
				}
			}
			if err := r.forget(ctx, gate, e.Elements...); err != nil {
				return n, purged, offline, fmt.Errorf("router: redis purge gate: %w", err)
			}
		}
		if cursor = e.Cursor; cursor == 0 {
			return n, purged, offline, nil
		}
	}
}

// Stats implements Router by SCANning every user key, on every primary of
// a cluster, and adding up HLEN: O(users) work on Redis per call. Use it for
// occasional reports such as /metrics, never per request. Concurrent
// changes during the scan may or may not be counted.
func (r *Redis) Stats(ctx context.Context) (Stats, error) {
	nodes, err := r.primaries(ctx)
	if err != nil {
		return Stats{}, fmt.Errorf("router: redis stats: %w", err)
	}
	var st Stats
	match := globEscape(r.prefix) + "u:{*}"
	for _, n := range nodes {
		var cursor uint64
		for {
			e, err := n.Do(ctx, n.B().Scan().Cursor(cursor).Match(match).Count(1000).Build()).AsScanEntry()
			if err != nil {
				return Stats{}, fmt.Errorf("router: redis stats: scan: %w", err)
			}
			if len(e.Elements) > 0 {
				cmds := make(rueidis.Commands, len(e.Elements))
				for i, k := range e.Elements {
					cmds[i] = n.B().Hlen().Key(k).Build()
				}
				for _, res := range n.DoMulti(ctx, cmds...) {
					l, err := res.AsInt64()
					if err != nil {
						return Stats{}, fmt.Errorf("router: redis stats: hlen: %w", err)
					}
					if l > 0 {
						st.Users++
						st.Sessions += int(l)
					}
				}
			}
			if cursor = e.Cursor; cursor == 0 {
				break
			}
		}
	}
	return st, nil
}

// primaries returns the client itself for a single Redis, and a client per
// primary node of a cluster (replicas would count keys twice).
func (r *Redis) primaries(ctx context.Context) ([]rueidis.Client, error) {
	if r.c.Mode() != rueidis.ClientModeCluster {
		return []rueidis.Client{r.c}, nil
	}
	var out []rueidis.Client
	for addr, n := range r.c.Nodes() {
		role, err := n.Do(ctx, n.B().Role().Build()).ToArray()
		if err != nil {
			return nil, fmt.Errorf("role of %s: %w", addr, err)
		}
		if len(role) > 0 {
			if s, _ := role[0].ToString(); s == "master" {
				out = append(out, n)
			}
		}
	}
	return out, nil
}

// globEscape quotes the glob metacharacters of SCAN MATCH.
func globEscape(s string) string {
	var b strings.Builder
	for _, c := range []byte(s) {
		switch c {
		case '*', '?', '[', ']', '\\':
			b.WriteByte('\\')
		}
		b.WriteByte(c)
	}
	return b.String()
}
