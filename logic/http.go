package logic

import (
	"encoding/json"
	"log/slog"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/valyala/fasthttp"
	"github.com/valyala/fasthttp/fasthttpadaptor"
)

// HTTPOptions configures the HTTP API.
type HTTPOptions struct {
	// Gatherer serves /metrics; nil leaves /metrics out.
	Gatherer prometheus.Gatherer
	// Ready reports whether the node should receive traffic (/readyz).
	Ready  func() bool
	Logger *slog.Logger
}

// NewHTTPServer returns the fasthttp server of the HTTP API: /healthz,
// /readyz and /metrics for operators. Bodies larger than 1 MiB are refused.
func NewHTTPServer(svc *Service, o HTTPOptions) *fasthttp.Server {
	var metrics fasthttp.RequestHandler
	if o.Gatherer != nil {
		metrics = fasthttpadaptor.NewFastHTTPHandler(promhttp.HandlerFor(o.Gatherer, promhttp.HandlerOpts{}))
	}
	h := func(ctx *fasthttp.RequestCtx) {
		switch string(ctx.Path()) {
		case "/healthz":
			writeJSON(ctx, fasthttp.StatusOK, map[string]any{"status": "ok"})
		case "/readyz":
			if o.Ready != nil && !o.Ready() {
				writeJSON(ctx, fasthttp.StatusServiceUnavailable, map[string]any{"status": "not ready"})
				return
			}
			st, _ := svc.router.Stats(ctx)
			writeJSON(ctx, fasthttp.StatusOK, map[string]any{"status": "ready", "users_online": st.Users, "sessions": st.Sessions})
		case "/metrics":
			if metrics == nil {
				ctx.Error("metrics disabled", fasthttp.StatusNotFound)
				return
			}
			metrics(ctx)
		default:
			writeJSON(ctx, fasthttp.StatusNotFound, map[string]any{"error": "no such endpoint", "path": string(ctx.Path())})
		}
	}
	return &fasthttp.Server{
		Handler:            h,
		Name:               "imd",
		MaxRequestBodySize: 1 << 20,
		ReadTimeout:        30e9,
		WriteTimeout:       30e9,
		IdleTimeout:        120e9,
	}
}

func writeJSON(ctx *fasthttp.RequestCtx, status int, v any) {
	ctx.SetStatusCode(status)
	ctx.SetContentType("application/json")
	_ = json.NewEncoder(ctx).Encode(v)
}
