package platform

import (
	"context"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/imd-dev/imd/internal/config"
)

// TestDataDirHeldByOne: a second node on a data dir in use fails at once
// with an error that names the holder, not with the store's or the
// broker's own lock error; the dir is free again once the first stops.
func TestDataDirHeldByOne(t *testing.T) {
	dir := t.TempDir()
	first := start(t, func(c *config.Config) { c.DataDir = dir })

	cfg := testConfig()
	useTestStore(t, &cfg)
	cfg.DataDir = dir
	p, err := Start(cfg, testLogger(t))
	if err == nil {
		_ = p.Shutdown(context.Background())
		t.Fatal("a second node started on a data dir in use")
	}
	want := fmt.Sprintf("another imd holds %s (pid %d)", dir, os.Getpid())
	if !strings.Contains(err.Error(), want) {
		t.Fatalf("second start: %v\nwant an error with %q", err, want)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := first.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	again := start(t, func(c *config.Config) { c.DataDir = dir })
	if again.Store == nil {
		t.Fatal("restarted node has no store")
	}
}

// TestGatewayDoesNotLockDataDir: a gateway keeps nothing in the data dir,
// so it may share one with the logic node (docs/operations.md runs them
// side by side on the default ./data).
func TestGatewayDoesNotLockDataDir(t *testing.T) {
	if usesDataDir(RoleGateway, testConfig()) {
		t.Fatal("a gateway locks the data dir")
	}
	cfg := testConfig()
	cfg.DataDir = "d"
	cfg.Store.Engine = "cassandra"
	cfg.Bus.Brokers = []string{"k:9092"}
	if usesDataDir(RoleLogic, cfg) {
		t.Fatal("a logic node with nothing embedded locks the data dir")
	}
	cfg.Bus.Brokers = nil
	if !usesDataDir(RoleLogic, cfg) {
		t.Fatal("a logic node with the embedded broker does not lock the data dir")
	}
}
