package router_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/imd-dev/imd/router"
)

// TestRedisNodeIDLease: node ids leased in Redis are unique among live
// holders; a held id is refused with its holder; a renewal by a holder
// that lost its lease says so; the ceiling the last holder left is where
// the next one starts.
func TestRedisNodeIDLease(t *testing.T) {
	r, _, _ := newTestRedis(t)
	ctx := context.Background()
	const ttl = 2 * time.Second
	a, err := r.AcquireNodeID(ctx, -1, "a", ttl, 1000, 100)
	if err != nil {
		t.Fatal(err)
	}
	if a.ID != 1023 || a.PrevCeiling != 0 || a.Ceiling != 1000 {
		t.Fatalf("first lease %+v", a)
	}
	b, err := r.AcquireNodeID(ctx, -1, "b", ttl, 1000, 100)
	if err != nil || b.ID != 1022 {
		t.Fatalf("second lease %+v %v", b, err)
	}
	_, err = r.AcquireNodeID(ctx, 1023, "c", ttl, 1000, 100)
	var held *router.NodeIDHeldError
	if !errors.As(err, &held) || held.Holder != "a" || held.ID != 1023 || held.TTL <= 0 || held.TTL > ttl {
		t.Fatalf("static id held by a: %v", err)
	}
	if hi, ok, err := r.RenewNodeID(ctx, 1023, "a", ttl, 5000); err != nil || !ok || hi != 5000 {
		t.Fatalf("renew: %d %v %v", hi, ok, err)
	}
	// the ceiling never goes down
	if hi, ok, err := r.RenewNodeID(ctx, 1023, "a", ttl, 4000); err != nil || !ok || hi != 5000 {
		t.Fatalf("renew lower: %d %v %v", hi, ok, err)
	}
	if _, ok, err := r.RenewNodeID(ctx, 1023, "b", ttl, 6000); err != nil || ok {
		t.Fatalf("renew by a non-holder: %v %v", ok, err)
	}
	// a release leaves the exact last time; the next holder starts above it
	if err := r.ReleaseNodeID(ctx, 1023, "b", 1); err != nil { // not b's: ignored
		t.Fatal(err)
	}
	if err := r.ReleaseNodeID(ctx, 1023, "a", 4321); err != nil {
		t.Fatal(err)
	}
	c, err := r.AcquireNodeID(ctx, 1023, "c", ttl, 1000, 100)
	if err != nil || c.ID != 1023 || c.PrevCeiling != 4321 || c.Ceiling != 4421 {
		t.Fatalf("lease after the release %+v %v", c, err)
	}
	// a lease that lapses is free again, with the ceiling its holder wrote
	if _, err := r.AcquireNodeID(ctx, 7, "d", 50*time.Millisecond, 9000, 100); err != nil {
		t.Fatal(err)
	}
	time.Sleep(120 * time.Millisecond)
	if _, ok, _ := r.RenewNodeID(ctx, 7, "d", ttl, 9000); ok {
		t.Fatal("a lapsed lease renewed")
	}
	e, err := r.AcquireNodeID(ctx, 7, "e", ttl, 1000, 100)
	if err != nil || e.PrevCeiling != 9000 || e.Ceiling != 9100 {
		t.Fatalf("lease after a lapse %+v %v", e, err)
	}
}
