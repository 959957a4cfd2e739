package ratelimit

import (
	"flag"
	"net/netip"
	"testing"
	"time"
)

func TestKeyedAllowsTheBurstThenRefills(t *testing.T) {
	k := NewKeyed[string](Rate{Rate: 10, Burst: 3})
	now := time.Now()
	for i := range 3 {
		if !k.Allow("a", now) {
			t.Fatalf("take %d refused within the burst", i)
		}
	}
	if k.Allow("a", now) {
		t.Fatal("a fourth take within the same instant was allowed")
	}
	if !k.Allow("b", now) {
		t.Fatal("another key was refused")
	}
	if !k.Allow("a", now.Add(100*time.Millisecond)) {
		t.Fatal("no token after a tenth of a second at 10/s")
	}
}

func TestKeyedFailShutsOut(t *testing.T) {
	k := NewKeyed[string](Rate{Rate: 1, Burst: 2})
	now := time.Now()
	for i := range 2 {
		if k.Fail("ip", now, time.Minute) {
			t.Fatalf("shut out at failure %d, within the two allowed", i+1)
		}
	}
	if !k.Fail("ip", now, time.Minute) {
		t.Fatal("the third failure did not shut the key out")
	}
	if d := k.ShutOut("ip", now.Add(time.Second)); d != 59*time.Second {
		t.Fatalf("shut out for %s more, want 59s", d)
	}
	if k.Allow("ip", now.Add(30*time.Second)) {
		t.Fatal("allowed while shut out")
	}
	if !k.Allow("ip", now.Add(61*time.Second)) {
		t.Fatal("still refused after the lockout")
	}
}

func TestKeyedSweepsIdleKeys(t *testing.T) {
	k := NewKeyed[int](Rate{Rate: 100})
	now := time.Now()
	for i := range 100 {
		k.Allow(i, now)
	}
	k.Allow(0, now.Add(2*time.Minute))
	if n := k.Len(); n != 1 {
		t.Fatalf("%d keys after the sweep, want 1", n)
	}
}

func TestOffIsNil(t *testing.T) {
	var k *Keyed[int] = NewKeyed[int](Rate{})
	if k != nil || !k.Allow(1, time.Now()) || k.Fail(1, time.Now(), time.Hour) || (Rate{}).Limiter() != nil {
		t.Fatal("a zero rate is not off")
	}
}

func TestRateFlag(t *testing.T) {
	var r Rate
	fs := flag.NewFlagSet("t", flag.ContinueOnError)
	fs.Var(&r, "r", "")
	if err := fs.Parse([]string{"-r", "2.5:10"}); err != nil || r != (Rate{Rate: 2.5, Burst: 10}) || r.String() != "2.5:10" {
		t.Fatalf("parsed %+v, %v", r, err)
	}
	if err := r.Set("-1"); err == nil {
		t.Fatal("a negative rate was accepted")
	}
	if r.Set("7") != nil || r.Size() != 7 {
		t.Fatalf("%+v: size %d, want 7", r, r.Size())
	}
}

func TestSource(t *testing.T) {
	a := Source(netip.MustParseAddr("2001:db8:1:2:3:4:5:6"))
	b := Source(netip.MustParseAddr("2001:db8:1:2:ffff::1"))
	if a != b || a != netip.MustParseAddr("2001:db8:1:2::") {
		t.Fatalf("%s and %s: one /64 keyed apart", a, b)
	}
	if s := Source(netip.MustParseAddr("::ffff:10.0.0.1")); s != netip.MustParseAddr("10.0.0.1") {
		t.Fatalf("mapped address keyed as %s", s)
	}
}
