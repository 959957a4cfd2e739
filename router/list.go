package router

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"

	"github.com/redis/rueidis"
)

// DefaultListPage is the page size of ListSessions when none is given.
const DefaultListPage = 1024

// SessionLister lists a table's sessions gateway by gateway, for a push to
// every online terminal of an appcode (a broadcast): one pass over the
// table in memory, one walk of each gateway's index in Redis, never a
// lookup per user. Both routers implement it.
type SessionLister interface {
	// ListSessions calls fn with the sessions of appcode (0: of every
	// appcode) that the gateways in gates hold, in pages of at most page
	// sessions (< 1: DefaultListPage), each page of one gateway. With nil
	// gates it lists every gateway holding sessions; the Redis router
	// needs them named (the membership lists them). Each session is
	// listed once; sessions that begin or end meanwhile may or may not
	// be. fn owns ss and is never called concurrently; an error from fn
	// or ctx stops the listing and is returned.
	ListSessions(ctx context.Context, gates []string, appcode uint32, page int, fn func(gate string, ss []Session) error) error
}

var (
	_ SessionLister = (*Memory)(nil)
	_ SessionLister = (*Redis)(nil)
)

// ListSessions implements SessionLister: one pass over the shards, each
// read-locked while its matching sessions are copied into their
// gateway's page; full pages are handed to fn after the shard's lock is
// released, the rest at the end.
func (m *Memory) ListSessions(ctx context.Context, gates []string, appcode uint32, page int, fn func(gate string, ss []Session) error) error {
	if page < 1 {
		page = DefaultListPage
	}
	type gatePage struct {
		gate string
		ss   []Session
	}
	// Few gateways: a slice scanned from the last one hit beats a map.
	var open []gatePage
	for _, g := range gates {
		if !slices.ContainsFunc(open, func(p gatePage) bool { return p.gate == g }) {
			open = append(open, gatePage{gate: g})
		}
	}
	var full []gatePage
	last := 0
	for i := range m.shards {
		if err := ctx.Err(); err != nil {
			return err
		}
		sh := &m.shards[i]
		sh.mu.RLock()
		for _, list := range sh.users {
			for j := range list {
				s := &list[j]
				if appcode != 0 && s.AppCode != appcode {
					continue
				}
				k := last
				if k >= len(open) || open[k].gate != s.Gate {
					k = slices.IndexFunc(open, func(p gatePage) bool { return p.gate == s.Gate })
					if k < 0 {
						if gates != nil {
							continue
						}
						k = len(open)
						open = append(open, gatePage{gate: s.Gate})
					}
					last = k
				}
				p := &open[k]
				if p.ss == nil {
					p.ss = make([]Session, 0, min(page, 256))
				}
				p.ss = append(p.ss, *s)
				if len(p.ss) == page {
					full = append(full, *p)
					p.ss = nil
				}
			}
		}
		sh.mu.RUnlock()
		for _, p := range full {
			if err := fn(p.gate, p.ss); err != nil {
				return err
			}
		}
		full = full[:0]
	}
	for _, p := range open {
		if len(p.ss) > 0 {
			if err := fn(p.gate, p.ss); err != nil {
				return err
			}
		}
	}
	return nil
}

// errNoGates is the Redis router's answer to a listing of every gateway.
var errNoGates = errors.New("router: redis: name the gateways to list (the membership lists them)")

// ListSessions implements SessionLister. For each gateway it walks the
// gateway's index P g:{gate} with SSCAN, page members at a time, and
// reads those users' session fields (HKEYS, pipelined: one round trip per
// page, to each node of a cluster in parallel), keeping the sessions on
// that gateway. SSCAN may return a member twice: sessions are listed once
// by connection id.
func (r *Redis) ListSessions(ctx context.Context, gates []string, appcode uint32, page int, fn func(gate string, ss []Session) error) error {
	if gates == nil {
		return errNoGates
	}
	if page < 1 {
		page = DefaultListPage
	}
	for _, g := range gates {
		if err := r.listGate(ctx, g, appcode, page, fn); err != nil {
			return err
		}
	}
	return nil
}

func (r *Redis) listGate(ctx context.Context, gate string, appcode uint32, page int, fn func(gate string, ss []Session) error) error {
	gk := r.gateKey(gate)
	prefix := ""
	if appcode != 0 {
		prefix = strconv.FormatUint(uint64(appcode), 10) + ":"
	}
	seen := map[uint64]struct{}{}
	out := make([]Session, 0, min(page, 64))
	var cursor uint64
	for {
		e, err := r.c.Do(ctx, r.c.B().Sscan().Key(gk).Cursor(cursor).Count(int64(page)).Build()).AsScanEntry()
		if err != nil {
			return fmt.Errorf("router: redis list gate %q: %w", gate, err)
		}
		users := make([]User, 0, len(e.Elements))
		cmds := make(rueidis.Commands, 0, len(e.Elements))
		for _, m := range e.Elements {
			u, err := parseMember(m)
			if err != nil {
				r.badEntry(gk, m, err)
				continue
			}
			users = append(users, u)
			cmds = append(cmds, r.c.B().Hkeys().Key(r.memberKey(m)).Build())
		}
		var results []rueidis.RedisResult
		if len(cmds) > 0 {
			results = r.c.DoMulti(ctx, cmds...)
		}
		for i, res := range results {
			fields, err := res.AsStrSlice()
			if err != nil {
				return fmt.Errorf("router: redis list gate %q: %w", gate, err)
			}
			for _, f := range fields {
				if !strings.HasPrefix(f, prefix) || !strings.HasSuffix(f, ":"+gate) {
					continue
				}
				s, err := decodeSession(users[i], f, "0:")
				if err != nil {
					r.badEntry(r.userKey(users[i]), f, err)
					continue
				}
				if s.Gate != gate {
					continue // a gate id that ends like this one
				}
				if _, dup := seen[s.Conn]; dup {
					continue
				}
				seen[s.Conn] = struct{}{}
				out = append(out, s)
				if len(out) == page {
					if err := fn(gate, out); err != nil {
						return err
					}
					out = make([]Session, 0, page)
				}
			}
		}
		if cursor = e.Cursor; cursor == 0 {
			break
		}
	}
	if len(out) > 0 {
		return fn(gate, out)
	}
	return nil
}
