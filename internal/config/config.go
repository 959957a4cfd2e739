// Package config loads imd's configuration from, in rising precedence,
// built-in defaults, a YAML file, IMD_* environment variables and
// command-line flags.
package config

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/imd-dev/imd/gateway"
	"github.com/imd-dev/imd/internal/acl"
	"github.com/imd-dev/imd/logic"
	"gopkg.in/yaml.v3"
)

// Config is everything imd reads at start.
type Config struct {
	// DataDir holds embedded storage and generated secrets.
	DataDir string  `yaml:"data_dir"`
	Log     Log     `yaml:"log"`
	Gateway Gateway `yaml:"gateway"`
	HTTP    HTTP    `yaml:"http"`
	// ShutdownGrace bounds a graceful shutdown on SIGTERM.
	ShutdownGrace time.Duration `yaml:"shutdown_grace"`
	// NodeID is this logic node's snowflake node id (0-1023), unique in
	// the cluster. -1 (the default): leased from Redis (cluster.redis), or
	// 0 without Redis, where there is one logic node. A static id that a
	// live node holds in Redis is refused at start.
	NodeID int64 `yaml:"node_id"`
	// MaxClockSkew is how far ahead of a logic node's clock a sender's
	// order floor (the highest msgid its terminal was answered) is
	// followed; beyond it the floor is clamped, logged and counted.
	// Default 1m.
	MaxClockSkew time.Duration `yaml:"max_clock_skew"`
	// Clock, for tests, is the wall clock logic's msgids carry; nil is
	// time.Now.
	Clock func() time.Time `yaml:"-"`

	Store  Store        `yaml:"store"`
	C2C    logic.C2C    `yaml:"c2c"`
	Groups logic.Groups `yaml:"groups"`
	// Transient bounds transient messages per user.
	Transient logic.Transient `yaml:"transient"`
	S2C       logic.S2C       `yaml:"s2c"`
	C2S       logic.C2S       `yaml:"c2s"`
	Bus       Bus             `yaml:"bus"`

	// Presence bounds presence subscriptions.
	Presence logic.Presence `yaml:"presence"`
	// Limits are the rate limits of the gateway and of logic, all off by
	// default (docs/operations.md, "Limits that protect the gateway").
	Limits Limits `yaml:"limits"`
	// ACL are the black and white lists of address ranges and uids, empty
	// by default (docs/operations.md, "Black and white lists"). The admin
	// API changes them at run time.
	ACL acl.Lists `yaml:"acl"`
	// Admin configures the admin API (GET/PUT /v1/admin/acl).
	Admin Admin `yaml:"admin"`
	// Cluster configures the many-process shape (imd logic, imd gateway).
	Cluster Cluster `yaml:"cluster"`
	// Apps maps each appcode to its account system and secrets. When it is
	// empty, imd runs the demo apps (DemoApps) with secrets generated once
	// into <data_dir>/secrets.yaml.
	Apps []logic.App `yaml:"apps"`
	// Demo serves the demo chat page on the gateway's web listener
	// (/demo/). Unset: on when imd runs the demo apps, off otherwise; a
	// production config leaves it off.
	Demo *bool `yaml:"demo"`
	// DemoAppsInUse is set by ResolveApps when the demo apps run: only
	// then does the demo page mint login tokens (/demo/token).
	DemoAppsInUse bool `yaml:"-"`
}

// Admin configures the admin API of logic nodes' HTTP API.
type Admin struct {
	// APIKey authenticates the admin API (`Authorization: Bearer
	// <api_key>`); it is not an app's API key. Empty: the admin API is
	// off. Better from IMD_ADMIN_API_KEY.
	APIKey string `yaml:"api_key"`
}

// Log configures logging.
type Log struct {
	Level  string `yaml:"level"`  // debug, info, warn, error
	Format string `yaml:"format"` // text or json
}

// Gateway mirrors gateway.Options.
type Gateway struct {
	// Engine is the connection engine: epoll (event loops, ~1.2 KB per
	// idle connection; the default on Linux) or goroutine (a reader
	// goroutine per connection, ~7 KB).
	Engine            string        `yaml:"engine"`
	Addr              string        `yaml:"addr"`
	ID                string        `yaml:"id"`
	MaxConns          int           `yaml:"max_conns"`
	MaxBody           uint32        `yaml:"max_body"`
	LoginTimeout      time.Duration `yaml:"login_timeout"`
	IdleTimeout       time.Duration `yaml:"idle_timeout"`
	KeepaliveInterval time.Duration `yaml:"keepalive_interval"`
	RequestTimeout    time.Duration `yaml:"request_timeout"`
	WriteTimeout      time.Duration `yaml:"write_timeout"`
	MaxInFlight       int           `yaml:"max_in_flight"`
	MaxQueueBytes     int           `yaml:"max_queue_bytes"`
	// CompressMin is the smallest body compressed for clients that
	// negotiated compression at login. Default 512; negative: never.
	CompressMin int `yaml:"compress_min"`
	// WebAddr is the web listener (WebSocket at /ws, HTTP long-poll under
	// /lp/); empty turns it off. Default :7072.
	WebAddr string `yaml:"web_addr"`
	// WebOrigins are the browser origins allowed on the web listener ("*":
	// any). Empty allows pages of the gateway's own host only; requests
	// without an Origin (non-browser clients) are always allowed.
	WebOrigins []string `yaml:"web_origins"`
	// PollTimeout is how long an HTTP long-poll waits for a frame before
	// it answers empty. Default 30s (a third of idle_timeout when that is
	// shorter).
	PollTimeout time.Duration `yaml:"poll_timeout"`
	// TLSAddr, when set, is a client listener that speaks TLS, then the
	// same frames as addr (docs/operations.md, "TLS"). It needs TLSCert
	// and TLSKey, PEM files read at start and again on SIGHUP.
	TLSAddr string `yaml:"tls_addr"`
	TLSCert string `yaml:"tls_cert"`
	TLSKey  string `yaml:"tls_key"`
	// PlainTCP opens the plain-TCP client port (addr) beside the TLS one:
	// with TLSAddr set, clients get plain TCP only when the operator asks
	// for it. Without TLSAddr the plain port is the client port and this
	// is ignored.
	PlainTCP bool `yaml:"plain_tcp"`
	// PublicHost is the host name or IP clients reach this gateway at, as
	// logic nodes list it in GET /v1/gateways (with the port of each
	// client listener). Default: the host of cluster.advertise, else of
	// the listen address (this host's name when it binds every
	// interface).
	PublicHost string `yaml:"public_host"`
	// TLSMinVersion is the oldest TLS version accepted: 1.3 (the
	// default) or 1.2.
	TLSMinVersion string `yaml:"tls_min_version"`
}

// Limits gathers the gateway's and logic's rate limits under one
// `limits:` section; each rate is {rate: per second, burst: bucket size}.
type Limits struct {
	Gateway gateway.Limits `yaml:",inline"`
	Logic   logic.Limits   `yaml:",inline"`
}

// LimitFlags binds the rate limits' flags. A rate is RATE or RATE:BURST
// (per second, bucket size); 0 is off.
func (c *Config) LimitFlags(fs *flag.FlagSet) {
	g, l := &c.Limits.Gateway, &c.Limits.Logic
	fs.Var(&g.ConnsPerIP, "limit-conns-per-ip", "new connections a second per source address, RATE[:BURST] (default 0: off)")
	fs.Var(&g.Conns, "limit-conns", "new connections a second to the gateway in all, RATE[:BURST] (default 0: off)")
	fs.Var(&g.LoginsPerIP, "limit-logins-per-ip", "login attempts a second per source address, RATE[:BURST] (default 0: off)")
	fs.Var(&g.LoginsPerUID, "limit-logins-per-uid", "login attempts a second per uid, RATE[:BURST] (default 0: off)")
	fs.IntVar(&g.LoginFailures, "limit-login-failures", g.LoginFailures, "failed logins per source address within limit-login-failure-window before it is shut out (default 0: off)")
	fs.DurationVar(&g.LoginFailureWindow, "limit-login-failure-window", g.LoginFailureWindow, "the window limit-login-failures counts in (default 1m)")
	fs.DurationVar(&g.LoginLockout, "limit-login-lockout", g.LoginLockout, "how long an address over limit-login-failures may not log in (default 5m)")
	fs.Var(&g.Frames, "limit-frames", "frames a second per logged-in connection, RATE[:BURST] (default 0: off)")
	fs.Var(&g.Bytes, "limit-bytes", "bytes a second per logged-in connection, RATE[:BURST] (default 0: off)")
	fs.Var(&l.C2CSendsPerUser, "limit-c2c-sends-per-user", "one-to-one and group messages a second per user on one logic node, RATE[:BURST] (default 0: off)")
	fs.Var(&l.PushesPerApp, "limit-pushes-per-app", "s2c pushes a second per app on one logic node, RATE[:BURST] (default 0: off)")
	fs.Var(&l.DiscoveryPerIP, "limit-discovery-per-ip", "gateway lists (GET /v1/gateways) a second per source address on one logic node, RATE[:BURST] (default 0: off)")
}

// Store configures message storage.
type Store struct {
	// Engine is "embedded" (a local key-value store under data_dir/store),
	// "cassandra" (a cluster; run `imd migrate` first) or "none" (no
	// c2c). Default embedded.
	Engine    string    `yaml:"engine"`
	Retention Retention `yaml:"retention"`
	Cassandra Cassandra `yaml:"cassandra"`
	// SyncInterval (embedded engine) is the least time between two syncs
	// of the store's log: a commit that comes sooner waits for the next
	// sync with the commits that come meanwhile. Default 1ms; negative:
	// every commit syncs as soon as it can.
	SyncInterval time.Duration `yaml:"sync_interval"`
}

// Bus configures the c2s message bus (Kafka).
type Bus struct {
	// Brokers of a Kafka cluster. Empty: imd runs its embedded
	// Kafka-protocol broker (Embedded), persisted under data_dir/kafka.
	Brokers  []string `yaml:"brokers"`
	Embedded struct {
		Addr       string `yaml:"addr"`       // default 127.0.0.1:9092
		Partitions int    `yaml:"partitions"` // per topic, default 1
	} `yaml:"embedded"`
	Linger          time.Duration `yaml:"linger"`           // default 5ms
	DeliveryTimeout time.Duration `yaml:"delivery_timeout"` // default 10s
	// AutoCreateTopics lets the producer create unknown topics (the
	// embedded broker always does).
	AutoCreateTopics bool `yaml:"auto_create_topics"`
}

// Cassandra configures the Cassandra store (das/cassandra.Config).
type Cassandra struct {
	Hosts             []string      `yaml:"hosts"`    // contact points, host or host:port
	Keyspace          string        `yaml:"keyspace"` // default imd
	LocalDC           string        `yaml:"local_dc"` // default: the first contact point's
	Consistency       string        `yaml:"consistency"`
	SerialConsistency string        `yaml:"serial_consistency"`
	Timeout           time.Duration `yaml:"timeout"`
	ConnectTimeout    time.Duration `yaml:"connect_timeout"`
	NumConns          int           `yaml:"num_conns"`
	Username          string        `yaml:"username"`
	Password          string        `yaml:"password"` // better from IMD_CASSANDRA_PASSWORD
	InboxLag          time.Duration `yaml:"inbox_lag"`
	MaxBatchBytes     int           `yaml:"max_batch_bytes"`
	// Replication is used by `imd migrate` to create the keyspace:
	// "dc1:3,dc2:3" (NetworkTopologyStrategy).
	Replication string `yaml:"replication"`
}

// Retention bounds roaming history and idempotency keys.
type Retention struct {
	MaxAge         time.Duration `yaml:"max_age"`         // 0: keep forever
	MaxCount       int           `yaml:"max_count"`       // per user; 0: no bound
	IdempotencyTTL time.Duration `yaml:"idempotency_ttl"` // default 24h
}

// Cluster configures how the tiers of a many-process deployment find each
// other (docs/operations.md, "Many processes").
type Cluster struct {
	// Redis holds node membership and the router's session table, shared
	// by every logic node. Empty: the router is in the logic process, so
	// run one logic node, and gateways find it through LogicAddrs.
	Redis Redis `yaml:"redis"`
	// RPCAddr is where a logic node accepts gateway links. Default :7071.
	RPCAddr string `yaml:"rpc_addr"`
	// Advertise is the address of this node that others dial (a logic
	// node's RPC address, a gateway's client address), published in the
	// membership. Default: the listen address, with this host's name when
	// it binds every interface.
	Advertise string `yaml:"advertise"`
	// LogicAddrs are logic nodes a gateway dials besides those the
	// membership lists.
	LogicAddrs []string `yaml:"logic_addrs"`
	// DC names this node's data center ("room"); gateways dial the logic
	// nodes of their own DC only.
	DC string `yaml:"dc"`
	// Heartbeat is how often a node renews its membership; a node silent
	// for NodeTTL is dead and a dead gateway's sessions are purged.
	// Defaults 2s and 10s.
	Heartbeat time.Duration `yaml:"heartbeat"`
	NodeTTL   time.Duration `yaml:"node_ttl"`
	// Secret, when set on logic nodes, is required in every gateway's
	// hello (HMAC-signed, never sent): set the same on every node.
	Secret string `yaml:"secret"`
	// RPCTLSCert, RPCTLSKey and RPCTLSCA, when set (all three, on every
	// node), put the internal RPC under mutual TLS: a logic node serves
	// RPCTLSCert and accepts only gateways whose client certificate
	// RPCTLSCA signed; a gateway presents RPCTLSCert and accepts only a
	// logic node whose certificate RPCTLSCA signed, for the address it
	// dials. The certificate needs the server and the client extended key
	// usage when a node is both. The HMAC hello (Secret) is unchanged.
	RPCTLSCert string `yaml:"rpc_tls_cert"`
	RPCTLSKey  string `yaml:"rpc_tls_key"`
	RPCTLSCA   string `yaml:"rpc_tls_ca"`
	// Split runs `imd all` as a logic node and a gateway linked by the
	// internal RPC over loopback, in one process: tests use it to run the
	// end-to-end suite over the many-process wiring.
	Split bool `yaml:"split"`

	// Rooms lists every data center of the deployment, the same list on
	// every node (docs/two-dc.md). Empty: one DC. With two or more, DC
	// must name one of them, and logic nodes link to the other DCs'
	// logic nodes through PeerAddr.
	Rooms []Room `yaml:"rooms"`
	// PeerAddr is where a logic node accepts links from the logic nodes
	// of the other DCs (with Rooms). Default :7074.
	PeerAddr string `yaml:"peer_addr"`
	// PeerQueueBytes bounds, per other DC, what a logic node keeps for
	// that DC while its link is down (notifies, kicks, session changes),
	// sent when the link is back. Default 64 MiB.
	PeerQueueBytes int `yaml:"peer_queue_bytes"`
}

// Room is one data center of a many-DC deployment.
type Room struct {
	// DC names it, as Cluster.DC does on its nodes.
	DC string `yaml:"dc"`
	// Peers are the peer-link addresses (PeerAddr) of its logic nodes,
	// as the other DCs reach them. A logic node of another DC links to
	// one of them and moves to the next when it fails.
	Peers []string `yaml:"peers"`
	// NodeIDs is the range of snowflake node ids its logic nodes lease,
	// "lo-hi" within 0-1023; ranges of DCs must not overlap, so msgids
	// minted in different DCs never collide, and a msgid tells the DC
	// that stored it.
	NodeIDs string `yaml:"node_ids"`
}

// Redis reaches the Redis that holds membership and the router.
type Redis struct {
	Addrs    []string `yaml:"addrs"`
	Password string   `yaml:"password"` // better from IMD_REDIS_PASSWORD
	Prefix   string   `yaml:"prefix"`   // key prefix; default imd:
}

// HTTP configures the HTTP API (health, metrics, s2c).
type HTTP struct {
	Addr string `yaml:"addr"`
	// DebugAddr, when set, serves Go's profiler (/debug/pprof/) on a
	// listener of its own. Bind it to loopback or a private network: it
	// is not authenticated.
	DebugAddr string `yaml:"debug_addr"`
}

// Default returns the built-in configuration.
func Default() Config {
	return Config{
		DataDir:       "./data",
		Log:           Log{Level: "info", Format: "text"},
		Gateway:       Gateway{Addr: ":7070", WebAddr: ":7072", LoginTimeout: 10 * time.Second, IdleTimeout: 90 * time.Second, MaxBody: 64 << 10},
		HTTP:          HTTP{Addr: ":8080"},
		ShutdownGrace: 15 * time.Second,
		NodeID:        -1,
		MaxClockSkew:  time.Minute,
		Store:         Store{Engine: "embedded", Retention: Retention{MaxAge: 30 * 24 * time.Hour, IdempotencyTTL: 24 * time.Hour}, SyncInterval: time.Millisecond},
	}
}

// DemoApps are the appcodes a configuration without apps runs with:
// freight on android and pc (one account system) and support on the web
// (another).
func DemoApps() []logic.App {
	return []logic.App{
		{AppCode: 101, Name: "freight-android", Account: 1},
		{AppCode: 102, Name: "freight-pc", Account: 1},
		{AppCode: 201, Name: "support-web", Account: 2},
	}
}

// DemoRoutes send the demo apps' c2s GPS reports (msgtype 1) to the topic
// freight.gps.
func DemoRoutes() []logic.Route {
	return []logic.Route{
		{AppCode: 101, MsgType: 1, Topic: "freight.gps"},
		{AppCode: 102, MsgType: 1, Topic: "freight.gps"},
	}
}

// Flags binds the common flags to c on fs. Call Load after fs.Parse.
func (c *Config) Flags(fs *flag.FlagSet) *string {
	path := fs.String("config", "", "YAML config file (env IMD_CONFIG)")
	fs.StringVar(&c.DataDir, "data-dir", c.DataDir, "directory for embedded storage and generated secrets")
	fs.StringVar(&c.Log.Level, "log-level", c.Log.Level, "log level: debug, info, warn or error")
	fs.StringVar(&c.Log.Format, "log-format", c.Log.Format, "log format: text or json")
	return path
}

// ServerFlags binds the flags of the serving subcommands.
func (c *Config) ServerFlags(fs *flag.FlagSet) {
	g := &c.Gateway
	fs.StringVar(&g.Addr, "gateway-addr", g.Addr, "gateway plain-TCP listen address (empty with --tls-addr: TLS only, no plain port)")
	fs.StringVar(&g.WebAddr, "web-addr", g.WebAddr, "gateway web listener (WebSocket /ws, HTTP long-poll /lp/); empty turns it off")
	listVar(fs, &g.WebOrigins, "web-origins", "browser origins allowed on the web listener, comma-separated (* for any; default: the gateway's own host only)")
	fs.StringVar(&g.TLSAddr, "tls-addr", g.TLSAddr, "gateway TLS listen address for clients (default: none)")
	fs.BoolVar(&g.PlainTCP, "plain-tcp", g.PlainTCP, "with --tls-addr, also open the plain-TCP client port (--gateway-addr); off by default")
	fs.StringVar(&g.PublicHost, "public-host", g.PublicHost, "host name or IP clients dial this gateway at, as GET /v1/gateways lists it (default: the advertised host)")
	fs.StringVar(&g.TLSCert, "tls-cert", g.TLSCert, "PEM certificate chain of the TLS listener, read again on SIGHUP")
	fs.StringVar(&g.TLSKey, "tls-key", g.TLSKey, "PEM private key of the TLS listener, read again on SIGHUP")
	fs.StringVar(&g.TLSMinVersion, "tls-min-version", g.TLSMinVersion, "oldest TLS version accepted: 1.3 or 1.2 (default 1.3)")
	fs.StringVar(&g.Engine, "gateway-engine", g.Engine, "gateway connection engine: epoll or goroutine (default epoll on Linux)")
	fs.StringVar(&g.ID, "gateway-id", g.ID, "gateway id, unique among live gateways (default hostname/boot nonce)")
	fs.IntVar(&g.MaxConns, "max-conns", g.MaxConns, "most connections held at once (default: open-file limit less a reserve)")
	fs.Func("max-body", "largest frame body in bytes (default 65536)", func(s string) error {
		var v uint32
		_, err := fmt.Sscan(s, &v)
		g.MaxBody = v
		return err
	})
	fs.DurationVar(&g.LoginTimeout, "login-timeout", g.LoginTimeout, "close connections that have not logged in by then")
	fs.DurationVar(&g.IdleTimeout, "idle-timeout", g.IdleTimeout, "close logged-in connections silent for this long")
	fs.DurationVar(&g.KeepaliveInterval, "keepalive-interval", g.KeepaliveInterval, "keepalive interval advertised to clients (default idle-timeout/3)")
	fs.DurationVar(&g.RequestTimeout, "request-timeout", g.RequestTimeout, "bound on each request inside the platform (default 10s)")
	fs.IntVar(&g.MaxInFlight, "max-in-flight", g.MaxInFlight, "concurrent requests per connection (default 64)")
	fs.DurationVar(&g.PollTimeout, "poll-timeout", g.PollTimeout, "how long an HTTP long-poll waits for a frame before it answers empty (default 30s)")
	fs.BoolFunc("demo", "serve the demo chat page at /demo/ on the web listener (default: on with the generated demo apps only)", func(v string) error {
		on, err := strconv.ParseBool(v)
		c.Demo = &on
		return err
	})
	fs.StringVar(&c.HTTP.Addr, "http-addr", c.HTTP.Addr, "HTTP API listen address (health, metrics, s2c)")
	fs.StringVar(&c.HTTP.DebugAddr, "debug-addr", c.HTTP.DebugAddr, "serve Go's profiler (/debug/pprof/) on this address, e.g. 127.0.0.1:6060 (default off; not authenticated)")
	fs.DurationVar(&c.ShutdownGrace, "shutdown-grace", c.ShutdownGrace, "how long a graceful shutdown may take")
	fs.Int64Var(&c.NodeID, "node-id", c.NodeID, "snowflake node id (0-1023) of this logic node, unique in the cluster; -1 leases a free one from Redis (0 without Redis)")
	fs.DurationVar(&c.MaxClockSkew, "max-clock-skew", c.MaxClockSkew, "how far ahead of this node's clock a sender's order floor (after_msgid) is followed before it is clamped")
	fs.StringVar(&c.Store.Engine, "store", c.Store.Engine, "message store: embedded (under data-dir/store), cassandra or none")
	fs.DurationVar(&c.Store.SyncInterval, "store-sync-interval", c.Store.SyncInterval, "embedded store: least time between two syncs of its log; commits meanwhile share the next one (negative: sync at once)")
	c.CassandraFlags(fs)
	fs.DurationVar(&c.Store.Retention.MaxAge, "history-max-age", c.Store.Retention.MaxAge, "drop roaming history older than this (0 keeps it)")
	fs.IntVar(&c.Store.Retention.MaxCount, "history-max-count", c.Store.Retention.MaxCount, "keep at most this many history messages per user (0: no bound)")
	listVar(fs, &c.Bus.Brokers, "kafka-brokers", "Kafka brokers for c2s, comma-separated host:port (default: the embedded broker)")
	fs.StringVar(&c.Bus.Embedded.Addr, "kafka-addr", c.Bus.Embedded.Addr, "listen address of the embedded Kafka broker (default 127.0.0.1:9092)")
	fs.IntVar(&c.C2C.PageSize, "page-size", c.C2C.PageSize, "offline pull page size when a client asks for 0 (default 50)")
	fs.IntVar(&c.S2C.StatsMax, "s2c-stats-max", c.S2C.StatsMax, "push statistics a logic node without Redis keeps in memory; past it the oldest are dropped before s2c.stats_ttl (default 1048576, about 92 MB)")
	fs.Float64Var(&c.Transient.Rate, "transient-rate", c.Transient.Rate, "transient messages (typing...) each user may send per second on one logic node (default 20)")
	c.LimitFlags(fs)
	fs.StringVar(&c.Admin.APIKey, "admin-api-key", c.Admin.APIKey, "key of the admin API (/v1/admin/acl); empty turns it off (prefer IMD_ADMIN_API_KEY)")
	fs.IntVar(&c.Presence.MaxFollowed, "presence-max-followed", c.Presence.MaxFollowed, "users one session may follow with presence-subscribe (default 200)")
	fs.IntVar(&c.Groups.MaxSize, "group-max-size", c.Groups.MaxSize, "largest group, in members (default 10000)")
	fs.IntVar(&c.Groups.CacheEntries, "group-cache-entries", c.Groups.CacheEntries, "bound of the group members cache, in member entries over all cached groups (default 1048576)")
	c.ClusterFlags(fs)
}

// ClusterFlags binds the flags of the many-process shape.
func (c *Config) ClusterFlags(fs *flag.FlagSet) {
	k := &c.Cluster
	listVar(fs, &k.Redis.Addrs, "redis-addrs", "Redis for membership and the router, comma-separated host:port (default: in-process, one logic node)")
	fs.StringVar(&k.Redis.Password, "redis-password", k.Redis.Password, "Redis password (prefer IMD_REDIS_PASSWORD)")
	fs.StringVar(&k.Redis.Prefix, "redis-prefix", k.Redis.Prefix, "prefix of every Redis key (default imd:)")
	fs.StringVar(&k.RPCAddr, "rpc-addr", k.RPCAddr, "logic: internal RPC listen address for gateway links (default :7071)")
	fs.StringVar(&k.Advertise, "advertise", k.Advertise, "address other nodes dial to reach this one (default: the listen address)")
	listVar(fs, &k.LogicAddrs, "logic-addrs", "gateway: logic nodes to dial, comma-separated host:port (besides those in the Redis membership)")
	fs.StringVar(&k.DC, "dc", k.DC, "this node's data center")
	fs.StringVar(&k.Secret, "rpc-secret", k.Secret, "cluster secret that signs internal RPC hellos; the same on every node (prefer IMD_RPC_SECRET)")
	fs.StringVar(&k.RPCTLSCert, "rpc-tls-cert", k.RPCTLSCert, "internal RPC mutual TLS: this node's certificate chain, PEM (with --rpc-tls-key and --rpc-tls-ca; default: no TLS)")
	fs.StringVar(&k.RPCTLSKey, "rpc-tls-key", k.RPCTLSKey, "internal RPC mutual TLS: this node's private key, PEM")
	fs.StringVar(&k.RPCTLSCA, "rpc-tls-ca", k.RPCTLSCA, "internal RPC mutual TLS: the CA certificates, PEM, that sign every node's certificate")
	fs.Func("rooms", "every data center of a many-DC deployment, the same on every node: dc=lo-hi@peer,peer;dc2=... (node id range and logic peer-link addresses of each; default: one DC)", func(v string) error {
		r, err := ParseRooms(v)
		k.Rooms = r
		return err
	})
	fs.StringVar(&k.PeerAddr, "peer-addr", k.PeerAddr, "logic, many DCs: listen address for the other DCs' logic nodes (default :7074)")
	fs.DurationVar(&k.Heartbeat, "heartbeat", k.Heartbeat, "membership heartbeat interval (default 2s)")
	fs.DurationVar(&k.NodeTTL, "node-ttl", k.NodeTTL, "a node silent this long is dead (default 10s)")
}

// CassandraFlags binds the flags that reach a Cassandra cluster.
func (c *Config) CassandraFlags(fs *flag.FlagSet) {
	k := &c.Store.Cassandra
	listVar(fs, &k.Hosts, "cassandra-hosts", "Cassandra contact points, comma-separated host[:port] (default 127.0.0.1:9042)")
	fs.StringVar(&k.Keyspace, "cassandra-keyspace", k.Keyspace, "Cassandra keyspace (default imd)")
	fs.StringVar(&k.LocalDC, "cassandra-dc", k.LocalDC, "this node's Cassandra data center (default: the first contact point's)")
	fs.StringVar(&k.Consistency, "cassandra-consistency", k.Consistency, "read and write consistency (default LOCAL_QUORUM)")
	fs.StringVar(&k.Username, "cassandra-username", k.Username, "Cassandra user, if the cluster authenticates")
	fs.StringVar(&k.Password, "cassandra-password", k.Password, "Cassandra password (prefer IMD_CASSANDRA_PASSWORD)")
}

// ParseRooms parses the --rooms flag: "dc=lo-hi@addr,addr;dc2=lo-hi@addr".
func ParseRooms(v string) ([]Room, error) {
	var out []Room
	for _, part := range strings.Split(v, ";") {
		if part = strings.TrimSpace(part); part == "" {
			continue
		}
		dc, rest, ok := strings.Cut(part, "=")
		ids, peers, ok2 := strings.Cut(rest, "@")
		if !ok || !ok2 || strings.TrimSpace(dc) == "" {
			return nil, fmt.Errorf("room %q is not dc=lo-hi@peer,peer", part)
		}
		out = append(out, Room{DC: strings.TrimSpace(dc), NodeIDs: strings.TrimSpace(ids), Peers: splitList(peers)})
	}
	return out, nil
}

// listVar binds a flag whose value is a comma-separated list.
func listVar(fs *flag.FlagSet, dst *[]string, name, usage string) {
	fs.Func(name, usage, func(v string) error {
		*dst = splitList(v)
		return nil
	})
}

func splitList(v string) []string {
	var out []string
	for _, h := range strings.Split(v, ",") {
		if h = strings.TrimSpace(h); h != "" {
			out = append(out, h)
		}
	}
	return out
}

// Load completes c after fs has parsed args once: it reads the YAML file
// (path from --config or IMD_CONFIG), applies IMD_* environment variables
// to every flag not given on the command line, and parses args again so
// that flags win. env is os.LookupEnv in production.
func (c *Config) Load(fs *flag.FlagSet, path *string, args []string, env func(string) (string, bool)) error {
	p := *path
	if p == "" {
		p, _ = env("IMD_CONFIG")
	}
	if p != "" {
		b, err := os.ReadFile(p)
		if err != nil {
			return fmt.Errorf("config: %w", err)
		}
		dec := yaml.NewDecoder(strings.NewReader(string(b)))
		dec.KnownFields(true)
		if err := dec.Decode(c); err != nil && !errors.Is(err, io.EOF) {
			return fmt.Errorf("config %s: %w", p, err)
		}
	}
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	var errs []error
	fs.VisitAll(func(f *flag.Flag) {
		if set[f.Name] || f.Name == "config" {
			return
		}
		name := EnvName(f.Name)
		if v, ok := env(name); ok {
			if err := fs.Set(f.Name, v); err != nil {
				errs = append(errs, fmt.Errorf("%s=%q: %w", name, v, err))
			}
		}
	})
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("config: %w", err)
	}
	if err := fs.Parse(args); err != nil {
		return err
	}
	return nil
}

// EnvName is the environment variable that sets flag name.
func EnvName(flagName string) string {
	return "IMD_" + strings.ToUpper(strings.ReplaceAll(flagName, "-", "_"))
}

// ResolveApps fills in the demo apps, their generated secret and API key,
// and (unless routes are configured) the demo c2s routes when no apps are
// configured. It reports whether the demo apps are in use, and turns the
// demo page on with them unless Demo says otherwise.
func (c *Config) ResolveApps() (demo bool, err error) {
	defer func() {
		c.DemoAppsInUse = demo && err == nil
		if c.Demo == nil {
			on := c.DemoAppsInUse
			c.Demo = &on
		}
	}()
	if len(c.Apps) > 0 {
		return false, nil
	}
	f, err := demoSecrets(filepath.Join(c.DataDir, "secrets.yaml"))
	if err != nil {
		return true, err
	}
	c.Apps = DemoApps()
	if len(c.C2S.Routes) == 0 {
		c.C2S.Routes = DemoRoutes()
	}
	for i := range c.Apps {
		c.Apps[i].Secrets = []string{f.DemoSecret}
		// one key per appcode: a key names the app that pushes
		c.Apps[i].APIKeys = []string{f.DemoAPIKey + "-" + strconv.FormatUint(uint64(c.Apps[i].AppCode), 10)}
	}
	return true, nil
}

type secretsFile struct {
	DemoSecret string `yaml:"demo_secret"`
	DemoAPIKey string `yaml:"demo_api_key"`
}

func randomHex() (string, error) {
	raw := make([]byte, 32)
	if _, err := rand.Read(raw); err != nil {
		return "", err
	}
	return hex.EncodeToString(raw), nil
}

// demoSecrets reads the demo secret and API key from path, creating what
// is missing on first use.
func demoSecrets(path string) (secretsFile, error) {
	var f secretsFile
	b, err := os.ReadFile(path)
	switch {
	case err == nil:
		if err := yaml.Unmarshal(b, &f); err != nil || len(f.DemoSecret) < 16 {
			return f, fmt.Errorf("config: %s is unreadable or holds no demo_secret (delete it to regenerate)", path)
		}
		if len(f.DemoAPIKey) >= 16 {
			return f, nil
		}
	case !errors.Is(err, fs.ErrNotExist):
		return f, fmt.Errorf("config: %w", err)
	}
	if f.DemoSecret == "" {
		if f.DemoSecret, err = randomHex(); err != nil {
			return f, err
		}
	}
	if f.DemoAPIKey, err = randomHex(); err != nil {
		return f, err
	}
	out, _ := yaml.Marshal(&f)
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return f, fmt.Errorf("config: %w", err)
	}
	if err := os.WriteFile(path, append([]byte("# generated by imd for the demo apps; configure apps for production\n"), out...), 0o600); err != nil {
		return f, fmt.Errorf("config: %w", err)
	}
	return f, nil
}
