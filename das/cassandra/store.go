// Package cassandra is the das.Store engine for clusters: the tables of
// schema/cql on Apache Cassandra, through gocql
// (github.com/apache/cassandra-gocql-driver/v2). schema/cql/README.md
// explains the data model; this package's README.md the write and read
// paths and the failure behaviour.
//
// Consistency: every read and write runs at Config.Consistency
// (LOCAL_QUORUM by default), the idempotency claim at SerialConsistency
// (LOCAL_SERIAL), so a write that returned nil is on a quorum of the local
// data center's replicas and every later read there sees it.
//
// Failures: an error that a retry may cure (Cassandra down, replicas
// unavailable or slow, no connection) is wrapped in das.ErrUnavailable.
// Idempotent statements (all but the idempotency claim, which PutC2C
// retries itself) are retried by the driver, on the next host, with
// backoff, within the caller's context. A PutC2C that failed may or may
// not have stored the message; its retry with the same client message id
// converges to one stored message with one msgid.
package cassandra

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"hash/maphash"
	"log/slog"
	"net"
	"strconv"
	"sync"
	"time"

	gocql "github.com/apache/cassandra-gocql-driver/v2"

	"github.com/imd-dev/imd/das"
	"github.com/imd-dev/imd/schema/cql"
)

var _ das.Store = (*Store)(nil)

// Defaults of Config.
const (
	DefaultHost              = "127.0.0.1:9042"
	DefaultKeyspace          = "imd"
	DefaultConsistency       = "LOCAL_QUORUM"
	DefaultSerialConsistency = "LOCAL_SERIAL"
	DefaultTimeout           = 5 * time.Second
	DefaultConnectTimeout    = 5 * time.Second
	DefaultRetries           = 2
	DefaultNumConns          = 2
	DefaultReconnectInterval = 10 * time.Second
	DefaultIdempotencyTTL    = 24 * time.Hour
	DefaultInboxLag          = 2 * time.Minute
	DefaultMaxPage           = 1000
	DefaultMaxBatchBytes     = 48 << 10
	lockStripes              = 1024
)

// Config configures a Store (and Migrate). The zero value of every field
// gets its default.
type Config struct {
	// Hosts are contact points, "host" or "host:port" (port 9042 if
	// omitted); the driver discovers the rest of the cluster. Default
	// DefaultHost.
	Hosts []string
	// Keyspace holds the tables; Migrate creates it. Default "imd".
	Keyspace string
	// LocalDC is this deployment's data center ("room"). Requests go to
	// its replicas first (token-aware within DC-aware round robin) and
	// LOCAL_* consistency counts its replicas. Empty: the data center of
	// the first contact point that answers.
	LocalDC string
	// Consistency of reads and writes. Default LOCAL_QUORUM.
	Consistency string
	// SerialConsistency of the idempotency claim (an LWT). Default
	// LOCAL_SERIAL.
	SerialConsistency string
	// Timeout bounds each request attempt; ConnectTimeout each connection
	// attempt. Defaults 5s.
	Timeout, ConnectTimeout time.Duration
	// Retries is how often an idempotent statement is retried (on the
	// next host, with backoff) after an error a retry may cure. Default 2;
	// negative: none.
	Retries int
	// NumConns is the number of connections per host. Default 2.
	NumConns int
	// ReconnectInterval is how often hosts marked down are tried again.
	// Default 10s.
	ReconnectInterval time.Duration
	// Username and Password, if set, authenticate with Cassandra's
	// PasswordAuthenticator.
	Username, Password string
	// TLS, if set, encrypts the connections.
	TLS *tls.Config
	// Retention: MaxAge becomes the TTL of timeline rows (counted from the
	// msgid's time); IdempotencyTTL the TTL of idempotency keys (default
	// 24h, at most 7 days, so that it stays below the inbox's
	// gc_grace_seconds). MaxCount is enforced by trim rounds (see
	// TrimInterval and Trim).
	Retention das.Retention
	// TrimInterval is the pause between the rounds that trim timelines
	// grown past Retention.MaxCount. Default DefaultTrimInterval;
	// negative: no background rounds (call Trim).
	TrimInterval time.Duration
	// InboxLag bounds how long a PutC2C takes from choosing its rows to
	// their being visible, plus clock skew between logic nodes; the inbox
	// low watermark trails the newest acknowledgement by this much (see
	// README.md). Default 2 minutes; at least 4 × Timeout.
	InboxLag time.Duration
	// MaxPage caps the limit of InboxPage and History. Default 1000.
	MaxPage int
	// MaxBatchBytes caps the estimated size of one message's logged batch
	// (its body is stored in each inbox row and on both timelines); a
	// larger message gets ErrInvalid. Keep it below the cluster's
	// batch_size_fail_threshold (Cassandra's default 50 KiB). Default
	// 48 KiB.
	MaxBatchBytes int
	// Logger receives the engine's and the driver's messages. nil
	// discards.
	Logger *slog.Logger

	// observer, set by tests, sees each statement and the node it ran on.
	observer observer
}

type observer interface {
	gocql.QueryObserver
	gocql.BatchObserver
}

func (c *Config) setDefaults() error {
	if len(c.Hosts) == 0 {
		c.Hosts = []string{DefaultHost}
	}
	if c.Keyspace == "" {
		c.Keyspace = DefaultKeyspace
	}
	if !cql.ValidName(c.Keyspace) {
		return fmt.Errorf("%w: keyspace %q", ErrInvalid, c.Keyspace)
	}
	if c.Consistency == "" {
		c.Consistency = DefaultConsistency
	}
	if c.SerialConsistency == "" {
		c.SerialConsistency = DefaultSerialConsistency
	}
	if _, err := gocql.ParseConsistencyWrapper(c.Consistency); err != nil {
		return fmt.Errorf("%w: consistency: %w", ErrInvalid, err)
	}
	if s, err := gocql.ParseConsistencyWrapper(c.SerialConsistency); err != nil || (s != gocql.Serial && s != gocql.LocalSerial) {
		return fmt.Errorf("%w: serial consistency %q: want SERIAL or LOCAL_SERIAL", ErrInvalid, c.SerialConsistency)
	}
	if c.Timeout == 0 {
		c.Timeout = DefaultTimeout
	}
	if c.ConnectTimeout == 0 {
		c.ConnectTimeout = DefaultConnectTimeout
	}
	if c.Retries == 0 {
		c.Retries = DefaultRetries
	}
	if c.NumConns == 0 {
		c.NumConns = DefaultNumConns
	}
	if c.ReconnectInterval == 0 {
		c.ReconnectInterval = DefaultReconnectInterval
	}
	r := &c.Retention
	if r.MaxAge < 0 || r.MaxCount < 0 || r.IdempotencyTTL < 0 {
		return fmt.Errorf("%w: negative retention %+v", ErrInvalid, *r)
	}
	if r.IdempotencyTTL == 0 {
		r.IdempotencyTTL = DefaultIdempotencyTTL
	}
	if r.IdempotencyTTL > 7*24*time.Hour {
		return fmt.Errorf("%w: idempotency TTL %v: at most 7 days (below the inbox gc_grace_seconds)", ErrInvalid, r.IdempotencyTTL)
	}
	if c.TrimInterval == 0 {
		c.TrimInterval = DefaultTrimInterval
	}
	if c.InboxLag == 0 {
		c.InboxLag = DefaultInboxLag
	}
	if c.InboxLag < 4*c.Timeout {
		return fmt.Errorf("%w: inbox lag %v: at least 4 × timeout (%v)", ErrInvalid, c.InboxLag, c.Timeout)
	}
	if c.MaxPage == 0 {
		c.MaxPage = DefaultMaxPage
	}
	if c.MaxBatchBytes == 0 {
		c.MaxBatchBytes = DefaultMaxBatchBytes
	}
	if c.Timeout < 0 || c.ConnectTimeout < 0 || c.NumConns < 0 || c.ReconnectInterval < 0 || c.MaxPage < 0 || c.MaxBatchBytes < 0 {
		return fmt.Errorf("%w: negative setting in %+v", ErrInvalid, *c)
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	return nil
}

// cluster returns the driver configuration for keyspace ks ("" for none).
func (c *Config) cluster(ks string, log *slog.Logger) *gocql.ClusterConfig {
	cl := gocql.NewCluster(c.Hosts...)
	cl.Keyspace = ks
	cl.Consistency, _ = gocql.ParseConsistencyWrapper(c.Consistency)
	cl.SerialConsistency, _ = gocql.ParseConsistencyWrapper(c.SerialConsistency)
	cl.Timeout = c.Timeout
	cl.ConnectTimeout = c.ConnectTimeout
	cl.WriteTimeout = c.Timeout
	cl.NumConns = c.NumConns
	cl.ReconnectInterval = c.ReconnectInterval
	cl.DefaultIdempotence = false // only statements marked idempotent are retried
	cl.RetryPolicy = &retryPolicy{retries: max(c.Retries, 0), min: 20 * time.Millisecond, max: time.Second}
	var dcPolicy gocql.HostSelectionPolicy = gocql.RoundRobinHostPolicy()
	if c.LocalDC != "" {
		dcPolicy = gocql.DCAwareRoundRobinPolicy(c.LocalDC)
	}
	// Token-aware: a statement goes to a replica of its partition, so the
	// coordinator is one of the replicas it waits for.
	cl.PoolConfig.HostSelectionPolicy = gocql.TokenAwareHostPolicy(dcPolicy)
	if c.LocalDC != "" {
		cl.PoolConfig.HostSelectionPolicy = localOnly{cl.PoolConfig.HostSelectionPolicy, c.LocalDC}
	}
	if c.Username != "" {
		cl.Authenticator = gocql.PasswordAuthenticator{Username: c.Username, Password: c.Password}
	}
	if c.TLS != nil {
		cl.SslOpts = &gocql.SslOptions{Config: c.TLS.Clone(), EnableHostVerification: !c.TLS.InsecureSkipVerify}
	}
	cl.Logger = slogLogger{log.With("source", "gocql")}
	if c.observer != nil {
		cl.QueryObserver, cl.BatchObserver = c.observer, c.observer
	}
	return cl
}

// Store is the Cassandra engine. All methods are safe for concurrent use.
type Store struct {
	s   *gocql.Session
	cfg Config
	log *slog.Logger
	now func() time.Time // replaced in tests

	cons, serial gocql.Consistency

	gate      das.Gate // Close waits for calls in flight
	closeOnce sync.Once

	seed     maphash.Seed
	ackLocks [lockStripes]sync.Mutex // by terminal: Ack's read + delete

	// Retention.MaxCount (trim.go)
	grown   trimSet // timelines written since their last trim
	trimMu  sync.Mutex
	trimmer sync.WaitGroup
	life    context.Context // canceled by Close: trim rounds stop
	endLife context.CancelFunc
}

// Open connects to the cluster and checks that the keyspace's schema is
// migrated (ErrSchema if not). A cluster that cannot be reached gives an
// error wrapping das.ErrUnavailable.
func Open(ctx context.Context, cfg Config) (*Store, error) {
	if err := cfg.setDefaults(); err != nil {
		return nil, err
	}
	log := cfg.Logger.With("component", "das/cassandra")
	if cfg.LocalDC == "" {
		dc, err := localDC(ctx, cfg, log)
		if err != nil {
			return nil, err
		}
		cfg.LocalDC = dc
		log.Info("local data center from the contact points", "dc", dc)
	}
	sess, err := newSession(ctx, cfg.cluster(cfg.Keyspace, log))
	if err != nil {
		// A session bound to a keyspace that does not exist fails like
		// one that reached no host: tell the two apart.
		if !errors.Is(err, gocql.ErrKeyspaceDoesNotExist) && ctx.Err() == nil {
			if _, exists, kerr := keyspaceExists(ctx, cfg, log); kerr == nil && !exists {
				err = gocql.ErrKeyspaceDoesNotExist
			}
		}
		if errors.Is(err, gocql.ErrKeyspaceDoesNotExist) {
			return nil, fmt.Errorf("%w: keyspace %s does not exist: run imd migrate", ErrSchema, cfg.Keyspace)
		}
		return nil, storeErr("connect", err)
	}
	s := &Store{s: sess, cfg: cfg, log: log, now: time.Now, seed: maphash.MakeSeed()}
	s.cons, _ = gocql.ParseConsistencyWrapper(cfg.Consistency)
	s.serial, _ = gocql.ParseConsistencyWrapper(cfg.SerialConsistency)
	if err := s.checkSchema(ctx); err != nil {
		sess.Close()
		return nil, err
	}
	s.startTrimmer()
	log.Info("cassandra store open", "hosts", cfg.Hosts, "keyspace", cfg.Keyspace, "dc", cfg.LocalDC, "consistency", cfg.Consistency)
	return s, nil
}

// newSession creates a session, giving up when ctx ends. gocql's own
// connect has no context; its ConnectTimeout bounds each attempt.
func newSession(ctx context.Context, cl *gocql.ClusterConfig) (*gocql.Session, error) {
	type result struct {
		s   *gocql.Session
		err error
	}
	ch := make(chan result, 1)
	go func() {
		s, err := cl.CreateSession()
		ch <- result{s, err}
	}()
	select {
	case r := <-ch:
		return r.s, r.err
	case <-ctx.Done():
		go func() { // close the session if it arrives after all
			if r := <-ch; r.s != nil {
				r.s.Close()
			}
		}()
		return nil, ctx.Err()
	}
}

// localDC returns the data center of the first contact point that
// answers. The session discovers every node, other data centers' too, so
// it is the contact point's own entry that counts, not any node's answer.
func localDC(ctx context.Context, cfg Config, log *slog.Logger) (string, error) {
	cl := cfg.adminCluster("", log)
	sess, err := newSession(ctx, cl)
	if err != nil {
		return "", storeErr("connect", err)
	}
	defer sess.Close()
	if dc := contactDC(ctx, sess, cfg.Hosts, cl.Port); dc != "" {
		return dc, nil
	}
	var dc string // no contact point among the nodes (an address translator): ask any
	if err := sess.Query(`SELECT data_center FROM system.local`).Idempotent(true).ScanContext(ctx, &dc); err != nil {
		return "", storeErr("local data center", err)
	}
	return dc, nil
}

// contactDC returns the data center of the first of hosts ("host" or
// "host:port") that the session sees up, or "" when none is among its
// nodes.
func contactDC(ctx context.Context, sess *gocql.Session, hosts []string, defPort int) string {
	nodes := sess.GetHosts()
	for _, h := range hosts {
		name, port := h, defPort
		if hn, p, err := net.SplitHostPort(h); err == nil {
			name = hn
			if n, err := strconv.Atoi(p); err == nil {
				port = n
			}
		}
		ips, err := net.DefaultResolver.LookupIPAddr(ctx, name)
		if err != nil {
			continue
		}
		for _, n := range nodes {
			if !n.IsUp() || n.Port() != port || n.DataCenter() == "" {
				continue
			}
			for _, ip := range ips {
				if n.ConnectAddress().Equal(ip.IP) {
					return n.DataCenter()
				}
			}
		}
	}
	return ""
}

// keyspaceExists reports whether cfg.Keyspace exists, and its replication.
func keyspaceExists(ctx context.Context, cfg Config, log *slog.Logger) (map[string]int, bool, error) {
	cl := cfg.cluster("", log)
	cl.NumConns = 1
	sess, err := newSession(ctx, cl)
	if err != nil {
		return nil, false, storeErr("connect", err)
	}
	defer sess.Close()
	return keyspaceReplication(ctx, sess, cfg.Keyspace)
}

// checkSchema fails unless every migration this binary knows is applied.
func (s *Store) checkSchema(ctx context.Context) error {
	applied, err := appliedVersions(ctx, s.s)
	if err != nil {
		return err
	}
	ms, err := cql.Migrations()
	if err != nil {
		return err
	}
	for _, m := range ms {
		sum, ok := applied[m.Version]
		if !ok {
			return fmt.Errorf("%w: keyspace %s lacks migration %03d_%s: run imd migrate", ErrSchema, s.cfg.Keyspace, m.Version, m.Name)
		}
		if sum != m.Checksum {
			return fmt.Errorf("%w: keyspace %s: migration %03d_%s was applied with another checksum", ErrSchema, s.cfg.Keyspace, m.Version, m.Name)
		}
	}
	return nil
}

// Close waits for calls in flight and closes the connections. Later calls
// return das.ErrClosed; Close itself may be called again and returns nil.
func (s *Store) Close() error {
	s.closeOnce.Do(func() {
		s.stopTrimmer()
		s.gate.Shut()
		s.s.Close()
	})
	return nil
}

// q returns an idempotent statement at the configured consistency.
func (s *Store) q(stmt string, args ...any) *gocql.Query {
	return s.s.Query(stmt, args...).Idempotent(true).Consistency(s.cons)
}

func (s *Store) ackStripe(t das.Terminal) *sync.Mutex {
	var h maphash.Hash
	h.SetSeed(s.seed)
	var b [16]byte
	putTerminal(b[:], t)
	_, _ = h.Write(b[:])
	return &s.ackLocks[h.Sum64()%lockStripes]
}

func putTerminal(b []byte, t das.Terminal) {
	_ = b[15]
	b[0], b[1], b[2], b[3] = byte(t.Account>>24), byte(t.Account>>16), byte(t.Account>>8), byte(t.Account)
	for i := range 8 {
		b[4+i] = byte(t.UID >> (56 - 8*i))
	}
	b[12], b[13], b[14], b[15] = byte(t.AppCode>>24), byte(t.AppCode>>16), byte(t.AppCode>>8), byte(t.AppCode)
}

// slogLogger routes the driver's log lines to slog.
type slogLogger struct{ l *slog.Logger }

func (g slogLogger) Error(msg string, f ...gocql.LogField)   { g.log(slog.LevelError, msg, f) }
func (g slogLogger) Warning(msg string, f ...gocql.LogField) { g.log(slog.LevelWarn, msg, f) }
func (g slogLogger) Info(msg string, f ...gocql.LogField)    { g.log(slog.LevelInfo, msg, f) }
func (g slogLogger) Debug(msg string, f ...gocql.LogField)   { g.log(slog.LevelDebug, msg, f) }

func (g slogLogger) log(level slog.Level, msg string, f []gocql.LogField) {
	ctx := context.Background()
	if !g.l.Enabled(ctx, level) {
		return
	}
	attrs := make([]slog.Attr, 0, len(f))
	for _, x := range f {
		attrs = append(attrs, slog.Any(x.Name, x.Value.Any()))
	}
	g.l.LogAttrs(ctx, level, msg, attrs...)
}
