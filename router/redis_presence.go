package router

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"

	"github.com/redis/rueidis"
)

// Presence keys (see the key layout in redis.go). The version key and the
// followers of a user carry the user's hash tag, so the scripts that change
// its sessions bump its version in the same slot. A session's own list
// carries its user's tag.

func (r *Redis) verKey(u User) string       { return r.prefix + "v:{" + userMember(u) + "}" }
func (r *Redis) followersKey(u User) string { return r.prefix + "pf:{" + userMember(u) + "}" }
func (r *Redis) followsKey(sub *Session) string {
	return r.prefix + "pl:{" + userMember(sub.User()) + "}:" + sessionField(sub)
}

// subMember names a following session in a followers set.
func subMember(s *Session) string { return userMember(s.User()) + "|" + sessionField(s) }

var errMember = errors.New("malformed user member")

// parseMember reads "<account>:<uid>".
func parseMember(m string) (User, error) {
	a, id, ok := strings.Cut(m, ":")
	acc, err1 := strconv.ParseUint(a, 10, 32)
	uid, err2 := strconv.ParseUint(id, 10, 64)
	if !ok || err1 != nil || err2 != nil {
		return User{}, errMember
	}
	return User{Account: uint32(acc), UID: uid}, nil
}

// decodeChange reads a script's {version, ms} reply; an empty one is no
// change.
func decodeChange(u User, online bool, m rueidis.RedisMessage) Change {
	parts, err := m.AsStrSlice()
	if err != nil || len(parts) != 2 {
		return Change{}
	}
	v, err1 := strconv.ParseUint(parts[0], 10, 64)
	ms, err2 := strconv.ParseInt(parts[1], 10, 64)
	if err1 != nil || err2 != nil {
		return Change{}
	}
	return Change{User: u, Online: online, Version: v, AtMS: ms}
}

// States implements Presence with one pipelined HGETALL and GET per user.
func (r *Redis) States(ctx context.Context, us []User) ([]State, error) {
	out := make([]State, len(us))
	if len(us) == 0 {
		return out, nil
	}
	cmds := make(rueidis.Commands, 0, 2*len(us))
	for _, u := range us {
		cmds = append(cmds, r.c.B().Hgetall().Key(r.userKey(u)).Build(), r.c.B().Get().Key(r.verKey(u)).Build())
	}
	res := r.c.DoMulti(ctx, cmds...)
	for i, u := range us {
		h, err := res[2*i].AsStrMap()
		if err != nil {
			return nil, fmt.Errorf("router: redis presence states: %w", err)
		}
		out[i].Sessions = r.decodeHash(u, h)
		if v, err := res[2*i+1].AsUint64(); err == nil {
			out[i].Version = v
		} else if !rueidis.IsRedisNil(err) {
			return nil, fmt.Errorf("router: redis presence version: %w", err)
		}
	}
	return out, nil
}

// Follow implements Presence. It reads the session's list, leaves the
// followers sets of the users it no longer follows, joins those of the new
// list and writes the list, in one pipeline. Calls for one session must not
// overlap (logic serves a connection's requests one presence-subscribe at a
// time through the SDK; an overlap leaves at worst an extra subscription
// until the session ends).
func (r *Redis) Follow(ctx context.Context, sub Session, us []User) error {
	lk, me := r.followsKey(&sub), subMember(&sub)
	old, err := r.c.Do(ctx, r.c.B().Smembers().Key(lk).Build()).AsStrSlice()
	if err != nil {
		return fmt.Errorf("router: redis follow: %w", err)
	}
	want := make(map[string]bool, len(us))
	for _, u := range us {
		want[userMember(u)] = true
	}
	cmds := make(rueidis.Commands, 0, len(old)+2*len(us)+2)
	for _, m := range old {
		if !want[m] {
			cmds = append(cmds, r.c.B().Srem().Key(r.prefix+"pf:{"+m+"}").Member(me).Build())
		}
	}
	cmds = append(cmds, r.c.B().Del().Key(lk).Build())
	if len(us) > 0 {
		ms := make([]string, 0, len(want))
		for m := range want {
			ms = append(ms, m)
			cmds = append(cmds, r.c.B().Sadd().Key(r.prefix+"pf:{"+m+"}").Member(me).Build())
		}
		cmds = append(cmds, r.c.B().Sadd().Key(lk).Member(ms...).Build())
	}
	for _, res := range r.c.DoMulti(ctx, cmds...) {
		if err := res.Error(); err != nil {
			return fmt.Errorf("router: redis follow: %w", err)
		}
	}
	return nil
}

// Unfollow implements Presence.
func (r *Redis) Unfollow(ctx context.Context, sub Session) error {
	lk, me := r.followsKey(&sub), subMember(&sub)
	old, err := r.c.Do(ctx, r.c.B().Smembers().Key(lk).Build()).AsStrSlice()
	if err != nil {
		return fmt.Errorf("router: redis unfollow: %w", err)
	}
	if len(old) == 0 {
		return nil
	}
	cmds := make(rueidis.Commands, 0, len(old)+1)
	for _, m := range old {
		cmds = append(cmds, r.c.B().Srem().Key(r.prefix+"pf:{"+m+"}").Member(me).Build())
	}
	cmds = append(cmds, r.c.B().Del().Key(lk).Build())
	for _, res := range r.c.DoMulti(ctx, cmds...) {
		if err := res.Error(); err != nil {
			return fmt.Errorf("router: redis unfollow: %w", err)
		}
	}
	return nil
}

// Followers implements Presence.
func (r *Redis) Followers(ctx context.Context, u User) ([]Session, error) {
	k := r.followersKey(u)
	ms, err := r.c.Do(ctx, r.c.B().Smembers().Key(k).Build()).AsStrSlice()
	if err != nil {
		return nil, fmt.Errorf("router: redis followers: %w", err)
	}
	out := make([]Session, 0, len(ms))
	for _, m := range ms {
		um, field, _ := strings.Cut(m, "|")
		su, err := parseMember(um)
		if err != nil {
			r.badEntry(k, m, err)
			continue
		}
		s, err := decodeSession(su, field, "0:")
		if err != nil {
			r.badEntry(k, m, err)
			continue
		}
		out = append(out, s)
	}
	return out, nil
}
