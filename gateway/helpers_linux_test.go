package gateway

import (
	"net"
	"os"
	"testing"

	"golang.org/x/sys/unix"
)

var testEngines = []string{EngineEpoll, EngineGoroutine}

// engineConn hands the server one end of a fresh in-process stream and
// returns the other: net.Pipe for the goroutine engine, a unix socketpair
// for the epoll engine (which needs a descriptor).
func engineConn(tb testing.TB, s *Server) net.Conn {
	tb.Helper()
	switch e := s.eng.(type) {
	case *goEngine:
		client, server := net.Pipe()
		e.start(server)
		return client
	case *epollEngine:
		fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			tb.Fatal(err)
		}
		if err := e.adopt(fds[0]); err != nil {
			tb.Fatal(err)
		}
		f := os.NewFile(uintptr(fds[1]), "client")
		defer f.Close()
		nc, err := net.FileConn(f)
		if err != nil {
			tb.Fatal(err)
		}
		return nc
	}
	tb.Fatalf("unknown engine %T", s.eng)
	return nil
}

// writeStalled reports whether the connection's socket was found full and
// frames wait for it (epoll engine only; false for the goroutine engine,
// which cannot tell).
func writeStalled(s *Server, id uint64) bool {
	c := s.conn(id)
	if c == nil {
		return false
	}
	ec, ok := c.io.(*epConn)
	if !ok {
		return false
	}
	ec.mu.Lock()
	defer ec.mu.Unlock()
	return ec.wantOut
}
