package router

import (
	"context"
	"sync"
)

const memoryShards = 64

// Memory is the in-process Router: a fixed number of shards, each a map
// guarded by its own lock. No method takes more than one shard lock at a
// time, so there is no lock order to keep.
type Memory struct {
	shards [memoryShards]memShard
}

type memShard struct {
	mu    sync.RWMutex
	users map[User][]Session
}

var _ Router = (*Memory)(nil)

// NewMemory returns an empty in-process router.
func NewMemory() *Memory {
	m := &Memory{}
	for i := range m.shards {
		m.shards[i].users = make(map[User][]Session)
	}
	return m
}

func (m *Memory) shard(u User) *memShard {
	// fibonacci hashing of the uid, mixed with the account system
	h := (u.UID ^ uint64(u.Account)<<32) * 0x9E3779B97F4A7C15
	return &m.shards[h>>58]
}

// Register implements Router.
func (m *Memory) Register(_ context.Context, s Session, maxPerTerminal int) ([]Session, error) {
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
			return nil, nil
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
	sh.users[u] = append(list, s)
	return evicted, nil
}

// Unregister implements Router.
func (m *Memory) Unregister(_ context.Context, s Session) (bool, error) {
	u := s.User()
	sh := m.shard(u)
	sh.mu.Lock()
	defer sh.mu.Unlock()
	list := sh.users[u]
	for i := range list {
		if list[i].Same(&s) {
			if len(list) == 1 {
				delete(sh.users, u)
				return true, nil
			}
			n := make([]Session, 0, len(list)-1)
			n = append(n, list[:i]...)
			sh.users[u] = append(n, list[i+1:]...)
			return true, nil
		}
	}
	return false, nil
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

// LookupMany implements Router.
func (m *Memory) LookupMany(ctx context.Context, us []User) ([][]Session, error) {
	out := make([][]Session, len(us))
	for i, u := range us {
		out[i], _ = m.Lookup(ctx, u)
	}
	return out, nil
}

// PurgeGate implements Router.
func (m *Memory) PurgeGate(_ context.Context, gate string) (int, error) {
	n := 0
	for i := range m.shards {
		sh := &m.shards[i]
		sh.mu.Lock()
		for u, list := range sh.users {
			kept := list[:0:0]
			for _, s := range list {
				if s.Gate == gate {
					n++
					continue
				}
				kept = append(kept, s)
			}
			switch {
			case len(kept) == 0:
				delete(sh.users, u)
			case len(kept) != len(list):
				sh.users[u] = kept
			}
		}
		sh.mu.Unlock()
	}
	return n, nil
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
