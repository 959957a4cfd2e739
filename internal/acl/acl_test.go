package acl

import (
	"net/netip"
	"reflect"
	"testing"
)

func TestACLIPLists(t *testing.T) {
	a, err := New(Lists{
		IPBlock: []string{"10.1.0.0/16", "192.0.2.7", "2001:db8::/32", "::ffff:198.51.100.0/120"},
		IPAllow: []string{"10.0.0.0/8", "127.0.0.1"},
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		addr           string
		blocked, allow bool
	}{
		{"10.1.2.3", true, false}, // in both: blocked wins
		{"10.2.3.4", false, true},
		{"::ffff:10.2.3.4", false, true}, // IPv4-mapped
		{"192.0.2.7", true, false},
		{"192.0.2.8", false, false},
		{"2001:db8:1::1", true, false},
		{"2001:db9::1", false, false},
		{"198.51.100.9", true, false},
		{"127.0.0.1", false, true},
		{"127.0.0.2", false, false},
	} {
		addr := netip.MustParseAddr(tc.addr)
		if got := a.BlockedIP(addr); got != tc.blocked {
			t.Errorf("BlockedIP(%s) = %v", tc.addr, got)
		}
		if got := a.AllowedIP(addr); got != tc.allow {
			t.Errorf("AllowedIP(%s) = %v", tc.addr, got)
		}
	}
	if a.BlockedIP(netip.Addr{}) || a.AllowedIP(netip.Addr{}) {
		t.Error("the zero Addr matched")
	}
	if !a.HasAllow() {
		t.Error("HasAllow = false")
	}
}

func TestACLNilAndEmpty(t *testing.T) {
	var a *ACL
	addr := netip.MustParseAddr("1.2.3.4")
	if a.BlockedIP(addr) || a.AllowedIP(addr) || a.HasAllow() || a.BlockedUID(1, 1) || !a.Lists().Empty() {
		t.Error("a nil ACL blocks or allows")
	}
	e, err := New(Lists{})
	if err != nil {
		t.Fatal(err)
	}
	if e.BlockedIP(addr) || e.AllowedIP(addr) || e.HasAllow() || e.BlockedUID(1, 1) || !e.Lists().Empty() {
		t.Error("empty lists block or allow")
	}
}

func TestACLUIDsAndSet(t *testing.T) {
	a, err := New(Lists{UIDBlock: []UIDBlock{{Account: 1, UIDs: []uint64{5, 3, 5}}}})
	if err != nil {
		t.Fatal(err)
	}
	if !a.BlockedUID(1, 3) || !a.BlockedUID(1, 5) || a.BlockedUID(2, 3) || a.BlockedUID(1, 4) {
		t.Error("BlockedUID wrong")
	}
	added, err := a.Set(Lists{UIDBlock: []UIDBlock{{Account: 2, UIDs: []uint64{9}}, {Account: 1, UIDs: []uint64{3, 4}}}})
	if err != nil {
		t.Fatal(err)
	}
	if want := []User{{1, 4}, {2, 9}}; !reflect.DeepEqual(added, want) {
		t.Errorf("added = %v, want %v", added, want)
	}
	if a.BlockedUID(1, 5) || !a.BlockedUID(1, 4) || !a.BlockedUID(2, 9) {
		t.Error("Set did not replace the lists")
	}
	want := Lists{IPBlock: []string{}, IPAllow: []string{}, UIDBlock: []UIDBlock{{Account: 1, UIDs: []uint64{3, 4}}, {Account: 2, UIDs: []uint64{9}}}}
	if got := a.Lists(); !reflect.DeepEqual(got, want) {
		t.Errorf("Lists = %+v, want %+v", got, want)
	}
}

func TestACLInvalidKeepsLists(t *testing.T) {
	a, err := New(Lists{IPBlock: []string{"192.0.2.0/24"}})
	if err != nil {
		t.Fatal(err)
	}
	for _, bad := range []Lists{
		{IPBlock: []string{"not-an-ip"}},
		{IPAllow: []string{"10.0.0.0/33"}},
		{UIDBlock: []UIDBlock{{Account: 1, UIDs: []uint64{0}}}},
	} {
		if _, err := a.Set(bad); err == nil {
			t.Errorf("Set(%+v) accepted", bad)
		}
		if err := bad.Validate(); err == nil {
			t.Errorf("Validate(%+v) = nil", bad)
		}
	}
	if !a.BlockedIP(netip.MustParseAddr("192.0.2.1")) {
		t.Error("a refused Set changed the lists")
	}
	if got := a.Lists().IPBlock; !reflect.DeepEqual(got, []string{"192.0.2.0/24"}) {
		t.Errorf("IPBlock = %v", got)
	}
	p, err := ParsePrefix("10.9.8.7/8")
	if err != nil || p.String() != "10.0.0.0/8" {
		t.Errorf("ParsePrefix masks: %v %v", p, err)
	}
}
