package cassandra

import (
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/imd-dev/imd/das"
	"github.com/imd-dev/imd/das/dastest"
)

// TestMaxCountConformance: Retention.MaxCount is enforced on Cassandra as
// on the embedded engine (the same conformance check).
func TestMaxCountConformance(t *testing.T) {
	cfg := needCassandra(t)
	cfg.Retention.MaxCount = dastest.MaxCount
	cfg.TrimInterval = -1
	dastest.RunMaxCount(t, func(t *testing.T) das.Store { return openTest(t, cfg) }, func(t *testing.T, s das.Store) {
		t.Helper()
		if _, err := s.(*Store).Trim(ctx); err != nil {
			t.Fatalf("Trim: %v", err)
		}
	})
}

// TestTrimBounded: a round removes at most trimRowsPerUser rows of a
// timeline and leaves it for the next round, which goes on from there.
func TestTrimBounded(t *testing.T) {
	cfg := needCassandra(t)
	cfg.Retention.MaxCount = 3
	cfg.TrimInterval = -1
	s := openTest(t, cfg)
	defer func(n int) { trimRowsPerUser = n }(trimRowsPerUser)
	trimRowsPerUser = 2
	a, b := newUser(), newUser()
	var sent []uint64
	for range 8 {
		m := newMsg(msgidAround(time.Now()), a, b, "")
		mustPut(t, s, m, 101)
		sent = append(sent, m.Msgid)
	}
	for i, want := range []struct{ removed, left, kept int }{{2 + 2, 2, 6}, {2 + 2, 2, 4}, {1 + 1, 0, 3}, {0, 0, 3}} {
		st, err := s.Trim(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if st.Timeline != want.removed || st.Left != want.left {
			t.Fatalf("round %d: %+v, want %d rows removed and %d timelines left", i, st, want.removed, want.left)
		}
		for _, side := range [][2]das.User{{a, b}, {b, a}} {
			u, peer := side[0], side[1]
			got, _, err := s.History(ctx, u, nil, 0, 100)
			if err != nil {
				t.Fatal(err)
			}
			wantIDs(t, fmt.Sprintf("round %d, user %d", i, u.UID), got, sent[len(sent)-want.kept:]...)
			got, _, err = s.History(ctx, u, &peer, 0, 100)
			if err != nil {
				t.Fatal(err)
			}
			wantIDs(t, fmt.Sprintf("round %d, user %d with the peer", i, u.UID), got, sent[len(sent)-want.kept:]...)
		}
	}
}

// TestTrimConcurrentNodes: two stores (two logic nodes) writing to and
// trimming the same timelines at once never remove one of the newest
// MaxCount messages.
func TestTrimConcurrentNodes(t *testing.T) {
	cfg := needCassandra(t)
	cfg.Retention.MaxCount = 5
	cfg.TrimInterval = -1
	nodes := []*Store{openTest(t, cfg), openTest(t, cfg)}
	a, b := newUser(), newUser()
	var (
		mu   sync.Mutex
		sent []uint64
		wg   sync.WaitGroup
		stop = make(chan struct{})
	)
	for _, s := range nodes {
		wg.Add(1)
		go func() { // trims all the time
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				if _, err := s.Trim(ctx); err != nil {
					t.Error(err)
					return
				}
			}
		}()
	}
	for i := range 40 {
		s := nodes[i%2]
		mu.Lock()
		m := newMsg(msgidAround(time.Now()), a, b, "")
		sent = append(sent, m.Msgid)
		mu.Unlock()
		mustPut(t, s, m, 101)
		if i >= 5 {
			got, _, err := s.History(ctx, a, nil, 0, 100)
			if err != nil {
				t.Fatal(err)
			}
			if len(got) < 5 || !slices.Equal(ids(got)[len(got)-5:], sent[i-4:i+1]) {
				t.Fatalf("after message %d: a's history %v lacks one of the newest 5 %v", i, ids(got), sent[i-4:i+1])
			}
		}
	}
	close(stop)
	wg.Wait()
	for _, s := range nodes {
		if _, err := s.Trim(ctx); err != nil {
			t.Fatal(err)
		}
	}
	for _, u := range []das.User{a, b} {
		got, _, err := nodes[0].History(ctx, u, nil, 0, 100)
		if err != nil {
			t.Fatal(err)
		}
		wantIDs(t, "after the last trim", got, sent[len(sent)-5:]...)
	}
}

// TestTrimInBackground: without calls to Trim, the store trims every
// TrimInterval by itself.
func TestTrimInBackground(t *testing.T) {
	cfg := needCassandra(t)
	cfg.Retention.MaxCount = 2
	cfg.TrimInterval = 20 * time.Millisecond
	s := openTest(t, cfg)
	a, b := newUser(), newUser()
	var sent []uint64
	for range 5 {
		m := newMsg(msgidAround(time.Now()), a, b, "")
		mustPut(t, s, m, 101)
		sent = append(sent, m.Msgid)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		got, _, err := s.History(ctx, b, nil, 0, 100)
		if err != nil {
			t.Fatal(err)
		}
		if slices.Equal(ids(got), sent[3:]) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("b's history is still %v, want %v", ids(got), sent[3:])
		}
		time.Sleep(20 * time.Millisecond)
	}
}
