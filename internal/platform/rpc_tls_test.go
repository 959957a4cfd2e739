package platform

import (
	"context"
	"crypto/tls"
	"testing"
	"time"

	"github.com/imd-dev/imd/internal/config"
	"github.com/imd-dev/imd/internal/rpc"
	"github.com/imd-dev/imd/internal/testcert"
)

// rpcMTLS puts a node's internal RPC under mutual TLS with a certificate
// ca signs for it and ca as the trusted CA.
func rpcMTLS(t *testing.T, ca *testcert.CA, name string, serial int64) func(*config.Config) {
	dir := t.TempDir()
	cert, key := ca.IssueNode(t, dir, name, serial)
	caFile := ca.WriteCA(t, dir, "ca.crt")
	return func(c *config.Config) {
		c.Cluster.RPCTLSCert, c.Cluster.RPCTLSKey, c.Cluster.RPCTLSCA = cert, key, caFile
	}
}

// TestClusterRPCMutualTLS: a logic node and two gateways whose internal
// RPC runs over mutual TLS (and the HMAC hello) chat across gateways;
// a gateway with no client certificate, with one from another CA, or
// with no TLS at all cannot link to the logic node.
func TestClusterRPCMutualTLS(t *testing.T) {
	ca := testcert.NewCA(t, "imd cluster CA")
	const secret = "cluster secret"
	lg := startNode(t, RoleLogic, func(c *config.Config) {
		rpcMTLS(t, ca, "logic", 2)(c)
		c.Cluster.Secret = secret
	})
	gw := func(name string, serial int64) *Platform {
		return startNode(t, RoleGateway, func(c *config.Config) {
			rpcMTLS(t, ca, name, serial)(c)
			c.Cluster.Secret = secret
			c.Cluster.LogicAddrs = []string{lg.RPCAddr()}
		})
	}
	g1, g2 := gw("gate1", 3), gw("gate2", 4)
	clusterChat(t, lg, g1, g2)
	if n := lg.rpcServer.Gateways(); n != 2 {
		t.Fatalf("logic node has %d gateway links, want 2", n)
	}
	if code := api(t, g1, "GET", "/readyz", "", nil, nil); code != 200 {
		t.Fatalf("gateway /readyz: %d", code)
	}

	other := testcert.NewCA(t, "another CA")
	_, otherCli, err := rpc.MutualTLS(tlsFiles(t, other))
	if err != nil {
		t.Fatal(err)
	}
	_, goodCli, err := rpc.MutualTLS(tlsFiles(t, ca))
	if err != nil {
		t.Fatal(err)
	}
	noCert := goodCli.Clone()
	noCert.Certificates = nil
	for _, tc := range []struct {
		name string
		tls  *tls.Config
	}{
		{"no client certificate", noCert},
		{"a certificate from another CA (which does not trust the logic node's either)", otherCli},
		{"no TLS", nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := rpc.NewClient(rpc.ClientOptions{Version: "test", Secret: secret, TLS: tc.tls, DialTimeout: time.Second})
			defer c.Close()
			c.Configure("intruder/"+tc.name, "127.0.0.1:1", g1.Gateway)
			c.SetAddrs([]string{lg.RPCAddr()})
			ctx, cancel := context.WithTimeout(ctxb, 1500*time.Millisecond)
			defer cancel()
			if err := c.WaitReady(ctx); err == nil {
				t.Fatal("linked to the logic node")
			}
			if n := lg.rpcServer.Gateways(); n != 2 {
				t.Fatalf("logic node has %d gateway links, want 2", n)
			}
		})
	}
	// the good gateways are still linked and served
	clusterChat(t, lg, g1, g2)
}

// tlsFiles issues a node certificate from ca and returns the files
// rpc.MutualTLS reads.
func tlsFiles(t *testing.T, ca *testcert.CA) (cert, key, caFile string) {
	dir := t.TempDir()
	cert, key = ca.IssueNode(t, dir, "node", 9)
	return cert, key, ca.WriteCA(t, dir, "ca.crt")
}
