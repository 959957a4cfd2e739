package gateway

import (
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"strconv"
	"time"

	"github.com/imd-dev/imd/schema"
)

// longPollHandler serves the HTTP long-poll transport under /lp/
// (PROTOCOL.md, "Web transports"): open, send, poll and close of sessions
// that each behave as one connection of the gateway (longpoll_session.go).
// The web listener has checked the origin already.
func (s *Server) longPollHandler() http.Handler {
	return &lpHandler{hub: newLPHub(s)}
}

type lpHandler struct {
	hub *lpHub
}

// lpOpened is the answer to /lp/open.
type lpOpened struct {
	Session string `json:"session"`
	PollMS  int64  `json:"poll_ms"`
}

// lpRefused is the answer to an /lp/open the gateway cannot hold: the
// status a TCP connection would get in its error frame.
type lpRefused struct {
	Code      uint16 `json:"code"`
	Message   string `json:"message"`
	Retryable bool   `json:"retryable"`
}

func (h *lpHandler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Cache-Control", "no-store")
	if origin := r.Header.Get("Origin"); origin != "" {
		// The web listener let this origin through, so its page may read
		// the answers: a page on another origin needs CORS for POSTs of
		// application/octet-stream, starting with a preflight.
		hd := w.Header()
		hd.Set("Access-Control-Allow-Origin", origin)
		hd.Add("Vary", "Origin")
		if r.Method == http.MethodOptions {
			hd.Set("Access-Control-Allow-Methods", http.MethodPost)
			hd.Set("Access-Control-Allow-Headers", "Content-Type")
			hd.Set("Access-Control-Max-Age", "600")
			w.WriteHeader(http.StatusNoContent)
			return
		}
	}
	if r.Method != http.MethodPost {
		w.Header().Set("Allow", http.MethodPost)
		http.Error(w, "long-poll requests are POSTs", http.StatusMethodNotAllowed)
		return
	}
	switch r.URL.Path {
	case "/lp/open":
		h.open(w, r)
		return
	case "/lp/send", "/lp/poll", "/lp/close":
	default:
		http.NotFound(w, r)
		return
	}
	var c *lpConn
	if key, ok := parseLPKey(r.URL.Query().Get("s")); ok {
		c = h.hub.get(key)
	}
	if c == nil {
		http.Error(w, "unknown or closed session", http.StatusNotFound)
		return
	}
	switch r.URL.Path {
	case "/lp/send":
		h.send(w, r, c)
	case "/lp/poll":
		h.poll(w, r, c)
	default:
		c.close("client closed")
		w.WriteHeader(http.StatusNoContent)
	}
}

func (h *lpHandler) open(w http.ResponseWriter, r *http.Request) {
	s := h.hub.s
	c, st := h.hub.open(r.RemoteAddr)
	if st != schema.StatusOK {
		code := refusalCode(st)
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Retry-After", "1")
		w.WriteHeader(code)
		_ = json.NewEncoder(w).Encode(lpRefused{Code: uint16(st), Message: refusal(st), Retryable: st.Retryable()})
		return
	}
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(lpOpened{Session: c.key.String(), PollMS: s.opts.PollTimeout.Milliseconds()})
}

// lpSendLimit bounds a send's body: many frames, but not an unbounded
// read into memory.
func lpSendLimit(maxBody uint32) int {
	return 16 * (schema.HeaderLen + int(maxBody))
}

func (h *lpHandler) send(w http.ResponseWriter, r *http.Request, c *lpConn) {
	limit := lpSendLimit(h.hub.s.opts.MaxBody)
	body, err := io.ReadAll(io.LimitReader(r.Body, int64(limit)+1))
	if err != nil {
		http.Error(w, "reading the body: "+err.Error(), http.StatusBadRequest)
		return
	}
	truncated := len(body) > limit
	if truncated {
		body = body[:limit]
	}
	switch c.send(body, truncated) {
	case lpSent:
		w.WriteHeader(http.StatusNoContent)
	case lpGone:
		http.Error(w, "unknown or closed session", http.StatusNotFound)
	case lpPartial:
		http.Error(w, "the body must hold whole frames; nothing was sent", http.StatusBadRequest)
	case lpEmpty:
		http.Error(w, "the body holds no frame", http.StatusBadRequest)
	case lpTooLarge:
		http.Error(w, "the body is over "+strconv.Itoa(limit)+" bytes; nothing was sent", http.StatusRequestEntityTooLarge)
	}
}

func (h *lpHandler) poll(w http.ResponseWriter, r *http.Request, c *lpConn) {
	s := h.hub.s
	out, closing, res := c.takePoll(r.Context(), s.opts.PollTimeout)
	switch res {
	case lpConflict:
		http.Error(w, "another poll of this session is pending", http.StatusConflict)
		return
	case lpClosed:
		http.Error(w, "unknown or closed session", http.StatusNotFound)
		return
	case lpLeft:
		return
	}
	n := 0
	for _, p := range out {
		n += len(*p)
	}
	w.Header().Set("Content-Type", "application/octet-stream")
	w.Header().Set("Content-Length", strconv.Itoa(n))
	w.WriteHeader(http.StatusOK)
	var werr error
	if n > 0 {
		// A write that stalls past the write timeout fails, and the
		// session closes as a socket that accepts nothing would.
		_ = http.NewResponseController(w).SetWriteDeadline(time.Now().Add(s.opts.WriteTimeout))
		for _, p := range out {
			if _, werr = w.Write(*p); werr != nil {
				break
			}
		}
		if werr == nil {
			werr = http.NewResponseController(w).Flush()
		}
		s.m.writes.Inc()
		s.m.framesOut.Add(float64(len(out)))
	}
	releaseFrames(out)
	if werr != nil && errors.Is(werr, http.ErrNotSupported) {
		werr = nil
	}
	c.finishPoll(closing, werr)
}
