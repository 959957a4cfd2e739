// Package acl holds the black and white lists of the platform: source
// address ranges that are refused at accept (IPBlock) or that bypass the
// rate limits (IPAllow), and uids refused at login per account system
// (UIDBlock). An ACL swaps its compiled lists atomically, so the accept and
// login paths read them without a lock; a nil *ACL, like empty lists,
// blocks and allows nothing.
package acl

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"sync/atomic"
)

// Lists are the lists as configured (`acl:` in the config file) and as the
// admin API reads and writes them (GET/PUT /v1/admin/acl).
type Lists struct {
	// IPBlock are address ranges (CIDR, or a bare address) whose
	// connections are refused at accept with status 2006 (forbidden).
	IPBlock []string `yaml:"ip_block" json:"ip_block"`
	// IPAllow are address ranges whose connections and logins bypass the
	// rate limits. A range in both lists is blocked.
	IPAllow []string `yaml:"ip_allow" json:"ip_allow"`
	// UIDBlock are uids refused at login (2006), per account system.
	UIDBlock []UIDBlock `yaml:"uid_block" json:"uid_block"`
}

// UIDBlock lists blocked uids of one account system.
type UIDBlock struct {
	Account uint32   `yaml:"account" json:"account"`
	UIDs    []uint64 `yaml:"uids" json:"uids"`
}

// User is a uid of an account system.
type User struct {
	Account uint32
	UID     uint64
}

// Empty reports whether the lists hold nothing.
func (l Lists) Empty() bool {
	if len(l.IPBlock) > 0 || len(l.IPAllow) > 0 {
		return false
	}
	for _, b := range l.UIDBlock {
		if len(b.UIDs) > 0 {
			return false
		}
	}
	return true
}

type compiled struct {
	lists Lists // normalized
	block []netip.Prefix
	allow []netip.Prefix
	uids  map[User]struct{}
}

// ParsePrefix reads a CIDR range or a bare address (a /32 or /128). An
// IPv4-mapped IPv6 range is read as its IPv4 range.
func ParsePrefix(s string) (netip.Prefix, error) {
	s = strings.TrimSpace(s)
	if !strings.Contains(s, "/") {
		a, err := netip.ParseAddr(s)
		if err != nil {
			return netip.Prefix{}, fmt.Errorf("acl: %q is neither an address nor a CIDR range", s)
		}
		a = a.Unmap().WithZone("")
		return netip.PrefixFrom(a, a.BitLen()), nil
	}
	p, err := netip.ParsePrefix(s)
	if err != nil {
		return netip.Prefix{}, fmt.Errorf("acl: %q is not a CIDR range: %v", s, err)
	}
	if a := p.Addr(); a.Is4In6() && p.Bits() >= 96 {
		p = netip.PrefixFrom(a.Unmap(), p.Bits()-96)
	}
	return p.Masked(), nil
}

func prefixes(list []string) ([]netip.Prefix, []string, error) {
	ps := []netip.Prefix{}
	for _, s := range list {
		p, err := ParsePrefix(s)
		if err != nil {
			return nil, nil, err
		}
		if !slices.Contains(ps, p) {
			ps = append(ps, p)
		}
	}
	slices.SortFunc(ps, func(a, b netip.Prefix) int {
		if c := a.Addr().Compare(b.Addr()); c != 0 {
			return c
		}
		return a.Bits() - b.Bits()
	})
	strs := make([]string, len(ps))
	for i, p := range ps {
		strs[i] = p.String()
	}
	return ps, strs, nil
}

func compile(l Lists) (*compiled, error) {
	c := &compiled{uids: map[User]struct{}{}, lists: Lists{UIDBlock: []UIDBlock{}}}
	var err error
	if c.block, c.lists.IPBlock, err = prefixes(l.IPBlock); err != nil {
		return nil, err
	}
	if c.allow, c.lists.IPAllow, err = prefixes(l.IPAllow); err != nil {
		return nil, err
	}
	byAccount := map[uint32][]uint64{}
	for _, b := range l.UIDBlock {
		for _, uid := range b.UIDs {
			if uid == 0 {
				return nil, fmt.Errorf("acl: uid 0 in the uid_block of account %d", b.Account)
			}
			u := User{b.Account, uid}
			if _, dup := c.uids[u]; !dup {
				c.uids[u] = struct{}{}
				byAccount[b.Account] = append(byAccount[b.Account], uid)
			}
		}
	}
	for acct, uids := range byAccount {
		slices.Sort(uids)
		c.lists.UIDBlock = append(c.lists.UIDBlock, UIDBlock{Account: acct, UIDs: uids})
	}
	slices.SortFunc(c.lists.UIDBlock, func(a, b UIDBlock) int { return int(a.Account) - int(b.Account) })
	return c, nil
}

// Validate reports whether l can be applied.
func (l Lists) Validate() error {
	_, err := compile(l)
	return err
}

// ACL holds the lists in force. Its methods are safe for concurrent use.
type ACL struct {
	cur atomic.Pointer[compiled]
}

// New returns an ACL holding l.
func New(l Lists) (*ACL, error) {
	c, err := compile(l)
	if err != nil {
		return nil, err
	}
	a := &ACL{}
	a.cur.Store(c)
	return a, nil
}

// Set replaces the lists with l, or returns an error and changes nothing.
// It returns the users that l blocks and the previous lists did not.
func (a *ACL) Set(l Lists) ([]User, error) {
	c, err := compile(l)
	if err != nil {
		return nil, err
	}
	old := a.cur.Swap(c)
	var added []User
	for u := range c.uids {
		if old == nil {
			added = append(added, u)
		} else if _, was := old.uids[u]; !was {
			added = append(added, u)
		}
	}
	slices.SortFunc(added, func(x, y User) int {
		if x.Account != y.Account {
			return int(x.Account) - int(y.Account)
		}
		switch {
		case x.UID < y.UID:
			return -1
		case x.UID > y.UID:
			return 1
		}
		return 0
	})
	return added, nil
}

// Lists returns the lists in force, normalized: ranges masked, sorted and
// without duplicates, uids grouped by account and sorted.
func (a *ACL) Lists() Lists {
	if a == nil {
		return Lists{IPBlock: []string{}, IPAllow: []string{}, UIDBlock: []UIDBlock{}}
	}
	if c := a.cur.Load(); c != nil {
		return c.lists
	}
	return Lists{IPBlock: []string{}, IPAllow: []string{}, UIDBlock: []UIDBlock{}}
}

func (a *ACL) load() *compiled {
	if a == nil {
		return nil
	}
	return a.cur.Load()
}

func contains(ps []netip.Prefix, addr netip.Addr) bool {
	if len(ps) == 0 || !addr.IsValid() {
		return false
	}
	addr = addr.Unmap().WithZone("")
	for _, p := range ps {
		if p.Contains(addr) {
			return true
		}
	}
	return false
}

// BlockedIP reports whether connections from addr are refused.
func (a *ACL) BlockedIP(addr netip.Addr) bool {
	c := a.load()
	return c != nil && contains(c.block, addr)
}

// AllowedIP reports whether addr bypasses the rate limits: it is in an
// IPAllow range and in no IPBlock range.
func (a *ACL) AllowedIP(addr netip.Addr) bool {
	c := a.load()
	return c != nil && contains(c.allow, addr) && !contains(c.block, addr)
}

// HasAllow reports whether any range is allowed: callers read a source
// address (a system call on some paths) only then.
func (a *ACL) HasAllow() bool {
	c := a.load()
	return c != nil && len(c.allow) > 0
}

// BlockedUID reports whether uid of account may not log in.
func (a *ACL) BlockedUID(account uint32, uid uint64) bool {
	c := a.load()
	if c == nil || len(c.uids) == 0 {
		return false
	}
	_, ok := c.uids[User{account, uid}]
	return ok
}
