package main

import (
	"context"
	"io"
	"os"
	"os/signal"
	"syscall"

	"github.com/imd-dev/imd/internal/config"
	"github.com/imd-dev/imd/internal/platform"
)

func runAll(args []string, stdout, stderr io.Writer) error {
	cfg := config.Default()
	fs := newFlagSet("all", "Run every tier of the platform in one process: the gateway (TCP long\n"+
		"connections), logic, the router and the HTTP API (health, metrics). No outside\n"+
		"server is needed. SIGTERM or SIGINT drains gracefully.", stdout, stderr)
	path := cfg.Flags(fs)
	cfg.ServerFlags(fs)
	if err := loadConfig(fs, &cfg, path, args); err != nil {
		return err
	}
	log, err := newLogger(cfg.Log, stderr)
	if err != nil {
		return err
	}
	demo, err := cfg.ResolveApps()
	if err != nil {
		return err
	}
	if demo {
		log.Warn("no apps configured: running the demo appcodes 101, 102 (account 1) and 201 (account 2) with a secret and an API key generated in the data dir (`imd token --uid N`, `imd token --api-key`); c2s msgtype 1 goes to topic freight.gps",
			"secrets", cfg.DataDir+"/secrets.yaml")
	}
	p, err := platform.Start(cfg, log)
	if err != nil {
		return err
	}
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	defer signal.Stop(sig)
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
