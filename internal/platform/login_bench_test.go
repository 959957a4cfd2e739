package platform

import (
	"bufio"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/imd-dev/imd/internal/config"
	"github.com/imd-dev/imd/internal/testcert"
	"github.com/imd-dev/imd/schema"
	"github.com/imd-dev/imd/schema/pb"
	"google.golang.org/protobuf/proto"
)

// BenchmarkLoginTLS: logins per second and the server's CPU per login, on
// the plain-TCP port and on the TLS port (TLS 1.3, ECDSA P-256, a full
// handshake each time: no session resumption). Each login is a new
// connection: dial (and handshake), the login request, its response, and
// a close, from 16 goroutines. The server runs in a child process (this
// test binary, TestLoginBenchServer) so its CPU (utime+stime from
// /proc, 10 ms ticks) leaves out the client's handshakes; the
// connection's teardown on the server counts too.
//
//	go test -run '^$' -bench LoginTLS -benchtime 5000x -count 3 ./internal/platform/
func BenchmarkLoginTLS(b *testing.B) {
	ca := testcert.NewCA(b, "imd bench CA")
	dir := b.TempDir()
	certFile, keyFile := ca.Issue(b, dir, 2)
	cmd := exec.Command(os.Args[0], "-test.run", "^TestLoginBenchServer$")
	cmd.Env = append(os.Environ(), "IMD_LOGIN_BENCH_SERVER="+certFile+","+keyFile)
	stdin, err := cmd.StdinPipe()
	if err != nil {
		b.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		b.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() {
		_ = stdin.Close() // the child shuts down at EOF
		done := make(chan struct{})
		go func() { _ = cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(15 * time.Second):
			_ = cmd.Process.Kill()
			<-done
		}
	})
	var tcpAddr, tlsAddr string
	sc := bufio.NewScanner(stdout)
	for sc.Scan() {
		if f := strings.Fields(sc.Text()); len(f) == 3 && f[0] == "LOGIN_BENCH_ADDRS" {
			tcpAddr, tlsAddr = f[1], f[2]
			break
		}
	}
	if tlsAddr == "" {
		b.Fatalf("the server process gave no addresses: %v", sc.Err())
	}
	go func() { _, _ = io.Copy(io.Discard, stdout) }()

	var uids atomic.Uint64
	uids.Store(1 << 20)
	clientTLS := &tls.Config{RootCAs: ca.Pool, ServerName: testcert.ServerName, MinVersion: tls.VersionTLS13}
	run := func(b *testing.B, dial func() (net.Conn, error)) {
		b.SetParallelism(8) // 16 clients on 2 cores
		cpu0 := procCPU(b, cmd.Process.Pid)
		start := time.Now()
		b.ResetTimer()
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				if err := benchLogin(dial, uids.Add(1)); err != nil {
					b.Error(err)
					return
				}
			}
		})
		b.StopTimer()
		elapsed := time.Since(start)
		cpu := procCPU(b, cmd.Process.Pid) - cpu0
		b.ReportMetric(float64(b.N)/elapsed.Seconds(), "logins/s")
		b.ReportMetric(cpu.Seconds()*1e6/float64(b.N), "server-cpu-us/login")
		b.ReportMetric(0, "ns/op")
	}
	b.Run("tcp", func(b *testing.B) {
		run(b, func() (net.Conn, error) { return net.DialTimeout("tcp", tcpAddr, 5*time.Second) })
	})
	b.Run("tls", func(b *testing.B) {
		d := tls.Dialer{NetDialer: &net.Dialer{Timeout: 5 * time.Second}, Config: clientTLS}
		run(b, func() (net.Conn, error) { return d.Dial("tcp", tlsAddr) })
	})
}

// benchLogin opens a connection, logs uid in and closes it.
func benchLogin(dial func() (net.Conn, error), uid uint64) error {
	nc, err := dial()
	if err != nil {
		return err
	}
	defer nc.Close()
	_ = nc.SetDeadline(time.Now().Add(10 * time.Second))
	body, _ := proto.Marshal(&pb.LoginRequest{Token: token(101, uid), DeviceId: "bench"})
	if _, err := nc.Write(schema.AppendFrame(nil, &schema.Header{Cmd: schema.CmdLogin, AppCode: 101, UID: uid, Seq: 1}, body)); err != nil {
		return err
	}
	dec := schema.NewDecoder(nc, 1<<20)
	var fr schema.Frame
	if err := dec.ReadFrame(&fr); err != nil {
		return fmt.Errorf("login %d: %w", uid, err)
	}
	defer fr.Release()
	if fr.Cmd != schema.CmdLogin || fr.Status != schema.StatusOK {
		return fmt.Errorf("login %d: %s status %s", uid, fr.Cmd, fr.Status)
	}
	return nil
}

// procCPU returns the user and system CPU time of process pid so far.
func procCPU(tb testing.TB, pid int) time.Duration {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		tb.Skipf("no /proc: %v", err)
	}
	s := string(b)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+2:]) // from field 3, state
	utime, err1 := strconv.ParseInt(f[11], 10, 64)           // field 14
	stime, err2 := strconv.ParseInt(f[12], 10, 64)           // field 15
	if err1 != nil || err2 != nil {
		tb.Fatalf("/proc/%d/stat: %q", pid, s)
	}
	return time.Duration(utime+stime) * (time.Second / 100) // USER_HZ
}

// TestLoginBenchServer is BenchmarkLoginTLS's server process: a platform
// with a plain and a TLS port, up until its stdin closes. It runs only
// when the benchmark starts it.
func TestLoginBenchServer(t *testing.T) {
	files := os.Getenv("IMD_LOGIN_BENCH_SERVER")
	if files == "" {
		t.Skip("the server process of BenchmarkLoginTLS")
	}
	certFile, keyFile, _ := strings.Cut(files, ",")
	p := start(t, func(c *config.Config) {
		c.Gateway.TLSAddr = "127.0.0.1:0"
		c.Gateway.PlainTCP = true
		c.Gateway.TLSCert, c.Gateway.TLSKey = certFile, keyFile
		c.Gateway.WebAddr = ""
	})
	fmt.Printf("LOGIN_BENCH_ADDRS %s %s\n", p.GatewayAddr(), p.TLSAddr())
	_, _ = io.Copy(io.Discard, os.Stdin)
}
