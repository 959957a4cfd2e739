package platform

import (
	"context"
	"fmt"
	"net"
	"testing"
	"time"

	"github.com/imd-dev/imd/schema/pb"
	"github.com/imd-dev/imd/sdk"
)

// slowLink forwards TCP connections to target, holding every chunk for
// delay in each direction (a mobile link's latency; order kept).
func slowLink(tb testing.TB, target string, delay time.Duration) string {
	tb.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { _ = ln.Close() })
	pipe := func(dst, src net.Conn) {
		type chunk struct {
			b  []byte
			at time.Time
		}
		q := make(chan chunk, 4096)
		go func() {
			defer dst.Close()
			for c := range q {
				time.Sleep(time.Until(c.at))
				if _, err := dst.Write(c.b); err != nil {
					return
				}
			}
		}()
		defer close(q)
		for {
			buf := make([]byte, 64<<10)
			n, err := src.Read(buf)
			if n > 0 {
				q <- chunk{buf[:n], time.Now().Add(delay)}
			}
			if err != nil {
				return
			}
		}
	}
	go func() {
		for {
			a, err := ln.Accept()
			if err != nil {
				return
			}
			b, err := net.Dial("tcp", target)
			if err != nil {
				_ = a.Close()
				continue
			}
			go pipe(b, a)
			go pipe(a, b)
		}
	}()
	return ln.Addr().String()
}

// BenchmarkC2COverSlowLink: one sender behind a link of 50 ms each way
// (100 ms round trip) sends 32 messages, waiting for each answer before
// the next (sequential) or all at once (pipelined, SendC2CAsync, stored
// in call order). Reports the messages per second one sender gets.
//
//	go test -run '^$' -bench C2COverSlowLink -benchtime 64x ./internal/platform/
func BenchmarkC2COverSlowLink(b *testing.B) {
	const burst = 32
	p := start(b, nil)
	addr := slowLink(b, p.GatewayAddr(), 50*time.Millisecond)
	login(b, p, 101, 2, func(o *sdk.Options) { o.OnC2C = func(*pb.C2CMessage) {} })
	sender := login(b, p, 101, 1, func(o *sdk.Options) { o.Addrs = []string{addr} })
	ctx := context.Background()
	to := &pb.User{Account: 1, Uid: 2}
	for _, mode := range []string{"sequential", "pipelined"} {
		b.Run(mode, func(b *testing.B) {
			start := time.Now()
			for sent := 0; sent < b.N; sent += burst {
				n := min(burst, b.N-sent)
				if mode == "sequential" {
					for i := range n {
						if _, err := sender.SendC2C(ctx, to, 1, fmt.Appendf(nil, "m%d", sent+i)); err != nil {
							b.Fatal(err)
						}
					}
					continue
				}
				sends := make([]*sdk.AsyncSend, n)
				for i := range sends {
					sends[i] = sender.SendC2CAsync(ctx, to, 1, fmt.Appendf(nil, "m%d", sent+i))
				}
				for _, a := range sends {
					if _, err := a.Wait(ctx); err != nil {
						b.Fatal(err)
					}
				}
			}
			b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "msgs/s")
		})
	}
}
