package logic

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"hash/fnv"
	"log/slog"
	"net"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/imd-dev/imd/internal/acl"
	"github.com/imd-dev/imd/schema"
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
	// ReadTimeout bounds reading one request, and the wait for the first
	// request of a new connection (0: 30s). IdleTimeout is the wait for
	// the next request on a kept-alive connection (0: 120s). A connection
	// that reaches either with no request begun is closed with nothing
	// written.
	ReadTimeout, IdleTimeout time.Duration
	// AdminKey authenticates the admin API (GET/PUT /v1/admin/acl) with
	// `Authorization: Bearer <admin key>`; app API keys are refused there.
	// Empty: the admin API is off (404).
	AdminKey string
	// SetACL applies lists PUT on the admin API; nil: Service.SetACL (one
	// node). A cluster stores them in Redis for every node as well.
	SetACL func(ctx context.Context, l acl.Lists) error
	// Gateways lists the gateways GET /v1/gateways offers clients
	// (discovery.go); nil: that endpoint answers 404.
	Gateways GatewayLister
}

// NewHTTPServer returns the fasthttp server of the HTTP API:
//
//   - /healthz, /readyz and /metrics for operators;
//   - the app-server API (schema/openapi.yaml), authenticated per app with
//     `Authorization: Bearer <api key>`: POST /v1/push, POST /v1/broadcast
//     (broadcast.go), GET /v1/push/{id}, GET /v1/presence?uid=N;
//   - for clients, before they log in and without a key: GET /v1/gateways,
//     the gateways to dial (discovery.go);
//   - the admin API, authenticated with its own key (HTTPOptions.AdminKey):
//     GET/PUT /v1/admin/acl.
//
// Bodies larger than S2C.MaxBody are refused with 413. With a nil svc (a
// gateway-only node) it serves the operator endpoints only.
func NewHTTPServer(svc *Service, o HTTPOptions) *fasthttp.Server {
	maxBody := 4 << 10
	if svc != nil {
		maxBody = svc.s2c.MaxBody
	}
	log := o.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if o.ReadTimeout <= 0 {
		o.ReadTimeout = 30 * time.Second
	}
	if o.IdleTimeout <= 0 {
		o.IdleTimeout = 120 * time.Second
	}
	// Connections with a request begun (between fasthttp's StateActive
	// and the next state): only those get an answer from ErrorHandler.
	var active sync.Map
	var metrics fasthttp.RequestHandler
	if o.Gatherer != nil {
		metrics = fasthttpadaptor.NewFastHTTPHandler(promhttp.HandlerFor(o.Gatherer, promhttp.HandlerOpts{}))
	}
	h := func(ctx *fasthttp.RequestCtx) {
		path := string(ctx.Path())
		logid := requestLogID(ctx)
		switch {
		case path == "/healthz":
			writeJSON(ctx, fasthttp.StatusOK, map[string]any{"status": "ok"})
		case path == "/readyz":
			if o.Ready != nil && !o.Ready() {
				writeJSON(ctx, fasthttp.StatusServiceUnavailable, map[string]any{"status": "not ready"})
				return
			}
			if svc == nil {
				writeJSON(ctx, fasthttp.StatusOK, map[string]any{"status": "ready"})
				return
			}
			st, _ := svc.router.Stats(ctx)
			writeJSON(ctx, fasthttp.StatusOK, map[string]any{"status": "ready", "users_online": st.Users, "sessions": st.Sessions})
		case path == "/metrics":
			if metrics == nil {
				writeError(ctx, fasthttp.StatusNotFound, 0, "metrics are disabled")
				return
			}
			metrics(ctx)
		case svc == nil:
			writeError(ctx, fasthttp.StatusNotFound, 0, "this node is a gateway: the app-server API is served by logic nodes")
		case path == "/v1/admin/acl":
			handleAdminACL(svc, o, ctx, log, logid)
		case path == "/v1/gateways":
			handleGateways(svc, o, ctx)
		case path == "/v1/push":
			if !ctx.IsPost() {
				writeError(ctx, fasthttp.StatusMethodNotAllowed, 0, "use POST")
				return
			}
			if app := authApp(svc, ctx); app != nil {
				handlePush(svc, app, ctx, log, logid)
			}
		case path == "/v1/broadcast":
			if !ctx.IsPost() {
				writeError(ctx, fasthttp.StatusMethodNotAllowed, 0, "use POST")
				return
			}
			if app := authApp(svc, ctx); app != nil {
				handleBroadcast(svc, app, ctx, log, logid)
			}
		case strings.HasPrefix(path, "/v1/push/"):
			if !ctx.IsGet() {
				writeError(ctx, fasthttp.StatusMethodNotAllowed, 0, "use GET")
				return
			}
			if app := authApp(svc, ctx); app != nil {
				handlePushStats(svc, app, ctx, strings.TrimPrefix(path, "/v1/push/"), log, logid)
			}
		case path == "/v1/presence":
			if !ctx.IsGet() {
				writeError(ctx, fasthttp.StatusMethodNotAllowed, 0, "use GET")
				return
			}
			if app := authApp(svc, ctx); app != nil {
				handlePresence(svc, app, ctx)
			}
		case path == "/v1/groups" || strings.HasPrefix(path, "/v1/groups/"):
			if app := authApp(svc, ctx); app != nil {
				handleGroups(svc, app, ctx, strings.TrimPrefix(path, "/v1/groups"), log, logid)
			}
		case strings.HasPrefix(path, "/v1/users/") && strings.HasSuffix(path, "/groups"):
			if !ctx.IsGet() {
				writeError(ctx, fasthttp.StatusMethodNotAllowed, 0, "use GET")
				return
			}
			if app := authApp(svc, ctx); app != nil {
				handleUserGroups(svc, app, ctx, strings.TrimSuffix(strings.TrimPrefix(path, "/v1/users/"), "/groups"))
			}
		default:
			writeError(ctx, fasthttp.StatusNotFound, 0, "no such endpoint: "+path)
		}
	}
	return &fasthttp.Server{
		Handler:            h,
		Name:               "imd",
		MaxRequestBodySize: maxBody,
		ReadTimeout:        o.ReadTimeout,
		WriteTimeout:       30 * time.Second,
		IdleTimeout:        o.IdleTimeout,
		Logger:             printfLogger{log},
		ConnState: func(c net.Conn, st fasthttp.ConnState) {
			if st == fasthttp.StateActive {
				active.Store(c, struct{}{})
			} else {
				active.Delete(c)
			}
		},
		ErrorHandler: func(ctx *fasthttp.RequestCtx, err error) {
			if _, ok := active.Load(ctx.Conn()); !ok {
				// No byte of a request arrived: the read timed out (or
				// failed) on a connection waiting for one. fasthttp
				// writes whatever this handler answers, and a client
				// keeping the connection as a spare would read it as the
				// answer to the request it sends next. Closing first
				// makes that write fail: the client sees a close.
				_ = ctx.Conn().Close()
				return
			}
			if errors.Is(err, fasthttp.ErrBodyTooLarge) {
				writeError(ctx, fasthttp.StatusRequestEntityTooLarge, 0, fmt.Sprintf("request body over %d bytes", maxBody))
				return
			}
			writeError(ctx, fasthttp.StatusBadRequest, 0, "bad request: "+err.Error())
		},
	}
}

// printfLogger gives fasthttp's own messages to slog.
type printfLogger struct{ log *slog.Logger }

func (l printfLogger) Printf(format string, args ...any) {
	l.log.Debug("fasthttp: " + fmt.Sprintf(format, args...))
}

// authApp returns the app of the request's API key, or answers 401. The
// scheme is matched in any case, as HTTP auth schemes are (RFC 9110, 11.1).
func authApp(svc *Service, ctx *fasthttp.RequestCtx) *App {
	auth := strings.TrimSpace(string(ctx.Request.Header.Peek("Authorization")))
	scheme, key, _ := strings.Cut(auth, " ")
	key = strings.TrimLeft(key, " ")
	if !strings.EqualFold(scheme, "Bearer") || key == "" {
		ctx.Response.Header.Set("WWW-Authenticate", `Bearer realm="imd"`)
		writeError(ctx, fasthttp.StatusUnauthorized, 0, "missing `Authorization: Bearer <api key>`")
		return nil
	}
	app := svc.AppByKey(key)
	if app == nil {
		writeError(ctx, fasthttp.StatusUnauthorized, 0, "unknown api key")
	}
	return app
}

// pushBody is the JSON of POST /v1/push.
type pushBody struct {
	To           []Recipient `json:"to"`
	MsgType      uint32      `json:"msgtype"`
	Content      []byte      `json:"content"` // base64
	Text         *string     `json:"text"`    // or plain text
	StoreOffline bool        `json:"store_offline"`
}

// requestLogID is the request's trace id: the client's X-Request-Id when
// it sends one (a decimal logid, or any other text, which is hashed to
// one), else a new one. The response carries it back in X-Request-Id, and
// every log line and frame the request causes carries it as logid.
func requestLogID(ctx *fasthttp.RequestCtx) uint64 {
	var id uint64
	if v := ctx.Request.Header.Peek("X-Request-Id"); len(v) > 0 {
		var err error
		if id, err = strconv.ParseUint(string(v), 10, 64); err != nil || id == 0 {
			h := fnv.New64a()
			_, _ = h.Write(v)
			id = h.Sum64() | 1
		}
	} else {
		id = schema.NewLogID()
	}
	ctx.Response.Header.Set("X-Request-Id", strconv.FormatUint(id, 10))
	return id
}

func handlePush(svc *Service, app *App, ctx *fasthttp.RequestCtx, log *slog.Logger, logid uint64) {
	var b pushBody
	dec := json.NewDecoder(bytes.NewReader(ctx.PostBody()))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&b); err != nil {
		writeError(ctx, fasthttp.StatusBadRequest, schema.StatusBadBody, "bad JSON: "+err.Error())
		return
	}
	if dec.More() {
		writeError(ctx, fasthttp.StatusBadRequest, schema.StatusBadBody, "bad JSON: more than one value")
		return
	}
	if b.Text != nil {
		if len(b.Content) > 0 {
			writeError(ctx, fasthttp.StatusBadRequest, schema.StatusBadArgument, "give content (base64) or text, not both")
			return
		}
		b.Content = []byte(*b.Text)
	}
	res, err := svc.Push(ctx, app, &PushRequest{To: b.To, MsgType: b.MsgType, Content: b.Content, StoreOffline: b.StoreOffline, LogID: logid})
	if err != nil {
		writeStatusError(ctx, err)
		log.Info("push refused", "appcode", app.AppCode, "err", err, "logid", logid)
		return
	}
	log.Debug("push", "appcode", app.AppCode, "push_id", res.PushID, "recipients", len(b.To), "online", res.Online, "stored", res.Stored, "dropped", res.Dropped, "logid", logid)
	writeJSON(ctx, fasthttp.StatusOK, res)
}

func handlePushStats(svc *Service, app *App, ctx *fasthttp.RequestCtx, idText string, log *slog.Logger, logid uint64) {
	id, err := strconv.ParseUint(idText, 10, 64)
	if err != nil {
		writeError(ctx, fasthttp.StatusBadRequest, schema.StatusBadArgument, "push id must be a decimal number")
		return
	}
	st, err := svc.PushStats(ctx, app, id)
	var none *NoStatsError
	switch {
	case errors.As(err, &none):
		writeError(ctx, fasthttp.StatusNotFound, 0, none.Msg)
	case err != nil:
		writeStatusError(ctx, err)
		log.Warn("push statistics", "push_id", id, "err", err, "logid", logid)
	default:
		writeJSON(ctx, fasthttp.StatusOK, st)
	}
}

// presenceSession is one session in GET /v1/presence.
type presenceSession struct {
	AppCode  uint32 `json:"appcode"`
	Terminal string `json:"terminal"`
	DeviceID string `json:"device_id"`
	Gate     string `json:"gate"`
	LoginMS  int64  `json:"login_ms"`
}

func handlePresence(svc *Service, app *App, ctx *fasthttp.RequestCtx) {
	uid, err := strconv.ParseUint(string(ctx.QueryArgs().Peek("uid")), 10, 64)
	if err != nil || uid == 0 {
		writeError(ctx, fasthttp.StatusBadRequest, schema.StatusBadRecipient, "query parameter uid must be a number > 0")
		return
	}
	ss, err := svc.Presence(ctx, app, uid)
	if err != nil {
		writeStatusError(ctx, err)
		return
	}
	out := make([]presenceSession, 0, len(ss))
	for _, s := range ss {
		name := ""
		if a := svc.apps[s.AppCode]; a != nil {
			name = a.Name
		}
		out = append(out, presenceSession{AppCode: s.AppCode, Terminal: name, DeviceID: s.DeviceID, Gate: s.Gate, LoginMS: s.LoginMS})
	}
	writeJSON(ctx, fasthttp.StatusOK, map[string]any{"account": app.Account, "uid": uid, "online": len(out) > 0, "sessions": out})
}

// writeStatusError answers a *schema.Error with the HTTP status that fits.
func writeStatusError(ctx *fasthttp.RequestCtx, err error) {
	var se *schema.Error
	if !errors.As(err, &se) {
		writeError(ctx, fasthttp.StatusInternalServerError, schema.StatusInternal, err.Error())
		return
	}
	code := fasthttp.StatusBadRequest
	switch {
	case se.Status == schema.StatusContentTooLarge:
		code = fasthttp.StatusRequestEntityTooLarge
	case se.Status == schema.StatusTimeout:
		code = fasthttp.StatusGatewayTimeout
	case se.Status == schema.StatusUnknownGroup:
		code = fasthttp.StatusNotFound
	case se.Status == schema.StatusGroupExists:
		code = fasthttp.StatusConflict
	case se.Status == schema.StatusOtherDC:
		code = fasthttp.StatusMisdirectedRequest
	case se.Status == schema.StatusRateLimited:
		code = fasthttp.StatusTooManyRequests
	case se.Status.Retryable():
		code = fasthttp.StatusServiceUnavailable
	}
	writeError(ctx, code, se.Status, se.Message)
}

// writeError answers {"error": {...}}; status is the platform status code
// (0 where none applies).
func writeError(ctx *fasthttp.RequestCtx, code int, status schema.Status, msg string) {
	e := map[string]any{"message": msg}
	if status != 0 {
		e["code"] = uint16(status)
		e["status"] = status.String()
		e["retryable"] = status.Retryable()
	}
	writeJSON(ctx, code, map[string]any{"error": e})
}

func writeJSON(ctx *fasthttp.RequestCtx, status int, v any) {
	ctx.SetStatusCode(status)
	ctx.SetContentType("application/json")
	_ = json.NewEncoder(ctx).Encode(v)
}
