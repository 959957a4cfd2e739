package gateway

import "net/http"

// longPollHandler serves the HTTP long-poll transport under /lp/. This is a
// placeholder until the transport is built: every path answers 404.
func (s *Server) longPollHandler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		http.Error(w, "long-poll not built yet", http.StatusNotFound)
	})
}
