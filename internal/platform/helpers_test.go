package platform

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"testing"
	"time"

	"github.com/imd-dev/imd/internal/config"
	"github.com/imd-dev/imd/logic"
	"github.com/imd-dev/imd/router"
	"github.com/imd-dev/imd/schema"
	"github.com/imd-dev/imd/schema/pb"
	"github.com/imd-dev/imd/sdk"
	"google.golang.org/protobuf/proto"
)

const (
	testSecret  = "test-secret-0123456789abcdef"
	testAPIKey  = "test-api-key-account-1-0123456789"
	testAPIKey2 = "test-api-key-account-2-0123456789"
)

// testConfig is a config on random loopback ports with three appcodes:
// 101 and 102 are two terminals of account 1, 301 allows two sessions.
func testConfig() config.Config {
	cfg := config.Default()
	cfg.DataDir = ""
	// `IMD_GATEWAY_ENGINE=goroutine go test` runs the suite on the other engine.
	cfg.Gateway.Engine = os.Getenv("IMD_GATEWAY_ENGINE")
	cfg.Gateway.Addr = "127.0.0.1:0"
	cfg.Gateway.WebAddr = "127.0.0.1:0"
	cfg.HTTP.Addr = "127.0.0.1:0"
	cfg.Bus.Embedded.Addr = "127.0.0.1:0"
	cfg.Cluster.RPCAddr = "127.0.0.1:0"
	// `IMD_TEST_SHAPE=split go test` runs the suite with logic and the
	// gateway linked by the internal RPC (the many-process wiring), and
	// with IMD_TEST_REDIS set, with the router and membership in Redis.
	if testShape == "split" {
		cfg.Cluster.Split = true
		cfg.Cluster.Secret = "test-cluster-secret-0123"
		if len(testRedis.Addrs) > 0 {
			cfg.Cluster.Redis = testRedis
			// every platform its own table, as with the in-process router
			cfg.Cluster.Redis.Prefix = fmt.Sprintf("%s%d:", testRedis.Prefix, redisPrefixes.Add(1))
		}
	}
	cfg.C2S.Routes = []logic.Route{
		{AppCode: 101, MsgType: 1, Topic: "freight.gps"},
		{AppCode: 101, MsgType: 2, Topic: "freight.events"},
		{AppCode: 102, MsgType: 1, Topic: "freight.gps"},
	}
	cfg.Apps = []logic.App{
		{AppCode: 101, Name: "freight-android", Account: 1, Secrets: []string{testSecret}, APIKeys: []string{testAPIKey}},
		{AppCode: 102, Name: "freight-pc", Account: 1, Secrets: []string{testSecret}},
		{AppCode: 201, Name: "support-web", Account: 2, Secrets: []string{testSecret}, APIKeys: []string{testAPIKey2}},
		{AppCode: 301, Name: "multi", Account: 3, Secrets: []string{testSecret}, MaxSessions: 2},
	}
	return cfg
}

func testLogger(t testing.TB) *slog.Logger {
	if os.Getenv("IMD_TEST_LOG") != "" {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return nil
}

// start runs a platform for the test and shuts it down at cleanup.
func start(t testing.TB, mod func(*config.Config)) *Platform {
	t.Helper()
	cfg := testConfig()
	useTestStore(t, &cfg)
	if mod != nil {
		mod(&cfg)
	}
	p, err := Start(cfg, testLogger(t))
	if err != nil {
		t.Fatalf("start platform: %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = p.Shutdown(ctx)
	})
	return p
}

func token(appcode uint32, uid uint64) string {
	return logic.MintToken(testSecret, appcode, uid, time.Now().Add(time.Hour))
}

func creds(appcode uint32, uid uint64) sdk.Credentials {
	return sdk.Credentials{AppCode: appcode, UID: uid, Token: token(appcode, uid)}
}

// dial returns an SDK client (not logged in) closed at cleanup.
func dial(t testing.TB, p *Platform, mod func(*sdk.Options)) *sdk.Client {
	t.Helper()
	o := sdk.Options{Addrs: []string{p.GatewayAddr()}, RequestTimeout: 5 * time.Second, BackoffMin: 20 * time.Millisecond, BackoffMax: 200 * time.Millisecond}
	if mod != nil {
		mod(&o)
	}
	c, err := sdk.Dial(context.Background(), o)
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}

func login(t testing.TB, p *Platform, appcode uint32, uid uint64, mod func(*sdk.Options)) *sdk.Client {
	t.Helper()
	c := dial(t, p, mod)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := c.Login(ctx, creds(appcode, uid)); err != nil {
		t.Fatalf("login %d/%d: %v", appcode, uid, err)
	}
	return c
}

func statusOf(err error) schema.Status {
	var se *schema.Error
	if errors.As(err, &se) {
		return se.Status
	}
	return 0xFFFF
}

// eventually polls cond until it holds or the deadline passes.
func eventually(t testing.TB, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", d, what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// raw is a client speaking frames by hand, for bad-input tests.
type raw struct {
	t   testing.TB
	nc  net.Conn
	dec *schema.Decoder
}

func dialRaw(t testing.TB, addr string) *raw {
	t.Helper()
	nc, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatalf("dial raw: %v", err)
	}
	t.Cleanup(func() { _ = nc.Close() })
	return &raw{t: t, nc: nc, dec: schema.NewDecoder(nc, 1<<20)}
}

func (r *raw) writeBytes(b []byte) {
	r.t.Helper()
	_ = r.nc.SetWriteDeadline(time.Now().Add(5 * time.Second))
	if _, err := r.nc.Write(b); err != nil {
		r.t.Fatalf("raw write: %v", err)
	}
}

func (r *raw) send(h schema.Header, m proto.Message) {
	r.t.Helper()
	var body []byte
	if m != nil {
		var err error
		if body, err = proto.Marshal(m); err != nil {
			r.t.Fatal(err)
		}
	}
	r.writeBytes(schema.AppendFrame(nil, &h, body))
}

// read returns the next frame, or fails the test after 5s.
func (r *raw) read() (schema.Header, []byte) {
	r.t.Helper()
	_ = r.nc.SetReadDeadline(time.Now().Add(5 * time.Second))
	var f schema.Frame
	if err := r.dec.ReadFrame(&f); err != nil {
		r.t.Fatalf("raw read: %v", err)
	}
	body := append([]byte(nil), f.Body...)
	f.Release()
	return f.Header, body
}

// readError reads a frame and checks it is an error response with status st.
func (r *raw) readError(st schema.Status) schema.Header {
	r.t.Helper()
	h, body := r.read()
	if h.Kind() != schema.KindResponse || h.Status != st {
		r.t.Fatalf("got %s %s status %d (%s), want error response %d (%s)", h.Kind(), h.Cmd, h.Status, h.Status, st, st)
	}
	var e pb.Error
	if err := proto.Unmarshal(body, &e); err != nil || e.Code != uint32(st) || e.Message == "" {
		r.t.Fatalf("error body %+v (err %v) does not carry code %d and a message", &e, err, st)
	}
	return h
}

// expectClosed checks the server closes the connection within d.
func (r *raw) expectClosed(d time.Duration) {
	r.t.Helper()
	_ = r.nc.SetReadDeadline(time.Now().Add(d))
	buf := make([]byte, 256)
	for {
		_, err := r.nc.Read(buf)
		if err == nil {
			continue
		}
		if errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed) || isReset(err) {
			return
		}
		r.t.Fatalf("connection not closed by the server within %s: %v", d, err)
	}
}

func isReset(err error) bool {
	var op *net.OpError
	return errors.As(err, &op) && !op.Timeout()
}

func (r *raw) login(appcode uint32, uid uint64, seq uint32) *pb.LoginResponse {
	r.t.Helper()
	r.send(schema.Header{Cmd: schema.CmdLogin, AppCode: appcode, UID: uid, Seq: seq}, &pb.LoginRequest{Token: token(appcode, uid), DeviceId: "raw"})
	h, body := r.read()
	if h.Status != schema.StatusOK || h.Seq != seq || h.Cmd != schema.CmdLogin || h.Kind() != schema.KindResponse {
		r.t.Fatalf("login response: %+v", h)
	}
	var resp pb.LoginResponse
	if err := proto.Unmarshal(body, &resp); err != nil {
		r.t.Fatal(err)
	}
	return &resp
}

// routerAfter returns p's router even after p shut down: a router in Redis
// is reached again through a client of its own, closed at cleanup.
func routerAfter(t testing.TB, p *Platform) router.Router {
	t.Helper()
	if p.redis == nil {
		return p.Router
	}
	r, err := router.NewRedis(p.redisOpts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(r.Close)
	return r
}
