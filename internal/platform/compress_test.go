package platform

import (
	"context"
	"fmt"
	"net"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/imd-dev/imd/sdk"
)

// countingConn counts the bytes a connection reads and writes.
type countingConn struct {
	net.Conn
	in, out *atomic.Int64
}

func (c countingConn) Read(b []byte) (int, error) {
	n, err := c.Conn.Read(b)
	c.in.Add(int64(n))
	return n, err
}

func (c countingConn) Write(b []byte) (int, error) {
	n, err := c.Conn.Write(b)
	c.out.Add(int64(n))
	return n, err
}

// countingDialer makes an SDK client count its wire bytes into in and out.
func countingDialer(in, out *atomic.Int64) func(ctx context.Context, network, addr string) (net.Conn, error) {
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		nc, err := (&net.Dialer{}).DialContext(ctx, network, addr)
		if err != nil {
			return nil, err
		}
		return countingConn{Conn: nc, in: in, out: out}, nil
	}
}

// compressibleText is n bytes of order-like text: it compresses, but not
// to nothing.
func compressibleText(n int) []byte {
	var sb strings.Builder
	for i := 0; sb.Len() < n; i++ {
		fmt.Fprintf(&sb, `{"order":%d,"pickup":"%d Baker Street","lat":51.%04d,"lng":-0.%04d,"fare":%d.%02d},`, 100000+i*7, 1+i%300, (i*37)%10000, (i*91)%10000, 5+i%40, i%100)
	}
	return []byte(sb.String()[:n])
}

// TestCompressC2CRoundTrip: a 16 KiB c2c message between two SDK clients
// that both negotiated compression (the SDK default) arrives intact, and
// goes compressed both ways: the sender writes and the recipient reads
// well under 16 KiB. With Compression off on both, the same message costs
// the full 16 KiB each way.
func TestCompressC2CRoundTrip(t *testing.T) {
	p := start(t, nil)
	content := compressibleText(16 << 10)
	for _, mode := range []string{"", sdk.CompressionOff} {
		t.Run("compression="+mode, func(t *testing.T) {
			var sIn, sOut, rIn, rOut atomic.Int64
			uid := uint64(300)
			if mode != "" {
				uid = 400
			}
			var rec received
			bob := chatter(t, p, 101, uid+2, &rec, nil, func(o *sdk.Options) {
				o.Compression = mode
				o.Dialer = countingDialer(&rIn, &rOut)
			})
			alice := login(t, p, 101, uid+1, func(o *sdk.Options) {
				o.Compression = mode
				o.Dialer = countingDialer(&sIn, &sOut)
			})
			if got, want := alice.LoginInfo().GetCompression(), map[string]string{"": "s2", sdk.CompressionOff: ""}[mode]; got != want {
				t.Fatalf("negotiated %q, want %q", got, want)
			}
			_ = bob
			// A first message shows bob's inbox pull after login is over:
			// a message stored while it runs could come in its page and in
			// a notify, twice the bytes of one delivery.
			if _, err := alice.SendC2C(ctxb, acct1(uid+2), 7, []byte("warm-up")); err != nil {
				t.Fatal(err)
			}
			eventually(t, 5*time.Second, "the first delivery", func() bool { return rec.len() == 1 })
			outBefore, inBefore := sOut.Load(), rIn.Load()
			if _, err := alice.SendC2C(ctxb, acct1(uid+2), 7, content); err != nil {
				t.Fatal(err)
			}
			eventually(t, 5*time.Second, "delivery", func() bool { return rec.len() == 2 })
			if got := rec.contents()[1]; got != string(content) {
				t.Fatalf("content differs: %d bytes, want %d", len(got), len(content))
			}
			sent, recvd := sOut.Load()-outBefore, rIn.Load()-inBefore
			t.Logf("sender wrote %d bytes, recipient read %d bytes for %d bytes of content", sent, recvd, len(content))
			if mode == "" && (sent >= int64(len(content))/2 || recvd >= int64(len(content))/2) {
				t.Fatalf("not compressed: sender wrote %d, recipient read %d", sent, recvd)
			}
			if mode == sdk.CompressionOff && (sent < int64(len(content)) || recvd < int64(len(content))) {
				t.Fatalf("compressed although off: sender wrote %d, recipient read %d", sent, recvd)
			}
		})
	}
}
