package scenario

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"
)

// TestDriveIsOpenLoop checks the driver against a fake operation: one
// stalled operation delays the ones behind it (one slot per sender), and
// their latency, taken from the schedule, shows the stall, while the
// service time does not.
func TestDriveIsOpenLoop(t *testing.T) {
	rs := newRunState(1000, 100, 1, false)
	rs.start = time.Now()
	rs.startM = mono()
	op := func(_ context.Context, rs *runState, s int, g int64, at int64) error {
		sent := mono()
		if g == 10 {
			time.Sleep(60 * time.Millisecond)
		}
		rs.expected.Add(1)
		rs.deliver(s, g, at, sent)
		return nil
	}
	drive(context.Background(), rs, 1, 1, op)
	if rs.issued.Load() != 100 || rs.ok.Load() != 100 || rs.delivered.Load() != 100 {
		t.Fatalf("issued %d ok %d delivered %d", rs.issued.Load(), rs.ok.Load(), rs.delivered.Load())
	}
	lat, svc := rs.lat.merged(), rs.svc.merged()
	// Operations 11.. were due 1 ms apart while 10 stalled for 60 ms: the
	// next one waited ~59 ms, and the p90 of the 100 is well above 1 ms.
	if lat.Max() < 50*time.Millisecond || lat.Quantile(0.9) < 5*time.Millisecond {
		t.Errorf("latency from the schedule hides the stall: max %s, p90 %s", lat.Max(), lat.Quantile(0.9))
	}
	if svc.Quantile(0.5) > 5*time.Millisecond {
		t.Errorf("service p50 %s, want the bare operation time", svc.Quantile(0.5))
	}
	if rs.maxBehind.Load() < int64(50*time.Millisecond) {
		t.Errorf("max behind schedule %s, want the stall", time.Duration(rs.maxBehind.Load()))
	}
}

func TestDriveStopsAtDeadline(t *testing.T) {
	rs := newRunState(100, 1000, 1, false) // 10 s of schedule
	rs.start = time.Now()
	rs.startM = mono()
	ctx, cancel := context.WithTimeout(context.Background(), 150*time.Millisecond)
	defer cancel()
	var mu sync.Mutex
	seen := map[int]int{}
	drive(ctx, rs, 4, 2, func(_ context.Context, rs *runState, s int, g int64, at int64) error {
		mu.Lock()
		seen[s]++
		mu.Unlock()
		if g%5 == 0 {
			return errors.New("boom")
		}
		return nil
	})
	is := rs.issued.Load()
	if is < 5 || is > 30 {
		t.Fatalf("issued %d in 150 ms at 100/s", is)
	}
	if rs.ok.Load()+rs.failed.Load() != is || rs.failed.Load() == 0 || rs.errs["boom"] != int(rs.failed.Load()) {
		t.Fatalf("ok %d failed %d of %d issued, errors %v", rs.ok.Load(), rs.failed.Load(), is, rs.errs)
	}
	if len(seen) != 4 {
		t.Errorf("senders used: %v, want all 4", seen)
	}
}

func TestHelpers(t *testing.T) {
	if got := MinMedMax([]float64{3, 1, 2, 10}); got != [3]float64{1, 2.5, 10} {
		t.Errorf("MinMedMax = %v", got)
	}
	if got := MinMedMax(nil); got != [3]float64{} {
		t.Errorf("MinMedMax(nil) = %v", got)
	}
	if Singular("deliveries") != "delivery" || Singular("msgs") != "msg" || Singular("acks") != "ack" || Singular("pushes") != "push" {
		t.Error("Singular")
	}
	for _, c := range []struct{ flag, json, want string }{
		{"", "", "results/x.svg"}, {"", "a/b.json", "a/b.svg"}, {"", "b.json", "results/b.svg"},
		{"c.svg", "a/b.json", "results/c.svg"}, {"d/c.svg", "", "d/c.svg"},
	} {
		if got := ChartFile(c.flag, c.json, "results", "x.svg"); got != c.want {
			t.Errorf("ChartFile(%q, %q) = %q, want %q", c.flag, c.json, got, c.want)
		}
	}
	b := newContent(40)
	putHeader(b, 7, 12345, 111, 222)
	if run, idx, at, sent, ok := getHeader(b); !ok || run != 7 || idx != 12345 || at != 111 || sent != 222 {
		t.Fatalf("header round trip: %v %v %v %v %v", run, idx, at, sent, ok)
	}
	if _, _, _, _, ok := getHeader(b[:10]); ok {
		t.Fatal("short content decoded")
	}
}

func TestCheckLoopback(t *testing.T) {
	for addr, ok := range map[string]bool{
		"127.0.0.1:7070": true, "127.0.0.9:1": true, "[::1]:80": true, "localhost:1": true,
		"10.0.0.1:7070": false, "example.com:80": false, "0.0.0.0:7070": false, "nonsense": false,
	} {
		if err := CheckLoopback(addr); (err == nil) != ok {
			t.Errorf("CheckLoopback(%s) = %v, want ok=%v", addr, err, ok)
		}
	}
}

func TestSplitPlan(t *testing.T) {
	base := plan{N: 10, First: 5, Concurrency: 4}
	plans := splitPlan(base, 3)
	next, total, conc := 5, 0, 0
	for _, p := range plans {
		if p.First != next || p.N < 3 || p.N > 4 || p.Concurrency < 1 {
			t.Fatalf("plans %+v: bad share %+v", plans, p)
		}
		next += p.N
		total += p.N
		conc += p.Concurrency
	}
	if total != 10 || conc < 4 || conc > 6 {
		t.Fatalf("plans %+v cover %d connections with concurrency %d", plans, total, conc)
	}
}

// TestMintTokenMatchesProtocol checks the token against the worked example
// of schema/PROTOCOL.md ("Example: one login exchange").
func TestMintTokenMatchesProtocol(t *testing.T) {
	got := MintToken("imd-example-secret", 101, 42, time.Unix(1893456000, 0))
	if want := "101.42.1893456000.969DG_jCY6JZX69Gl7LdFgglhV7rAElQfJ6VouAAHaQ"; got != want {
		t.Fatalf("MintToken = %s, want %s", got, want)
	}
}

func TestValidateOptions(t *testing.T) {
	bad := []interface{ Validate() error }{
		&C2C{Load: DefaultLoadOptions(0, 100, 1), Pairs: 1},
		&C2C{Load: DefaultLoadOptions(10, 4, 1), Pairs: 1},
		&S2C{Load: DefaultLoadOptions(10, 100, 1), Clients: 10, Pushers: 1, Fanout: 11, Client: ClientRaw},
		&S2C{Load: DefaultLoadOptions(10, 100, 1), Clients: 10, Pushers: 1, Shape: "spray", Client: ClientRaw},
		&S2C{Load: DefaultLoadOptions(10, 100, 1), Clients: 10, Pushers: 1, Shape: ShapeBroadcast, Fanout: 5, Client: ClientRaw},
		&S2C{Load: DefaultLoadOptions(10, 100, 1), Clients: 10, Pushers: 1, Client: "carrier-pigeon"},
		&S2C{Load: DefaultLoadOptions(10, 100, 1), Clients: 10, Pushers: 1, Shape: ShapeDispatch, Endpoint: EndpointBroadcast, Client: ClientRaw},
		&S2C{Load: DefaultLoadOptions(10, 100, 1), Clients: 10, Pushers: 1, Endpoint: "fax", Client: ClientRaw},
		&S2C{Load: DefaultLoadOptions(10, 100, 1), Clients: 10, Pushers: 1, Client: ClientSDK, NoAcks: true},
		&Group{Load: DefaultLoadOptions(10, 100, 1), Members: 10, Online: 20, Senders: 1, Client: ClientRaw},
		&Conns{N: 0, C: 1, Client: ClientSDK, UIDBase: 1, DialTimeout: 1, LoginTimeout: 1, Timeout: 1},
		&Offline{N: 0},
	}
	for i, o := range bad {
		if o.Validate() == nil {
			t.Errorf("%d: %+v passed validation", i, o)
		}
	}
	s := &S2C{Load: DefaultLoadOptions(10, 100, 1), Clients: 5000, Pushers: 4, Shape: ShapeDispatch, Client: ClientRaw}
	if err := s.Validate(); err != nil || s.Fanout != DefaultDispatchFanout {
		t.Errorf("dispatch: %v, fanout %d", err, s.Fanout)
	}
	s = &S2C{Load: DefaultLoadOptions(10, 100, 1), Clients: 20, Pushers: 4, Client: ClientRaw}
	if err := s.Validate(); err != nil || s.Shape != ShapeBroadcast || s.Fanout != 20 {
		t.Errorf("default shape: %v, %s to %d", err, s.Shape, s.Fanout)
	}
	s = &S2C{Load: DefaultLoadOptions(10, 100, 1), Clients: 20, Pushers: 4, Fanout: 8, Client: ClientSDK}
	if err := s.Validate(); err != nil || s.Shape != ShapeRotate {
		t.Errorf("--fanout alone: %v, shape %s", err, s.Shape)
	}
	for _, o := range []interface{ Validate() error }{NewC2C(), NewS2C(), NewGroup(), NewC2S(), NewOffline(), NewConns()} {
		if err := o.Validate(); err != nil {
			t.Errorf("defaults of %T: %v", o, err)
		}
	}
}
