package gateway

import (
	"net"
	"os"
	"runtime"
	"strconv"
	"testing"
	"time"

	"github.com/imd-dev/imd/schema"
)

// TestWSMemoryPerConn measures the memory (heap and stacks, server and
// client in this process) of an idle logged-in connection over TCP and
// over WebSocket on the epoll engine. It runs only when asked:
//
//	IMD_WS_MEM=4000 go test -run TestWSMemoryPerConn -v ./gateway/
func TestWSMemoryPerConn(t *testing.T) {
	n, _ := strconv.Atoi(os.Getenv("IMD_WS_MEM"))
	if n <= 0 {
		t.Skip("set IMD_WS_MEM to the number of connections to measure")
	}
	s := startWSServer(t, nil)
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
		c.write(loginFrame(uid, 1))
		c.expect(1, schema.StatusOK)
		return c.nc
	}
	websocket := func(uid uint64) net.Conn {
		c := mustDialWS(t, s)
		c.send(loginFrame(uid, 1))
		c.expect(1, schema.StatusOK)
		return c.nc
	}
	// Each kind twice, alternating: the first round also warms the pools
	// and grows the router's maps.
	for range 2 {
		measure("tcp", tcp)
		measure("websocket", websocket)
	}
}

func memInUse() uint64 {
	runtime.GC()
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.HeapInuse + ms.StackInuse
}
