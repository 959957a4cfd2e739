package cassandra

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net"
	"os"
	"testing"
	"time"

	gocql "github.com/apache/cassandra-gocql-driver/v2"
)

// The tests that need a server use a real Cassandra at IMD_TEST_CASSANDRA
// (default 127.0.0.1:9042; scripts/services.sh up cassandra starts one).
// TestMain migrates a fresh keyspace imd_test_<random> there and drops it
// at the end. Without a server those tests skip, except under CI=true,
// where they fail.
var (
	testAddr     string
	testCfg      Config // hosts, keyspace and data center of the test keyspace
	testSetupErr error  // why there is no test keyspace
)

func TestMain(m *testing.M) {
	os.Exit(runTests(m))
}

func runTests(m *testing.M) int {
	testAddr = os.Getenv("IMD_TEST_CASSANDRA")
	if testAddr == "" {
		testAddr = DefaultHost
	}
	if c, err := net.DialTimeout("tcp", testAddr, 2*time.Second); err != nil {
		testSetupErr = fmt.Errorf("no Cassandra at %s (IMD_TEST_CASSANDRA): %w", testAddr, err)
		return m.Run()
	} else {
		_ = c.Close()
	}
	var b [4]byte
	_, _ = rand.Read(b[:])
	ks := "imd_test_" + hex.EncodeToString(b[:])
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cfg := Config{Hosts: []string{testAddr}, Keyspace: ks, Timeout: 10 * time.Second}
	if err := cfg.setDefaults(); err != nil {
		testSetupErr = err
		return m.Run()
	}
	dc, err := localDC(ctx, cfg, cfg.Logger)
	if err != nil {
		testSetupErr = fmt.Errorf("Cassandra at %s: %w", testAddr, err)
		return m.Run()
	}
	cfg.LocalDC = dc
	start := time.Now()
	if err := Migrate(ctx, cfg, map[string]int{dc: 1}); err != nil {
		testSetupErr = fmt.Errorf("migrate %s at %s: %w", ks, testAddr, err)
		dropKeyspace(cfg)
		return m.Run()
	}
	fmt.Fprintf(os.Stderr, "das/cassandra: keyspace %s at %s (data center %s) migrated in %v\n", ks, testAddr, dc, time.Since(start).Round(time.Millisecond))
	testCfg = Config{Hosts: cfg.Hosts, Keyspace: ks, LocalDC: dc}
	code := m.Run()
	dropKeyspace(cfg)
	return code
}

// dropKeyspace removes the test keyspace. The fault test may have left
// Cassandra down; then the keyspace stays (it is named per run).
func dropKeyspace(cfg Config) {
	cl := cfg.adminCluster("", cfg.Logger)
	cl.Timeout = ddlTimeout
	s, err := cl.CreateSession()
	if err != nil {
		fmt.Fprintf(os.Stderr, "das/cassandra: keyspace %s not dropped: %v\n", cfg.Keyspace, err)
		return
	}
	defer s.Close()
	if err := s.Query("DROP KEYSPACE IF EXISTS " + cfg.Keyspace).Exec(); err != nil {
		fmt.Fprintf(os.Stderr, "das/cassandra: keyspace %s not dropped: %v\n", cfg.Keyspace, err)
	}
}

// needCassandra returns the configuration of the test keyspace, or skips
// the test (fails it under CI=true) when there is none.
func needCassandra(t testing.TB) Config {
	t.Helper()
	if testSetupErr != nil || testCfg.Keyspace == "" {
		err := testSetupErr
		if err == nil {
			err = fmt.Errorf("no test keyspace")
		}
		if os.Getenv("CI") == "true" {
			t.Fatalf("CI=true and the Cassandra tests cannot run: %v", err)
		}
		t.Skipf("%v (start one: bash scripts/services.sh up cassandra)", err)
	}
	return testCfg
}

// openTest opens a store on the test keyspace, closed at the end of t.
func openTest(t testing.TB, cfg Config) *Store {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	s, err := Open(ctx, cfg)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() {
		if err := s.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return s
}

// rawSession opens a session on the test keyspace for checks below the
// das interface.
func rawSession(t testing.TB, cfg Config) *gocql.Session {
	t.Helper()
	if err := cfg.setDefaults(); err != nil {
		t.Fatal(err)
	}
	cl := cfg.cluster(cfg.Keyspace, cfg.Logger)
	cl.NumConns = 1
	s, err := cl.CreateSession()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Close)
	return s
}
