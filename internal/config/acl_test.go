package config

import (
	"reflect"
	"testing"

	"github.com/imd-dev/imd/internal/acl"
)

// TestACLConfig: the acl and admin sections load from the file, and the
// admin key from IMD_ADMIN_API_KEY.
func TestACLConfig(t *testing.T) {
	path := writeFile(t, "acl:\n  ip_block: [203.0.113.0/24]\n  ip_allow: [10.0.0.0/8, 127.0.0.1]\n  uid_block:\n    - {account: 1, uids: [5, 6]}\n")
	c, err := load(t, []string{"--config", path}, map[string]string{"IMD_ADMIN_API_KEY": "k-0123456789"})
	if err != nil {
		t.Fatal(err)
	}
	want := acl.Lists{IPBlock: []string{"203.0.113.0/24"}, IPAllow: []string{"10.0.0.0/8", "127.0.0.1"},
		UIDBlock: []acl.UIDBlock{{Account: 1, UIDs: []uint64{5, 6}}}}
	if !reflect.DeepEqual(c.ACL, want) || c.Admin.APIKey != "k-0123456789" {
		t.Fatalf("acl %+v, admin %+v", c.ACL, c.Admin)
	}
	if d, err := load(t, nil, nil); err != nil || !d.ACL.Empty() || d.Admin.APIKey != "" {
		t.Fatalf("default acl %+v admin %+v (%v), want empty", d.ACL, d.Admin, err)
	}
}
