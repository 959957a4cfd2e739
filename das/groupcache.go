package das

import (
	"container/list"
	"context"
	"sync"

	"github.com/prometheus/client_golang/prometheus"
)

// GroupCache keeps the members of recently used groups in memory, so that
// a group message's fan-out does not read the whole membership from the
// store each time. It is bounded by the number of member entries it holds
// (least recently used groups leave first).
//
// A cached membership carries its version (GroupInfo.MemberSeq: the seq of
// the group's last membership change). Every append returns the version at
// the appended seq (Appended.MemberSeq), and Members reloads a group whose
// cached version is older: a membership change made by any logic node
// anywhere in the cluster invalidates every other node's copy at its next
// message to the group, with no message between the nodes. Invalidate
// drops a group at once (the node that made the change, and, through the
// router's publish, every node of the DC). All methods are safe for
// concurrent use.
type GroupCache struct {
	store GroupStore
	max   int

	mu      sync.Mutex
	groups  map[uint64]*list.Element // of *cachedGroup
	lru     list.List                // front: most recently used
	entries int

	mHits, mMisses, mEvicted prometheus.Counter
	mReads                   prometheus.Counter
}

type cachedGroup struct {
	id      uint64
	members []Member
	version uint64
	index   map[User]uint64 // user -> join seq, built on the first Member call
	head    uint64          // the highest seq known to be stored (SawSeq)
}

// DefaultGroupCacheEntries bounds a GroupCache when the caller gives 0:
// about 40 MB of member entries.
const DefaultGroupCacheEntries = 1 << 20

// NewGroupCache returns a cache over gs holding at most maxEntries members
// in all (0: DefaultGroupCacheEntries). Its metrics go to reg when not nil.
func NewGroupCache(gs GroupStore, maxEntries int, reg prometheus.Registerer) (*GroupCache, error) {
	if maxEntries <= 0 {
		maxEntries = DefaultGroupCacheEntries
	}
	c := &GroupCache{store: gs, max: maxEntries, groups: make(map[uint64]*list.Element)}
	counter := func(name, help string) prometheus.Counter {
		return prometheus.NewCounter(prometheus.CounterOpts{Namespace: "imd", Subsystem: "das", Name: name, Help: help})
	}
	c.mHits = counter("group_cache_hits_total", "Group membership reads served from the cache.")
	c.mMisses = counter("group_cache_misses_total", "Group membership reads that went to the store (absent, or older than the message's membership version).")
	c.mEvicted = counter("group_cache_evictions_total", "Groups dropped from the cache to keep it within its bound.")
	c.mReads = counter("group_cache_member_rows_read_total", "Member rows read from the store to fill the cache (what a cache hit saves is the group's size).")
	if reg != nil {
		for _, m := range []prometheus.Collector{c.mHits, c.mMisses, c.mEvicted, c.mReads} {
			if err := reg.Register(m); err != nil {
				return nil, err
			}
		}
		entries := prometheus.NewGaugeFunc(prometheus.GaugeOpts{Namespace: "imd", Subsystem: "das", Name: "group_cache_entries", Help: "Member entries held by the group cache."},
			func() float64 { c.mu.Lock(); defer c.mu.Unlock(); return float64(c.entries) })
		if err := reg.Register(entries); err != nil {
			return nil, err
		}
	}
	return c, nil
}

// Members returns the members of group id at a version no older than
// minVersion (0: whatever is cached), from the cache or, when it has none
// that recent, from the store. The slice is shared: do not modify it.
func (c *GroupCache) Members(ctx context.Context, id, minVersion uint64) ([]Member, uint64, error) {
	c.mu.Lock()
	if e, ok := c.groups[id]; ok {
		g := e.Value.(*cachedGroup)
		if g.version >= minVersion {
			c.lru.MoveToFront(e)
			c.mu.Unlock()
			c.mHits.Inc()
			return g.members, g.version, nil
		}
	}
	c.mu.Unlock()
	c.mMisses.Inc()
	members, version, err := c.store.Members(ctx, id)
	if err != nil {
		return nil, 0, err
	}
	c.mReads.Add(float64(len(members)))
	c.put(id, members, version)
	return members, version, nil
}

// Member reports whether u is a member of group id as the cache knows it
// (loading the group when it has none), and its join seq. The answer may
// be as old as the cached version: use it where a stale answer is
// harmless.
func (c *GroupCache) Member(ctx context.Context, id uint64, u User) (joinSeq uint64, ok bool, err error) {
	for range 2 {
		c.mu.Lock()
		if e, found := c.groups[id]; found {
			g := e.Value.(*cachedGroup)
			if g.index == nil {
				g.index = make(map[User]uint64, len(g.members))
				for _, m := range g.members {
					g.index[m.User] = m.JoinSeq
				}
			}
			joinSeq, ok = g.index[u]
			c.lru.MoveToFront(e)
			c.mu.Unlock()
			c.mHits.Inc()
			return joinSeq, ok, nil
		}
		c.mu.Unlock()
		if _, _, err := c.Members(ctx, id, 0); err != nil {
			return 0, false, err
		}
	}
	// Too large to cache: look through the store's answer.
	members, _, err := c.store.Members(ctx, id)
	if err != nil {
		return 0, false, err
	}
	for _, m := range members {
		if m.User == u {
			return m.JoinSeq, true, nil
		}
	}
	return 0, false, nil
}

// put caches members at version unless a newer version is cached already
// (a concurrent reload), and evicts the least recently used groups beyond
// the bound. A group larger than the whole bound is not cached.
func (c *GroupCache) put(id uint64, members []Member, version uint64) {
	if len(members) > c.max {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if e, ok := c.groups[id]; ok {
		g := e.Value.(*cachedGroup)
		if g.version > version {
			return
		}
		c.entries += len(members) - len(g.members)
		g.members, g.version, g.index = members, version, nil
		c.lru.MoveToFront(e)
	} else {
		c.groups[id] = c.lru.PushFront(&cachedGroup{id: id, members: members, version: version})
		c.entries += len(members)
	}
	for c.entries > c.max {
		e := c.lru.Back()
		g := e.Value.(*cachedGroup)
		c.lru.Remove(e)
		delete(c.groups, g.id)
		c.entries -= len(g.members)
		c.mEvicted.Inc()
	}
}

// SawSeq records that group id has stored seq, if the group is cached. A
// group's head only grows, so what was seen stays true.
func (c *GroupCache) SawSeq(id, seq uint64) {
	c.mu.Lock()
	if e, ok := c.groups[id]; ok {
		g := e.Value.(*cachedGroup)
		g.head = max(g.head, seq)
	}
	c.mu.Unlock()
}

// HasSeq reports whether group id is known (SawSeq) to have stored seq;
// false means it may or may not have. A member's ack of a seq it was sent
// is answered without reading the group's head from the store.
func (c *GroupCache) HasSeq(id, seq uint64) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	e, ok := c.groups[id]
	return ok && e.Value.(*cachedGroup).head >= seq
}

// Invalidate drops group id: its membership changed.
func (c *GroupCache) Invalidate(id uint64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if e, ok := c.groups[id]; ok {
		c.entries -= len(e.Value.(*cachedGroup).members)
		c.lru.Remove(e)
		delete(c.groups, id)
	}
}
