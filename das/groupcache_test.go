package das

import (
	"context"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
)

// countingMembers serves Members from a map and counts the reads; the rest
// of GroupStore is not used by the cache.
type countingMembers struct {
	GroupStore
	members map[uint64][]Member
	version map[uint64]uint64
	reads   int
}

func (c *countingMembers) Members(_ context.Context, id uint64) ([]Member, uint64, error) {
	c.reads++
	return c.members[id], c.version[id], nil
}

func TestGroupCache(t *testing.T) {
	st := &countingMembers{members: map[uint64][]Member{}, version: map[uint64]uint64{}}
	for id := uint64(1); id <= 3; id++ {
		st.members[id] = make([]Member, 4)
		st.version[id] = 1
	}
	reg := prometheus.NewRegistry()
	c, err := NewGroupCache(st, 10, reg)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	get := func(id, minVersion uint64) uint64 {
		t.Helper()
		ms, v, err := c.Members(ctx, id, minVersion)
		if err != nil || len(ms) != len(st.members[id]) {
			t.Fatalf("Members(%d) = %d members, %v", id, len(ms), err)
		}
		return v
	}
	get(1, 0)
	get(1, 1)
	if st.reads != 1 {
		t.Fatalf("%d store reads for two lookups of one group, want 1", st.reads)
	}
	// A newer membership version than the cached one reloads.
	st.version[1], st.members[1] = 3, make([]Member, 5)
	if v := get(1, 3); v != 3 || st.reads != 2 {
		t.Fatalf("version %d after %d reads, want 3 after 2", v, st.reads)
	}
	// The bound: 10 entries hold group 1 (5) and group 2 (4); group 3
	// evicts the least recently used.
	get(2, 0)
	get(1, 0)
	get(3, 0)
	if c.entries > 10 {
		t.Fatalf("%d entries, over the bound of 10", c.entries)
	}
	reads := st.reads
	get(1, 0)
	if st.reads != reads {
		t.Fatal("the most recently used group was evicted")
	}
	get(2, 0)
	if st.reads != reads+1 {
		t.Fatal("the least recently used group was kept over the bound")
	}
	// Invalidate drops a group.
	reads = st.reads
	c.Invalidate(2)
	get(2, 0)
	if st.reads != reads+1 {
		t.Fatal("an invalidated group was served from the cache")
	}
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == "imd_das_group_cache_hits_total" {
			if h := mf.GetMetric()[0].GetCounter().GetValue(); h != 3 {
				t.Fatalf("hits %v, want 3", h)
			}
			return
		}
	}
	t.Fatal("no imd_das_group_cache_hits_total")
}

func TestGroupCacheMember(t *testing.T) {
	st := &countingMembers{members: map[uint64][]Member{
		1: {{User: User{Account: 1, UID: 10}, JoinSeq: 1}, {User: User{Account: 2, UID: 10}, JoinSeq: 4}},
	}, version: map[uint64]uint64{1: 4}}
	c, err := NewGroupCache(st, 10, nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	for _, tc := range []struct {
		u    User
		join uint64
		ok   bool
	}{{User{1, 10}, 1, true}, {User{2, 10}, 4, true}, {User{1, 11}, 0, false}} {
		join, ok, err := c.Member(ctx, 1, tc.u)
		if err != nil || ok != tc.ok || join != tc.join {
			t.Fatalf("Member(%v) = %d, %v, %v; want %d, %v", tc.u, join, ok, err, tc.join, tc.ok)
		}
	}
	if st.reads != 1 {
		t.Fatalf("%d store reads for three lookups, want 1", st.reads)
	}
	// A group larger than the whole cache is read from the store each time.
	big := make([]Member, 11)
	big[5] = Member{User: User{Account: 1, UID: 99}, JoinSeq: 7}
	st.members[2], st.version[2] = big, 1
	if join, ok, err := c.Member(ctx, 2, User{Account: 1, UID: 99}); err != nil || !ok || join != 7 {
		t.Fatalf("Member of an uncacheable group = %d, %v, %v", join, ok, err)
	}
}

// TestGroupCacheHasSeq: a seq is known once seen for a cached group, never
// for one that is not cached, and a reload at a newer membership version
// keeps what was seen while Invalidate forgets it.
func TestGroupCacheHasSeq(t *testing.T) {
	st := &countingMembers{members: map[uint64][]Member{
		1: {{User: User{Account: 1, UID: 10}, JoinSeq: 1}},
	}, version: map[uint64]uint64{1: 1}}
	c, err := NewGroupCache(st, 10, nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	c.SawSeq(1, 5) // not cached yet: nothing to remember it by
	if c.HasSeq(1, 1) {
		t.Fatal("HasSeq of a group that is not cached")
	}
	if _, _, err := c.Members(ctx, 1, 0); err != nil {
		t.Fatal(err)
	}
	c.SawSeq(1, 5)
	c.SawSeq(1, 3) // heads only grow
	for seq, want := range map[uint64]bool{1: true, 5: true, 6: false} {
		if got := c.HasSeq(1, seq); got != want {
			t.Fatalf("HasSeq(1, %d) = %v, want %v", seq, got, want)
		}
	}
	st.version[1] = 2
	if _, _, err := c.Members(ctx, 1, 2); err != nil {
		t.Fatal(err)
	}
	if !c.HasSeq(1, 5) {
		t.Fatal("a reload forgot the seq seen")
	}
	c.Invalidate(1)
	if c.HasSeq(1, 1) {
		t.Fatal("HasSeq after Invalidate")
	}
}
