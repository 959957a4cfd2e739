package sdk_test

import (
	"context"
	"fmt"
	"log"
	"os"
	"time"

	"github.com/imd-dev/imd/internal/config"
	"github.com/imd-dev/imd/internal/platform"
	"github.com/imd-dev/imd/logic"
	"github.com/imd-dev/imd/schema/pb"
	"github.com/imd-dev/imd/sdk"
)

// startDemo runs the whole platform in this process on random ports, the
// way `imd all` does, with one appcode whose secret the example knows and
// its store in a temporary directory (removed by stop).
func startDemo(secret string) (p *platform.Platform, stop func()) {
	dir, err := os.MkdirTemp("", "imd-example-")
	if err != nil {
		log.Fatal(err)
	}
	cfg := config.Default()
	cfg.DataDir = dir
	cfg.Gateway.Addr, cfg.HTTP.Addr, cfg.Bus.Embedded.Addr = "127.0.0.1:0", "127.0.0.1:0", "127.0.0.1:0"
	cfg.Gateway.WebAddr = ""
	cfg.Apps = []logic.App{{AppCode: 101, Name: "freight-android", Account: 1, Secrets: []string{secret}}}
	p, err = platform.Start(cfg, nil)
	if err != nil {
		log.Fatal(err)
	}
	return p, func() { _ = p.Shutdown(context.Background()); _ = os.RemoveAll(dir) }
}

// A driver's app connects, logs in with a token from its app-server, is
// told when another phone takes over its session, and logs out.
func Example() {
	const secret = "example-secret-0123456789"
	p, stop := startDemo(secret)
	defer stop()

	kicked := make(chan *pb.Kickout, 1)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	client, err := sdk.Dial(ctx, sdk.Options{
		Addrs:     []string{p.GatewayAddr()}, // several gateways may be listed
		DeviceID:  "phone-1",
		OnMessage: func(m sdk.Message) { fmt.Println("message", m.Cmd) },
		OnKickout: func(k *pb.Kickout) { kicked <- k },
	})
	if err != nil {
		log.Fatal(err)
	}
	// The app-server mints tokens; `imd token` does it from the shell.
	token := logic.MintToken(secret, 101, 42, time.Now().Add(time.Hour))
	info, err := client.Login(ctx, sdk.Credentials{AppCode: 101, UID: 42, Token: token})
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("state:", client.State(), "account:", info.Account)

	// The same driver logs in on another phone: the first is kicked out.
	other, err := sdk.Dial(ctx, sdk.Options{Addrs: []string{p.GatewayAddr()}, DeviceID: "phone-2"})
	if err != nil {
		log.Fatal(err)
	}
	if _, err := other.Login(ctx, sdk.Credentials{AppCode: 101, UID: 42, Token: token}); err != nil {
		log.Fatal(err)
	}
	fmt.Println("kicked out:", (<-kicked).GetReason())
	_ = client.Wait()
	fmt.Println("first phone:", client.State())

	if err := other.Logout(ctx); err != nil {
		log.Fatal(err)
	}
	fmt.Println("second phone:", other.State())
	// Output:
	// state: online account: 1
	// kicked out: KICK_REASON_LOGIN_ELSEWHERE
	// first phone: closed
	// second phone: closed
}

// A client that knows only the discovery URL of the logic tier's HTTP API
// asks it for the gateways (its nearest data center's least loaded first)
// and dials them in that order; it asks again when a gateway sends it away
// or none of them answers. Addrs, when given, are the fallback.
func ExampleOptions_discoveryURL() {
	const secret = "example-secret-0123456789"
	p, stop := startDemo(secret)
	defer stop()

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	client, err := sdk.Dial(ctx, sdk.Options{
		DiscoveryURL: "http://" + p.HTTPAddr() + "/v1/gateways", // e.g. https://im.example.com:8080/v1/gateways
		DeviceID:     "phone-1",
	})
	if err != nil {
		log.Fatal(err)
	}
	defer client.Close()
	token := logic.MintToken(secret, 101, 42, time.Now().Add(time.Hour))
	info, err := client.Login(ctx, sdk.Credentials{AppCode: 101, UID: 42, Token: token})
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("logged in on the gateway discovered:", info.GateId == p.Gateway.ID())
	// Output: logged in on the gateway discovered: true
}

// A phone app keeps what it has shown in a file, so a message shown just
// before the app was killed is not shown again when it starts next time,
// and the messages it sends keep their order after a restart.
func ExampleFileState() {
	state, err := sdk.FileState("/data/app/imd-42.state", 0) // one file per terminal
	if err != nil {
		log.Fatal(err)
	}
	defer state.Close()
	ctx := context.Background()
	client, err := sdk.Dial(ctx, sdk.Options{
		Addrs:    []string{"im.example.com:7000"},
		DeviceID: "phone-1",
		State:    state,
		OnC2C:    func(m *pb.C2CMessage) { fmt.Printf("%d: %s\n", m.Msgid, m.Content) },
	})
	if err != nil {
		log.Fatal(err)
	}
	defer client.Close() // acknowledges what was shown
	if _, err := client.Login(ctx, sdk.Credentials{AppCode: 101, UID: 42, TokenFunc: fetchToken}); err != nil {
		log.Fatal(err)
	}
}

// fetchToken stands for the app's call to its app-server for a token.
func fetchToken(ctx context.Context) (string, error) { return "token", nil }

// A driver sends three messages without waiting for each answer (on a
// slow mobile network each would cost a round trip): they are written at
// once, and stored and shown in the order of the calls.
func ExampleClient_SendC2CAsync() {
	const secret = "example-secret-0123456789"
	p, stop := startDemo(secret)
	defer stop()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	shown := make(chan string, 3)
	merchant, err := sdk.Dial(ctx, sdk.Options{
		Addrs: []string{p.GatewayAddr()},
		OnC2C: func(m *pb.C2CMessage) { shown <- string(m.Content) },
	})
	if err != nil {
		log.Fatal(err)
	}
	defer merchant.Close()
	if _, err := merchant.Login(ctx, sdk.Credentials{AppCode: 101, UID: 7, Token: logic.MintToken(secret, 101, 7, time.Now().Add(time.Hour))}); err != nil {
		log.Fatal(err)
	}
	driver, err := sdk.Dial(ctx, sdk.Options{Addrs: []string{p.GatewayAddr()}})
	if err != nil {
		log.Fatal(err)
	}
	defer driver.Close()
	if _, err := driver.Login(ctx, sdk.Credentials{AppCode: 101, UID: 42, Token: logic.MintToken(secret, 101, 42, time.Now().Add(time.Hour))}); err != nil {
		log.Fatal(err)
	}
	var sends []*sdk.AsyncSend
	for _, text := range []string{"arrived", "loading", "leaving now"} {
		sends = append(sends, driver.SendC2CAsync(ctx, &pb.User{Account: 1, Uid: 7}, 0, []byte(text)))
	}
	for _, s := range sends {
		if _, err := s.Wait(ctx); err != nil {
			log.Fatal(err)
		}
	}
	for range sends {
		fmt.Println(<-shown)
	}
	// Output:
	// arrived
	// loading
	// leaving now
}
