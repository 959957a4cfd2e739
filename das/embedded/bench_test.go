package embedded

import (
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2"
	"google.golang.org/protobuf/proto"

	"github.com/imd-dev/imd/das"
	"github.com/imd-dev/imd/schema/pb"
)

var benchContent = make([]byte, 200)

func benchMsg(id uint64, from, to das.User) *pb.C2CMessage {
	return &pb.C2CMessage{
		Msgid:       id,
		From:        &pb.User{Account: from.Account, Uid: from.UID},
		FromAppcode: 101,
		To:          &pb.User{Account: to.Account, Uid: to.UID},
		Msgtype:     1,
		Content:     benchContent,
		SentAtMs:    time.Now().UnixMilli(),
		ClientMsgId: fmt.Sprint("cm-", id),
	}
}

// reportWrites adds writes/s and WAL fsyncs per write.
func reportWrites(b *testing.B, s *Store, syncsBefore uint64, start time.Time) {
	el := time.Since(start)
	b.ReportMetric(float64(b.N)/el.Seconds(), "writes/s")
	b.ReportMetric(float64(walSyncs(b, s)-syncsBefore)/float64(b.N), "fsyncs/op")
}

// BenchmarkPutC2C stores 200-byte messages with a client id into two
// inboxes and two timelines, each a synced batch. serial is one writer;
// parallel runs 8 writers per core (each its own sender), whose commits
// share fsyncs.
func BenchmarkPutC2C(b *testing.B) {
	b.Run("serial", func(b *testing.B) {
		s := openTest(b, Options{JanitorInterval: -1})
		from, to := user(1), user(2)
		b.SetBytes(int64(len(benchContent)))
		b.ReportAllocs()
		syncs, start := walSyncs(b, s), time.Now()
		b.ResetTimer()
		for i := range b.N {
			if _, _, err := s.PutC2C(ctx, benchMsg(uint64(i+1), from, to), []uint32{101, 102}, nil); err != nil {
				b.Fatal(err)
			}
		}
		b.StopTimer()
		reportWrites(b, s, syncs, start)
	})
	b.Run("parallel", func(b *testing.B) {
		s := openTest(b, Options{JanitorInterval: -1})
		var next, sender atomic.Uint64
		b.SetBytes(int64(len(benchContent)))
		b.SetParallelism(8)
		b.ReportAllocs()
		syncs, start := walSyncs(b, s), time.Now()
		b.ResetTimer()
		b.RunParallel(func(pb *testing.PB) {
			from := user(100 + sender.Add(1))
			to := user(2)
			for pb.Next() {
				if _, _, err := s.PutC2C(ctx, benchMsg(next.Add(1), from, to), []uint32{101, 102}, nil); err != nil {
					b.Error(err)
					return
				}
			}
		})
		b.StopTimer()
		reportWrites(b, s, syncs, start)
	})
}

// fill stores n messages to to's terminal 101 without syncing each one.
func fill(b testing.TB, s *Store, to das.User, n int) {
	b.Helper()
	from := user(1)
	batch := s.db.NewBatch()
	for i := range n {
		m := benchMsg(uint64(i+1), from, to)
		body, err := marshal(m)
		if err != nil {
			b.Fatal(err)
		}
		s.addMessage(batch, m, []uint32{101}, nil, body)
		if batch.Count() > 10000 || i == n-1 {
			if err := batch.Commit(pebble.NoSync); err != nil {
				b.Fatal(err)
			}
			batch.Close()
			batch = s.db.NewBatch()
		}
	}
	batch.Close()
	if err := s.db.Flush(); err != nil {
		b.Fatal(err)
	}
}

// BenchmarkInboxPage reads the first page of 100 of an inbox of 10,000.
func BenchmarkInboxPage(b *testing.B) {
	s := openTest(b, Options{JanitorInterval: -1})
	to := user(2)
	fill(b, s, to, 10000)
	b.ReportAllocs()
	b.ResetTimer()
	for b.Loop() {
		msgs, more, err := s.InboxPage(ctx, term(to, 101), 0, 100)
		if err != nil || len(msgs) != 100 || !more {
			b.Fatalf("%d messages, more %v, %v", len(msgs), more, err)
		}
	}
	b.ReportMetric(float64(b.N*100)/b.Elapsed().Seconds(), "msgs/s")
}

// BenchmarkAck acknowledges one message per call (one synced batch), and
// a page of 100 per call.
func BenchmarkAck(b *testing.B) {
	for _, per := range []int{1, 100} {
		b.Run(fmt.Sprint("msgids=", per), func(b *testing.B) {
			s := openTest(b, Options{JanitorInterval: -1})
			to := user(2)
			fill(b, s, to, b.N*per)
			ids := make([]uint64, per)
			b.ReportAllocs()
			syncs, start := walSyncs(b, s), time.Now()
			b.ResetTimer()
			for i := range b.N {
				for j := range ids {
					ids[j] = uint64(i*per + j + 1)
				}
				acked, missing, err := s.Ack(ctx, term(to, 101), ids)
				if err != nil || len(missing) != 0 || len(acked) != per {
					b.Fatalf("acked %d, missing %v, %v", len(acked), missing, err)
				}
			}
			b.StopTimer()
			reportWrites(b, s, syncs, start)
		})
	}
}

func marshal(m *pb.C2CMessage) ([]byte, error) { return proto.Marshal(m) }

// BenchmarkMessageLife is the store's whole work for one chat message to
// one online terminal: PutC2C (two inboxes, two timelines), the
// recipient's Ack, and the janitor's share of the Sweep that follows (its
// collection marks). Reported as ns per message for the put and ack
// phase and for the sweep; the sweep runs every minute in a server, so a
// short benchmark of the send path alone never sees its cost.
func BenchmarkMessageLife(b *testing.B) {
	s := openTest(b, Options{JanitorInterval: -1})
	from, to := user(1), user(2)
	b.ReportAllocs()
	b.ResetTimer()
	start := time.Now()
	for i := range b.N {
		id := uint64(i + 1)
		if _, _, err := s.PutC2C(ctx, benchMsg(id, from, to), []uint32{101, 102}, nil); err != nil {
			b.Fatal(err)
		}
		if _, _, err := s.Ack(ctx, term(to, 101), []uint64{id}); err != nil {
			b.Fatal(err)
		}
	}
	mid := time.Now()
	if _, err := s.Sweep(ctx); err != nil {
		b.Fatal(err)
	}
	end := time.Now()
	b.StopTimer()
	b.ReportMetric(float64(mid.Sub(start).Nanoseconds())/float64(b.N), "put+ack-ns/msg")
	b.ReportMetric(float64(end.Sub(mid).Nanoseconds())/float64(b.N), "sweep-ns/msg")
	b.ReportMetric(float64(countTag(b, s, tagGC)), "marks-left")
}

// BenchmarkIdempotencyExpiry is the janitor's work to expire the
// idempotency keys of b.N messages once their TTL has passed (each key and
// its expiry-queue row: a read and two deletes), in ns per message. The
// keys here are young, in the memtable or the first levels; a real sweep
// reads keys a TTL old, so it costs more.
func BenchmarkIdempotencyExpiry(b *testing.B) {
	s := openTest(b, Options{JanitorInterval: -1, Retention: das.Retention{IdempotencyTTL: time.Hour}})
	var mu sync.Mutex
	now := time.Now()
	s.now = func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	var next atomic.Uint64
	var wg sync.WaitGroup
	for w := range 16 {
		wg.Go(func() {
			from, to := user(uint64(100+w)), user(2)
			for {
				id := next.Add(1)
				if id > uint64(b.N) {
					return
				}
				if _, _, err := s.PutC2C(ctx, benchMsg(id, from, to), []uint32{101}, nil); err != nil {
					b.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()
	mu.Lock()
	now = now.Add(2 * time.Hour)
	mu.Unlock()
	b.ResetTimer()
	st, err := s.Sweep(ctx)
	if err != nil {
		b.Fatal(err)
	}
	b.StopTimer()
	if st.Idempotency != b.N {
		b.Fatalf("expired %d keys, want %d", st.Idempotency, b.N)
	}
}
