package main

import (
	"context"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/imd-dev/imd/internal/config"
	"github.com/imd-dev/imd/internal/platform"
)

func runAll(args []string, stdout, stderr io.Writer) error {
	return runRole(platform.RoleAll, "Run every tier of the platform in one process: the gateway (TCP long\n"+
		"connections), logic, the router and the HTTP API (health, metrics). No outside\n"+
		"server is needed. SIGTERM or SIGINT drains gracefully.", args, stdout, stderr)
}

func runLogic(args []string, stdout, stderr io.Writer) error {
	return runRole(platform.RoleLogic, "Run a logic node: login, c2c, c2s, s2c and the HTTP API, with the store and\n"+
		"the bus. Gateways dial its internal RPC address (--rpc-addr). With\n"+
		"--redis-addrs, any number of logic nodes share the router and the membership;\n"+
		"without it, run one logic node and point gateways at it with --logic-addrs.\n"+
		"SIGTERM or SIGINT stops it; gateways move their calls to the other logic nodes.", args, stdout, stderr)
}

func runGateway(args []string, stdout, stderr io.Writer) error {
	return runRole(platform.RoleGateway, "Run a gateway: it holds client TCP connections and forwards their requests\n"+
		"to logic nodes over the internal RPC. It finds logic nodes in the Redis\n"+
		"membership (--redis-addrs) and at --logic-addrs. It needs no store, no bus\n"+
		"and no app config. SIGTERM or SIGINT drains its clients gracefully.", args, stdout, stderr)
}

// reloadOnHUP reads the TLS certificate and key again at each SIGHUP; a
// failed reload keeps the certificate in use. It ends when the process
// does.
func reloadOnHUP(p *platform.Platform, hup <-chan os.Signal, log *slog.Logger) {
	for range hup {
		expires, ok, err := p.ReloadTLS()
		switch {
		case !ok:
			log.Info("SIGHUP: nothing to reload (no TLS listener)")
		case err != nil:
			log.Error("SIGHUP: tls certificate reload failed; keeping the certificate in use", "err", err, "expires", expires)
		default:
			log.Info("SIGHUP: tls certificate reloaded", "expires", expires)
		}
	}
}

func runRole(role, synopsis string, args []string, stdout, stderr io.Writer) error {
	cfg := config.Default()
	if role == platform.RoleGateway {
		cfg.HTTP.Addr = ":8081" // operator endpoints only, beside a logic node's :8080
	}
	fs := newFlagSet(role, synopsis, stdout, stderr)
	path := cfg.Flags(fs)
	cfg.ServerFlags(fs)
	if err := loadConfig(fs, &cfg, path, args); err != nil {
		return err
	}
	log, err := newLogger(cfg.Log, stderr)
	if err != nil {
		return err
	}
	demo := false
	if role != platform.RoleGateway { // a gateway authenticates nothing itself
		if demo, err = cfg.ResolveApps(); err != nil {
			return err
		}
	}
	if demo {
		log.Warn("no apps configured: running the demo appcodes 101, 102 (account 1) and 201 (account 2) with a secret and an API key generated in the data dir (`imd token --uid N`, `imd token --api-key`); c2s msgtype 1 goes to topic freight.gps",
			"secrets", cfg.DataDir+"/secrets.yaml")
	}
	platform.Version = version
	p, err := platform.StartRole(role, cfg, log)
	if err != nil {
		return err
	}
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	defer signal.Stop(sig)
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	go reloadOnHUP(p, hup, log)
	var serveErr error
	select {
	case s := <-sig:
		log.Info("signal received; shutting down", "signal", s.String(), "grace", cfg.ShutdownGrace)
	case serveErr = <-p.Err():
		log.Error("serving failed; shutting down", "err", serveErr)
	}
	ctx, cancel := context.WithTimeout(context.Background(), cfg.ShutdownGrace)
	defer cancel()
	go func() { // a second signal skips the grace period
		select {
		case <-sig:
			log.Warn("second signal: closing now")
			cancel()
		case <-ctx.Done():
		}
	}()
	if err := p.Shutdown(ctx); err != nil {
		log.Warn("shutdown ended before every client left", "err", err)
	}
	log.Info("bye")
	return serveErr
}
