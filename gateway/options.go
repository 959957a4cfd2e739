package gateway

import (
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"strconv"
	"syscall"
	"time"

	"github.com/imd-dev/imd/internal/acl"
	"github.com/prometheus/client_golang/prometheus"
)

// Options configures a gateway Server. Zero values get the defaults below.
type Options struct {
	// Addr is the TCP listen address. Default ":7070".
	Addr string
	// ID names this gateway in the router; it must be unique among live
	// gateways. Default: hostname:port plus a boot nonce.
	ID string
	// MaxConns is the most connections held at once; more are answered
	// with StatusTooManyConns and closed. Default and ceiling: the
	// process's open-file limit less a reserve for everything else.
	MaxConns int
	// MaxBody is the largest frame body accepted. Default 64 KiB.
	MaxBody uint32
	// LoginTimeout closes a connection that has not logged in by then.
	// Default 10s.
	LoginTimeout time.Duration
	// IdleTimeout closes a logged-in connection that sent nothing for this
	// long. Default 90s.
	IdleTimeout time.Duration
	// KeepaliveInterval is advertised to clients at login. Default IdleTimeout/3.
	KeepaliveInterval time.Duration
	// RequestTimeout bounds each call into logic. Default 10s.
	RequestTimeout time.Duration
	// WriteTimeout closes a connection whose socket accepts nothing for
	// this long. Default 10s.
	WriteTimeout time.Duration
	// MaxInFlight bounds concurrent requests per connection. Default 64.
	MaxInFlight int
	// MaxQueueBytes closes a connection (slow consumer) whose unsent frames
	// exceed it. Default 4 MiB.
	MaxQueueBytes int
	// CompressMin is the smallest body the gateway compresses on a
	// connection whose login negotiated compression (PROTOCOL.md, Flags).
	// Default 512 bytes; negative turns compression off (logins are
	// answered with no scheme).
	CompressMin int
	// Engine chooses how connections are served: EngineEpoll (event loops,
	// Linux only; elsewhere the gateway falls back to goroutines) or
	// EngineGoroutine (a reader goroutine per connection). Default epoll
	// on Linux: an idle logged-in connection costs it about 1.2 KB of RSS
	// against 7 KB with a goroutine (imbench conns, 10k connections).
	Engine string
	// WebAddr is the web listener's address (WebSocket at /ws, HTTP
	// long-poll under /lp/, the demo page under /demo/). Empty: no web
	// listener. The gateway has no default for it; the platform's
	// configuration defaults it to ":7072".
	WebAddr string
	// WebOrigins are the browser origins (e.g. "https://chat.example.com")
	// allowed on the web listener; "*" allows any. A request without an
	// Origin header (a non-browser client) is always allowed. Empty allows,
	// besides those, only pages served by the same host as the request
	// (the Origin's host equals the request's Host), which is the demo
	// page's case; anything else is refused with 403.
	WebOrigins []string
	// WebStatic, when set, serves the web listener's /demo/ paths; nil
	// answers them 404.
	WebStatic http.Handler
	// PollTimeout is how long an HTTP long-poll waits for a frame before
	// it answers empty (poll_ms of /lp/open). Default 30s, or a third of
	// IdleTimeout when that is shorter; it must be shorter than
	// IdleTimeout, which closes a session with no poll.
	PollTimeout time.Duration
	// TLSAddr, when set, is a second client listener whose connections
	// speak TLS (with TLS) and then the same frames as Addr. They are
	// served by the goroutine engine whatever Engine says, so Addr keeps
	// its engine's memory budget. Empty: no TLS listener.
	TLSAddr string
	// TLS configures the TLS listener; it is required with TLSAddr (see
	// ServerTLSConfig). A zero MinVersion is taken as TLS 1.3.
	TLS *tls.Config
	// NoPlain, with TLSAddr, leaves out the plain-TCP listener: every
	// client then comes in over TLS, and Addr is not bound. Without
	// TLSAddr it is an error.
	NoPlain bool
	// Limits are the rate limits (limits.go); all are off by default.
	Limits Limits
	// ACL, when set, refuses connections from its blocked ranges at
	// accept (StatusForbidden) and exempts its allowed ranges from Limits.
	// It may change while the gateway runs; nil blocks and allows nothing.
	ACL *acl.ACL

	Logger   *slog.Logger
	Registry prometheus.Registerer
}

// fdReserve is kept free of connections for listeners, storage and logs.
const fdReserve = 256

func openFileLimit() int {
	var rl syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &rl); err != nil || rl.Cur > 1<<31 {
		return 1 << 20
	}
	return int(rl.Cur)
}

func (o *Options) setDefaults() error {
	if o.NoPlain && o.TLSAddr == "" {
		return errors.New("gateway: no plain listener and no TLS listener: set TLSAddr")
	}
	if o.Addr == "" {
		o.Addr = ":7070"
	}
	if o.ID == "" {
		h, _ := os.Hostname()
		o.ID = h + "/" + strconv.FormatInt(time.Now().UnixNano(), 36)
	}
	limit := openFileLimit() - fdReserve
	if limit < 1 {
		return fmt.Errorf("gateway: open-file limit %d leaves no room for connections", limit+fdReserve)
	}
	if o.MaxConns == 0 || o.MaxConns > limit {
		o.MaxConns = limit
	}
	if o.MaxBody == 0 {
		o.MaxBody = 64 << 10
	}
	if o.LoginTimeout == 0 {
		o.LoginTimeout = 10 * time.Second
	}
	if o.IdleTimeout == 0 {
		o.IdleTimeout = 90 * time.Second
	}
	if o.KeepaliveInterval == 0 {
		o.KeepaliveInterval = o.IdleTimeout / 3
	}
	if o.RequestTimeout == 0 {
		o.RequestTimeout = 10 * time.Second
	}
	if o.WriteTimeout == 0 {
		o.WriteTimeout = 10 * time.Second
	}
	if o.MaxInFlight == 0 {
		o.MaxInFlight = 64
	}
	if o.MaxQueueBytes == 0 {
		o.MaxQueueBytes = 4 << 20
	}
	if o.CompressMin == 0 {
		o.CompressMin = 512
	}
	if o.PollTimeout == 0 {
		o.PollTimeout = min(30*time.Second, o.IdleTimeout/3)
	}
	limitsErr := o.Limits.setDefaults(o.MaxBody)
	engine, engineErr := resolveEngine(o.Engine)
	o.Engine = engine
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	errs := []error{engineErr, limitsErr}
	if o.MaxConns < 0 {
		errs = append(errs, errors.New("max conns must be >= 0"))
	}
	if o.LoginTimeout < 0 || o.IdleTimeout < 0 || o.RequestTimeout < 0 || o.WriteTimeout < 0 {
		errs = append(errs, errors.New("timeouts must be >= 0"))
	}
	if o.KeepaliveInterval >= o.IdleTimeout {
		errs = append(errs, fmt.Errorf("keepalive interval %s must be shorter than the idle timeout %s", o.KeepaliveInterval, o.IdleTimeout))
	}
	if o.PollTimeout < 0 || o.PollTimeout >= o.IdleTimeout {
		errs = append(errs, fmt.Errorf("poll timeout %s must be positive and shorter than the idle timeout %s", o.PollTimeout, o.IdleTimeout))
	}
	if o.TLSAddr != "" && (o.TLS == nil || (o.TLS.GetCertificate == nil && len(o.TLS.Certificates) == 0 && o.TLS.GetConfigForClient == nil)) {
		errs = append(errs, errors.New("a TLS listener needs a TLS config with a certificate"))
	}
	if o.TLS != nil && o.TLS.MinVersion == 0 {
		o.TLS = o.TLS.Clone()
		o.TLS.MinVersion = tls.VersionTLS13
	}
	if o.MaxInFlight < 0 || o.MaxQueueBytes < 0 {
		errs = append(errs, errors.New("max in flight and max queue bytes must be >= 0"))
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("gateway: %w", err)
	}
	return nil
}
