package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/imd-dev/imd/schema"
	"github.com/imd-dev/imd/sdk"
)

var (
	buildOnce sync.Once
	binPath   string
	buildErr  error
)

// imdBinary builds cmd/imd once per test run.
func imdBinary(t *testing.T) string {
	t.Helper()
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "imd-bin-")
		if err != nil {
			buildErr = err
			return
		}
		binPath = filepath.Join(dir, "imd")
		out, err := exec.Command("go", "build", "-o", binPath, ".").CombinedOutput()
		if err != nil {
			buildErr = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return binPath
}

func TestMain(m *testing.M) {
	code := m.Run()
	if binPath != "" {
		_ = os.RemoveAll(filepath.Dir(binPath))
	}
	os.Exit(code)
}

// proc is an `imd all` child process.
type proc struct {
	cmd     *exec.Cmd
	dataDir string
	gateway string
	http    string
	rpc     string   // a logic node's internal RPC address
	kafka   []string // the embedded broker
	mu      sync.Mutex
	lines   []map[string]any
	exited  chan struct{}
	waitErr error
}

// startImd runs `imd all` on random loopback ports with JSON logs, under
// an open-file limit when nofile > 0, and waits until it listens.
func startImd(t *testing.T, nofile int, args ...string) *proc {
	t.Helper()
	return startImdIn(t, t.TempDir(), nofile, args...)
}

// startImdIn is startImd on a given data directory.
func startImdIn(t *testing.T, dataDir string, nofile int, args ...string) *proc {
	t.Helper()
	return startRole(t, "all", dataDir, nofile, args...)
}

// startRole runs `imd <role>` on loopback ports of its own, with its log
// as JSON, and returns once it has started.
func startRole(t *testing.T, role, dataDir string, nofile int, args ...string) *proc {
	t.Helper()
	bin := imdBinary(t)
	p := &proc{dataDir: dataDir, exited: make(chan struct{})}
	full := append([]string{role, "--data-dir", p.dataDir, "--gateway-addr", "127.0.0.1:0", "--web-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0",
		"--kafka-addr", "127.0.0.1:0", "--rpc-addr", "127.0.0.1:0", "--log-format", "json"}, args...)
	if nofile > 0 {
		script := fmt.Sprintf(`ulimit -n %d && exec "$0" "$@"`, nofile)
		p.cmd = exec.Command("bash", append([]string{"-c", script, bin}, full...)...)
	} else {
		p.cmd = exec.Command(bin, full...)
	}
	stderr, err := p.cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	started := make(chan struct{})
	go func() {
		sc := bufio.NewScanner(stderr)
		once := sync.Once{}
		for sc.Scan() {
			var m map[string]any
			if json.Unmarshal(sc.Bytes(), &m) != nil {
				m = map[string]any{"msg": sc.Text()}
			}
			p.mu.Lock()
			p.lines = append(p.lines, m)
			if m["msg"] == "embedded kafka broker started" {
				if as, ok := m["addr"].([]any); ok {
					for _, a := range as {
						p.kafka = append(p.kafka, fmt.Sprint(a))
					}
				}
			}
			if m["msg"] == "node started" {
				p.gateway, _ = m["gateway"].(string)
				p.http, _ = m["http"].(string)
				p.rpc, _ = m["rpc"].(string)
				once.Do(func() { close(started) })
			}
			p.mu.Unlock()
		}
		_, _ = io.Copy(io.Discard, stderr)
		p.waitErr = p.cmd.Wait()
		close(p.exited)
	}()
	t.Cleanup(func() {
		_ = p.cmd.Process.Kill()
		<-p.exited
		if t.Failed() {
			for _, l := range p.log() {
				t.Logf("imd: %v", l)
			}
		}
	})
	select {
	case <-started:
	case <-p.exited:
		t.Fatalf("imd exited before listening: %v", p.waitErr)
	case <-time.After(20 * time.Second):
		t.Fatal("imd did not start within 20s")
	}
	return p
}

func (p *proc) log() []map[string]any {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]map[string]any(nil), p.lines...)
}

func (p *proc) logged(msg string) bool {
	for _, l := range p.log() {
		if l["msg"] == msg {
			return true
		}
	}
	return false
}

// token mints a token with the child's own generated demo secret.
func (p *proc) token(t *testing.T, appcode uint32, uid uint64) string {
	t.Helper()
	code, out, errOut := runCmd("token", "--data-dir", p.dataDir, "--appcode", fmt.Sprint(appcode), "--uid", fmt.Sprint(uid))
	if code != 0 {
		t.Fatalf("imd token: %s", errOut)
	}
	return strings.TrimSpace(out)
}

func (p *proc) get(path string) (int, string, error) {
	resp, err := http.Get("http://" + p.http + path)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), nil
}

// TestSIGTERMDrains: SIGTERM makes imd tell its clients to go away,
// unregister them and exit 0 well inside the grace period.
func TestSIGTERMDrains(t *testing.T) {
	p := startImd(t, 0, "--shutdown-grace", "10s")
	if code, body, err := p.get("/readyz"); err != nil || code != 200 || !strings.Contains(body, `"ready"`) {
		t.Fatalf("/readyz: %d %q %v", code, body, err)
	}
	var goaway sync.WaitGroup
	const n = 5
	for i := range n {
		goaway.Add(1)
		var once sync.Once
		c, err := sdk.Dial(context.Background(), sdk.Options{
			Addrs: []string{p.gateway},
			OnState: func(s sdk.State, err error) {
				if s == sdk.StateOffline {
					once.Do(goaway.Done)
				}
			},
		})
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if _, err := c.Login(context.Background(), sdk.Credentials{AppCode: 101, UID: uint64(i + 1), Token: p.token(t, 101, uint64(i+1))}); err != nil {
			t.Fatalf("login: %v", err)
		}
	}
	began := time.Now()
	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case <-p.exited:
	case <-time.After(15 * time.Second):
		t.Fatal("imd did not exit within 15s of SIGTERM")
	}
	if p.waitErr != nil {
		t.Fatalf("imd exited with %v after SIGTERM, want 0", p.waitErr)
	}
	if el := time.Since(began); el > 8*time.Second {
		t.Errorf("drain took %s though every client left at once", el)
	}
	done := make(chan struct{})
	go func() { goaway.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("not every client was told to go away")
	}
	for _, msg := range []string{"signal received; shutting down", "gateway draining", "gateway stopped", "bye"} {
		if !p.logged(msg) {
			t.Errorf("log has no %q line", msg)
		}
	}
	for _, l := range p.log() {
		if l["msg"] == "gateway stopped" && l["closed_by_force"] != float64(0) {
			t.Errorf("%v clients were closed by force", l["closed_by_force"])
		}
	}
}

// TestFileLimitRefusesCleanly runs imd under a small open-file limit and
// opens more connections than it can hold: the gateway derives its maximum
// from the limit, refuses the rest with StatusTooManyConns, and keeps
// serving (health, logins) instead of failing on EMFILE.
func TestFileLimitRefusesCleanly(t *testing.T) {
	const nofile = 300 // max conns = 300 - 256 reserve = 44
	p := startImd(t, nofile)
	const dials = 150
	var held []net.Conn
	refused := 0
	for i := range dials {
		nc, err := net.DialTimeout("tcp", p.gateway, 5*time.Second)
		if err != nil {
			t.Fatalf("dial %d: %v", i, err)
		}
		defer nc.Close()
		// Held connections answer nothing until they log in; refused ones
		// get one error frame at once.
		_ = nc.SetReadDeadline(time.Now().Add(150 * time.Millisecond))
		var f schema.Frame
		err = schema.NewDecoder(nc, 4096).ReadFrame(&f)
		switch {
		case err == nil && f.Status == schema.StatusTooManyConns:
			refused++
			nc.Close()
		case err != nil && os.IsTimeout(err):
			held = append(held, nc)
		default:
			t.Fatalf("dial %d: frame %+v err %v", i, f.Header, err)
		}
	}
	if len(held) != nofile-256 || refused != dials-len(held) {
		t.Fatalf("held %d, refused %d; want %d held and the rest refused", len(held), refused, nofile-256)
	}
	if code, _, err := p.get("/healthz"); err != nil || code != 200 {
		t.Fatalf("/healthz under a full gateway: %d %v", code, err)
	}
	// Free one slot: a client logs in on it.
	held[0].Close()
	deadline := time.Now().Add(5 * time.Second)
	for {
		c, err := sdk.Dial(context.Background(), sdk.Options{Addrs: []string{p.gateway}, NoReconnect: true})
		if err == nil {
			_, err = c.Login(context.Background(), sdk.Credentials{AppCode: 101, UID: 5, Token: p.token(t, 101, 5)})
			c.Close()
			if err == nil {
				break
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no login after a slot was freed: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	select {
	case <-p.exited:
		t.Fatalf("imd died: %v", p.waitErr)
	default:
	}
}
