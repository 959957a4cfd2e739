package gateway

import (
	"context"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/imd-dev/imd/logic"
	"github.com/imd-dev/imd/router"
	"github.com/imd-dev/imd/schema"
	"github.com/imd-dev/imd/schema/pb"
)

// laneAPI is the real logic for logins, with a Handle that records the
// order in which requests were served and how many ordered ones ran at
// once, waits for gate on the requests it names, and fails those in fail.
type laneAPI struct {
	logic.API
	mu      sync.Mutex
	served  []uint32
	gate    map[uint32]chan struct{}
	fail    map[uint32]bool
	running atomic.Int32
	most    atomic.Int32
}

func (a *laneAPI) Handle(ctx context.Context, _ router.Session, h *schema.Header, _ []byte) ([]byte, error) {
	ordered := h.Flags&schema.FlagOrdered != 0
	if ordered {
		n := a.running.Add(1)
		defer a.running.Add(-1)
		for m := a.most.Load(); n > m && !a.most.CompareAndSwap(m, n); m = a.most.Load() {
		}
	}
	a.mu.Lock()
	g, fail := a.gate[h.Seq], a.fail[h.Seq]
	a.mu.Unlock()
	if g != nil {
		<-g
	}
	time.Sleep(time.Millisecond) // long enough for a second ordered request to overlap, were it let
	a.mu.Lock()
	a.served = append(a.served, h.Seq)
	a.mu.Unlock()
	if fail {
		return nil, schema.Errorf(schema.StatusUnavailable, "failed on purpose")
	}
	return nil, nil
}

// TestOrderedLane: a connection's ordered requests are served one at a
// time in arrival order, beside its other requests; when one fails, those
// queued behind it are answered 3005 unserved, and the next ordered
// request opens the lane again.
func TestOrderedLane(t *testing.T) {
	forEachEngine(t, func(t *testing.T, engine string) {
		svc := newTestLogic(t)
		api := &laneAPI{API: svc, gate: map[uint32]chan struct{}{}, fail: map[uint32]bool{}}
		s, err := New(Options{Addr: "127.0.0.1:0", Engine: engine}, api)
		if err != nil {
			t.Fatal(err)
		}
		svc.AttachGate(s.ID(), s)
		if err := s.Listen(); err != nil {
			t.Fatal(err)
		}
		go func() { _ = s.Serve() }()
		t.Cleanup(func() {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			_ = s.Shutdown(ctx)
		})
		c := dialClient(t, s)
		c.login(42)

		send := func(seq uint32, ordered bool) []byte {
			h := schema.Header{Cmd: schema.CmdC2CSend, Seq: seq}
			if ordered {
				h.Flags = schema.FlagOrdered
			}
			return encodeFrame(h, &pb.C2CSendRequest{ClientMsgId: "x"})
		}
		// Ten ordered sends and, among them, two plain ones, in one write.
		var burst []byte
		var want []uint32
		for seq := uint32(2); seq <= 11; seq++ {
			burst = append(burst, send(seq, true)...)
			want = append(want, seq)
			if seq == 4 || seq == 8 {
				burst = append(burst, send(100+seq, false)...)
			}
		}
		c.write(burst)
		got := map[uint32]schema.Status{}
		for range 12 {
			h, _ := c.read()
			got[h.Seq] = h.Status
		}
		for _, seq := range append(slices.Clone(want), 104, 108) {
			if st, ok := got[seq]; !ok || st != schema.StatusOK {
				t.Fatalf("seq %d: answered %v (%s), want OK", seq, ok, st)
			}
		}
		api.mu.Lock()
		var order []uint32
		for _, seq := range api.served {
			if seq < 100 {
				order = append(order, seq)
			}
		}
		api.served = nil
		api.mu.Unlock()
		if !slices.Equal(order, want) {
			t.Fatalf("ordered requests served in order %v, want %v", order, want)
		}
		if n := api.most.Load(); n != 1 {
			t.Fatalf("%d ordered requests of one connection ran at once, want 1", n)
		}

		// 20 waits until 21-25 are queued behind it; 21 fails.
		release := make(chan struct{})
		api.mu.Lock()
		api.gate[20], api.fail[21] = release, true
		api.mu.Unlock()
		burst = nil
		for seq := uint32(20); seq <= 25; seq++ {
			burst = append(burst, send(seq, true)...)
		}
		c.write(burst)
		id := onlyConn(t, s)
		eventually(t, 5*time.Second, "six requests in flight", func() bool {
			var n int32
			s.each(func(cn *conn) {
				if cn.id == id {
					n = cn.inflight.Load()
				}
			})
			return n == 6
		})
		close(release)
		c.expect(20, schema.StatusOK)
		c.expect(21, schema.StatusUnavailable)
		for seq := uint32(22); seq <= 25; seq++ {
			c.expect(seq, schema.StatusOutOfOrder)
		}
		c.write(send(26, true))
		c.expect(26, schema.StatusOK)
		api.mu.Lock()
		defer api.mu.Unlock()
		if !slices.Equal(api.served, []uint32{20, 21, 26}) {
			t.Fatalf("served %v, want [20 21 26]: those behind the failure must not be served", api.served)
		}
	})
}
