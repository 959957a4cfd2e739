// Package ratelimit holds the token buckets that imd's rate limits share:
// Rate, the shape of one bucket as configured, and Keyed, a bucket per key
// (a source address, a user, an app) that can also shut a key out for a
// while. Every bucket is a golang.org/x/time/rate.Limiter.
package ratelimit

import (
	"fmt"
	"math"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/time/rate"
)

// Rate is the shape of a token bucket: Rate tokens a second, at most Burst
// at once. A Rate of 0 (the zero value) turns the limit off. A Burst of 0
// is Rate rounded up, and at least 1.
type Rate struct {
	Rate  float64 `yaml:"rate"`
	Burst int     `yaml:"burst"`
}

// On reports whether the limit is on.
func (r Rate) On() bool { return r.Rate > 0 }

// Size returns the bucket's size with the default applied.
func (r Rate) Size() int {
	if r.Burst > 0 {
		return r.Burst
	}
	return max(1, int(math.Ceil(r.Rate)))
}

// Limiter returns a full bucket of this shape, or nil when the limit is off.
func (r Rate) Limiter() *rate.Limiter {
	if !r.On() {
		return nil
	}
	return rate.NewLimiter(rate.Limit(r.Rate), r.Size())
}

// String formats r as Set reads it: "RATE" or "RATE:BURST", "0" when off.
func (r *Rate) String() string {
	if r == nil || !r.On() {
		return "0"
	}
	s := strconv.FormatFloat(r.Rate, 'g', -1, 64)
	if r.Burst > 0 {
		s += ":" + strconv.Itoa(r.Burst)
	}
	return s
}

// Set parses "RATE" or "RATE:BURST" (tokens a second, bucket size), so that
// a Rate is a flag.Value.
func (r *Rate) Set(s string) error {
	rs, bs, hasBurst := strings.Cut(strings.TrimSpace(s), ":")
	v, err := strconv.ParseFloat(rs, 64)
	if err != nil || v < 0 || math.IsInf(v, 0) || math.IsNaN(v) {
		return fmt.Errorf("rate %q: want RATE or RATE:BURST with RATE >= 0", s)
	}
	b := 0
	if hasBurst {
		if b, err = strconv.Atoi(bs); err != nil || b < 0 {
			return fmt.Errorf("rate %q: the burst must be an integer >= 0", s)
		}
	}
	r.Rate, r.Burst = v, b
	return nil
}

// Validate reports a negative rate or burst.
func (r Rate) Validate(name string) error {
	if r.Rate < 0 || r.Burst < 0 || math.IsNaN(r.Rate) {
		return fmt.Errorf("%s: rate and burst must be >= 0", name)
	}
	return nil
}

// Keyed is a token bucket per key. Buckets idle long enough to have
// refilled are dropped, so memory follows the keys active now. A nil
// *Keyed is a limit that is off: it allows everything. It is safe for
// concurrent use.
type Keyed[K comparable] struct {
	r       Rate
	idle    time.Duration // how long an untouched bucket is kept
	mu      sync.Mutex
	m       map[K]*entry
	sweptAt time.Time
}

type entry struct {
	l     *rate.Limiter
	used  time.Time
	until time.Time // the key is shut out until then (Fail)
}

// NewKeyed returns a bucket per key of shape r, or nil when r is off.
func NewKeyed[K comparable](r Rate) *Keyed[K] {
	if !r.On() {
		return nil
	}
	refill := time.Duration(float64(r.Size()) / r.Rate * float64(time.Second))
	return &Keyed[K]{r: r, idle: max(time.Minute, refill), m: make(map[K]*entry)}
}

// Rate returns the shape of the buckets.
func (k *Keyed[K]) Rate() Rate {
	if k == nil {
		return Rate{}
	}
	return k.r
}

// get returns key's entry, creating a full bucket; it is called with k.mu
// held and sweeps idle entries once a minute.
func (k *Keyed[K]) get(key K, now time.Time) *entry {
	if now.Sub(k.sweptAt) > time.Minute {
		for kk, e := range k.m {
			if now.Sub(e.used) > k.idle && !now.Before(e.until) {
				delete(k.m, kk)
			}
		}
		k.sweptAt = now
	}
	e := k.m[key]
	if e == nil {
		e = &entry{l: rate.NewLimiter(rate.Limit(k.r.Rate), k.r.Size())}
		k.m[key] = e
	}
	e.used = now
	return e
}

// Allow takes a token of key's bucket and reports whether there was one.
// A key that Fail has shut out is refused until its time is up.
func (k *Keyed[K]) Allow(key K, now time.Time) bool {
	if k == nil {
		return true
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	e := k.get(key, now)
	if now.Before(e.until) {
		return false
	}
	return e.l.AllowN(now, 1)
}

// ShutOut reports how much longer key is shut out by Fail; 0 when it is
// not.
func (k *Keyed[K]) ShutOut(key K, now time.Time) time.Duration {
	if k == nil {
		return 0
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	e := k.m[key]
	if e == nil || !now.Before(e.until) {
		return 0
	}
	return e.until.Sub(now)
}

// Fail counts a failure against key: it takes a token, and when the bucket
// is empty it shuts key out for d (Allow and ShutOut see it) and reports
// true.
func (k *Keyed[K]) Fail(key K, now time.Time, d time.Duration) bool {
	if k == nil {
		return false
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	e := k.get(key, now)
	if e.l.AllowN(now, 1) {
		return false
	}
	e.until = now.Add(d)
	return true
}

// Len returns the number of keys with a bucket.
func (k *Keyed[K]) Len() int {
	if k == nil {
		return 0
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	return len(k.m)
}

// Source returns the key a source address is limited under: an IPv4
// address (a mapped one unmapped) is its own key, an IPv6 address is keyed
// by its /64, the least a single host or site is usually given, so that one
// cannot dodge a per-address limit by walking its own prefix. An invalid
// address is returned as it is.
func Source(a netip.Addr) netip.Addr {
	a = a.Unmap()
	if a.Is6() {
		p, err := a.Prefix(64)
		if err == nil {
			return p.Addr()
		}
	}
	return a
}
