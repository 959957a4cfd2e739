package platform

import (
	"net"
	"reflect"
	"testing"
	"time"

	"github.com/imd-dev/imd/internal/acl"
	"github.com/imd-dev/imd/internal/config"
	"github.com/imd-dev/imd/internal/ratelimit"
	"github.com/imd-dev/imd/schema"
	"github.com/imd-dev/imd/schema/pb"
	"github.com/imd-dev/imd/sdk"
	"google.golang.org/protobuf/proto"
)

const testAdminKey = "test-admin-key-0123456789abcdef"

// dialRawFrom is dialRaw from a given loopback source address.
func dialRawFrom(t *testing.T, src, addr string) *raw {
	t.Helper()
	d := net.Dialer{Timeout: 5 * time.Second, LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}}
	nc, err := d.Dial("tcp", addr)
	if err != nil {
		t.Fatalf("dial raw from %s: %v", src, err)
	}
	t.Cleanup(func() { _ = nc.Close() })
	return &raw{t: t, nc: nc, dec: schema.NewDecoder(nc, 1<<20)}
}

// TestACLBlockedIPRefusedAtAccept: a connection from a blocked range gets
// one 2006 error frame and is closed; 127.0.0.1 still connects and logs in.
func TestACLBlockedIPRefusedAtAccept(t *testing.T) {
	p := start(t, func(c *config.Config) { c.ACL.IPBlock = []string{"127.0.0.2/32"} })
	r := dialRawFrom(t, "127.0.0.2", p.GatewayAddr())
	r.readError(schema.StatusForbidden)
	r.expectClosed(2 * time.Second)
	dialRawFrom(t, "127.0.0.1", p.GatewayAddr()).login(101, 731, 1)
	if n := metricValue(t, p.Registry, "imd_gateway_rejected_total", "status", schema.StatusForbidden.String()); n != 1 {
		t.Fatalf("imd_gateway_rejected_total{forbidden} = %v, want 1", n)
	}
}

// TestACLAllowedRangeBypassesRateLimits: with one new connection a source
// address allowed, 127.0.0.1 (allowed) opens many while 127.0.0.2 is
// refused its second.
func TestACLAllowedRangeBypassesRateLimits(t *testing.T) {
	p := start(t, func(c *config.Config) {
		c.Limits.Gateway.ConnsPerIP = ratelimit.Rate{Rate: 0.01, Burst: 1}
		c.Limits.Gateway.LoginsPerIP = ratelimit.Rate{Rate: 0.01, Burst: 1}
		c.ACL.IPAllow = []string{"127.0.0.1"}
	})
	for i := range 4 {
		dialRawFrom(t, "127.0.0.1", p.GatewayAddr()).login(101, 741+uint64(i), 1)
	}
	dialRawFrom(t, "127.0.0.2", p.GatewayAddr()).login(101, 751, 1)
	r := dialRawFrom(t, "127.0.0.2", p.GatewayAddr())
	r.readError(schema.StatusRateLimited)
	r.expectClosed(2 * time.Second)
}

// TestACLAdminBlocksUID: a uid blocked at run time through the admin API
// is kicked with KICK_REASON_ADMIN and its next login refused with 2006;
// other users and accounts are untouched, and unblocking lets it in again.
// The admin API refuses app keys and no key.
func TestACLAdminBlocksUID(t *testing.T) {
	p := start(t, func(c *config.Config) { c.Admin.APIKey = testAdminKey })
	var got acl.Lists
	if code := api(t, p, "GET", "/v1/admin/acl", testAdminKey, nil, &got); code != 200 || !got.Empty() {
		t.Fatalf("GET /v1/admin/acl: %d %+v, want 200 and empty lists", code, got)
	}
	for _, key := range []string{testAPIKey, ""} {
		if code := api(t, p, "GET", "/v1/admin/acl", key, nil, nil); code != 401 {
			t.Fatalf("GET /v1/admin/acl with key %q: %d, want 401", key, code)
		}
		if code := api(t, p, "PUT", "/v1/admin/acl", key, acl.Lists{IPBlock: []string{"10.0.0.0/8"}}, nil); code != 401 {
			t.Fatalf("PUT /v1/admin/acl with key %q: %d, want 401", key, code)
		}
	}
	if code := api(t, p, "PUT", "/v1/admin/acl", testAdminKey, acl.Lists{IPBlock: []string{"not-an-ip"}}, nil); code != 400 {
		t.Fatalf("PUT of a bad range: %d, want 400", code)
	}

	victim := dialRaw(t, p.GatewayAddr())
	victim.login(101, 761, 1)
	login(t, p, 101, 762, nil)
	login(t, p, 201, 761, nil) // the same uid in another account

	put := acl.Lists{UIDBlock: []acl.UIDBlock{{Account: 1, UIDs: []uint64{761}}}}
	if code := api(t, p, "PUT", "/v1/admin/acl", testAdminKey, put, &got); code != 200 ||
		!reflect.DeepEqual(got.UIDBlock, put.UIDBlock) {
		t.Fatalf("PUT /v1/admin/acl: %d %+v", code, got)
	}
	for {
		h, body := victim.read()
		if h.Cmd != schema.CmdKickout {
			continue
		}
		var k pb.Kickout
		if err := proto.Unmarshal(body, &k); err != nil {
			t.Fatal(err)
		}
		if k.Reason != pb.KickReason_KICK_REASON_ADMIN {
			t.Fatalf("kickout reason %s, want KICK_REASON_ADMIN", k.Reason)
		}
		break
	}
	victim.expectClosed(2 * time.Second)

	r := dialRaw(t, p.GatewayAddr())
	r.send(schema.Header{Cmd: schema.CmdLogin, AppCode: 102, UID: 761, Seq: 1}, &pb.LoginRequest{Token: token(102, 761)})
	r.readError(schema.StatusForbidden)
	r.expectClosed(2 * time.Second)

	// The others kept their sessions.
	if len(sessions(t, p, 1, 762)) != 1 || len(sessions(t, p, 2, 761)) != 1 {
		t.Fatal("a user that is not blocked lost its session")
	}

	if code := api(t, p, "PUT", "/v1/admin/acl", testAdminKey, acl.Lists{}, nil); code != 200 {
		t.Fatalf("PUT of empty lists: %d", code)
	}
	dialRaw(t, p.GatewayAddr()).login(101, 761, 1)
}

// TestACLAdminOff: without admin.api_key the admin API is off, whatever key.
func TestACLAdminOff(t *testing.T) {
	p := start(t, nil)
	if code := api(t, p, "GET", "/v1/admin/acl", testAPIKey, nil, nil); code != 404 {
		t.Fatalf("GET /v1/admin/acl with no admin key configured: %d, want 404", code)
	}
}

// TestClusterACLSharedThroughRedis: lists PUT on node a apply on node b
// within a few seconds: b's gateway refuses the blocked address and b's
// logic kicks and refuses the blocked uid.
func TestClusterACLSharedThroughRedis(t *testing.T) {
	fast := fastRedisCluster(needRedis(t))
	a := startNode(t, RoleAll, func(c *config.Config) { fast(c); c.Admin.APIKey = testAdminKey })
	b := startNode(t, RoleAll, func(c *config.Config) { fast(c); c.NodeID = 2 })
	eventually(t, 5*time.Second, "each node's gateway to link to the other's logic", func() bool {
		return a.rpcClient.Links() == 1 && b.rpcClient.Links() == 1
	})
	kicked := make(chan *pb.Kickout, 1)
	login(t, b, 101, 771, func(o *sdk.Options) { o.OnKickout = func(k *pb.Kickout) { kicked <- k } })

	put := acl.Lists{IPBlock: []string{"127.0.0.2"}, UIDBlock: []acl.UIDBlock{{Account: 1, UIDs: []uint64{771}}}}
	if code := api(t, a, "PUT", "/v1/admin/acl", testAdminKey, put, nil); code != 200 {
		t.Fatalf("PUT /v1/admin/acl on node a: %d", code)
	}
	select {
	case k := <-kicked:
		if k.Reason != pb.KickReason_KICK_REASON_ADMIN {
			t.Fatalf("kickout reason %s", k.Reason)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the blocked uid on node b was not kicked")
	}
	eventually(t, 5*time.Second, "node b to apply the lists", func() bool {
		return b.acl.BlockedUID(1, 771) && len(b.acl.Lists().IPBlock) == 1
	})
	r := dialRawFrom(t, "127.0.0.2", b.GatewayAddr())
	r.readError(schema.StatusForbidden)
	r.expectClosed(2 * time.Second)
	r = dialRaw(t, b.GatewayAddr())
	r.send(schema.Header{Cmd: schema.CmdLogin, AppCode: 101, UID: 771, Seq: 1}, &pb.LoginRequest{Token: token(101, 771)})
	r.readError(schema.StatusForbidden)

	// A node that starts later takes the lists from Redis, not its config.
	c := startNode(t, RoleAll, func(c *config.Config) { fast(c); c.NodeID = 3 })
	if !c.acl.BlockedUID(1, 771) {
		t.Fatal("a node started after the change does not block the uid")
	}
}
