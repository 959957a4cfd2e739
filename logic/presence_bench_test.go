package logic

import (
	"context"
	"testing"
	"time"

	"github.com/imd-dev/imd/router"
	"github.com/imd-dev/imd/schema"
	"github.com/imd-dev/imd/schema/pb"
)

// countGate takes every push and counts the connections, at no cost of its
// own: the benchmark measures logic and the router.
type countGate struct{ conns int }

func (g *countGate) Kick(context.Context, uint64, *pb.Kickout, uint64) error { return nil }

func (g *countGate) Push(_ context.Context, conns []uint64, _ schema.Cmd, _ uint32, _ uint64, _ []byte, queued []bool) error {
	g.conns += len(conns)
	for i := range queued {
		queued[i] = true
	}
	return nil
}

// BenchmarkPresenceFanOut: the server CPU of one presence change (a login
// or a logout of a user's only terminal) fanned out to 100 followers on
// two gateways, in logic and the in-process router; the gateways' socket
// writes are not included (an s2c delivery costs 14-20 µs of them,
// docs/capacity.md).
//
//	go test -run '^$' -bench PresenceFanOut -benchtime 20000x ./logic/
func BenchmarkPresenceFanOut(b *testing.B) {
	const followers = 100
	r := router.NewMemory()
	s, err := New(Options{Router: r, Apps: []App{{AppCode: 101, Account: 1, Secrets: []string{presSecret}}}})
	if err != nil {
		b.Fatal(err)
	}
	gates := []*countGate{{}, {}}
	s.AttachGate("gate-a", gates[0])
	s.AttachGate("gate-b", gates[1])
	ctx := context.Background()
	token := func(uid uint64) string { return MintToken(presSecret, 101, uid, time.Now().Add(time.Hour)) }
	body := mustMarshal(&pb.PresenceSubscribeRequest{Users: []*pb.User{{Account: 1, Uid: 7}}})
	for i := range followers {
		gate := []string{"gate-a", "gate-b"}[i%2]
		res, err := s.Login(ctx, LoginInput{AppCode: 101, UID: uint64(1000 + i), Gate: gate, Conn: uint64(i + 1), Token: token(uint64(1000 + i))})
		if err != nil {
			b.Fatal(err)
		}
		if _, err := s.Handle(ctx, res.Session, &schema.Header{Cmd: schema.CmdPresenceSubscribe}, body); err != nil {
			b.Fatal(err)
		}
	}
	tok := token(7)
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i += 2 {
		res, err := s.Login(ctx, LoginInput{AppCode: 101, UID: 7, Gate: "gate-a", Conn: uint64(100000 + i), Token: tok})
		if err != nil {
			b.Fatal(err)
		}
		if err := s.Logout(ctx, res.Session); err != nil {
			b.Fatal(err)
		}
	}
	b.StopTimer()
	if got, want := gates[0].conns+gates[1].conns, followers*(b.N+b.N%2); got != want {
		b.Fatalf("%d notifies for %d changes, want %d", got, b.N, want)
	}
}
