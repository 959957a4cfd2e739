package router

import (
	"context"
	"sync"
	"time"
)

const memoryShards = 64

// Memory is the in-process Router: a fixed number of shards, each a map
// guarded by its own lock. No method takes more than one shard lock at a
// time, so there is no lock order to keep.
type Memory struct {
	shards [memoryShards]memShard
	subs   memSubs // presence subscriptions (memory_presence.go)
}

type memShard struct {
	mu    sync.RWMutex
	users map[User][]Session
	ver   map[User]uint64 // presence version of each user that changed
}

var _ Presence = (*Memory)(nil)

// NewMemory returns an empty in-process router.
func NewMemory() *Memory {
	m := &Memory{}
	for i := range m.shards {
		m.shards[i].users = make(map[User][]Session)
		m.shards[i].ver = make(map[User]uint64)
	}
	return m
}

func (m *Memory) shard(u User) *memShard {
	// fibonacci hashing of the uid, mixed with the account system
	h := (u.UID ^ uint64(u.Account)<<32) * 0x9E3779B97F4A7C15
	return &m.shards[h>>58]
}

// Register implements Router.
func (m *Memory) Register(ctx context.Context, s Session, maxPerTerminal int) ([]Session, error) {
	evicted, _, err := m.RegisterChange(ctx, s, maxPerTerminal)
	return evicted, err
}

// RegisterChange implements Presence.
func (m *Memory) RegisterChange(_ context.Context, s Session, maxPerTerminal int) ([]Session, Change, error) {
	if maxPerTerminal < 1 {
		maxPerTerminal = 1
	}
	u := s.User()
	sh := m.shard(u)
	sh.mu.Lock()
	defer sh.mu.Unlock()
	list := sh.users[u]
	for i := range list {
		if list[i].Same(&s) { // announced again (a gateway re-announcing): replace, evict nothing
			list[i] = s
			return nil, Change{}, nil
		}
	}
	same := 0
	for i := range list {
		if list[i].AppCode == s.AppCode {
			same++
		}
	}
	var evicted []Session
	if over := same + 1 - maxPerTerminal; over > 0 {
		kept := list[:0:0]
		for _, o := range list {
			if o.AppCode == s.AppCode && over > 0 {
				evicted = append(evicted, o)
				over--
				continue
			}
			kept = append(kept, o)
		}
		list = kept
	}
	var ch Change
	if len(sh.users[u]) == 0 {
		ch = sh.change(u, true)
		ch.Apps = []uint32{s.AppCode}
	}
	sh.users[u] = append(list, s)
	return evicted, ch, nil
}

// change bumps u's presence version; the caller holds sh.mu.
func (sh *memShard) change(u User, online bool) Change {
	now := time.Now()
	v := max(sh.ver[u]+1, uint64(now.UnixMicro()))
	sh.ver[u] = v
	return Change{User: u, Online: online, Version: v, AtMS: now.UnixMilli()}
}

// Unregister implements Router.
func (m *Memory) Unregister(ctx context.Context, s Session) (bool, error) {
	ok, _, err := m.UnregisterChange(ctx, s)
	return ok, err
}

// UnregisterChange implements Presence.
func (m *Memory) UnregisterChange(_ context.Context, s Session) (bool, Change, error) {
	u := s.User()
	sh := m.shard(u)
	sh.mu.Lock()
	defer sh.mu.Unlock()
	list := sh.users[u]
	for i := range list {
		if list[i].Same(&s) {
			if len(list) == 1 {
				delete(sh.users, u)
				return true, sh.change(u, false), nil
			}
			n := make([]Session, 0, len(list)-1)
			n = append(n, list[:i]...)
			sh.users[u] = append(n, list[i+1:]...)
			return true, Change{}, nil
		}
	}
	return false, Change{}, nil
}

// Lookup implements Router.
func (m *Memory) Lookup(_ context.Context, u User) ([]Session, error) {
	sh := m.shard(u)
	sh.mu.RLock()
	defer sh.mu.RUnlock()
	list := sh.users[u]
	if len(list) == 0 {
		return nil, nil
	}
	return append([]Session(nil), list...), nil
}

// LookupMany implements Router. The sessions of all of us share one
// backing array (most users have one session), not one copy per user.
func (m *Memory) LookupMany(_ context.Context, us []User) ([][]Session, error) {
	out := make([][]Session, len(us))
	all := make([]Session, 0, len(us))
	for i, u := range us {
		sh := m.shard(u)
		sh.mu.RLock()
		if list := sh.users[u]; len(list) > 0 {
			start := len(all)
			all = append(all, list...)
			out[i] = all[start:len(all):len(all)]
		}
		sh.mu.RUnlock()
	}
	return out, nil
}

// PurgeGate implements Router.
func (m *Memory) PurgeGate(ctx context.Context, gate string) (int, error) {
	purged, _, err := m.PurgeGateChanges(ctx, gate)
	return len(purged), err
}

// PurgeGateChanges implements Presence.
func (m *Memory) PurgeGateChanges(_ context.Context, gate string) ([]Session, []Change, error) {
	var purged []Session
	var offline []Change
	for i := range m.shards {
		sh := &m.shards[i]
		sh.mu.Lock()
		for u, list := range sh.users {
			kept := list[:0:0]
			for _, s := range list {
				if s.Gate == gate {
					purged = append(purged, s)
					continue
				}
				kept = append(kept, s)
			}
			switch {
			case len(kept) == 0:
				delete(sh.users, u)
				offline = append(offline, sh.change(u, false))
			case len(kept) != len(list):
				sh.users[u] = kept
			}
		}
		sh.mu.Unlock()
	}
	return purged, offline, nil
}

// Stats implements Router.
func (m *Memory) Stats(context.Context) (Stats, error) {
	var st Stats
	for i := range m.shards {
		sh := &m.shards[i]
		sh.mu.RLock()
		st.Users += len(sh.users)
		for _, l := range sh.users {
			st.Sessions += len(l)
		}
		sh.mu.RUnlock()
	}
	return st, nil
}
