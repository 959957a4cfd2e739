package router_test

import (
	"context"
	"errors"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/imd-dev/imd/router"
)

// testLedger checks the PushLedger contract on l.
func testLedger(t *testing.T, l router.PushLedger) {
	ctx := context.Background()
	rec := router.PushRecord{PushID: 1001, AppCode: 101, CreatedMS: 1_700_000_000_000, Recipients: 3}
	if err := l.Open(ctx, rec, time.Hour); err != nil {
		t.Fatal(err)
	}
	if n, err := l.Acked(ctx, []uint64{1001, 1001, 999}); err != nil || n != 2 {
		t.Fatalf("Acked: %d %v, want 2 (999 is unknown)", n, err)
	}
	if err := l.Settle(ctx, 1001, 3, 2, 1, 0); err != nil {
		t.Fatal(err)
	}
	got, ok, err := l.Get(ctx, 1001)
	want := rec
	want.Online, want.Stored, want.Acked = 2, 1, 2
	if err != nil || !ok || got != want {
		t.Fatalf("Get: %+v %v %v, want %+v", got, ok, err, want)
	}
	// A broadcast's record: its recipients are known when it settles.
	bc := router.PushRecord{PushID: 1002, AppCode: 102, CreatedMS: 1_700_000_000_001, Broadcast: true}
	if err := l.Open(ctx, bc, time.Hour); err != nil {
		t.Fatal(err)
	}
	if _, err := l.Acked(ctx, []uint64{1002}); err != nil {
		t.Fatal(err)
	}
	if err := l.Settle(ctx, 1002, 5, 4, 0, 1); err != nil {
		t.Fatal(err)
	}
	want = bc
	want.Recipients, want.Online, want.Dropped, want.Acked = 5, 4, 1, 1
	if got, ok, err := l.Get(ctx, 1002); err != nil || !ok || got != want {
		t.Fatalf("Get broadcast: %+v %v %v, want %+v", got, ok, err, want)
	}
	if _, ok, err := l.Get(ctx, 999); ok || err != nil {
		t.Fatalf("Get of an unknown push: %v %v", ok, err)
	}
	// Expired: neither answered for nor settled.
	if err := l.Open(ctx, router.PushRecord{PushID: 1003}, time.Millisecond); err != nil {
		t.Fatal(err)
	}
	time.Sleep(20 * time.Millisecond)
	if err := l.Settle(ctx, 1003, 1, 1, 0, 0); err != nil {
		t.Fatal(err)
	}
	if _, ok, err := l.Get(ctx, 1003); ok || err != nil {
		t.Fatalf("Get of an expired push: %v %v", ok, err)
	}
}

func TestMemoryLedger(t *testing.T) { testLedger(t, router.NewMemoryLedger(0)) }

func TestMemoryLedgerZeroValue(t *testing.T) {
	var l router.MemoryLedger
	testLedger(t, &l)
	if l.Max() != router.DefaultLedgerMax {
		t.Fatalf("zero value's bound %d, want %d", l.Max(), router.DefaultLedgerMax)
	}
}

func TestRedisLedger(t *testing.T) {
	r, _, _ := newTestRedis(t)
	testLedger(t, r)
}

// TestMemoryLedgerBound: the ledger never holds more than its bound; the
// newest pushes are kept, the oldest evicted, and Get tells an evicted
// push from an unknown one.
func TestMemoryLedgerBound(t *testing.T) {
	ctx := context.Background()
	l := router.NewMemoryLedger(1000)
	if l.Max() != 1008 { // 16 shards of 63
		t.Fatalf("bound %d, want 1008", l.Max())
	}
	const n = 20_000
	for i := range n {
		id := uint64(1+i) << 22 // snowflake-like: time in the high bits
		if err := l.Open(ctx, router.PushRecord{PushID: id, Recipients: 1}, time.Hour); err != nil {
			t.Fatal(err)
		}
		if l.Len() > l.Max() {
			t.Fatalf("%d records after %d pushes, over the bound of %d", l.Len(), i+1, l.Max())
		}
	}
	if l.Len() < l.Max()*9/10 {
		t.Fatalf("only %d records kept of %d", l.Len(), l.Max())
	}
	kept, evicted := 0, 0
	for i := range n {
		id := uint64(1+i) << 22
		_, ok, err := l.Get(ctx, id)
		switch {
		case ok:
			kept++
		case errors.Is(err, router.ErrStatsEvicted):
			evicted++
			if i >= n-100 {
				t.Fatalf("push %d of the newest 100 was evicted", i)
			}
		default:
			t.Fatalf("push %d: %v %v", i, ok, err)
		}
	}
	if kept != l.Len() || kept+evicted != n {
		t.Fatalf("kept %d evicted %d of %d (len %d)", kept, evicted, n, l.Len())
	}
	if _, ok, err := l.Get(ctx, uint64(n+10)<<22); ok || err != nil {
		t.Fatalf("a push id newer than any: %v %v, want unknown", ok, err)
	}
	// Acks of an evicted push count nothing.
	if c, _ := l.Acked(ctx, []uint64{1 << 22}); c != 0 {
		t.Fatalf("an evicted push counted %d acks", c)
	}
}

// TestMemoryLedgerExpiry: expired records make room for new ones.
func TestMemoryLedgerExpiry(t *testing.T) {
	ctx := context.Background()
	l := router.NewMemoryLedger(16)
	for i := range 64 {
		_ = l.Open(ctx, router.PushRecord{PushID: uint64(1 + i)}, time.Millisecond)
	}
	time.Sleep(10 * time.Millisecond)
	for i := range 64 {
		_ = l.Open(ctx, router.PushRecord{PushID: uint64(1000 + i)}, time.Hour)
	}
	if l.Len() > 16 {
		t.Fatalf("%d records held, bound 16", l.Len())
	}
	if _, ok, _ := l.Get(ctx, 1063); !ok {
		t.Fatal("the newest push is not kept")
	}
}

// TestMemoryLedgerConcurrent: acks counted from many goroutines while
// pushes are opened all add up (run with -race).
func TestMemoryLedgerConcurrent(t *testing.T) {
	ctx := context.Background()
	l := router.NewMemoryLedger(1 << 12)
	const pushes, ackers, acks = 64, 8, 2000
	for i := range pushes {
		_ = l.Open(ctx, router.PushRecord{PushID: uint64(1 + i)}, time.Hour)
	}
	var wg sync.WaitGroup
	for a := range ackers {
		wg.Go(func() {
			ids := []uint64{0, 0}
			for i := range acks {
				ids[0], ids[1] = uint64(1+i%pushes), uint64(1+(i+a)%pushes)
				if n, _ := l.Acked(ctx, ids); n != 2 {
					t.Errorf("counted %d of 2", n)
					return
				}
			}
		})
	}
	wg.Go(func() { // new pushes meanwhile, in other slots
		for i := range 1000 {
			_ = l.Open(ctx, router.PushRecord{PushID: uint64(10_000 + i)}, time.Hour)
			_ = l.Settle(ctx, uint64(10_000+i), 1, 1, 0, 0)
			_, _, _ = l.Get(ctx, uint64(1+i%pushes))
		}
	})
	wg.Wait()
	total := 0
	for i := range pushes {
		r, ok, _ := l.Get(ctx, uint64(1+i))
		if !ok {
			t.Fatalf("push %d lost", i+1)
		}
		total += r.Acked
	}
	if total != ackers*acks*2 {
		t.Fatalf("%d acks counted, want %d", total, ackers*acks*2)
	}
}

// TestMemoryLedgerChurn: acks race with evictions (a ledger of 64 taking
// 20,000 pushes): a push never shows more acks than were sent for it,
// and every ack counted landed on a push that was kept (run with -race).
func TestMemoryLedgerChurn(t *testing.T) {
	ctx := context.Background()
	l := router.NewMemoryLedger(64)
	const pushes = 20_000
	sent := make([]atomic.Int32, pushes+1)
	var newest atomic.Uint64
	var counted atomic.Int64
	var wg sync.WaitGroup
	wg.Go(func() {
		for i := uint64(1); i <= pushes; i++ {
			_ = l.Open(ctx, router.PushRecord{PushID: i}, time.Hour)
			newest.Store(i)
		}
	})
	for a := range 4 {
		wg.Go(func() {
			ids := []uint64{0}
			for j := 0; newest.Load() < pushes; j++ {
				n := newest.Load()
				if n < 50 {
					continue
				}
				ids[0] = n - uint64((j*7+a)%50) // among the newest 50: some being evicted
				sent[ids[0]].Add(1)
				c, _ := l.Acked(ctx, ids)
				counted.Add(int64(c))
			}
		})
	}
	wg.Wait()
	var kept int64
	for id := uint64(1); id <= pushes; id++ {
		r, ok, _ := l.Get(ctx, id)
		if !ok {
			continue
		}
		if int32(r.Acked) > sent[id].Load() {
			t.Fatalf("push %d shows %d acks, %d were sent", id, r.Acked, sent[id].Load())
		}
		kept += int64(r.Acked)
	}
	if kept > counted.Load() {
		t.Fatalf("the kept pushes show %d acks, Acked counted %d", kept, counted.Load())
	}
}

func heapAlloc() uint64 {
	runtime.GC()
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.HeapAlloc
}

// BenchmarkMemoryLedgerBytes measures the heap a full MemoryLedger holds
// per push record (B/push) in its steady state: 400,000 pushes opened
// into a bound of 200,000 (the oldest half dropped), the heap (after GC)
// compared before and after. docs/capacity.md, "Push statistics and broadcasts".
func BenchmarkMemoryLedgerBytes(b *testing.B) {
	const n = 200_000
	ctx := context.Background()
	for range b.N {
		before := heapAlloc()
		l := router.NewMemoryLedger(n)
		for i := range 2 * n {
			_ = l.Open(ctx, router.PushRecord{PushID: uint64(1+i) << 22, AppCode: 101, CreatedMS: 1, Recipients: 50}, time.Hour)
		}
		after := heapAlloc()
		b.ReportMetric(float64(after-before)/float64(l.Len()), "B/push")
		runtime.KeepAlive(l)
	}
}

// BenchmarkMemoryLedgerAcked counts acks from GOMAXPROCS goroutines, each
// ack of one push among 4,096 (the dispatch shape: many pushes acked at
// once). Compare -cpu 1,2: ns/op falls when acks are counted in parallel.
func BenchmarkMemoryLedgerAcked(b *testing.B) {
	ctx := context.Background()
	l := router.NewMemoryLedger(0)
	const pushes = 4096
	for i := range pushes {
		_ = l.Open(ctx, router.PushRecord{PushID: uint64(1+i) << 22}, time.Hour)
	}
	var goroutines atomic.Uint64
	b.RunParallel(func(pb *testing.PB) {
		// Each goroutine walks the pushes from its own offset: no state
		// shared but the ledger.
		i := goroutines.Add(1) * 997
		ids := []uint64{0}
		for pb.Next() {
			i++
			ids[0] = (i%pushes + 1) << 22
			_, _ = l.Acked(ctx, ids)
		}
	})
}

// BenchmarkMemoryLedgerAckedOne counts acks of one push (a broadcast's)
// from GOMAXPROCS goroutines.
func BenchmarkMemoryLedgerAckedOne(b *testing.B) {
	ctx := context.Background()
	l := router.NewMemoryLedger(0)
	_ = l.Open(ctx, router.PushRecord{PushID: 1 << 22}, time.Hour)
	b.RunParallel(func(pb *testing.PB) {
		ids := []uint64{1 << 22}
		for pb.Next() {
			_, _ = l.Acked(ctx, ids)
		}
	})
}

// BenchmarkMemoryLedgerOpen opens pushes into a full ledger (each evicts
// the oldest of its shard).
func BenchmarkMemoryLedgerOpen(b *testing.B) {
	ctx := context.Background()
	l := router.NewMemoryLedger(1 << 16)
	var next atomic.Uint64
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			_ = l.Open(ctx, router.PushRecord{PushID: next.Add(1) << 22}, time.Hour)
		}
	})
}

// TestRedisLedgerBytes reports what one push record costs in Redis
// (MEMORY USAGE of its key, with the default listpack encoding of small
// hashes): docs/capacity.md, "Push statistics and broadcasts".
func TestRedisLedgerBytes(t *testing.T) {
	r, raw, prefix := newTestRedis(t)
	ctx := context.Background()
	id := uint64(7_345_678_901_234_567_890)
	if err := r.Open(ctx, router.PushRecord{PushID: id, AppCode: 101, CreatedMS: time.Now().UnixMilli(), Recipients: 50}, time.Hour); err != nil {
		t.Fatal(err)
	}
	if err := r.Settle(ctx, id, 50, 30, 15, 5); err != nil {
		t.Fatal(err)
	}
	if _, err := r.Acked(ctx, []uint64{id}); err != nil {
		t.Fatal(err)
	}
	key := prefix + "p:{" + "7345678901234567890" + "}"
	n, err := raw.Do(ctx, raw.B().MemoryUsage().Key(key).Build()).AsInt64()
	if err != nil {
		t.Fatal(err)
	}
	enc, _ := raw.Do(ctx, raw.B().ObjectEncoding().Key(key).Build()).ToString()
	ttl, _ := raw.Do(ctx, raw.B().Pttl().Key(key).Build()).AsInt64()
	t.Logf("one push record in Redis: MEMORY USAGE %d bytes (key %d bytes, encoding %s, ttl %dms)", n, len(key), enc, ttl)
	if n <= 0 || n > 512 || ttl <= 0 {
		t.Fatalf("MEMORY USAGE %d, ttl %d", n, ttl)
	}
}
