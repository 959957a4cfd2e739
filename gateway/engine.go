package gateway

import (
	"fmt"
	"net"
)

// Engines: how a gateway moves bytes. Both run the same protocol code
// (conn.go); they differ in how a connection waits for input and output.
const (
	// EngineEpoll runs one event loop per CPU over epoll (Linux only). A
	// connection is a small struct and its socket: no goroutine, no
	// net.Conn, and no buffer while no frame is half read.
	EngineEpoll = "epoll"
	// EngineGoroutine runs one reader goroutine per connection over
	// net.Conn. It runs everywhere.
	EngineGoroutine = "goroutine"
)

// engine is the byte-moving half of a gateway.
type engine interface {
	name() string
	// serve accepts on ln until it is closed, then returns ErrServerClosed.
	serve(ln net.Listener) error
	// closeListener stops serve; Shutdown calls it after closing ln.
	closeListener()
	// stop ends the engine's own goroutines; Shutdown calls it once every
	// connection is closed.
	stop()
}

func resolveEngine(name string) (string, error) {
	switch name {
	case "":
		return defaultEngine, nil
	case EngineEpoll, EngineGoroutine:
		return name, nil
	}
	return "", fmt.Errorf("engine %q: want %s or %s", name, EngineEpoll, EngineGoroutine)
}

func newEngine(s *Server) engine {
	if s.opts.Engine == EngineEpoll {
		if e := newEpollEngine(s); e != nil {
			return e
		}
		s.log.Warn("gateway: the epoll engine needs Linux; using the goroutine engine")
	}
	return &goEngine{s: s}
}
