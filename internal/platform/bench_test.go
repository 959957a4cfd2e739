package platform

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"io"
	"net/http"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"fmt"
	"github.com/gobwas/ws"
	"github.com/imd-dev/imd/bench"
	"github.com/imd-dev/imd/internal/config"
	"github.com/imd-dev/imd/logic"
	"github.com/imd-dev/imd/schema"
	"github.com/imd-dev/imd/schema/pb"
	"github.com/imd-dev/imd/sdk"
	"google.golang.org/protobuf/proto"
)

// BenchmarkC2CEndToEnd: durable c2c messages through the SDK, the gateway,
// logic and the embedded store, to an online recipient. 32 senders send
// concurrently (each waits for "stored" before its next message); the
// latency is from the send call to the recipient's OnC2C. Reports
// msgs/s and the send->delivered p50/p99.
//
//	go test -run '^$' -bench C2CEndToEnd -benchtime 20000x ./internal/platform/
func BenchmarkC2CEndToEnd(b *testing.B) {
	const pairs = 32
	p := start(b, nil)
	var mu sync.Mutex
	var hist bench.Histogram
	var delivered atomic.Int64
	done := make(chan struct{})
	var target atomic.Int64
	onMsg := func(m *pb.C2CMessage) {
		sent := time.Unix(0, int64(binary.BigEndian.Uint64(m.Content)))
		mu.Lock()
		hist.Record(time.Since(sent))
		mu.Unlock()
		if delivered.Add(1) == target.Load() {
			close(done)
		}
	}
	senders := make([]*sdk.Client, pairs)
	for i := range pairs {
		senders[i] = login(b, p, 101, uint64(1+i), nil)
		login(b, p, 101, uint64(1001+i), func(o *sdk.Options) { o.OnC2C = onMsg })
	}
	target.Store(int64(b.N))
	var next atomic.Int64
	b.ResetTimer()
	began := time.Now()
	var wg sync.WaitGroup
	for i := range pairs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			content := make([]byte, 100)
			for next.Add(1) <= int64(b.N) {
				binary.BigEndian.PutUint64(content, uint64(time.Now().UnixNano()))
				if _, err := senders[i].SendC2C(context.Background(), &pb.User{Account: 1, Uid: uint64(1001 + i)}, 0, content); err != nil {
					b.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		b.Fatalf("%d of %d delivered", delivered.Load(), b.N)
	}
	el := time.Since(began)
	b.StopTimer()
	b.ReportMetric(float64(b.N)/el.Seconds(), "msgs/s")
	b.ReportMetric(float64(hist.Quantile(0.50))/1e6, "p50-ms")
	b.ReportMetric(float64(hist.Quantile(0.99))/1e6, "p99-ms")
}

// BenchmarkC2SEndToEnd: GPS-sized c2s reports from 64 connected drivers
// through the gateway to the embedded Kafka broker (or the real one with
// IMD_TEST_BUS=kafka), each driver waiting for "stored in Kafka" before
// its next report. Reports msgs/s and send->ack p50/p99.
//
//	go test -run '^$' -bench C2SEndToEnd -benchtime 20000x ./internal/platform/
func BenchmarkC2SEndToEnd(b *testing.B) {
	const drivers = 64
	p := start(b, func(c *config.Config) {
		c.C2S.Routes = []logic.Route{{AppCode: 101, MsgType: 1, Topic: "bench.gps"}}
		if testBus == "kafka" {
			c.Bus.Brokers = []string{os.Getenv("IMD_TEST_KAFKA")}
			c.Bus.AutoCreateTopics = true
		}
	})
	clients := make([]*sdk.Client, drivers)
	for i := range drivers {
		clients[i] = login(b, p, 101, uint64(1+i), nil)
	}
	report := []byte(`{"lat":31.2304,"lng":121.4737,"speed":42.5,"heading":270,"ts":1795000000000}`)
	var mu sync.Mutex
	var hist bench.Histogram
	var next atomic.Int64
	b.ResetTimer()
	began := time.Now()
	var wg sync.WaitGroup
	for i := range drivers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for next.Add(1) <= int64(b.N) {
				t0 := time.Now()
				if _, err := clients[i].SendC2S(context.Background(), 1, report); err != nil {
					b.Error(err)
					return
				}
				d := time.Since(t0)
				mu.Lock()
				hist.Record(d)
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	el := time.Since(began)
	b.StopTimer()
	b.ReportMetric(float64(b.N)/el.Seconds(), "msgs/s")
	b.ReportMetric(float64(hist.Quantile(0.50))/1e6, "p50-ms")
	b.ReportMetric(float64(hist.Quantile(0.99))/1e6, "p99-ms")
}

// BenchmarkS2CFanOut: one HTTP push of a 100-byte order to 500 online
// drivers per op, 4 pushers at once; reports deliveries/s (notifies that
// reached an SDK callback) and push->delivery p50/p99.
//
//	go test -run '^$' -bench S2CFanOut -benchtime 200x ./internal/platform/
func BenchmarkS2CFanOut(b *testing.B) {
	const drivers, pushers = 500, 4
	p := start(b, nil)
	var mu sync.Mutex
	var hist bench.Histogram
	var delivered atomic.Int64
	for i := range drivers {
		login(b, p, 101, uint64(1+i), func(o *sdk.Options) {
			o.OnS2C = func(m *pb.S2CNotify) {
				d := time.Since(time.UnixMilli(m.SentAtMs))
				mu.Lock()
				hist.Record(d)
				mu.Unlock()
				delivered.Add(1)
			}
		})
	}
	el := pushToAll(b, p, drivers, pushers, strings.Repeat("o", 100), &delivered)
	b.ReportMetric(float64(int64(b.N)*drivers)/el.Seconds(), "deliveries/s")
	b.ReportMetric(float64(hist.Quantile(0.50))/1e6, "p50-ms")
	b.ReportMetric(float64(hist.Quantile(0.99))/1e6, "p99-ms")
}

// BenchmarkConvSync: the login-time conversation sync of a user with 200
// one-to-one conversations and a group, against a full pull. "full" asks
// with no versions held; "delta" holds every version and 3 conversations
// changed since. Reports the response bytes per sync beside the time.
//
//	go test -run '^$' -bench ConvSync -benchtime 200x ./internal/platform/
func BenchmarkConvSync(b *testing.B) {
	p := start(b, nil)
	w := newConvWorld(b, p, 73, 200)
	pc := login(b, p, 102, w.me, nil)
	ctx := context.Background()
	var list sdk.ConvList
	if _, err := list.Sync(ctx, pc); err != nil {
		b.Fatal(err)
	}
	for _, peer := range []uint64{w.peers[1], w.peers[100], w.peers[199]} {
		w.say(b, peer, false, "news")
	}
	known := list.Known()
	for _, tc := range []struct {
		name  string
		known []*pb.ConvVersion
		want  int
	}{{"full", nil, 201}, {"delta", known, 3}} {
		b.Run(tc.name, func(b *testing.B) {
			var bytes int
			for b.Loop() {
				resp, err := pc.ConvSync(ctx, tc.known)
				if err != nil {
					b.Fatal(err)
				}
				if len(resp.Changed) != tc.want {
					b.Fatalf("%d changed, want %d", len(resp.Changed), tc.want)
				}
				bytes = proto.Size(resp)
			}
			b.ReportMetric(float64(bytes), "resp-bytes/op")
			b.ReportMetric(float64(proto.Size(&pb.ConvSyncRequest{Known: tc.known})), "req-bytes/op")
		})
	}
}

// BenchmarkS2CFanOutWS is BenchmarkS2CFanOut with the 500 recipients on
// WebSocket instead of TCP: browser-like clients (frames in binary
// messages, by hand) that log in, take every push and acknowledge it, as
// the SDKs do. Run both to compare the transports:
//
//	go test -run '^$' -bench 'S2CFanOut' -benchtime 200x ./internal/platform/
func BenchmarkS2CFanOutWS(b *testing.B) {
	const drivers, pushers = 500, 4
	p := start(b, nil)
	var mu sync.Mutex
	var hist bench.Histogram
	var delivered atomic.Int64
	addr := "ws://" + p.Gateway.WebAddr().String() + "/ws"
	for i := range drivers {
		uid := uint64(1 + i)
		nc, _, _, err := ws.Dialer{Timeout: 5 * time.Second}.Dial(context.Background(), addr)
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { _ = nc.Close() })
		send := func(h schema.Header, m proto.Message) error {
			body, _ := proto.Marshal(m)
			return ws.WriteFrame(nc, ws.MaskFrame(ws.NewBinaryFrame(schema.AppendFrame(nil, &h, body))))
		}
		if err := send(schema.Header{Cmd: schema.CmdLogin, AppCode: 101, UID: uid, Seq: 1}, &pb.LoginRequest{Token: token(101, uid)}); err != nil {
			b.Fatal(err)
		}
		logged := make(chan error, 1)
		go func() {
			first := true
			for {
				h, err := ws.ReadHeader(nc)
				if err != nil {
					return
				}
				msg := make([]byte, h.Length)
				if _, err := io.ReadFull(nc, msg); err != nil {
					return
				}
				var acks []uint64
				for len(msg) >= schema.HeaderLen {
					fh, err := schema.ParseHeader(msg, 1<<20)
					if err != nil {
						return
					}
					n := schema.HeaderLen + int(fh.BodyLen)
					switch {
					case fh.Cmd == schema.CmdLogin && first:
						first = false
						if fh.Status != schema.StatusOK {
							logged <- fmt.Errorf("login %d: status %s", uid, fh.Status)
						} else {
							logged <- nil
						}
					case fh.Cmd == schema.CmdS2C:
						var m pb.S2CNotify
						if proto.Unmarshal(msg[schema.HeaderLen:n], &m) == nil {
							d := time.Since(time.UnixMilli(m.SentAtMs))
							mu.Lock()
							hist.Record(d)
							mu.Unlock()
							delivered.Add(1)
							acks = append(acks, m.PushId)
						}
					}
					msg = msg[n:]
				}
				if len(acks) > 0 {
					h := schema.Header{Cmd: schema.CmdS2CAck}
					h.SetKind(schema.KindNotify)
					if send(h, &pb.S2CAck{PushIds: acks}) != nil {
						return
					}
				}
			}
		}()
		if err := <-logged; err != nil {
			b.Fatal(err)
		}
	}
	el := pushToAll(b, p, drivers, pushers, strings.Repeat("o", 100), &delivered)
	b.ReportMetric(float64(int64(b.N)*drivers)/el.Seconds(), "deliveries/s")
	b.ReportMetric(float64(hist.Quantile(0.50))/1e6, "p50-ms")
	b.ReportMetric(float64(hist.Quantile(0.99))/1e6, "p99-ms")
}

// BenchmarkS2CCompress: BenchmarkS2CFanOut with 1 KiB order-like bodies
// (about 2.5:1 under s2), with body compression negotiated by every
// driver ("on", the SDK default) and with it off. Reports deliveries/s and
// the bytes the drivers read per delivery.
//
//	go test -run '^$' -bench S2CCompress -benchtime 100x -count 3 ./internal/platform/
func BenchmarkS2CCompress(b *testing.B) {
	for _, mode := range []struct{ name, opt string }{{"on", sdk.CompressionS2}, {"off", sdk.CompressionOff}} {
		b.Run(mode.name, func(b *testing.B) {
			const drivers, pushers = 500, 4
			p := start(b, nil)
			var delivered, in, out atomic.Int64
			for i := range drivers {
				login(b, p, 101, uint64(1+i), func(o *sdk.Options) {
					o.Compression = mode.opt
					o.Dialer = countingDialer(&in, &out)
					o.OnS2C = func(*pb.S2CNotify) { delivered.Add(1) }
				})
			}
			inBefore := in.Load()
			el := pushToAll(b, p, drivers, pushers, string(compressibleText(1<<10)), &delivered)
			want := int64(b.N) * drivers
			b.ReportMetric(float64(want)/el.Seconds(), "deliveries/s")
			b.ReportMetric(float64(in.Load()-inBefore)/float64(want), "wire-B/delivery")
		})
	}
}

// pushToAll is the load of the s2c fan-out benchmarks: b.N pushes of text
// to uids 1..n of appcode 101 from pushers concurrent HTTP clients. It
// resets the timer, waits (60 s at most) until delivered reaches b.N*n,
// stops the timer and returns the time taken; a failed push or a missing
// delivery fails the benchmark.
func pushToAll(b *testing.B, p *Platform, n, pushers int, text string, delivered *atomic.Int64) time.Duration {
	b.Helper()
	to := make([]map[string]any, n)
	for i := range to {
		to[i] = map[string]any{"appcode": 101, "uid": 1 + i}
	}
	body, _ := json.Marshal(map[string]any{"to": to, "msgtype": 2, "text": text})
	url := "http://" + p.HTTPAddr() + "/v1/push"
	var next atomic.Int64
	b.ResetTimer()
	began := time.Now()
	var wg sync.WaitGroup
	for range pushers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for next.Add(1) <= int64(b.N) {
				req, _ := http.NewRequest("POST", url, bytes.NewReader(body))
				req.Header.Set("Authorization", "Bearer "+testAPIKey)
				resp, err := http.DefaultClient.Do(req)
				if err != nil {
					b.Error(err)
					return
				}
				_, _ = io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if resp.StatusCode != 200 {
					b.Errorf("push: HTTP %d", resp.StatusCode)
					return
				}
			}
		}()
	}
	wg.Wait()
	want := int64(b.N) * int64(n)
	deadline := time.Now().Add(60 * time.Second)
	for delivered.Load() < want && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	el := time.Since(began)
	b.StopTimer()
	if delivered.Load() < want {
		b.Fatalf("%d of %d deliveries", delivered.Load(), want)
	}
	return el
}
