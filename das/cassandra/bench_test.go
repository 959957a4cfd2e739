package cassandra

import (
	"fmt"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	gocql "github.com/apache/cassandra-gocql-driver/v2"
	"google.golang.org/protobuf/proto"

	"github.com/imd-dev/imd/das"
	"github.com/imd-dev/imd/das/embedded"
	"github.com/imd-dev/imd/schema/pb"
)

// The benchmarks have the names of das/embedded's (PutC2C/serial,
// PutC2C/parallel, InboxPage, Ack/msgids=N) and run the same workload on
// both engines, one sub-benchmark each (engine=cassandra on the server at
// IMD_TEST_CASSANDRA, engine=embedded in a temporary directory), so that
// one run compares them:
//
//	go test -run '^$' -bench . -benchtime 3s ./das/cassandra
//
// Each reports operations per second and the latency percentiles p50 and
// p99 of single calls in milliseconds.

type benchEngine struct {
	name string
	open func(b *testing.B) das.Store
}

func benchEngines(b *testing.B) []benchEngine {
	es := []benchEngine{{"engine=embedded", func(b *testing.B) das.Store {
		s, err := embedded.Open(b.TempDir(), embedded.Options{JanitorInterval: -1})
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { _ = s.Close() })
		return s
	}}}
	if testSetupErr == nil && testCfg.Keyspace != "" {
		es = append([]benchEngine{{"engine=cassandra", func(b *testing.B) das.Store { return openTest(b, testCfg) }}}, es...)
	} else if os.Getenv("CI") == "true" {
		b.Fatalf("CI=true and no Cassandra: %v", testSetupErr)
	} else {
		b.Logf("engine=cassandra skipped: %v", testSetupErr)
	}
	return es
}

var benchContent = make([]byte, 200)

func benchMsg(from, to das.User, cmid string) *pb.C2CMessage {
	return &pb.C2CMessage{
		Msgid:       msgidAround(time.Now()),
		From:        &pb.User{Account: from.Account, Uid: from.UID},
		FromAppcode: 101,
		To:          &pb.User{Account: to.Account, Uid: to.UID},
		Msgtype:     1,
		Content:     benchContent,
		SentAtMs:    time.Now().UnixMilli(),
		ClientMsgId: cmid,
	}
}

// latencies records call durations and reports their percentiles.
type latencies struct {
	mu sync.Mutex
	d  []time.Duration
}

func (l *latencies) add(d ...time.Duration) {
	l.mu.Lock()
	l.d = append(l.d, d...)
	l.mu.Unlock()
}

func (l *latencies) report(b *testing.B, perOp int, unit string) {
	if len(l.d) == 0 {
		return
	}
	slices.Sort(l.d)
	q := func(p float64) float64 {
		i := min(len(l.d)-1, int(p*float64(len(l.d))))
		return float64(l.d[i].Microseconds()) / 1000
	}
	b.ReportMetric(float64(b.N*perOp)/b.Elapsed().Seconds(), unit)
	b.ReportMetric(q(0.50), "p50-ms")
	b.ReportMetric(q(0.99), "p99-ms")
}

// BenchmarkPutC2C stores 200-byte messages with a client id into two
// inboxes and two timelines. serial is one writer; parallel runs 8
// writers per core (each its own sender).
func BenchmarkPutC2C(b *testing.B) {
	engines := benchEngines(b)
	b.Run("serial", func(b *testing.B) {
		for _, e := range engines {
			b.Run(e.name, func(b *testing.B) {
				s := e.open(b)
				from, to := newUser(), newUser()
				var lat latencies
				lat.d = make([]time.Duration, 0, b.N)
				b.SetBytes(int64(len(benchContent)))
				b.ResetTimer()
				for i := range b.N {
					m := benchMsg(from, to, fmt.Sprint("b", i))
					t0 := time.Now()
					if _, _, err := s.PutC2C(ctx, m, []uint32{101, 102}, nil); err != nil {
						b.Fatal(err)
					}
					lat.d = append(lat.d, time.Since(t0))
				}
				b.StopTimer()
				lat.report(b, 1, "writes/s")
			})
		}
	})
	b.Run("parallel", func(b *testing.B) {
		for _, e := range engines {
			b.Run(e.name, func(b *testing.B) {
				b.SetBytes(int64(len(benchContent)))
				putParallel(b, e.open(b), "p")
			})
		}
	})
}

// BenchmarkPutC2CClaim prices the idempotency claim: the parallel
// workload of BenchmarkPutC2C with a client id (on Cassandra a lightweight
// transaction, then the batch) and without one (the batch alone).
//
//	go test -run '^$' -bench PutC2CClaim -benchtime 2000x -count 3 ./das/cassandra
func BenchmarkPutC2CClaim(b *testing.B) {
	for _, e := range benchEngines(b) {
		for _, prefix := range []string{"c", ""} {
			b.Run(fmt.Sprintf("%s/client-id=%v", e.name, prefix != ""), func(b *testing.B) {
				putParallel(b, e.open(b), prefix)
			})
		}
	}
}

// putParallel runs PutC2C from 8 writers per core (each its own sender)
// to one recipient's two terminals and reports writes/s and latencies.
// Each message's client id is prefix and a counter; none when prefix is
// empty.
func putParallel(b *testing.B, s das.Store, prefix string) {
	to := newUser()
	var lat latencies
	var n atomic.Uint64
	b.SetParallelism(8)
	b.ResetTimer()
	b.RunParallel(func(p *testing.PB) {
		from := newUser()
		var mine []time.Duration
		for p.Next() {
			cmid := ""
			if prefix != "" {
				cmid = fmt.Sprint(prefix, n.Add(1))
			}
			m := benchMsg(from, to, cmid)
			t0 := time.Now()
			if _, _, err := s.PutC2C(ctx, m, []uint32{101, 102}, nil); err != nil {
				b.Error(err)
				return
			}
			mine = append(mine, time.Since(t0))
		}
		lat.add(mine...)
	})
	b.StopTimer()
	lat.report(b, 1, "writes/s")
}

// fill puts n messages into t's inbox and returns their msgids. On
// Cassandra it writes the inbox rows directly (100 to a single-partition
// batch: the rows PutC2C writes, without the timelines); on the embedded
// engine it calls PutC2C from 32 goroutines, whose commits share fsyncs.
func fill(b *testing.B, st das.Store, t das.Terminal, n int) []uint64 {
	b.Helper()
	from := newUser()
	to := das.User{Account: t.Account, UID: t.UID}
	msgs := make([]*pb.C2CMessage, n)
	for i := range msgs {
		msgs[i] = benchMsg(from, to, "")
	}
	var next atomic.Int64
	var wg sync.WaitGroup
	errc := make(chan error, 32)
	for range 32 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				start := int(next.Add(100)) - 100
				if start >= n {
					return
				}
				chunk := msgs[start:min(start+100, n)]
				var err error
				if s, ok := st.(*Store); ok {
					bt := s.s.Batch(gocql.UnloggedBatch)
					for _, m := range chunk {
						body, _ := proto.Marshal(m)
						bt.Entries = append(bt.Entries, gocql.BatchEntry{Stmt: stmtInsertInbox, Idempotent: true,
							Args: []any{i32(t.Account), i64(t.UID), i32(t.AppCode), i64(m.Msgid), body, false}})
					}
					err = bt.ExecContext(ctx)
				} else {
					for _, m := range chunk {
						if _, _, err = st.PutC2C(ctx, m, []uint32{t.AppCode}, nil); err != nil {
							break
						}
					}
				}
				if err != nil {
					errc <- err
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errc)
	if err := <-errc; err != nil {
		b.Fatal(err)
	}
	return ids(msgs)
}

// BenchmarkInboxPage reads the first page of 100 of an inbox of 10,000.
func BenchmarkInboxPage(b *testing.B) {
	for _, e := range benchEngines(b) {
		s := e.open(b)
		rcpt := term(newUser(), 101)
		fill(b, s, rcpt, 10000)
		b.Run(e.name, func(b *testing.B) {
			var lat latencies
			lat.d = make([]time.Duration, 0, b.N)
			b.ResetTimer()
			for range b.N {
				t0 := time.Now()
				msgs, more, err := s.InboxPage(ctx, rcpt, 0, 100)
				if err != nil || len(msgs) != 100 || !more {
					b.Fatalf("%d messages, more %v, %v", len(msgs), more, err)
				}
				lat.d = append(lat.d, time.Since(t0))
			}
			b.StopTimer()
			lat.report(b, 100, "msgs/s")
		})
	}
}

// BenchmarkAck acknowledges one message per call, and a page of 100 per
// call, oldest first (as a pulling terminal does).
func BenchmarkAck(b *testing.B) {
	engines := benchEngines(b)
	for _, per := range []int{1, 100} {
		b.Run(fmt.Sprint("msgids=", per), func(b *testing.B) {
			for _, e := range engines {
				b.Run(e.name, func(b *testing.B) {
					s := e.open(b)
					rcpt := term(newUser(), 101)
					all := fill(b, s, rcpt, b.N*per)
					var lat latencies
					lat.d = make([]time.Duration, 0, b.N)
					b.ResetTimer()
					for i := range b.N {
						t0 := time.Now()
						acked, missing, err := s.Ack(ctx, rcpt, all[i*per:(i+1)*per])
						if err != nil || len(missing) != 0 || len(acked) != per {
							b.Fatalf("acked %d, missing %v, %v", len(acked), missing, err)
						}
						lat.d = append(lat.d, time.Since(t0))
					}
					b.StopTimer()
					lat.report(b, per, "msgs/s")
				})
			}
		})
	}
}
