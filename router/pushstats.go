package router

import (
	"context"
	"fmt"
	"strconv"
	"sync"
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
	Settle(ctx context.Context, id uint64, online, stored, dropped int) error
	// Acked counts one arrival for each id whose record is kept and
	// returns how many it counted.
	Acked(ctx context.Context, ids []uint64) (int, error)
	// Get returns the record of id, if it is still kept.
	Get(ctx context.Context, id uint64) (PushRecord, bool, error)
}

var (
	_ PushLedger = (*MemoryLedger)(nil)
	_ PushLedger = (*Redis)(nil)
)

// MemoryLedger is a PushLedger in this process's memory.
type MemoryLedger struct {
	mu    sync.Mutex
	m     map[uint64]*memRecord
	order []uint64 // creation order, for expiry
}

type memRecord struct {
	PushRecord
	expires time.Time
}

// Open implements PushLedger; it also forgets expired records.
func (l *MemoryLedger) Open(_ context.Context, rec PushRecord, ttl time.Duration) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.m == nil {
		l.m = make(map[uint64]*memRecord)
	}
	now := time.Now()
	i := 0
	for ; i < len(l.order); i++ {
		if old := l.m[l.order[i]]; old != nil && old.expires.After(now) {
			break
		}
		delete(l.m, l.order[i])
	}
	l.order = append(l.order[i:], rec.PushID)
	l.m[rec.PushID] = &memRecord{PushRecord: rec, expires: now.Add(ttl)}
	return nil
}

func (l *MemoryLedger) live(id uint64) *memRecord {
	r := l.m[id]
	if r == nil || !r.expires.After(time.Now()) {
		return nil
	}
	return r
}

// Settle implements PushLedger.
func (l *MemoryLedger) Settle(_ context.Context, id uint64, online, stored, dropped int) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if r := l.live(id); r != nil {
		r.Online, r.Stored, r.Dropped = online, stored, dropped
	}
	return nil
}

// Acked implements PushLedger.
func (l *MemoryLedger) Acked(_ context.Context, ids []uint64) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	n := 0
	for _, id := range ids {
		if r := l.live(id); r != nil {
			r.Acked++
			n++
		}
	}
	return n, nil
}

// Get implements PushLedger.
func (l *MemoryLedger) Get(_ context.Context, id uint64) (PushRecord, bool, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if r := l.live(id); r != nil {
		return r.PushRecord, true, nil
	}
	return PushRecord{}, false, nil
}

// Push records in Redis:
//
//	P p:{<push id>}  hash: app, created, recipients, online, stored,
//	                 dropped, acked; expires with the record's ttl
//
// Each record has its own slot; an ack of several pushes is one pipelined
// script call per push.

func (r *Redis) pushKey(id uint64) string {
	return r.prefix + "p:{" + strconv.FormatUint(id, 10) + "}"
}

// pushOpenScript: HSET KEYS[1] the record's fields; PEXPIRE ARGV[1].
var pushOpenScript = rueidis.NewLuaScript(`
redis.call('HSET', KEYS[1], 'app', ARGV[2], 'created', ARGV[3], 'recipients', ARGV[4],
  'online', 0, 'stored', 0, 'dropped', 0, 'acked', 0)
return redis.call('PEXPIRE', KEYS[1], ARGV[1])
`)

// pushSettleScript sets the outcome of an existing record only: a record
// that expired is not brought back without its TTL.
var pushSettleScript = rueidis.NewLuaScript(`
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'online', ARGV[1], 'stored', ARGV[2], 'dropped', ARGV[3])
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
		strconv.FormatInt(rec.CreatedMS, 10), strconv.Itoa(rec.Recipients),
	}).Error()
	if err != nil {
		return fmt.Errorf("router: redis push record %d: %w", rec.PushID, err)
	}
	return nil
}

// Settle implements PushLedger.
func (r *Redis) Settle(ctx context.Context, id uint64, online, stored, dropped int) error {
	err := pushSettleScript.Exec(ctx, r.c, []string{r.pushKey(id)}, []string{
		strconv.Itoa(online), strconv.Itoa(stored), strconv.Itoa(dropped),
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
		Dropped: int(num("dropped")), Acked: int(num("acked")),
	}, true, nil
}
