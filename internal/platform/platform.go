// Package platform assembles every tier in one process: the shape `imd all`
// runs and the end-to-end tests start on random ports.
package platform

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/imd-dev/imd/bus"
	"github.com/imd-dev/imd/das"
	"github.com/imd-dev/imd/das/cassandra"
	"github.com/imd-dev/imd/das/embedded"
	"github.com/imd-dev/imd/gateway"
	"github.com/imd-dev/imd/internal/acl"
	"github.com/imd-dev/imd/internal/config"
	"github.com/imd-dev/imd/internal/rpc"
	"github.com/imd-dev/imd/internal/web"
	"github.com/imd-dev/imd/logic"
	"github.com/imd-dev/imd/router"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/valyala/fasthttp"
)

// Version is this build's version, reported in internal RPC hellos;
// cmd/imd sets it.
var Version = "dev"

// Roles a process can run (`imd all|logic|gateway`).
const (
	RoleAll     = "all"
	RoleLogic   = "logic"
	RoleGateway = "gateway"
)

// Platform is a running node: every tier (`imd all`), a logic node
// (`imd logic`: logic, router client, store, bus, HTTP API and the
// internal RPC that gateways dial) or a gateway (`imd gateway`: client
// connections, forwarded to logic nodes over the internal RPC). Fields of
// tiers the role does not run are nil.
type Platform struct {
	Role     string
	Router   router.Router
	Logic    *logic.Service
	Gateway  *gateway.Server
	Registry *prometheus.Registry
	Store    das.Store   // nil with store engine "none"
	Broker   *bus.Broker // the embedded Kafka broker; nil with external brokers
	producer *bus.KafkaProducer
	kafka    []string
	busOnce  sync.Once
	unlock   func() // releases the data dir; nil when not held

	redis     *router.Redis // membership and router; nil without cluster.redis
	redisOpts router.RedisOptions
	rpcServer *rpc.Server // logic side of the internal RPC
	rpcLn     net.Listener
	rpcAddr   string      // advertised
	rpcClient *rpc.Client // gateway side
	rpcM      *rpc.Metrics
	gateAddr  string               // the gateway's advertised address
	tlsCert   *gateway.Certificate // the TLS listener's; nil without one
	members   *membership
	stopSubs  context.CancelFunc // ends the group change subscription
	idLease   *idLease           // logic's node id lease; nil without Redis
	rooms     *rpc.Rooms         // links to the other DCs; nil with one DC
	peerLn    net.Listener       // where other DCs' logic nodes link in
	acl       *acl.ACL           // the black and white lists (acl.go)
	aclSync   aclSync
	disc      discovery // GET /v1/gateways (discovery.go)

	log       *slog.Logger
	http      *fasthttp.Server
	httpLn    net.Listener
	debug     *http.Server // --debug-addr: the profiler
	debugAddr string
	serveErr  chan error
	once      sync.Once
}

// Start runs every tier in one process (`imd all`); cfg's Apps must be
// resolved. It returns once the gateway and the HTTP API are listening.
func Start(cfg config.Config, log *slog.Logger) (*Platform, error) {
	return StartRole(RoleAll, cfg, log)
}

// StartRole starts the tiers of role. It returns once they listen.
func StartRole(role string, cfg config.Config, log *slog.Logger) (p *Platform, err error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if role != RoleAll && role != RoleLogic && role != RoleGateway {
		return nil, fmt.Errorf("platform: unknown role %q", role)
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	p = &Platform{Role: role, Registry: reg, log: log, serveErr: make(chan error, 4)}
	defer func() {
		if err != nil { // one undo path for a start that failed half way
			p.stop(context.Background())
		}
	}()
	// First, before the store and the broker take locks of their own that
	// would fail with a bare "resource temporarily unavailable".
	if usesDataDir(role, cfg) {
		if p.unlock, err = lockDataDir(cfg.DataDir); err != nil {
			return p, err
		}
	}
	if err := p.openCluster(cfg); err != nil {
		return p, err
	}
	if err := p.openACL(cfg); err != nil {
		return p, err
	}
	if role != RoleGateway {
		if err := p.startLogic(cfg, log, reg); err != nil {
			return p, err
		}
	}
	if role != RoleLogic {
		if err := p.startGateway(cfg, log, reg); err != nil {
			return p, err
		}
	}
	if err := p.startHTTP(cfg); err != nil {
		return p, err
	}
	if p.redis != nil {
		p.members = startMembership(p, cfg.Cluster) // its first round points the gateway at logic nodes
		p.startACLPoll()
	}
	if p.Logic == nil || cfg.Cluster.Split {
		// The gateway serves nothing until a logic node answers: wait for
		// one, but a gateway that finds none yet keeps trying and says so
		// on /readyz instead of refusing to start.
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		err := p.rpcClient.WaitReady(ctx)
		cancel()
		if err != nil {
			log.Warn("gateway started with no logic node reachable yet; /readyz says not ready until one answers", "logic_addrs", cfg.Cluster.LogicAddrs, "redis", cfg.Cluster.Redis.Addrs)
		}
	}
	attrs := []any{"role", role, "http", p.httpLn.Addr().String()}
	if p.Gateway != nil {
		if a := p.Gateway.Addr(); a != nil {
			attrs = append(attrs, "gateway", a.String())
		}
		attrs = append(attrs, "gate_id", p.Gateway.ID())
		if a := p.Gateway.WebAddr(); a != nil {
			attrs = append(attrs, "web", a.String())
		}
		if a := p.Gateway.TLSAddr(); a != nil {
			attrs = append(attrs, "tls", a.String(), "tls_cert_expires", p.tlsCert.NotAfter())
		}
	}
	if p.rpcLn != nil {
		attrs = append(attrs, "rpc", p.rpcLn.Addr().String())
	}
	if p.Logic != nil {
		attrs = append(attrs, "apps", len(cfg.Apps))
	}
	log.Info("node started", attrs...)
	return p, nil
}

// openCluster connects to Redis, when configured, for membership and the
// router; without it the router is in-process.
func (p *Platform) openCluster(cfg config.Config) error {
	r := cfg.Cluster.Redis
	if len(r.Addrs) == 0 {
		if p.Role == RoleGateway && len(cfg.Cluster.LogicAddrs) == 0 {
			return errors.New("gateway: no logic node to dial: set --logic-addrs or --redis-addrs")
		}
		if p.Role != RoleGateway {
			p.Router = router.NewMemory()
		}
		return nil
	}
	p.redisOpts = router.RedisOptions{Addrs: r.Addrs, Password: r.Password, Prefix: r.Prefix, Logger: p.log.With("tier", "router")}
	rr, err := router.NewRedis(p.redisOpts)
	if err != nil {
		return fmt.Errorf("redis %v: %w", r.Addrs, err)
	}
	p.redis = rr
	p.Router = rr
	p.log.Info("redis connected: membership and router", "addrs", r.Addrs)
	return nil
}

func (p *Platform) startLogic(cfg config.Config, log *slog.Logger, reg prometheus.Registerer) error {
	store, err := openStore(cfg, log)
	if err != nil {
		return err
	}
	p.Store = store
	if err := p.openBus(cfg, log, reg); err != nil {
		return err
	}
	// Push statistics live beside the router: in Redis, every logic node
	// of the DC counts acks and answers for any push.
	var ledger router.PushLedger
	if p.redis != nil {
		ledger = p.redis
	}
	nodeID := cfg.NodeID
	switch {
	case p.redis != nil:
		nodeID = -1 // none until the lease below
	case nodeID < 0:
		nodeID = 0 // without Redis there is one logic node
	}
	// Membership changes made here are announced to the other logic nodes
	// of the DC, which drop the group from their members caches.
	var groupChanged func(context.Context, uint64)
	if p.redis != nil {
		rr := p.redis
		groupChanged = func(ctx context.Context, id uint64) {
			if err := rr.PublishGroupChange(ctx, id); err != nil {
				log.Warn("announce a group change", "group", id, "err", err)
			}
		}
	}
	svc, err := logic.New(logic.Options{
		PushLedger: ledger, Groups: cfg.Groups, GroupChanged: groupChanged, Transient: cfg.Transient, Presence: cfg.Presence,
		Apps: cfg.Apps, Router: p.Router, Logger: log.With("tier", "logic"), Registry: reg,
		Store: store, NodeID: nodeID, C2C: cfg.C2C, S2C: cfg.S2C, C2S: cfg.C2S, Bus: p.producer,
		Clock: cfg.Clock, MaxClockSkew: cfg.MaxClockSkew, Limits: cfg.Limits.Logic, ACL: p.acl,
	})
	if err != nil {
		return err
	}
	p.Logic = svc
	if p.redis != nil {
		ctx, cancel := context.WithCancel(context.Background())
		p.stopSubs = cancel
		go p.redis.SubscribeGroupChanges(ctx, svc.InvalidateGroup)
	}
	if p.redis != nil {
		// Lease the node id before anything can ask for a msgid.
		if err := p.leaseNodeID(cfg); err != nil {
			return err
		}
	}
	// Gateways in other processes reach this node over the internal RPC:
	// always for a logic node, for `imd all` when it shares a cluster.
	if p.Role == RoleAll && p.redis == nil && !cfg.Cluster.Split {
		return nil
	}
	addr := cfg.Cluster.RPCAddr
	if addr == "" {
		addr = ":7071"
	}
	srvTLS, _, err := rpcTLS(cfg.Cluster)
	if err != nil {
		return err
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("rpc: listen %s: %w", addr, err)
	}
	p.rpcLn = ln
	p.rpcAddr = advertise(cfg.Cluster.Advertise, ln.Addr())
	node := "logic/" + p.rpcAddr
	m, err := p.rpcMetrics()
	if err != nil {
		return err
	}
	p.rpcServer = rpc.NewServer(svc, rpc.ServerOptions{Node: node, Version: Version, LocalRouter: p.redis == nil, Logger: log.With("tier", "rpc"), Metrics: m, Secret: cfg.Cluster.Secret, TLS: srvTLS})
	if cfg.Cluster.Secret == "" && !isLoopback(ln.Addr()) {
		log.Warn("the internal RPC listens beyond loopback with no --rpc-secret: anyone who reaches it can act as a gateway", "rpc", ln.Addr().String())
	}
	go func() {
		if err := p.rpcServer.Serve(ln); err != nil {
			p.serveErr <- err
		}
	}()
	return p.startRooms(cfg, node, log, reg)
}

func (p *Platform) startGateway(cfg config.Config, log *slog.Logger, reg prometheus.Registerer) error {
	g := cfg.Gateway
	opts := gateway.Options{
		Engine: g.Engine, Addr: g.Addr, ID: g.ID, MaxConns: g.MaxConns, MaxBody: g.MaxBody,
		LoginTimeout: g.LoginTimeout, IdleTimeout: g.IdleTimeout, KeepaliveInterval: g.KeepaliveInterval,
		RequestTimeout: g.RequestTimeout, WriteTimeout: g.WriteTimeout, MaxInFlight: g.MaxInFlight,
		MaxQueueBytes: g.MaxQueueBytes, CompressMin: g.CompressMin, WebAddr: g.WebAddr, WebOrigins: g.WebOrigins, PollTimeout: g.PollTimeout,
		Limits: cfg.Limits.Gateway,
		Logger: log.With("tier", "gateway"), Registry: reg,
	}
	if g.TLSAddr != "" {
		if g.TLSCert == "" || g.TLSKey == "" {
			return errors.New("gateway: --tls-addr needs --tls-cert and --tls-key")
		}
		minVersion, err := gateway.ParseTLSVersion(g.TLSMinVersion)
		if err != nil {
			return fmt.Errorf("gateway: %w", err)
		}
		cert, err := gateway.LoadCertificate(g.TLSCert, g.TLSKey)
		if err != nil {
			return err
		}
		p.tlsCert = cert
		opts.TLSAddr, opts.TLS = g.TLSAddr, gateway.ServerTLSConfig(cert, minVersion)
		// With a TLS address, the plain-TCP port opens only when the
		// operator asks for it (--plain-tcp) and names an address.
		opts.NoPlain = g.Addr == "" || !g.PlainTCP
	}
	if cfg.Demo != nil && *cfg.Demo {
		wo := web.Options{Logger: log.With("tier", "web")}
		if cfg.DemoAppsInUse { // never mint tokens for configured apps
			wo.Mint = web.AppsMint(cfg.Apps)
		}
		opts.WebStatic = web.Handler(wo)
	}
	direct := p.Logic != nil && !cfg.Cluster.Split
	var api logic.API = p.Logic
	if !direct || p.redis != nil {
		// The gateway serves logic nodes of other processes (and, when not
		// direct, calls them) over the internal RPC.
		m, err := p.rpcMetrics()
		if err != nil {
			return err
		}
		_, cliTLS, err := rpcTLS(cfg.Cluster)
		if err != nil {
			return err
		}
		p.rpcClient = rpc.NewClient(rpc.ClientOptions{Version: Version, Logger: log.With("tier", "rpc"), Metrics: m, Registry: reg, Secret: cfg.Cluster.Secret, TLS: cliTLS})
		if !direct {
			api = p.rpcClient
		}
	}
	opts.ACL = p.acl
	gw, err := gateway.New(opts, api)
	if err != nil {
		return err
	}
	if err := gw.Listen(); err != nil {
		return err
	}
	p.Gateway = gw
	p.gateAddr = advertise(cfg.Cluster.Advertise, gw.ClientAddr()) // the TLS port when there is no plain one
	p.disc.addrs = clientAddrs(cfg, gw)
	if direct {
		p.Logic.AttachGate(gw.ID(), gw)
	}
	if c := p.rpcClient; c != nil {
		c.Configure(gw.ID(), p.gateAddr, gw)
		var addrs []string
		addrs = append(addrs, cfg.Cluster.LogicAddrs...)
		if cfg.Cluster.Split {
			addrs = append(addrs, p.rpcAddr)
		}
		c.SetAddrs(addrs)
	}
	go func() {
		if err := gw.Serve(); err != nil && !errors.Is(err, gateway.ErrServerClosed) {
			p.serveErr <- err
		}
	}()
	return nil
}

func (p *Platform) startHTTP(cfg config.Config) error {
	ln, err := net.Listen("tcp", cfg.HTTP.Addr)
	if err != nil {
		return fmt.Errorf("http: listen %s: %w", cfg.HTTP.Addr, err)
	}
	p.httpLn = ln
	ready := func() bool {
		if p.Gateway != nil && (p.Gateway.ClientAddr() == nil || p.Gateway.Draining()) {
			return false
		}
		return p.Logic != nil || p.rpcClient.Links() > 0
	}
	p.http = logic.NewHTTPServer(p.Logic, logic.HTTPOptions{Gatherer: p.Registry, Logger: p.log.With("tier", "http"), Ready: ready,
		AdminKey: cfg.Admin.APIKey, SetACL: p.putACL, Gateways: p.gatewayLister(cfg.Cluster.DC)})
	go func() {
		if err := p.http.Serve(ln); err != nil {
			p.serveErr <- fmt.Errorf("http: %w", err)
		}
	}()
	if a := cfg.HTTP.DebugAddr; a != "" {
		dln, err := net.Listen("tcp", a)
		if err != nil {
			return fmt.Errorf("debug: listen %s: %w", a, err)
		}
		mux := http.NewServeMux()
		mux.HandleFunc("/debug/pprof/", pprof.Index)
		mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
		mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
		mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
		mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
		p.debug = &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
		p.debugAddr = dln.Addr().String()
		go func() { _ = p.debug.Serve(dln) }()
		p.log.Info("profiler serving", "addr", dln.Addr().String())
	}
	return nil
}

// rpcMetrics returns the internal RPC's metrics, registered once for both
// sides of a node that runs them.
func (p *Platform) rpcMetrics() (*rpc.Metrics, error) {
	if p.rpcM == nil {
		m, err := rpc.NewMetrics(p.Registry)
		if err != nil {
			return nil, fmt.Errorf("rpc metrics: %w", err)
		}
		p.rpcM = m
	}
	return p.rpcM, nil
}

func isLoopback(a net.Addr) bool {
	ta, ok := a.(*net.TCPAddr)
	return ok && ta.IP.IsLoopback()
}

// rpcTLS returns the internal RPC's mutual TLS configurations, both nil
// when none of --rpc-tls-cert, --rpc-tls-key and --rpc-tls-ca is set.
func rpcTLS(k config.Cluster) (server, client *tls.Config, err error) {
	if k.RPCTLSCert == "" && k.RPCTLSKey == "" && k.RPCTLSCA == "" {
		return nil, nil, nil
	}
	return rpc.MutualTLS(k.RPCTLSCert, k.RPCTLSKey, k.RPCTLSCA)
}

// advertise is the address others dial for a listener: configured, or
// the listen address with this host's name when it binds every interface.
func advertise(configured string, a net.Addr) string {
	if configured != "" {
		return configured
	}
	host, port, err := net.SplitHostPort(a.String())
	if err != nil {
		return a.String()
	}
	if ip := net.ParseIP(host); ip == nil || ip.IsUnspecified() {
		if h, err := os.Hostname(); err == nil {
			host = h
		}
	}
	return net.JoinHostPort(host, port)
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
			Retention:    das.Retention{MaxAge: r.MaxAge, MaxCount: r.MaxCount, IdempotencyTTL: r.IdempotencyTTL},
			Logger:       log.With("tier", "das"),
			SyncInterval: cfg.Store.SyncInterval,
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
	if p.unlock != nil {
		p.unlock()
		p.unlock = nil
	}
	return err
}

// GatewayAddr is the address clients dial: the gateway's plain-TCP
// listen address, or its TLS one when it has no plain listener.
func (p *Platform) GatewayAddr() string { return p.Gateway.ClientAddr().String() }

// TLSAddr returns the gateway's TLS listener address, or "" when it has
// none.
func (p *Platform) TLSAddr() string {
	if p.Gateway == nil || p.Gateway.TLSAddr() == nil {
		return ""
	}
	return p.Gateway.TLSAddr().String()
}

// ReloadTLS reads the TLS listener's certificate and key files again: the
// handshakes that follow use them, connections already up stay. On an
// error the certificate in use stays. It returns the new certificate's
// expiry; ok is false when there is no TLS listener.
func (p *Platform) ReloadTLS() (expires time.Time, ok bool, err error) {
	if p.tlsCert == nil {
		return time.Time{}, false, nil
	}
	if err := p.tlsCert.Reload(); err != nil {
		return p.tlsCert.NotAfter(), true, err
	}
	return p.tlsCert.NotAfter(), true, nil
}

// HTTPAddr is the HTTP API's listen address.
func (p *Platform) HTTPAddr() string { return p.httpLn.Addr().String() }

// DebugAddr is where the profiler listens, or "".
func (p *Platform) DebugAddr() string { return p.debugAddr }

// RPCAddr is the address gateways dial to reach this logic node, or "".
func (p *Platform) RPCAddr() string { return p.rpcAddr }

// Err delivers a fatal serving error.
func (p *Platform) Err() <-chan error { return p.serveErr }

// Shutdown drains the gateway (clients are told to go away and their
// in-flight requests finish), leaves the membership, then stops the HTTP
// API, the internal RPC, the bus and the store. Idempotent.
func (p *Platform) Shutdown(ctx context.Context) error {
	var err error
	p.once.Do(func() { err = p.stop(ctx) })
	return err
}

// stop undoes whatever StartRole started, in order.
func (p *Platform) stop(ctx context.Context) error {
	var err error
	if p.Gateway != nil && p.Gateway.ClientAddr() != nil {
		p.leaveDiscovery() // before the GoAways: clients that come back are sent elsewhere
		err = p.Gateway.Shutdown(ctx)
		if p.Logic != nil {
			p.Logic.DetachGate(context.Background(), p.Gateway.ID())
		}
	}
	if p.members != nil {
		p.members.stop() // leaves: gateways stop dialling this node, logic purges this gateway
	}
	p.releaseNodeID()
	if p.http != nil {
		err = errors.Join(err, p.http.ShutdownWithContext(ctx))
	}
	if p.debug != nil {
		_ = p.debug.Close()
	}
	if p.rpcClient != nil {
		p.rpcClient.Close()
	}
	if p.rooms != nil {
		p.rooms.Close(ctx) // after the gateway's purge above reached the other DCs
	}
	if p.rpcServer != nil {
		p.rpcServer.Close(ctx)
	} else if p.rpcLn != nil {
		_ = p.rpcLn.Close()
	}
	// Every request has finished with the gateway: the bus and the store
	// can close.
	err = errors.Join(err, p.closeBackends(ctx))
	if p.stopSubs != nil {
		p.stopSubs()
	}
	p.stopACLPoll()
	if p.redis != nil {
		p.redis.Close()
	}
	return err
}
