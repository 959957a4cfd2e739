package gateway

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"
)

// webListener is the gateway's web listener: the same frames as the TCP
// port, carried by WebSocket (/ws) or HTTP long-poll (/lp/) for browsers,
// and a hook for the demo page (/demo/). See PROTOCOL.md, "Web transports".
type webListener struct {
	mu  sync.Mutex
	ln  net.Listener
	srv *http.Server
}

// webHeaderTimeout bounds how long a client may take to send a request's
// headers (the WebSocket upgrade included) on the web listener.
const webHeaderTimeout = 10 * time.Second

// listenWeb binds the web listener when one is configured.
func (s *Server) listenWeb() error {
	if s.opts.WebAddr == "" {
		return nil
	}
	ln, err := net.Listen("tcp", s.opts.WebAddr)
	if err != nil {
		return fmt.Errorf("gateway: web listen %s: %w", s.opts.WebAddr, err)
	}
	srv := &http.Server{
		Handler:           s.webHandler(),
		ReadHeaderTimeout: webHeaderTimeout,
	}
	s.web.mu.Lock()
	s.web.ln, s.web.srv = ln, srv
	s.web.mu.Unlock()
	return nil
}

// WebAddr returns the web listener's address, or nil when there is none.
func (s *Server) WebAddr() net.Addr {
	s.web.mu.Lock()
	defer s.web.mu.Unlock()
	if s.web.ln == nil {
		return nil
	}
	return s.web.ln.Addr()
}

// serveWeb serves the web listener on a goroutine of its own.
func (s *Server) serveWeb() {
	s.web.mu.Lock()
	ln, srv := s.web.ln, s.web.srv
	s.web.mu.Unlock()
	if srv == nil {
		return
	}
	s.log.Info("gateway web serving", "addr", ln.Addr().String(), "origins", s.opts.WebOrigins)
	go func() {
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			s.log.Error("gateway web listener failed", "err", err)
		}
	}()
}

// shutdownWeb stops the web listener from accepting and closes its idle
// HTTP connections; it returns when requests in progress have finished,
// ctx is done or closeWeb has cut them. WebSocket connections are not the
// HTTP server's once upgraded: they drain with the others.
func (s *Server) shutdownWeb(ctx context.Context) {
	s.web.mu.Lock()
	srv := s.web.srv
	s.web.mu.Unlock()
	if srv != nil {
		_ = srv.Shutdown(ctx)
	}
}

// closeWeb closes the web listener's HTTP connections at once.
func (s *Server) closeWeb() {
	s.web.mu.Lock()
	srv := s.web.srv
	s.web.mu.Unlock()
	if srv != nil {
		_ = srv.Close()
	}
}

// webHandler routes the web listener's paths.
func (s *Server) webHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /ws", func(w http.ResponseWriter, r *http.Request) {
		if !s.originAllowed(r) {
			http.Error(w, "origin not allowed", http.StatusForbidden)
			return
		}
		s.serveWS(w, r)
	})
	lp := s.longPollHandler()
	mux.Handle("/lp/", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !s.originAllowed(r) {
			http.Error(w, "origin not allowed", http.StatusForbidden)
			return
		}
		lp.ServeHTTP(w, r)
	}))
	mux.Handle("/demo/", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if s.opts.WebStatic == nil {
			http.NotFound(w, r)
			return
		}
		s.opts.WebStatic.ServeHTTP(w, r)
	}))
	return mux
}

// originAllowed applies WebOrigins to a request: no Origin header (a
// non-browser client) passes; "*" passes anything; otherwise the origin
// must be listed, or, with no list, be served by the host the request
// came to.
func (s *Server) originAllowed(r *http.Request) bool {
	origin := r.Header.Get("Origin")
	if origin == "" {
		return true
	}
	if len(s.opts.WebOrigins) == 0 {
		u, err := url.Parse(origin)
		return err == nil && u.Host != "" && strings.EqualFold(u.Host, r.Host)
	}
	for _, o := range s.opts.WebOrigins {
		if o == "*" || strings.EqualFold(strings.TrimSuffix(o, "/"), origin) {
			return true
		}
	}
	return false
}
