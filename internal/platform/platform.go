// Package platform assembles every tier in one process: the shape `imd all`
// runs and the end-to-end tests start on random ports.
package platform

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"path/filepath"
	"sync"
	"time"

	"github.com/imd-dev/imd/bus"
	"github.com/imd-dev/imd/das"
	"github.com/imd-dev/imd/das/cassandra"
	"github.com/imd-dev/imd/das/embedded"
	"github.com/imd-dev/imd/gateway"
	"github.com/imd-dev/imd/internal/config"
	"github.com/imd-dev/imd/logic"
	"github.com/imd-dev/imd/router"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/valyala/fasthttp"
)

// Platform is a running one-process deployment.
type Platform struct {
	Router   router.Router
	Logic    *logic.Service
	Gateway  *gateway.Server
	Registry *prometheus.Registry
	Store    das.Store   // nil with store engine "none"
	Broker   *bus.Broker // the embedded Kafka broker; nil with external brokers
	producer *bus.KafkaProducer
	kafka    []string
	busOnce  sync.Once

	log      *slog.Logger
	http     *fasthttp.Server
	httpLn   net.Listener
	serveErr chan error
	once     sync.Once
}

// Start builds and starts every tier from cfg (whose Apps must be
// resolved). It returns once the gateway and the HTTP API are listening.
func Start(cfg config.Config, log *slog.Logger) (*Platform, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	p := &Platform{Router: router.NewMemory(), Registry: reg, log: log, serveErr: make(chan error, 2)}
	store, err := openStore(cfg, log)
	if err != nil {
		return nil, err
	}
	p.Store = store
	if err := p.openBus(cfg, log, reg); err != nil {
		p.closeBackends(context.Background())
		return nil, err
	}
	svc, err := logic.New(logic.Options{
		Apps: cfg.Apps, Router: p.Router, Logger: log.With("tier", "logic"), Registry: reg,
		Store: store, NodeID: cfg.NodeID, C2C: cfg.C2C, S2C: cfg.S2C, C2S: cfg.C2S, Bus: p.producer,
	})
	if err != nil {
		p.closeBackends(context.Background())
		return nil, err
	}
	p.Logic = svc
	g := cfg.Gateway
	gw, err := gateway.New(gateway.Options{
		Engine: g.Engine, Addr: g.Addr, ID: g.ID, MaxConns: g.MaxConns, MaxBody: g.MaxBody,
		LoginTimeout: g.LoginTimeout, IdleTimeout: g.IdleTimeout, KeepaliveInterval: g.KeepaliveInterval,
		RequestTimeout: g.RequestTimeout, WriteTimeout: g.WriteTimeout, MaxInFlight: g.MaxInFlight,
		MaxQueueBytes: g.MaxQueueBytes, Logger: log.With("tier", "gateway"), Registry: reg,
	}, svc)
	if err != nil {
		p.closeBackends(context.Background())
		return nil, err
	}
	p.Gateway = gw
	svc.AttachGate(gw.ID(), gw)
	if err := gw.Listen(); err != nil {
		p.closeBackends(context.Background())
		return nil, err
	}
	ln, err := net.Listen("tcp", cfg.HTTP.Addr)
	if err != nil {
		_ = gw.Shutdown(context.Background())
		p.closeBackends(context.Background())
		return nil, fmt.Errorf("http: listen %s: %w", cfg.HTTP.Addr, err)
	}
	p.httpLn = ln
	p.http = logic.NewHTTPServer(svc, logic.HTTPOptions{Gatherer: reg, Logger: log.With("tier", "http"), Ready: func() bool { return gw.Addr() != nil && !gw.Draining() }})
	go func() {
		if err := gw.Serve(); err != nil && !errors.Is(err, gateway.ErrServerClosed) {
			p.serveErr <- err
		}
	}()
	go func() {
		if err := p.http.Serve(ln); err != nil {
			p.serveErr <- fmt.Errorf("http: %w", err)
		}
	}()
	log.Info("platform started", "gateway", gw.Addr().String(), "http", ln.Addr().String(), "apps", len(cfg.Apps))
	return p, nil
}

func openStore(cfg config.Config, log *slog.Logger) (das.Store, error) {
	r := cfg.Store.Retention
	switch cfg.Store.Engine {
	case "none":
		log.Warn("no message store: c2c, offline and history requests get status unavailable")
		return nil, nil
	case "embedded", "":
		if cfg.DataDir == "" {
			return nil, errors.New("store: the embedded store needs a data dir")
		}
		dir := filepath.Join(cfg.DataDir, "store")
		st, err := embedded.Open(dir, embedded.Options{
			Retention: das.Retention{MaxAge: r.MaxAge, MaxCount: r.MaxCount, IdempotencyTTL: r.IdempotencyTTL},
			Logger:    log.With("tier", "das"),
		})
		if err != nil {
			return nil, fmt.Errorf("store: open %s: %w", dir, err)
		}
		log.Info("embedded store open", "dir", dir)
		return st, nil
	case "cassandra":
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		cc := CassandraConfig(cfg, log)
		st, err := cassandra.Open(ctx, cc)
		if err != nil {
			return nil, fmt.Errorf("store: cassandra %v keyspace %q: %w (has `imd migrate` run?)", cc.Hosts, cc.Keyspace, err)
		}
		log.Info("cassandra store open", "hosts", cc.Hosts, "keyspace", cc.Keyspace)
		return st, nil
	}
	return nil, fmt.Errorf("store: unknown engine %q (want embedded, cassandra or none)", cfg.Store.Engine)
}

// CassandraConfig is the das/cassandra configuration of cfg.
func CassandraConfig(cfg config.Config, log *slog.Logger) cassandra.Config {
	k := cfg.Store.Cassandra
	r := cfg.Store.Retention
	return cassandra.Config{
		Hosts: k.Hosts, Keyspace: k.Keyspace, LocalDC: k.LocalDC,
		Consistency: k.Consistency, SerialConsistency: k.SerialConsistency,
		Timeout: k.Timeout, ConnectTimeout: k.ConnectTimeout, NumConns: k.NumConns,
		Username: k.Username, Password: k.Password,
		InboxLag: k.InboxLag, MaxBatchBytes: k.MaxBatchBytes,
		Retention: das.Retention{MaxAge: r.MaxAge, MaxCount: r.MaxCount, IdempotencyTTL: r.IdempotencyTTL},
		Logger:    log.With("tier", "das"),
	}
}

// openBus starts the embedded Kafka broker unless brokers are configured,
// and the c2s producer.
func (p *Platform) openBus(cfg config.Config, log *slog.Logger, reg prometheus.Registerer) error {
	b := cfg.Bus
	brokers := b.Brokers
	if len(brokers) == 0 {
		dir := ""
		if cfg.DataDir != "" {
			dir = filepath.Join(cfg.DataDir, "kafka")
		}
		br, err := bus.StartBroker(bus.BrokerConfig{
			Addr: b.Embedded.Addr, DataDir: dir, Partitions: b.Embedded.Partitions,
			Topics: cfg.C2S.Topics(), Logger: log.With("tier", "bus"),
		})
		if err != nil {
			return fmt.Errorf("embedded kafka broker: %w", err)
		}
		p.Broker = br
		brokers = br.Addrs()
		log.Info("embedded kafka broker started", "addr", brokers, "dir", dir)
	}
	pr, err := bus.NewKafkaProducer(bus.ProducerConfig{
		Brokers: brokers, Linger: b.Linger, DeliveryTimeout: b.DeliveryTimeout,
		AutoCreateTopics: b.AutoCreateTopics || p.Broker != nil,
		Logger:           log.With("tier", "bus"), Registry: reg,
	})
	if err != nil { // Start's undo stops the broker
		return fmt.Errorf("kafka producer: %w", err)
	}
	p.producer, p.kafka = pr, brokers
	return nil
}

// KafkaAddrs are the brokers c2s goes to.
func (p *Platform) KafkaAddrs() []string { return p.kafka }

// closeBus flushes the producer, then stops the embedded broker. Once.
func (p *Platform) closeBus(ctx context.Context) error {
	var err error
	p.busOnce.Do(func() {
		if p.producer != nil {
			err = p.producer.Close(ctx)
		}
		if p.Broker != nil {
			p.Broker.Close()
		}
	})
	return err
}

// closeBackends flushes and stops the bus, then closes the store: the
// last step of Shutdown, and the undo of a Start that failed half way.
func (p *Platform) closeBackends(ctx context.Context) error {
	err := p.closeBus(ctx)
	if p.Store != nil {
		err = errors.Join(err, p.Store.Close())
	}
	return err
}

// GatewayAddr is the gateway's listen address.
func (p *Platform) GatewayAddr() string { return p.Gateway.Addr().String() }

// HTTPAddr is the HTTP API's listen address.
func (p *Platform) HTTPAddr() string { return p.httpLn.Addr().String() }

// Err delivers a fatal serving error.
func (p *Platform) Err() <-chan error { return p.serveErr }

// Shutdown drains the gateway (clients are told to go away and their
// in-flight requests finish), then stops the HTTP API. Idempotent.
func (p *Platform) Shutdown(ctx context.Context) error {
	var err error
	p.once.Do(func() {
		err = p.Gateway.Shutdown(ctx)
		p.Logic.DetachGate(context.Background(), p.Gateway.ID())
		if herr := p.http.ShutdownWithContext(ctx); herr != nil {
			err = errors.Join(err, herr)
		}
		// Every request has finished with the gateway: the bus and the
		// store can close.
		err = errors.Join(err, p.closeBackends(ctx))
	})
	return err
}
