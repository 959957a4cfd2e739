//go:build !linux

package gateway

import (
	"net"
	"testing"
)

var testEngines = []string{EngineGoroutine}

func engineConn(tb testing.TB, s *Server) net.Conn {
	client, server := net.Pipe()
	s.eng.(*goEngine).start(server)
	return client
}

func writeStalled(*Server, uint64) bool { return false }
