package router

import (
	"context"
	"errors"
	"fmt"
	"math"
	"math/bits"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/rueidis"
)

// PushRecord is what is known of one s2c push's delivery: the outcome of
// its fan-out and how many recipient terminals acknowledged it.
type PushRecord struct {
	PushID     uint64 `json:"push_id,string"`
	AppCode    uint32 `json:"appcode"`
	CreatedMS  int64  `json:"created_ms"`
	Recipients int    `json:"recipients"`
	Online     int    `json:"online"`
	Stored     int    `json:"stored"`
	Dropped    int    `json:"dropped"`
	// Acked counts recipients' terminals that acknowledged (live or from
	// their inbox); Acked / (Online + Stored) is the arrival rate.
	Acked int `json:"acked"`
	// Broadcast marks a push to every online terminal of AppCode (the
	// terminals' appcode, not the caller's): its counts are sessions,
	// Recipients those the router listed, Dropped those whose gateway
	// could not take the notify; nothing is stored.
	Broadcast bool `json:"broadcast,omitempty"`
}

// PushLedger keeps PushRecords where every logic node that serves the
// push's recipients can count their acks and any node can answer for it:
// in the node's memory for one logic node (`imd all`), in Redis for a
// cluster, so that the answer survives the node that took the push. All
// methods are safe for concurrent use.
type PushLedger interface {
	// Open starts a record, kept for ttl.
	Open(ctx context.Context, rec PushRecord, ttl time.Duration) error
	// Settle sets the fan-out's outcome of a record that is still kept.
	Settle(ctx context.Context, id uint64, recipients, online, stored, dropped int) error
	// Acked counts one arrival for each id whose record is kept and
	// returns how many it counted.
	Acked(ctx context.Context, ids []uint64) (int, error)
	// Get returns the record of id, if it is still kept. A ledger that
	// dropped the record to stay within its bound (not for its age) says
	// so with ErrStatsEvicted, when it can tell.
	Get(ctx context.Context, id uint64) (PushRecord, bool, error)
}

// ErrStatsEvicted is Get's error for a push whose record a bounded ledger
// dropped, before its TTL, to make room for newer ones.
var ErrStatsEvicted = errors.New("router: push statistics evicted to keep the ledger within its bound")

var (
	_ PushLedger = (*MemoryLedger)(nil)
	_ PushLedger = (*Redis)(nil)
)

// DefaultLedgerMax is the bound of a MemoryLedger made without one
// (docs/capacity.md, "Push statistics and broadcasts": about 92 MB
// when full).
const DefaultLedgerMax = 1 << 20

// ledgerShards splits a MemoryLedger so that pushes opened at once rarely
// meet on a lock; a power of two.
const ledgerShards = 16

// ledgerChunk is how many records a shard allocates at a time, as it
// fills up to its share of the bound.
const ledgerChunk = 512

// MemoryLedger is a PushLedger in this process's memory, bounded: it
// keeps at most about Max records (each of its 16 shards its share),
// dropping the oldest of a shard to make room (Get then answers
// ErrStatsEvicted), and forgets records older than their TTL. Records are
// stored inline in per-shard rings, with no pointer per record for the
// garbage collector to follow.
//
// Counting an ack and reading a record take no lock: a shard's index is
// an open-addressing table of atomic entries, and each record carries a
// tag (its place in the ring) that changes whenever the record is
// rewritten, so a reader that raced with an eviction sees it and counts
// nothing. An ack is one compare-and-swap on its record. Open and Settle
// take their shard's lock. The zero value is a ledger with
// DefaultLedgerMax.
type MemoryLedger struct {
	max    int
	once   sync.Once
	shards [ledgerShards]ledgerShard
}

// NewMemoryLedger returns a MemoryLedger that keeps at most about max
// records; max < 1 means DefaultLedgerMax.
func NewMemoryLedger(max int) *MemoryLedger {
	return &MemoryLedger{max: max}
}

type ledgerShard struct {
	mu     sync.Mutex // writers
	index  atomic.Pointer[ledgerIndex]
	chunks [][]ledgerRec // the ring of slots, ledgerChunk each, made as first used
	size   uint64        // slots in the ring: this shard's share of the bound
	// Records live at sequence numbers [head, tail), in the order they
	// were opened; sequence q is in slot q % size.
	head, tail uint64
	evicted    atomic.Uint64 // the newest push id dropped for room (ids grow with time)
	_          [56]byte
}

// ledgerRec is one record. Every field is atomic: readers take no lock.
// word holds the record's tag (high 32 bits, never 0 but while the record
// is being rewritten: it changes with every use of the slot) and its acks
// (low 32 bits).
type ledgerRec struct {
	word      atomic.Uint64
	id        atomic.Uint64
	createdMS atomic.Int64
	expiresMS atomic.Int64
	app       atomic.Uint32 // appcode; the top bit marks a broadcast

	recipients, online, stored, dropped atomic.Int32
}

const broadcastBit = 1 << 31

// tagOf is the tag of the record at sequence number q.
func tagOf(q uint64) uint64 {
	t := uint32(q) + 1
	if t == 0 {
		t = 1
	}
	return uint64(t) << 32
}

const tagMask uint64 = 0xFFFFFFFF_00000000

// ledgerIndex maps push ids to slots with linear probing. Only the
// shard's writer changes it (a deleted entry becomes a tombstone); when
// tombstones fill it, the writer builds a new one and swaps it in.
// Readers of either check what they find against the record itself.
type ledgerIndex struct {
	entries []ledgerEntry
	used    int // entries that are not empty: live and tombstones (writer only)
	live    int
}

type ledgerEntry struct {
	id   atomic.Uint64 // 0: empty; tombstone: deleted
	slot atomic.Uint32
}

const tombstone = ^uint64(0)

// newLedgerIndex returns an index for live entries, at most half full.
func newLedgerIndex(live int) *ledgerIndex {
	return &ledgerIndex{entries: make([]ledgerEntry, max(64, 2*live+2))}
}

// start is where id's probe begins: a mix of id reduced to the table's
// length by multiplication (no power of two needed).
func (x *ledgerIndex) start(id uint64) int {
	h, _ := bits.Mul64((id^id>>29)*0x9E3779B97F4A7C15, uint64(len(x.entries)))
	return int(h)
}

// find returns the slot of id; safe without the lock.
func (x *ledgerIndex) find(id uint64) (uint32, bool) {
	h := x.start(id)
	for range x.entries {
		e := &x.entries[h]
		switch e.id.Load() {
		case 0:
			return 0, false
		case id:
			return e.slot.Load(), true
		}
		if h++; h == len(x.entries) {
			h = 0
		}
	}
	return 0, false
}

// put adds id -> slot; the shard's lock is held and id is not in x.
func (x *ledgerIndex) put(id uint64, slot uint32) {
	h := x.start(id)
	for {
		e := &x.entries[h]
		if k := e.id.Load(); k == 0 || k == tombstone {
			if k == 0 {
				x.used++
			}
			x.live++
			e.slot.Store(slot)
			e.id.Store(id) // publishes the entry
			return
		}
		if h++; h == len(x.entries) {
			h = 0
		}
	}
}

// del removes id; the shard's lock is held.
func (x *ledgerIndex) del(id uint64) {
	h := x.start(id)
	for range x.entries {
		e := &x.entries[h]
		switch e.id.Load() {
		case 0:
			return
		case id:
			e.id.Store(tombstone)
			x.live--
			return
		}
		if h++; h == len(x.entries) {
			h = 0
		}
	}
}

func (l *MemoryLedger) init() {
	max := l.max
	if max < 1 {
		max = DefaultLedgerMax
	}
	per := uint64(max+ledgerShards-1) / ledgerShards
	for i := range l.shards {
		sh := &l.shards[i]
		sh.size = per
		sh.chunks = make([][]ledgerRec, (per+ledgerChunk-1)/ledgerChunk)
		sh.index.Store(newLedgerIndex(0))
	}
}

// Max returns the bound: the most records the ledger keeps.
func (l *MemoryLedger) Max() int {
	l.once.Do(l.init)
	return int(l.shards[0].size) * ledgerShards
}

func (l *MemoryLedger) shard(id uint64) *ledgerShard {
	l.once.Do(l.init)
	// Snowflake ids differ mostly in their high (time) bits: spread them
	// by fibonacci hashing.
	return &l.shards[(id*0x9E3779B97F4A7C15)>>(64-4)]
}

// rec returns the record in slot. A reader only asks for slots it found
// in the index, published after their chunk was made.
func (sh *ledgerShard) rec(slot uint32) *ledgerRec {
	return &sh.chunks[slot/ledgerChunk][slot%ledgerChunk]
}

func (sh *ledgerShard) slotOf(q uint64) uint32 { return uint32(q % sh.size) }

// alloc returns the record of sequence q, making its chunk; the lock is
// held.
func (sh *ledgerShard) alloc(q uint64) *ledgerRec {
	s := sh.slotOf(q)
	c := &sh.chunks[s/ledgerChunk]
	if *c == nil {
		*c = make([]ledgerRec, min(ledgerChunk, sh.size-uint64(s/ledgerChunk)*ledgerChunk))
	}
	return &(*c)[s%ledgerChunk]
}

// lookup returns the record of id and its word as read, or nil. The word
// changes whenever the record is rewritten: a compare-and-swap on it, or
// a second read of its tag, tells whether the record is still id's.
func (sh *ledgerShard) lookup(id uint64) (*ledgerRec, uint64) {
	slot, ok := sh.index.Load().find(id)
	if !ok {
		return nil, 0
	}
	r := sh.rec(slot)
	w := r.word.Load()
	if w == 0 || r.id.Load() != id {
		return nil, 0 // being rewritten, or rewritten for another push
	}
	return r, w
}

// pop drops the oldest record and returns its push id; the lock is held.
func (sh *ledgerShard) pop() uint64 {
	r := sh.rec(sh.slotOf(sh.head))
	id := r.id.Load()
	sh.index.Load().del(id)
	r.word.Store(0) // readers that found it before the delete now miss it
	sh.head++
	return id
}

// Open implements PushLedger. It first forgets the shard's expired
// records, then the oldest one if the shard is full. Opening an id the
// ledger holds starts its record again.
func (l *MemoryLedger) Open(_ context.Context, rec PushRecord, ttl time.Duration) error {
	id := rec.PushID
	if id == 0 || id == tombstone {
		return fmt.Errorf("router: push id %d cannot be recorded", id)
	}
	sh := l.shard(id)
	nowMS := time.Now().UnixMilli()
	sh.mu.Lock()
	defer sh.mu.Unlock()
	x := sh.index.Load()
	var r *ledgerRec
	var tag uint64
	if slot, found := x.find(id); found {
		r = sh.rec(slot)
		tag = r.word.Load() & tagMask
		r.word.Store(0)
	} else {
		for sh.head < sh.tail && sh.rec(sh.slotOf(sh.head)).expiresMS.Load() <= nowMS {
			sh.pop()
		}
		if sh.tail-sh.head == sh.size {
			sh.evicted.Store(max(sh.evicted.Load(), sh.pop()))
		}
		q := sh.tail
		sh.tail++
		r, tag = sh.alloc(q), tagOf(q)
		if (x.used+1)*4 > len(x.entries)*3 {
			// Tombstones (or growth) fill the table: build a new one
			// of the live entries, for readers to switch to.
			nx := newLedgerIndex(x.live + 1)
			for p := sh.head; p < q; p++ {
				s := sh.slotOf(p)
				nx.put(sh.rec(s).id.Load(), s)
			}
			sh.index.Store(nx)
			x = nx
		}
		defer x.put(id, sh.slotOf(q)) // once the record is written
	}
	app := rec.AppCode &^ broadcastBit
	if rec.Broadcast {
		app |= broadcastBit
	}
	r.id.Store(id)
	r.createdMS.Store(rec.CreatedMS)
	r.expiresMS.Store(nowMS + max(ttl.Milliseconds(), 1))
	r.app.Store(app)
	r.recipients.Store(int32(rec.Recipients))
	r.online.Store(int32(rec.Online))
	r.stored.Store(int32(rec.Stored))
	r.dropped.Store(int32(rec.Dropped))
	r.word.Store(tag | uint64(uint32(rec.Acked)))
	return nil
}

// Settle implements PushLedger.
func (l *MemoryLedger) Settle(_ context.Context, id uint64, recipients, online, stored, dropped int) error {
	sh := l.shard(id)
	nowMS := time.Now().UnixMilli()
	sh.mu.Lock()
	defer sh.mu.Unlock()
	if r, _ := sh.lookup(id); r != nil && r.expiresMS.Load() > nowMS {
		r.recipients.Store(int32(recipients))
		r.online.Store(int32(online))
		r.stored.Store(int32(stored))
		r.dropped.Store(int32(dropped))
	}
	return nil
}

// Acked implements PushLedger. It counts acks of records that are kept,
// expired or not: an expired record is not answered for, and the next
// Open of its shard drops it.
func (l *MemoryLedger) Acked(_ context.Context, ids []uint64) (int, error) {
	n := 0
	for _, id := range ids {
		sh := l.shard(id)
		r, w := sh.lookup(id)
		for r != nil && uint32(w) != math.MaxUint32 { // acks stop short of the tag
			if r.word.CompareAndSwap(w, w+1) {
				n++
				break
			}
			if w2 := r.word.Load(); w2&tagMask == w&tagMask {
				w = w2 // another ack meanwhile
				continue
			}
			break // evicted meanwhile
		}
	}
	return n, nil
}

// Get implements PushLedger.
func (l *MemoryLedger) Get(_ context.Context, id uint64) (PushRecord, bool, error) {
	sh := l.shard(id)
	r, w := sh.lookup(id)
	if r != nil && r.expiresMS.Load() > time.Now().UnixMilli() {
		app := r.app.Load()
		rec := PushRecord{
			PushID: id, AppCode: app &^ broadcastBit, Broadcast: app&broadcastBit != 0, CreatedMS: r.createdMS.Load(),
			Recipients: int(r.recipients.Load()), Online: int(r.online.Load()), Stored: int(r.stored.Load()),
			Dropped: int(r.dropped.Load()),
		}
		// The record was not rewritten while it was read if its tag
		// still holds (the acks may have grown).
		if w2 := r.word.Load(); w2&tagMask == w&tagMask {
			rec.Acked = int(uint32(w2))
			return rec, true, nil
		}
	}
	if id != 0 && id <= sh.evicted.Load() {
		if _, kept := sh.index.Load().find(id); !kept {
			return PushRecord{}, false, ErrStatsEvicted
		}
	}
	return PushRecord{}, false, nil
}

// Len returns how many records the ledger holds, expired ones not yet
// dropped included.
func (l *MemoryLedger) Len() int {
	l.once.Do(l.init)
	n := 0
	for i := range l.shards {
		sh := &l.shards[i]
		sh.mu.Lock()
		n += int(sh.tail - sh.head)
		sh.mu.Unlock()
	}
	return n
}

// Push records in Redis:
//
//	P p:{<push id>}  hash: app, created, recipients, online, stored,
//	                 dropped, acked (and broadcast = 1 for a broadcast);
//	                 expires with the record's ttl
//
// Each record has its own slot; an ack of several pushes is one pipelined
// script call per push.

func (r *Redis) pushKey(id uint64) string {
	return r.prefix + "p:{" + strconv.FormatUint(id, 10) + "}"
}

// pushOpenScript: HSET KEYS[1] the record's fields (and broadcast = 1
// for a broadcast, ARGV[5]); PEXPIRE ARGV[1].
var pushOpenScript = rueidis.NewLuaScript(`
redis.call('HSET', KEYS[1], 'app', ARGV[2], 'created', ARGV[3], 'recipients', ARGV[4],
  'online', 0, 'stored', 0, 'dropped', 0, 'acked', 0)
if ARGV[5] == '1' then redis.call('HSET', KEYS[1], 'broadcast', 1) end
return redis.call('PEXPIRE', KEYS[1], ARGV[1])
`)

// pushSettleScript sets the outcome of an existing record only: a record
// that expired is not brought back without its TTL.
var pushSettleScript = rueidis.NewLuaScript(`
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'online', ARGV[1], 'stored', ARGV[2], 'dropped', ARGV[3], 'recipients', ARGV[4])
return 1
`)

// pushAckScript counts one arrival on an existing record.
var pushAckScript = rueidis.NewLuaScript(`
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HINCRBY', KEYS[1], 'acked', 1)
return 1
`)

// Open implements PushLedger.
func (r *Redis) Open(ctx context.Context, rec PushRecord, ttl time.Duration) error {
	ms := max(ttl.Milliseconds(), 1)
	err := pushOpenScript.Exec(ctx, r.c, []string{r.pushKey(rec.PushID)}, []string{
		strconv.FormatInt(ms, 10), strconv.FormatUint(uint64(rec.AppCode), 10),
		strconv.FormatInt(rec.CreatedMS, 10), strconv.Itoa(rec.Recipients), flag(rec.Broadcast),
	}).Error()
	if err != nil {
		return fmt.Errorf("router: redis push record %d: %w", rec.PushID, err)
	}
	return nil
}

// Settle implements PushLedger.
func (r *Redis) Settle(ctx context.Context, id uint64, recipients, online, stored, dropped int) error {
	err := pushSettleScript.Exec(ctx, r.c, []string{r.pushKey(id)}, []string{
		strconv.Itoa(online), strconv.Itoa(stored), strconv.Itoa(dropped), strconv.Itoa(recipients),
	}).Error()
	if err != nil {
		return fmt.Errorf("router: redis push record %d: %w", id, err)
	}
	return nil
}

// Acked implements PushLedger.
func (r *Redis) Acked(ctx context.Context, ids []uint64) (int, error) {
	if len(ids) == 0 {
		return 0, nil
	}
	calls := make([]rueidis.LuaExec, len(ids))
	for i, id := range ids {
		calls[i] = rueidis.LuaExec{Keys: []string{r.pushKey(id)}}
	}
	n := 0
	for i, res := range execScript(ctx, r.c, pushAckScript, calls) {
		v, err := res.AsInt64()
		if err != nil {
			return n, fmt.Errorf("router: redis push ack %d: %w", ids[i], err)
		}
		n += int(v)
	}
	return n, nil
}

// Get implements PushLedger.
func (r *Redis) Get(ctx context.Context, id uint64) (PushRecord, bool, error) {
	m, err := r.c.Do(ctx, r.c.B().Hgetall().Key(r.pushKey(id)).Build()).AsStrMap()
	if err != nil {
		return PushRecord{}, false, fmt.Errorf("router: redis push record %d: %w", id, err)
	}
	if len(m) == 0 {
		return PushRecord{}, false, nil
	}
	num := func(f string) int64 {
		v, _ := strconv.ParseInt(m[f], 10, 64)
		return v
	}
	return PushRecord{
		PushID: id, AppCode: uint32(num("app")), CreatedMS: num("created"),
		Recipients: int(num("recipients")), Online: int(num("online")), Stored: int(num("stored")),
		Dropped: int(num("dropped")), Acked: int(num("acked")), Broadcast: m["broadcast"] == "1",
	}, true, nil
}

func flag(b bool) string {
	if b {
		return "1"
	}
	return "0"
}
