// Package embedded is the das.Store engine for one machine: the Cassandra
// tables laid out as keys of one local Pebble database (see keys.go).
//
// Durability: every write method commits one atomic batch with a WAL sync
// before it returns. Pebble's commit pipeline lets concurrent committers
// share one fsync (group commit), so throughput grows with the number of
// concurrent writers while each caller still waits for its own sync.
//
// Retention: a background janitor (Options.JanitorInterval) removes
// timeline entries and group messages beyond Retention.MaxAge, timeline
// entries beyond Retention.MaxCount,
// idempotency keys older than Retention.IdempotencyTTL, and messages that
// no inbox or timeline row points to any more. Retention never removes an
// inbox row: only Ack does, so an offline terminal keeps every message it
// has not acknowledged, however old.
package embedded

import (
	"context"
	"fmt"
	"hash/maphash"
	"log/slog"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cockroachdb/pebble/v2"
	"github.com/cockroachdb/pebble/v2/bloom"

	"github.com/imd-dev/imd/das"
)

var _ das.Store = (*Store)(nil)

// ErrInvalid is returned (wrapped) for bad arguments: a nil message, msgid
// 0, a missing sender or recipient, or a page limit <= 0. A retry cannot
// cure it.
var ErrInvalid = das.ErrInvalid

// Defaults of Options.
const (
	DefaultIdempotencyTTL  = 24 * time.Hour
	DefaultJanitorInterval = time.Minute
	DefaultMaxPage         = 1000
	DefaultCacheSize       = 64 << 20
	DefaultMemTableSize    = 32 << 20
	DefaultSyncInterval    = time.Millisecond
	lockStripes            = 1024
)

// Options configure a Store. The zero value gets the defaults.
type Options struct {
	// Retention bounds the timelines and the idempotency keys. A zero
	// IdempotencyTTL means DefaultIdempotencyTTL.
	Retention das.Retention
	// Logger receives the engine's and Pebble's messages. nil discards.
	Logger *slog.Logger
	// JanitorInterval is the pause between retention sweeps; 0 means
	// DefaultJanitorInterval and a negative value disables the janitor
	// (Sweep can still be called).
	JanitorInterval time.Duration
	// MaxPage caps the limit of InboxPage and History: a larger limit is
	// served as MaxPage, with more = true if more follow. 0 means
	// DefaultMaxPage.
	MaxPage int
	// CacheSize is Pebble's block cache in bytes; 0 means DefaultCacheSize.
	CacheSize int64
	// MemTableSize is Pebble's memtable size in bytes; 0 means
	// DefaultMemTableSize.
	MemTableSize uint64
	// SyncInterval is the least time between two syncs of the log (WAL);
	// a synced commit that comes sooner waits for the next sync, with the
	// commits that come meanwhile. 0 means DefaultSyncInterval; negative,
	// no wait. At 4,000-8,000 c2c messages/s 1ms took a fifth off a
	// message's server CPU and added 1-5 ms to the p99 of a send.
	SyncInterval time.Duration
}

func (o *Options) setDefaults() error {
	if o.Retention.MaxAge < 0 || o.Retention.MaxCount < 0 || o.Retention.IdempotencyTTL < 0 {
		return fmt.Errorf("%w: negative retention %+v", ErrInvalid, o.Retention)
	}
	if o.MaxPage < 0 || o.CacheSize < 0 {
		return fmt.Errorf("%w: negative MaxPage or CacheSize", ErrInvalid)
	}
	if o.Retention.IdempotencyTTL == 0 {
		o.Retention.IdempotencyTTL = DefaultIdempotencyTTL
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.JanitorInterval == 0 {
		o.JanitorInterval = DefaultJanitorInterval
	}
	if o.MaxPage == 0 {
		o.MaxPage = DefaultMaxPage
	}
	if o.CacheSize == 0 {
		o.CacheSize = DefaultCacheSize
	}
	if o.MemTableSize == 0 {
		o.MemTableSize = DefaultMemTableSize
	}
	if o.SyncInterval == 0 {
		o.SyncInterval = DefaultSyncInterval
	}
	return nil
}

// Store is the embedded engine. All methods are safe for concurrent use.
type Store struct {
	db   *pebble.DB
	opts Options
	log  *slog.Logger
	now  func() time.Time // replaced in tests

	gate das.Gate // Close waits for calls in flight: no call touches a closed db

	closeOnce sync.Once
	closeErr  error
	life      context.Context // canceled by Close: the janitor and Sweep stop
	endLife   context.CancelFunc
	janitor   sync.WaitGroup
	sweepMu   sync.Mutex // one sweep at a time
	dirty     dirtyUsers // timelines to check against Retention.MaxCount

	seed        maphash.Seed
	idemLocks   [lockStripes]sync.Mutex // by idempotency key: check + commit
	idem        *idemFilter             // which idempotency keys are certainly not stored
	idemEpochMs uint64                  // length of an idempotency epoch (idemEpochKey)
	legacyIdem  atomic.Bool             // keys of before the epochs may be left (tagIdemQueue)
	ackLocks    [lockStripes]sync.Mutex // by terminal: Ack's existence check + delete, AckGroup
	gcEvent     atomic.Uint64           // suffix of collection marks, unique per process run

	// groupLocks are the groups' sequencers (by group id): every write
	// to a group reads its head and commits head+1 under one (group.go).
	groupLocks [lockStripes]sync.Mutex
}

// Open opens (creating if needed) the store in dir, e.g. <data-dir>/store.
// Only one process may open a dir at a time.
func Open(dir string, opts Options) (*Store, error) {
	if err := opts.setDefaults(); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(dir, 0o750); err != nil {
		return nil, fmt.Errorf("%w: %w", das.ErrUnavailable, err)
	}
	log := opts.Logger.With("component", "das/embedded")
	cache := pebble.NewCache(opts.CacheSize)
	defer cache.Unref() // the db holds its own reference
	po := &pebble.Options{
		Cache:              cache,
		MemTableSize:       opts.MemTableSize,
		FormatMajorVersion: pebble.FormatNewest,
		Logger:             pebbleLogger{log},
		EventListener:      eventListener(log),
	}
	if d := opts.SyncInterval; d > 0 {
		po.WALMinSyncInterval = func() time.Duration { return d }
	}
	// Whole-key bloom filters on every level (later levels inherit L0's):
	// every PutC2C with a client id looks up a key that is almost never
	// there, and Ack and the collector do point lookups too.
	po.Levels[0].FilterPolicy = bloom.FilterPolicy(10)
	db, err := pebble.Open(dir, po)
	if err != nil {
		return nil, fmt.Errorf("%w: open %s: %w", das.ErrUnavailable, dir, err)
	}
	s := &Store{
		db:   db,
		opts: opts,
		log:  log,
		now:  time.Now,
		seed: maphash.MakeSeed(),
		idem: newIdemFilter(opts.Retention.IdempotencyTTL),
	}
	if err := s.openIdemEpochs(); err != nil {
		_ = db.Close()
		return nil, err
	}
	s.life, s.endLife = context.WithCancel(context.Background())
	s.janitor.Add(1)
	go func() {
		defer s.janitor.Done()
		s.buildIdemFilter(s.life)
	}()
	// Collection marks should not clash with marks left by an earlier
	// run that the collector has not read yet; nanoseconds since the
	// epoch grow across restarts. (A clash could only leak a message
	// body, never delete one still referenced.)
	s.gcEvent.Store(uint64(time.Now().UnixNano()))
	if opts.JanitorInterval > 0 {
		s.janitor.Add(1)
		go s.runJanitor(opts.JanitorInterval)
	}
	return s, nil
}

// Close stops the janitor, waits for calls in flight and closes the
// database. Later calls return das.ErrClosed; Close itself may be called
// again and then returns nil.
func (s *Store) Close() error {
	first := false
	s.closeOnce.Do(func() {
		first = true
		s.endLife()
		s.janitor.Wait()
		s.gate.Shut()
		if err := s.db.Close(); err != nil {
			s.closeErr = fmt.Errorf("%w: close: %w", das.ErrUnavailable, err)
		}
	})
	if !first {
		return nil
	}
	return s.closeErr
}

// unavailable wraps an engine error so that callers can test it with
// errors.Is(err, das.ErrUnavailable) and still see the cause.
func unavailable(op string, err error) error {
	return fmt.Errorf("%w: %s: %w", das.ErrUnavailable, op, err)
}

// stripe maps a key (an idempotency key, or a terminal for Ack) to one of
// lockStripes locks.
func (s *Store) stripe(key []byte) int { return int(maphash.Bytes(s.seed, key) % lockStripes) }

func (s *Store) terminalStripe(t das.Terminal) int {
	var b [terminalLen]byte
	return s.stripe(appendTerminal(b[:0], t))
}

func (s *Store) nowMs() uint64 { return uint64(s.now().UnixMilli()) }

// pebbleLogger routes Pebble's log lines to slog. Pebble's Fatalf reports
// states it cannot continue from (a failed WAL sync, corruption); it must
// not return, so it panics after logging.
type pebbleLogger struct{ l *slog.Logger }

func (p pebbleLogger) Infof(format string, args ...any) {
	p.l.Debug(fmt.Sprintf(format, args...), "source", "pebble")
}

func (p pebbleLogger) Errorf(format string, args ...any) {
	p.l.Error(fmt.Sprintf(format, args...), "source", "pebble")
}

func (p pebbleLogger) Fatalf(format string, args ...any) {
	msg := fmt.Sprintf(format, args...)
	p.l.Error(msg, "source", "pebble", "fatal", true)
	panic("das/embedded: pebble: " + msg)
}

func eventListener(log *slog.Logger) *pebble.EventListener {
	return &pebble.EventListener{
		BackgroundError: func(err error) { log.Error("pebble background error", "err", err) },
		DataCorruption: func(info pebble.DataCorruptionInfo) {
			log.Error("pebble data corruption", "info", info.String())
		},
		DiskSlow: func(info pebble.DiskSlowInfo) {
			log.Warn("disk slow", "info", info.String())
		},
		WriteStallBegin: func(info pebble.WriteStallBeginInfo) {
			log.Warn("write stall", "reason", info.Reason)
		},
		WriteStallEnd: func() { log.Info("write stall ended") },
	}
}
