// Package web serves the demo chat page under /demo/ on the gateway's web
// listener (gateway.Options.WebStatic): a page that logs in over the
// WebSocket transport with the TypeScript SDK's browser bundle, lists the
// user's one-to-one conversations and chats.
//
// The files are embedded, so `go build` needs no npm; `make web` rebuilds
// static/imd-sdk.js from sdk-ts. The page is for trying imd out: the
// platform serves it only when the demo is on (config `demo`), because its
// token endpoint lets anyone who reaches the listener log in as any user.
package web

import (
	"embed"
	"encoding/json"
	"fmt"
	"io/fs"
	"log/slog"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/imd-dev/imd/logic"
)

//go:embed static
var files embed.FS

// Prefix is the path under which the page is served.
const Prefix = "/demo/"

// Options configures Handler.
type Options struct {
	// Mint, when set, serves GET /demo/token?appcode=A&uid=U, which answers
	// {"token": "..."}: a login token for that user, so the page can log
	// in without `imd token`. Set it only for the demo apps.
	Mint func(appcode uint32, uid uint64) (string, error)
	// Logger receives refused token requests; nil discards.
	Logger *slog.Logger
}

// config is what the page reads from /demo/config.json before it shows
// the login form.
type config struct {
	Mint bool `json:"mint"` // whether /demo/token answers
}

// Handler serves the page's files under Prefix, /demo/config.json and,
// with Options.Mint, /demo/token. Every other path answers 404.
func Handler(opts Options) http.Handler {
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	static, err := fs.Sub(files, "static")
	if err != nil {
		panic(err) // the embedded tree always has static/
	}
	fileServer := http.StripPrefix(Prefix, http.FileServer(http.FS(static)))
	cfg, _ := json.Marshal(config{Mint: opts.Mint != nil})
	mux := http.NewServeMux()
	mux.HandleFunc("GET "+Prefix+"config.json", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Cache-Control", "no-store")
		_, _ = w.Write(cfg)
	})
	if opts.Mint != nil {
		mux.HandleFunc("GET "+Prefix+"token", func(w http.ResponseWriter, r *http.Request) {
			mint(w, r, opts.Mint, log)
		})
	}
	mux.HandleFunc("GET "+Prefix, func(w http.ResponseWriter, r *http.Request) {
		// The files change with every build of imd and carry no
		// modification time (embed), so browsers revalidate each time.
		w.Header().Set("Cache-Control", "no-cache")
		w.Header().Set("X-Content-Type-Options", "nosniff")
		if strings.HasSuffix(r.URL.Path, "/") && r.URL.Path != Prefix {
			http.NotFound(w, r) // no directory listings
			return
		}
		fileServer.ServeHTTP(w, r)
	})
	return mux
}

// mint answers a token for the appcode and uid of the query.
func mint(w http.ResponseWriter, r *http.Request, f func(uint32, uint64) (string, error), log *slog.Logger) {
	q := r.URL.Query()
	app, err1 := strconv.ParseUint(q.Get("appcode"), 10, 32)
	uid, err2 := strconv.ParseUint(q.Get("uid"), 10, 64)
	if err1 != nil || err2 != nil || uid == 0 {
		http.Error(w, "want appcode and uid (> 0) as decimal numbers", http.StatusBadRequest)
		return
	}
	tok, err := f(uint32(app), uid)
	if err != nil {
		log.Info("demo token refused", "appcode", app, "uid", uid, "err", err)
		http.Error(w, err.Error(), http.StatusNotFound)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	_ = json.NewEncoder(w).Encode(map[string]string{"token": tok})
}

// TokenTTL is how long a token from /demo/token stays valid.
const TokenTTL = 24 * time.Hour

// AppsMint is an Options.Mint that signs with the first secret of the
// appcode among apps, as `imd token` does. An appcode not among them, or
// without a secret, is refused.
func AppsMint(apps []logic.App) func(uint32, uint64) (string, error) {
	secrets := make(map[uint32]string, len(apps))
	for _, a := range apps {
		if len(a.Secrets) > 0 {
			secrets[a.AppCode] = a.Secrets[0]
		}
	}
	return func(appcode uint32, uid uint64) (string, error) {
		s, ok := secrets[appcode]
		if !ok {
			return "", fmt.Errorf("appcode %d is not a demo app", appcode)
		}
		return logic.MintToken(s, appcode, uid, time.Now().Add(TokenTTL)), nil
	}
}
