package gateway

import "net/http"

// serveWS upgrades a request to a WebSocket connection.
func (s *Server) serveWS(w http.ResponseWriter, _ *http.Request) {
	http.Error(w, "websocket not built yet", http.StatusNotImplemented)
}
