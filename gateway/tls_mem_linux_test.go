package gateway

import (
	"crypto/tls"
	"net"
	"os"
	"strconv"
	"testing"
	"time"

	"github.com/imd-dev/imd/internal/testcert"
	"github.com/imd-dev/imd/schema"
)

// TestTLSMemoryPerConn measures the memory (heap and stacks, server and
// client in this process) of an idle logged-in connection on the plain
// TCP port (epoll engine) and on the TLS port (goroutine engine, TLS 1.3,
// ECDSA P-256). It runs only when asked:
//
//	IMD_TLS_MEM=4000 go test -run TestTLSMemoryPerConn -v ./gateway/
func TestTLSMemoryPerConn(t *testing.T) {
	n, _ := strconv.Atoi(os.Getenv("IMD_TLS_MEM"))
	if n <= 0 {
		t.Skip("set IMD_TLS_MEM to the number of connections to measure")
	}
	ca := testcert.NewCA(t, "imd test CA")
	cert, err := LoadCertificate(ca.Issue(t, t.TempDir(), 2))
	if err != nil {
		t.Fatal(err)
	}
	s := startServer(t, EngineEpoll, func(o *Options) {
		o.TLSAddr = "127.0.0.1:0"
		o.TLS = ServerTLSConfig(cert, 0)
	})
	clientCfg := &tls.Config{RootCAs: ca.Pool, ServerName: testcert.ServerName}
	measure := func(name string, open func(uid uint64) net.Conn) {
		before := memInUse()
		conns := make([]net.Conn, 0, n)
		for i := range n {
			conns = append(conns, open(uint64(1000+i)))
		}
		time.Sleep(200 * time.Millisecond) // let flush goroutines end
		after := memInUse()
		t.Logf("%s: %d idle logged-in connections, %.0f bytes each (server and client, heap and stacks)", name, n, float64(after-before)/float64(n))
		for _, c := range conns {
			_ = c.Close()
		}
		deadline := time.Now().Add(10 * time.Second)
		for s.Conns() > 0 && time.Now().Before(deadline) {
			time.Sleep(10 * time.Millisecond)
		}
	}
	tcp := func(uid uint64) net.Conn {
		c := dialClient(t, s)
		c.login(uid)
		return c.nc
	}
	overTLS := func(uid uint64) net.Conn {
		d := tls.Dialer{NetDialer: &net.Dialer{Timeout: 5 * time.Second}, Config: clientCfg}
		nc, err := d.Dial("tcp", s.TLSAddr().String())
		if err != nil {
			t.Fatal(err)
		}
		c := &client{t: t, nc: nc, dec: schema.NewDecoder(nc, 1<<20)}
		c.login(uid)
		return nc
	}
	for range 2 { // the first round also warms the pools and the router's maps
		measure("tcp (epoll)", tcp)
		measure("tls (goroutine)", overTLS)
	}
}
