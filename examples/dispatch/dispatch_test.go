package dispatch_test

import (
	"context"
	"encoding/json"
	"sync"
	"testing"
	"time"

	"github.com/imd-dev/imd/examples/dispatch"
	"github.com/imd-dev/imd/internal/config"
	"github.com/imd-dev/imd/internal/platform"
	"github.com/imd-dev/imd/logic"
	"github.com/imd-dev/imd/schema/pb"
	"github.com/imd-dev/imd/sdk"
)

// TestDispatchNearbyDrivers runs the example against the platform with its
// demo configuration: drivers report GPS over c2s, the app-server learns
// their positions from Kafka, and an order reaches exactly the drivers near
// its pickup.
func TestDispatchNearbyDrivers(t *testing.T) {
	cfg := config.Default()
	cfg.DataDir = t.TempDir()
	cfg.Gateway.Addr, cfg.HTTP.Addr, cfg.Bus.Embedded.Addr = "127.0.0.1:0", "127.0.0.1:0", "127.0.0.1:0"
	cfg.Gateway.WebAddr = ""
	if demo, err := cfg.ResolveApps(); err != nil || !demo {
		t.Fatalf("demo config: %v %v", demo, err)
	}
	p, err := platform.Start(cfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Shutdown(context.Background())
	app := cfg.Apps[0]
	ctx := context.Background()

	positions := map[uint64]dispatch.Report{
		1: {Lat: 31.230, Lng: 121.470}, // at the pickup
		2: {Lat: 31.240, Lng: 121.475}, // ~1.2 km
		3: {Lat: 31.300, Lng: 121.600}, // ~14 km
		4: {Lat: 30.000, Lng: 120.000}, // far away
	}
	var mu sync.Mutex
	got := map[uint64]string{}
	for uid, pos := range positions {
		c, err := sdk.Dial(ctx, sdk.Options{Addrs: []string{p.GatewayAddr()}, OnS2C: func(m *pb.S2CNotify) {
			mu.Lock()
			got[uid] = string(m.Content)
			mu.Unlock()
		}})
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if _, err := c.Login(ctx, sdk.Credentials{AppCode: app.AppCode, UID: uid, Token: logic.MintToken(app.Secrets[0], app.AppCode, uid, time.Now().Add(time.Hour))}); err != nil {
			t.Fatal(err)
		}
		rep, _ := json.Marshal(pos)
		if _, err := c.SendC2S(ctx, 1, rep); err != nil {
			t.Fatal(err)
		}
	}
	d := dispatch.New(dispatch.Config{Brokers: p.KafkaAddrs(), Topic: "freight.gps", Group: "test",
		API: "http://" + p.HTTPAddr(), APIKey: app.APIKeys[0], AppCode: app.AppCode})
	cctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() { _ = d.Consume(cctx) }()
	deadline := time.Now().Add(20 * time.Second)
	for d.Known() < len(positions) {
		if time.Now().After(deadline) {
			t.Fatalf("the app-server learned %d of %d positions", d.Known(), len(positions))
		}
		time.Sleep(20 * time.Millisecond)
	}
	res, near, err := d.Dispatch(ctx, dispatch.Order{ID: "o-1", Lat: 31.23, Lng: 121.47, Cargo: "pallets"}, 3)
	if err != nil {
		t.Fatal(err)
	}
	if len(near) != 2 || near[0] != 1 || near[1] != 2 || res.Online != 2 {
		t.Fatalf("dispatched to %v (online %+v), want drivers 1 and 2", near, res)
	}
	deadline = time.Now().Add(5 * time.Second)
	for {
		mu.Lock()
		n := len(got)
		mu.Unlock()
		if n >= 2 || time.Now().After(deadline) {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(got) != 2 || got[1] == "" || got[2] == "" {
		t.Fatalf("pushes received: %v, want drivers 1 and 2 only", got)
	}
	var o dispatch.Order
	if err := json.Unmarshal([]byte(got[1]), &o); err != nil || o.ID != "o-1" {
		t.Fatalf("driver 1 got %q", got[1])
	}
}
