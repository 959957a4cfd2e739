// Package testenv finds the real servers that integration tests use, the
// ones `scripts/services.sh up` starts on 127.0.0.1. A test that needs one
// and cannot reach it fails under CI=true (CI starts them all) and skips
// otherwise, saying how to start it.
package testenv

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// Redis returns the address of the test Redis: IMD_TEST_REDIS, else
// 127.0.0.1:6379, once it accepts a connection.
func Redis(tb testing.TB) string {
	tb.Helper()
	addr := os.Getenv("IMD_TEST_REDIS")
	if addr == "" {
		addr = "127.0.0.1:6379"
	}
	need(tb, "Redis", "redis", "IMD_TEST_REDIS", addr)
	return addr
}

// RedisCluster returns the seed addresses of the test Redis Cluster of
// data center dc ("dc1" or "dc2"), the rcluster of scripts/services.sh:
// IMD_TEST_REDIS_CLUSTER_DC1 (or _DC2), comma-separated, else ports
// 7001-7003 on 127.0.0.1 (DC1) or 127.0.0.2 (DC2), once each accepts a
// connection.
func RedisCluster(tb testing.TB, dc string) []string {
	tb.Helper()
	env := "IMD_TEST_REDIS_CLUSTER_" + strings.ToUpper(dc)
	host := "127.0.0.1"
	if dc == "dc2" {
		host = "127.0.0.2"
	}
	v := os.Getenv(env)
	if v == "" {
		v = host + ":7001," + host + ":7002," + host + ":7003"
	}
	var addrs []string
	for a := range strings.SplitSeq(v, ",") {
		if a = strings.TrimSpace(a); a != "" {
			addrs = append(addrs, a)
		}
	}
	for _, a := range addrs {
		need(tb, "Redis Cluster node of "+dc, "rcluster", env, a)
	}
	return addrs
}

// CassandraDC2 returns the CQL address of DC2's Cassandra node (data
// center dc2, in the same cluster as IMD_TEST_CASSANDRA's dc1):
// IMD_TEST_CASSANDRA_DC2, else 127.0.0.2:9042, once it accepts a
// connection.
func CassandraDC2(tb testing.TB) string {
	tb.Helper()
	addr := os.Getenv("IMD_TEST_CASSANDRA_DC2")
	if addr == "" {
		addr = "127.0.0.2:9042"
	}
	need(tb, "Cassandra node of dc2", "cassandra2", "IMD_TEST_CASSANDRA_DC2", addr)
	return addr
}

func need(tb testing.TB, what, service, env, addr string) {
	tb.Helper()
	c, err := net.DialTimeout("tcp", addr, 2*time.Second)
	if err == nil {
		_ = c.Close()
		return
	}
	if os.Getenv("CI") == "true" {
		tb.Fatalf("CI=true and no %s at %s (%s): %v", what, addr, env, err)
	}
	tb.Skipf("no %s at %s (%v): run `scripts/services.sh up %s` (or set %s)", what, addr, err, service, env)
}

// Services runs scripts/services.sh with args (say "up", "rcluster"), for
// tests that stop or kill one of its servers and start it again. It fails
// tb when the script fails, and returns how long it took.
func Services(tb testing.TB, args ...string) time.Duration {
	tb.Helper()
	dir, err := os.Getwd()
	if err != nil {
		tb.Fatal(err)
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			break
		}
		up := filepath.Dir(dir)
		if up == dir {
			tb.Fatal("services.sh: no go.mod above the test's folder")
		}
		dir = up
	}
	start := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), 6*time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, "bash", append([]string{filepath.Join(dir, "scripts", "services.sh")}, args...)...).CombinedOutput()
	if err != nil {
		tb.Fatalf("services.sh %v: %v\n%s", args, err, out)
	}
	return time.Since(start)
}

// KillRedis kills the redis-server at addr with SIGKILL, as a crash would,
// and returns its pid once it is gone. The server must run on this machine
// (scripts/services.sh's): its pid is the process_id of its INFO server.
func KillRedis(tb testing.TB, addr string) int {
	tb.Helper()
	pid, err := redisPID(addr)
	if err != nil {
		tb.Fatalf("pid of the redis-server at %s: %v", addr, err)
	}
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		tb.Fatalf("kill -9 %d (redis-server %s): %v", pid, addr, err)
	}
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if err := syscall.Kill(pid, 0); errors.Is(err, syscall.ESRCH) {
			return pid
		}
		if time.Now().After(deadline) {
			tb.Fatalf("redis-server %s (pid %d) still there 10s after SIGKILL", addr, pid)
		}
	}
}

// redisPID asks the Redis at addr for its process id (INFO server).
func redisPID(addr string) (int, error) {
	c, err := net.DialTimeout("tcp", addr, 2*time.Second)
	if err != nil {
		return 0, err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(c, "INFO server\r\n"); err != nil {
		return 0, err
	}
	rd := bufio.NewReader(c)
	head, err := rd.ReadString('\n')
	if err != nil {
		return 0, err
	}
	n, err := strconv.Atoi(strings.TrimSpace(strings.TrimPrefix(head, "$")))
	if !strings.HasPrefix(head, "$") || err != nil {
		return 0, fmt.Errorf("INFO answered %q", head)
	}
	body := make([]byte, n)
	if _, err := io.ReadFull(rd, body); err != nil {
		return 0, err
	}
	for line := range strings.Lines(string(body)) {
		if v, ok := strings.CutPrefix(line, "process_id:"); ok {
			return strconv.Atoi(strings.TrimSpace(v))
		}
	}
	return 0, errors.New("INFO server has no process_id")
}
