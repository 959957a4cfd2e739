package platform

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"testing"
	"time"

	"github.com/imd-dev/imd/das/cassandra"
	"github.com/imd-dev/imd/internal/config"
)

// IMD_TEST_STORE=cassandra runs the suite on a real Cassandra at
// IMD_TEST_CASSANDRA (default 127.0.0.1:9042; scripts/services.sh up
// cassandra): TestMain migrates a keyspace of its own, every test starts
// on emptied tables, and the keyspace is dropped at the end. Asked for and
// not there is a failure, never a skip.
var (
	testStore     = os.Getenv("IMD_TEST_STORE")
	testCassandra config.Cassandra
	testShape     = os.Getenv("IMD_TEST_SHAPE")
	// testRedis is this run's key prefix, and with IMD_TEST_SHAPE=split
	// the Redis at IMD_TEST_REDIS (Addrs empty when it is unset: then the
	// split shape keeps the router in-process).
	testRedis config.Redis
)

func TestMain(m *testing.M) {
	var b [4]byte
	_, _ = rand.Read(b[:])
	testRedis.Prefix = "imdtest:" + hex.EncodeToString(b[:]) + ":"
	if addr := os.Getenv("IMD_TEST_REDIS"); addr != "" {
		testRedis.Addrs = []string{addr}
	}
	if testStore != "cassandra" {
		os.Exit(m.Run())
	}
	addr := os.Getenv("IMD_TEST_CASSANDRA")
	if addr == "" {
		addr = "127.0.0.1:9042"
	}
	_, _ = rand.Read(b[:])
	cc := cassandra.Config{Hosts: []string{addr}, Keyspace: "imd_platform_" + hex.EncodeToString(b[:]), Timeout: 10 * time.Second}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	dc, err := cassandra.LocalDC(ctx, cc)
	if err == nil {
		cc.LocalDC = dc
		err = cassandra.Migrate(ctx, cc, map[string]int{dc: 1})
	}
	cancel()
	if err != nil {
		fmt.Fprintf(os.Stderr, "IMD_TEST_STORE=cassandra: no test keyspace at %s: %v\n", addr, err)
		os.Exit(1)
	}
	testCassandra = config.Cassandra{Hosts: cc.Hosts, Keyspace: cc.Keyspace, LocalDC: dc, Timeout: 10 * time.Second, MaxBatchBytes: 512 << 10}
	code := m.Run()
	ctx, cancel = context.WithTimeout(context.Background(), time.Minute)
	if err := cassandra.DropKeyspace(ctx, cc); err != nil {
		fmt.Fprintf(os.Stderr, "drop test keyspace %s: %v\n", cc.Keyspace, err)
	}
	cancel()
	os.Exit(code)
}

// useTestStore points cfg at the suite's store: a fresh embedded one in a
// temporary directory, or the emptied Cassandra test keyspace.
func useTestStore(t testing.TB, cfg *config.Config) {
	t.Helper()
	cfg.DataDir = t.TempDir()
	if testStore != "cassandra" {
		return
	}
	cfg.Store.Engine = "cassandra"
	cfg.Store.Cassandra = testCassandra
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := cassandra.TruncateAll(ctx, cassandra.Config{Hosts: testCassandra.Hosts, Keyspace: testCassandra.Keyspace, LocalDC: testCassandra.LocalDC, Timeout: 30 * time.Second}); err != nil {
		t.Fatalf("empty the test keyspace: %v", err)
	}
}
