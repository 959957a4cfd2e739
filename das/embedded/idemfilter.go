package embedded

import (
	"context"
	"encoding/binary"
	"errors"
	"io"
	"sync"
	"sync/atomic"
	"time"

	"github.com/bits-and-blooms/bloom/v3"
	"github.com/cockroachdb/pebble/v2"
)

// idemFilter answers, without a read, that an idempotency key is certainly
// not stored: nearly every message with a client id is new, and looking
// its key up in Pebble (the memtable's skiplist, then each level's bloom
// filter) was a seventh of a c2c message's server CPU.
//
// It is a row of Bloom filters (generations), each holding the keys stored
// while it was the newest, with the time of its newest key. A generation
// whose newest key is older than IdempotencyTTL holds only expired keys
// and is dropped whole (Bloom filters cannot delete). A generation is full
// at its capacity; the next one is twice as big, up to maxIdemGen keys, so
// an idle store holds a small filter and a busy one about 1.2 bytes per key
// stored within the TTL (1% false positives per generation).
//
// Until it has read the keys stored before Open (build, from every
// idempotency epoch, on a goroutine) it answers "maybe" to every
// key. Keys stored meanwhile are added by their writers, so once the scan
// is done the filter holds every live key.
type idemFilter struct {
	mu    sync.Mutex
	gens  []*idemGen // oldest first
	ttlMs uint64
	ready atomic.Bool
}

type idemGen struct {
	f      *bloom.BloomFilter
	n, cap uint
	newest uint64 // stored ms of the newest key added
}

const (
	minIdemGen = 1 << 16 // keys in the first generation (about 77 KB)
	maxIdemGen = 1 << 21 // keys in the largest (about 2.4 MB)
	idemFP     = 0.01
)

func newIdemFilter(ttl time.Duration) *idemFilter {
	return &idemFilter{ttlMs: uint64(ttl.Milliseconds())}
}

// add records that ik was stored at storedMs (ms since the epoch).
func (f *idemFilter) add(ik []byte, storedMs uint64) {
	f.mu.Lock()
	defer f.mu.Unlock()
	g := f.newestGen()
	g.f.Add(ik)
	g.n++
	g.newest = max(g.newest, storedMs)
}

// newestGen returns the generation to add to, starting a new one when the
// newest is full. Called with mu held.
func (f *idemFilter) newestGen() *idemGen {
	var size uint = minIdemGen
	if k := len(f.gens); k > 0 {
		g := f.gens[k-1]
		if g.n < g.cap {
			return g
		}
		size = min(2*g.cap, maxIdemGen)
	}
	g := &idemGen{f: bloom.NewWithEstimates(size, idemFP), cap: size}
	f.gens = append(f.gens, g)
	return g
}

// mayHold reports whether ik may be stored: false means it certainly is
// not (or only expired, which counts as absent).
func (f *idemFilter) mayHold(ik []byte) bool {
	if !f.ready.Load() {
		return true
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	for i := len(f.gens) - 1; i >= 0; i-- {
		if f.gens[i].f.Test(ik) {
			return true
		}
	}
	return false
}

// expire drops the generations whose keys all expired by nowMs, keeping
// the newest (it takes the next keys).
func (f *idemFilter) expire(nowMs uint64) {
	f.mu.Lock()
	defer f.mu.Unlock()
	k := 0
	for k < len(f.gens)-1 && f.gens[k].newest+f.ttlMs <= nowMs {
		k++
	}
	if k > 0 {
		n := copy(f.gens, f.gens[k:])
		clear(f.gens[n:])
		f.gens = f.gens[:n]
	}
}

// bytes is the filter's size (for the log and tests).
func (f *idemFilter) bytes() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	n := 0
	for _, g := range f.gens {
		n += int(g.f.Cap() / 8)
	}
	return n
}

// buildIdemFilter adds the keys stored before Open (both c2c and group
// keys: every epoch's, and the expiry queue of a store of before the
// epochs), then lets the filter answer. An error leaves it answering
// "maybe": correct, only slower.
func (s *Store) buildIdemFilter(ctx context.Context) {
	t0 := time.Now()
	n, err := s.addStoredIdem(ctx)
	if err != nil || ctx.Err() != nil {
		s.log.Warn("idempotency filter not built; every client id is looked up", "err", err)
		return
	}
	s.idem.ready.Store(true)
	s.log.Debug("idempotency filter built", "keys", n, "bytes", s.idem.bytes(), "took", time.Since(t0))
}

func (s *Store) addStoredIdem(ctx context.Context) (int, error) {
	it, err := s.db.NewIter(&pebble.IterOptions{LowerBound: []byte{tagIdemEpoch}, UpperBound: []byte{tagIdemEpoch + 1}})
	if err != nil {
		return 0, err
	}
	n := 0
	for valid := it.First(); valid && ctx.Err() == nil; valid = it.Next() {
		k := it.Key()
		_, stored, ok := decodeIdemValue(it.Value())
		if len(k) <= idemEpochHead || !ok {
			continue
		}
		s.idem.add(k[idemEpochHead:], stored)
		n++
	}
	if err := errors.Join(it.Error(), it.Close()); err != nil || !s.legacyIdem.Load() {
		return n, err
	}
	it, err = s.db.NewIter(&pebble.IterOptions{LowerBound: []byte{tagIdemQueue}, UpperBound: []byte{tagIdemQueue + 1}})
	if err != nil {
		return n, err
	}
	for valid := it.First(); valid && ctx.Err() == nil; valid = it.Next() {
		k := it.Key()
		if len(k) <= idemQueueHead {
			continue
		}
		s.idem.add(k[idemQueueHead:], binary.BigEndian.Uint64(k[1:]))
		n++
	}
	return n, errors.Join(it.Error(), it.Close())
}

// openIdemEpochs reads the idempotency epoch's length (fixing it, a
// quarter of IdempotencyTTL and at least a second, when the store is new)
// and whether keys of a store of before the epochs may be left.
func (s *Store) openIdemEpochs() error {
	v, closer, err := s.db.Get(metaIdemEpoch)
	switch {
	case err == nil:
		if len(v) == 8 {
			s.idemEpochMs = binary.BigEndian.Uint64(v)
		}
		_ = closer.Close()
	case !errors.Is(err, pebble.ErrNotFound):
		return unavailable("open: idempotency epoch", err)
	}
	if s.idemEpochMs == 0 {
		s.idemEpochMs = max(uint64(s.opts.Retention.IdempotencyTTL.Milliseconds())/4, 1000)
		if err := s.db.Set(metaIdemEpoch, binary.BigEndian.AppendUint64(nil, s.idemEpochMs), pebble.Sync); err != nil {
			return unavailable("open: idempotency epoch", err)
		}
	}
	if n := uint64(s.opts.Retention.IdempotencyTTL.Milliseconds()) / s.idemEpochMs; n > 16 {
		// The TTL grew since the store was created: a lookup that misses
		// (a Bloom filter false positive) reads every epoch of the TTL.
		s.log.Warn("idempotency TTL spans many epochs of this store; a missed lookup reads each", "epochs", n+2, "epoch", time.Duration(s.idemEpochMs)*time.Millisecond)
	}
	left, err := s.legacyIdemLeft()
	if err != nil {
		return unavailable("open: idempotency queue", err)
	}
	s.legacyIdem.Store(left)
	return nil
}

// idemEpoch is the epoch of a key stored at ms.
func (s *Store) idemEpoch(ms uint64) uint32 { return uint32(ms / s.idemEpochMs) }

// getIdem reads the idempotency key ik, answering pebble.ErrNotFound from
// the filter when it certainly is not stored. It looks in the epochs that
// may hold it unexpired, newest first (a key stored again after it
// expired, or for another group, is in a newer one than the key it
// replaced), from the one after now's (a key stored by a clock a little
// ahead) down to the epoch of now - IdempotencyTTL: keys in older ones
// all expired, which counts as absent. Then, while any is left, the keys
// of before the epochs.
func (s *Store) getIdem(ik []byte) ([]byte, io.Closer, error) {
	if !s.idem.mayHold(ik) {
		return nil, nil, pebble.ErrNotFound
	}
	now, ttl := s.nowMs(), uint64(s.opts.Retention.IdempotencyTTL.Milliseconds())
	lo := s.idemEpoch(now - min(ttl, now))
	for e := s.idemEpoch(now) + 1; e >= lo; e-- {
		v, closer, err := s.db.Get(idemEpochKey(e, ik))
		if !errors.Is(err, pebble.ErrNotFound) {
			return v, closer, err
		}
		if e == 0 {
			break
		}
	}
	if s.legacyIdem.Load() {
		return s.db.Get(ik)
	}
	return nil, nil, pebble.ErrNotFound
}

// liveIdem returns the msgid stored under the c2c idempotency key ik if
// it has not expired at nowMs; an expired one counts as absent.
func (s *Store) liveIdem(ik []byte, nowMs uint64) (uint64, bool, error) {
	v, closer, err := s.getIdem(ik)
	if errors.Is(err, pebble.ErrNotFound) {
		return 0, false, nil
	}
	if err != nil {
		return 0, false, err
	}
	defer closer.Close()
	msgid, stored, ok := decodeIdemValue(v)
	return msgid, ok && !s.idemExpired(stored, nowMs), nil
}

// legacyIdemLeft reports whether the expiry queue of a store of before
// the epochs holds any row.
func (s *Store) legacyIdemLeft() (bool, error) {
	it, err := s.db.NewIter(&pebble.IterOptions{LowerBound: []byte{tagIdemQueue}, UpperBound: []byte{tagIdemQueue + 1}})
	if err != nil {
		return false, err
	}
	left := it.First()
	return left, it.Close()
}

// putIdem adds to b the idempotency key ik, stored at nowMs with value v.
func (s *Store) putIdem(b *pebble.Batch, ik []byte, nowMs uint64, v []byte) {
	_ = b.Set(idemEpochKey(s.idemEpoch(nowMs), ik), v, nil)
}
