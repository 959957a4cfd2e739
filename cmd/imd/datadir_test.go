package main

import (
	"context"
	"fmt"
	"os/exec"
	"strings"
	"testing"
	"time"
)

// TestSecondImdOnDataDir: a second `imd all` on a data dir in use exits
// at once and says which process holds it.
func TestSecondImdOnDataDir(t *testing.T) {
	dir := t.TempDir()
	first := startImdIn(t, dir, 0)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, imdBinary(t), "all", "--data-dir", dir, "--gateway-addr", "127.0.0.1:0", "--web-addr", "127.0.0.1:0",
		"--http-addr", "127.0.0.1:0", "--kafka-addr", "127.0.0.1:0", "--rpc-addr", "127.0.0.1:0").CombinedOutput()
	if err == nil || ctx.Err() != nil {
		t.Fatalf("second imd on %s: %v (context %v)\n%s", dir, err, ctx.Err(), out)
	}
	want := fmt.Sprintf("another imd holds %s (pid %d)", dir, first.cmd.Process.Pid)
	if !strings.Contains(string(out), want) {
		t.Fatalf("second imd said:\n%s\nwant %q", out, want)
	}
	if strings.Contains(string(out), "resource temporarily unavailable") {
		t.Fatalf("second imd still reports the raw lock error:\n%s", out)
	}
}
