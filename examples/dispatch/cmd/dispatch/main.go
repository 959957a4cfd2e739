// Command dispatch runs the freight example against a running `imd all`:
// it starts simulated drivers (SDK clients) that report GPS over c2s,
// consumes their reports from Kafka like an app-server, and pushes an order
// to the drivers near the pickup over the HTTP API. See examples/README.md.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"math/rand/v2"
	"os"
	"os/signal"
	"sync/atomic"
	"time"

	"github.com/imd-dev/imd/examples/dispatch"
	"github.com/imd-dev/imd/internal/config"
	"github.com/imd-dev/imd/logic"
	"github.com/imd-dev/imd/schema/pb"
	"github.com/imd-dev/imd/sdk"
)

func main() {
	fs := flag.NewFlagSet("dispatch", flag.ExitOnError)
	dataDir := fs.String("data-dir", "./data", "imd's data dir (for the demo secret and API key in secrets.yaml)")
	gateway := fs.String("gateway", "127.0.0.1:7070", "imd gateway")
	api := fs.String("api", "http://127.0.0.1:8080", "imd HTTP API")
	kafka := fs.String("kafka", "127.0.0.1:9092", "Kafka (imd's embedded broker by default)")
	topic := fs.String("topic", "freight.gps", "c2s topic of the GPS reports (the demo route of appcode 101 msgtype 1)")
	drivers := fs.Int("drivers", 50, "simulated drivers")
	radius := fs.Float64("radius-km", 3, "push the order to drivers within this distance of the pickup")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "Usage: dispatch [flags]\n\nSimulate drivers reporting GPS to a running `imd all`, consume the reports\nfrom Kafka, and push an order to the drivers near the pickup.\n\nFlags:\n")
		fs.PrintDefaults()
	}
	_ = fs.Parse(os.Args[1:])
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	if err := run(ctx, *dataDir, *gateway, *api, *kafka, *topic, *drivers, *radius); err != nil {
		fmt.Fprintln(os.Stderr, "dispatch:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, dataDir, gateway, api, kafka, topic string, n int, radius float64) error {
	cfg := config.Default()
	cfg.DataDir = dataDir
	if _, err := cfg.ResolveApps(); err != nil {
		return err
	}
	app := cfg.Apps[0] // 101 freight-android
	// Drivers around a depot, a few kilometres apart.
	var pushed atomic.Int32
	for i := range n {
		uid := uint64(1000 + i)
		c, err := sdk.Dial(ctx, sdk.Options{Addrs: []string{gateway}, DeviceID: fmt.Sprintf("truck-%d", uid),
			OnS2C: func(m *pb.S2CNotify) {
				pushed.Add(1)
				fmt.Printf("driver %d got order: %s\n", uid, m.Content)
			}})
		if err != nil {
			return err
		}
		defer c.Close()
		tok := logic.MintToken(app.Secrets[0], app.AppCode, uid, time.Now().Add(time.Hour))
		if _, err := c.Login(ctx, sdk.Credentials{AppCode: app.AppCode, UID: uid, Token: tok}); err != nil {
			return fmt.Errorf("driver %d login: %w", uid, err)
		}
		rep, _ := json.Marshal(dispatch.Report{Lat: 31.23 + (rand.Float64()-0.5)*0.2, Lng: 121.47 + (rand.Float64()-0.5)*0.2})
		if _, err := c.SendC2S(ctx, 1, rep); err != nil {
			return fmt.Errorf("driver %d report: %w", uid, err)
		}
	}
	fmt.Printf("%d drivers online and reported their position\n", n)

	d := dispatch.New(dispatch.Config{Brokers: []string{kafka}, Topic: topic, Group: "dispatch-example",
		API: api, APIKey: app.APIKeys[0], AppCode: app.AppCode})
	cctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() { _ = d.Consume(cctx) }()
	deadline := time.Now().Add(30 * time.Second)
	for d.Known() < n && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	fmt.Printf("app-server knows %d drivers' positions from Kafka\n", d.Known())
	res, near, err := d.Dispatch(ctx, dispatch.Order{ID: "o-77", Lat: 31.23, Lng: 121.47, Cargo: "2 pallets"}, radius)
	if err != nil {
		return err
	}
	if res == nil {
		fmt.Println("no driver within", radius, "km")
		return nil
	}
	fmt.Printf("order o-77 pushed (push id %s) to %d drivers within %.1f km, %d online\n", res.PushID, len(near), radius, res.Online)
	time.Sleep(500 * time.Millisecond)
	fmt.Printf("%d drivers received it; see GET %s/v1/push/%s for the acks\n", pushed.Load(), api, res.PushID)
	return nil
}
