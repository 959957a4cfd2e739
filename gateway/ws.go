package gateway

import (
	"net"
	"net/http"
	"strconv"

	"github.com/gobwas/ws"
	"github.com/imd-dev/imd/schema"
)

// wsEngine is an engine that serves WebSocket connections once upgraded.
type wsEngine interface {
	adoptWS(nc net.Conn) error
}

// serveWS upgrades GET /ws to a WebSocket connection (PROTOCOL.md, "Web
// transports") and hands it to the engine, after which it is a connection
// of the gateway like a TCP one. A gateway that cannot hold another
// connection, or is draining, answers 503 before the upgrade.
func (s *Server) serveWS(w http.ResponseWriter, r *http.Request) {
	eng, ok := s.eng.(wsEngine)
	if !ok {
		http.Error(w, "WebSocket needs the epoll engine", http.StatusNotImplemented)
		return
	}
	if st := s.admission(parseAddr(r.RemoteAddr)); st != schema.StatusOK {
		s.m.rejected.WithLabelValues(st.String()).Inc()
		code := refusalCode(st)
		w.Header().Set("Retry-After", "1")
		http.Error(w, strconv.Itoa(int(st))+" "+st.String()+": "+refusal(st), code)
		return
	}
	nc, brw, _, err := ws.HTTPUpgrader{}.Upgrade(r, w)
	if err != nil {
		if nc != nil {
			_ = nc.Close()
		}
		return
	}
	if brw != nil && brw.Reader.Buffered() > 0 {
		// RFC 6455 has the client wait for the handshake's answer before
		// it sends a frame.
		_ = nc.Close()
		return
	}
	s.m.accepted.Inc()
	if err := eng.adoptWS(nc); err != nil {
		s.log.Info("websocket not adopted", "err", err)
	}
}

// refusalCode is the HTTP status of a web connection refused at admission.
func refusalCode(st schema.Status) int {
	switch st {
	case schema.StatusRateLimited:
		return http.StatusTooManyRequests
	case schema.StatusForbidden:
		return http.StatusForbidden
	}
	return http.StatusServiceUnavailable
}
