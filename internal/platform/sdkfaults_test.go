package platform

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/imd-dev/imd/schema"
	"github.com/imd-dev/imd/schema/pb"
	"github.com/imd-dev/imd/sdk"
)

// Faults of the SDK's own making, against a real platform: what a client
// shows just before it is closed or killed, logins whose connection dies
// at the worst moment, and gateways that accept connections and drop them.

// TestSDKCloseAcksShown: a client closed right after OnC2C returned has
// acknowledged the message, so the next client of the terminal does not
// show it again. Ten rounds, each a new client that must show exactly the
// one message sent in its round.
func TestSDKCloseAcksShown(t *testing.T) {
	p := start(t, nil)
	alice := login(t, p, 101, 1, nil)
	for i := 0; i < 10; i++ {
		var rec received
		got := make(chan struct{}, 1)
		bob := login(t, p, 101, 2, func(o *sdk.Options) {
			o.DeviceID = "bob-phone"
			o.OnC2C = func(m *pb.C2CMessage) {
				rec.on(m)
				select {
				case got <- struct{}{}:
				default:
				}
			}
		})
		want := fmt.Sprintf("m%02d", i)
		if _, err := alice.SendC2C(ctxb, acct1(2), 1, []byte(want)); err != nil {
			t.Fatal(err)
		}
		select {
		case <-got:
		case <-time.After(5 * time.Second):
			t.Fatalf("round %d: nothing shown within 5s", i)
		}
		_ = bob.Close()
		if c := rec.contents(); len(c) != 1 || c[0] != want {
			t.Fatalf("round %d: the client showed %q, want only %q", i, c, want)
		}
	}
	bob := login(t, p, 101, 2, func(o *sdk.Options) { o.DeviceID = "bob-phone" })
	if n := inboxCount(t, bob); n != 0 {
		t.Fatalf("%d messages left in the inbox after the last close", n)
	}
}

// Environment of TestSDKFaultsChild, the receiver that
// TestSDKKilledReceiverShowsOnce runs in a child process.
const (
	childGatewayEnv = "IMD_SDKFAULTS_GATEWAY"
	childStateEnv   = "IMD_SDKFAULTS_STATE"
)

// printingState reports on stdout every id its FileStore has recorded,
// after the record is written.
type printingState struct {
	*sdk.FileStore
	mu *sync.Mutex
}

func (s printingState) SaveShown(ids []uint64) error {
	err := s.FileStore.SaveShown(ids)
	if err == nil {
		s.mu.Lock()
		for _, id := range ids {
			fmt.Printf("recorded %d\n", id)
		}
		s.mu.Unlock()
	}
	return err
}

// TestSDKFaultsChild is not a test of its own: it is the receiver (101/2,
// device bob-phone) that TestSDKKilledReceiverShowsOnce starts in a child
// process and kills. It prints "shown <msgid> <content>" for every message
// shown and "recorded <msgid>" once the id is in its state file, and waits
// to be killed. Acks wait a whole second to be batched, so a kill finds
// the last messages shown and not acknowledged.
func TestSDKFaultsChild(t *testing.T) {
	addr := os.Getenv(childGatewayEnv)
	if addr == "" {
		t.Skip("the child process of TestSDKKilledReceiverShowsOnce")
	}
	fs, err := sdk.FileState(os.Getenv(childStateEnv), 0)
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	c, err := sdk.Dial(context.Background(), sdk.Options{
		Addrs:    []string{addr},
		DeviceID: "bob-phone",
		AckDelay: time.Second,
		State:    printingState{fs, &mu},
		OnC2C: func(m *pb.C2CMessage) {
			mu.Lock()
			fmt.Printf("shown %d %s\n", m.Msgid, m.Content)
			mu.Unlock()
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := c.Login(ctx, creds(101, 2)); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	fmt.Println("online")
	mu.Unlock()
	time.Sleep(2 * time.Minute) // killed long before
}

// child is a running TestSDKFaultsChild and what it printed.
type child struct {
	cmd *exec.Cmd

	mu       sync.Mutex
	online   bool
	shown    []string // contents, in the order shown
	recorded int
	done     chan struct{} // stdout closed
}

func startChild(t *testing.T, p *Platform, state string) *child {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^TestSDKFaultsChild$", "-test.count=1")
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "IMD_TEST_STORE=") { // the child needs no store
			cmd.Env = append(cmd.Env, kv)
		}
	}
	cmd.Env = append(cmd.Env, childGatewayEnv+"="+p.GatewayAddr(), childStateEnv+"="+state)
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	ch := &child{cmd: cmd, done: make(chan struct{})}
	t.Cleanup(func() { ch.kill() })
	go func() {
		defer close(ch.done)
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			f := strings.Fields(sc.Text())
			ch.mu.Lock()
			switch {
			case len(f) == 1 && f[0] == "online":
				ch.online = true
			case len(f) == 3 && f[0] == "shown":
				ch.shown = append(ch.shown, f[2])
			case len(f) == 2 && f[0] == "recorded":
				ch.recorded++
			}
			ch.mu.Unlock()
		}
	}()
	return ch
}

func (ch *child) counts() (online bool, shown, recorded int) {
	ch.mu.Lock()
	defer ch.mu.Unlock()
	return ch.online, len(ch.shown), ch.recorded
}

// kill sends SIGKILL and waits for the process and its output.
func (ch *child) kill() {
	_ = ch.cmd.Process.Signal(syscall.SIGKILL)
	<-ch.done
	_ = ch.cmd.Wait()
}

// TestSDKKilledReceiverShowsOnce: a receiver with a state file is killed
// (SIGKILL) after it showed 60 messages, most of them not acknowledged yet;
// 30 more arrive while it is down and 30 after a new process of the same
// terminal, with the same state file, has logged in. Across both processes
// every message is shown exactly once, in the order sent.
func TestSDKKilledReceiverShowsOnce(t *testing.T) {
	p := start(t, nil)
	alice := login(t, p, 101, 1, nil)
	state := filepath.Join(t.TempDir(), "bob.state")
	send := func(from, to int) {
		for i := from; i < to; i++ {
			if _, err := alice.SendC2C(ctxb, acct1(2), 1, []byte(fmt.Sprintf("m%03d", i))); err != nil {
				t.Fatal(err)
			}
		}
	}
	wait := func(ch *child, what string, cond func(online bool, shown, recorded int) bool) {
		t.Helper()
		eventually(t, 20*time.Second, what, func() bool { return cond(ch.counts()) })
	}

	first := startChild(t, p, state)
	wait(first, "the first receiver online", func(on bool, _, _ int) bool { return on })
	send(0, 60)
	wait(first, "60 messages shown and recorded", func(_ bool, s, r int) bool { return s >= 60 && r >= 60 })
	first.kill()
	send(60, 90)
	_, shownFirst, _ := first.counts()
	second := startChild(t, p, state)
	wait(second, "the second receiver online", func(on bool, _, _ int) bool { return on })
	send(90, 120)
	wait(second, "the rest shown", func(_ bool, s, _ int) bool { return shownFirst+s >= 120 })
	time.Sleep(300 * time.Millisecond) // let duplicates, if any, show up
	second.kill()

	all := append(append([]string(nil), first.shown...), second.shown...)
	for i, c := range all {
		if want := fmt.Sprintf("m%03d", i); c != want {
			t.Fatalf("message %d shown is %q, want %q (shown twice, lost or out of order; first process showed %d, second %d)",
				i, c, want, len(first.shown), len(second.shown))
		}
	}
	if len(all) != 120 {
		t.Fatalf("%d messages shown, want 120", len(all))
	}
}

// loginCutter forwards connections to a gateway and resets the first one
// right after it forwarded the answer to the login on it, so the client
// sees a successful login and, at once, a dead connection.
type loginCutter struct {
	ln     net.Listener
	target string
	conns  atomic.Int32
}

func newLoginCutter(t *testing.T, target string) *loginCutter {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	lc := &loginCutter{ln: ln, target: target}
	go lc.serve()
	t.Cleanup(func() { _ = ln.Close() })
	return lc
}

func (lc *loginCutter) serve() {
	for {
		a, err := lc.ln.Accept()
		if err != nil {
			return
		}
		n := lc.conns.Add(1)
		b, err := net.Dial("tcp", lc.target)
		if err != nil {
			_ = a.Close()
			continue
		}
		go func() { _, _ = io.Copy(b, a); _ = b.Close() }()
		if n > 1 {
			go func() { _, _ = io.Copy(a, b); _ = a.Close() }()
			continue
		}
		go func() {
			defer a.Close()
			defer b.Close()
			dec := schema.NewDecoder(b, 1<<20)
			var f schema.Frame
			for {
				if err := dec.ReadFrame(&f); err != nil {
					return
				}
				_, err := a.Write(schema.AppendFrame(nil, &f.Header, f.Body))
				login := f.Cmd == schema.CmdLogin && f.Kind() == schema.KindResponse
				f.Release()
				if err != nil {
					return
				}
				if login {
					_ = a.(*net.TCPConn).SetLinger(0) // a reset, not a clean close
					return
				}
			}
		}()
	}
}

// TestSDKLoginLostRightAfterAnswer: the connection dies right after the
// login answer reached the client. Login succeeds, and the client must
// come back on a new connection by itself and receive what is sent to it,
// every time (twenty rounds).
func TestSDKLoginLostRightAfterAnswer(t *testing.T) {
	p := start(t, nil)
	alice := login(t, p, 101, 1, nil)
	for i := 0; i < 20; i++ {
		lc := newLoginCutter(t, p.GatewayAddr())
		var rec received
		bob := dial(t, p, func(o *sdk.Options) {
			o.Addrs = []string{lc.ln.Addr().String()}
			o.OnC2C = rec.on
		})
		ctx, cancel := context.WithTimeout(ctxb, 5*time.Second)
		_, err := bob.Login(ctx, creds(101, 2))
		cancel()
		if err != nil {
			t.Fatalf("round %d: login: %v", i, err)
		}
		want := fmt.Sprintf("m%02d", i)
		if _, err := alice.SendC2C(ctxb, acct1(2), 1, []byte(want)); err != nil {
			t.Fatal(err)
		}
		eventually(t, 5*time.Second, fmt.Sprintf("round %d: the client back online and shown %q (state %s, %d connections)", i, want, bob.State(), lc.conns.Load()), func() bool {
			c := rec.contents()
			return len(c) > 0 && c[len(c)-1] == want
		})
		if n := lc.conns.Load(); n < 2 {
			t.Fatalf("round %d: %d connections: the first one was not cut", i, n)
		}
		_ = bob.Close()
	}
}

// switchProxy forwards connections to a target until refuse is set; then it
// accepts them and closes them at once, like a balancer in front of a dead
// gateway.
type switchProxy struct {
	*proxy
	refuse atomic.Bool
	seen   atomic.Int32 // connections accepted while refusing
}

func newSwitchProxy(t *testing.T, target string) *switchProxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	sp := &switchProxy{proxy: &proxy{ln: ln, target: target}}
	go sp.serve()
	t.Cleanup(func() { _ = ln.Close(); sp.cut() })
	return sp
}

func (sp *switchProxy) serve() {
	for {
		a, err := sp.ln.Accept()
		if err != nil {
			return
		}
		if sp.refuse.Load() {
			sp.seen.Add(1)
			_ = a.Close()
			continue
		}
		b, err := net.Dial("tcp", sp.target)
		if err != nil {
			_ = a.Close()
			continue
		}
		sp.mu.Lock()
		sp.conns = append(sp.conns, a, b)
		sp.mu.Unlock()
		go func() { _, _ = io.Copy(a, b); _ = a.Close() }()
		go func() { _, _ = io.Copy(b, a); _ = b.Close() }()
	}
}

// TestSDKRotatesPastResettingGateway: the first address accepts
// connections and drops them. The client must log in through the second
// within a few seconds, at the first Login and on a reconnect after the
// gateway it was using went bad that way.
func TestSDKRotatesPastResettingGateway(t *testing.T) {
	p := start(t, nil)
	alice := login(t, p, 101, 1, nil)
	expect := func(rec *received, want string) {
		t.Helper()
		if _, err := alice.SendC2C(ctxb, acct1(2), 1, []byte(want)); err != nil {
			t.Fatal(err)
		}
		eventually(t, 5*time.Second, "the client shown "+want, func() bool {
			c := rec.contents()
			return len(c) > 0 && c[len(c)-1] == want
		})
	}

	t.Run("login", func(t *testing.T) {
		bad, tries := refuser(t)
		var rec received
		bob := dial(t, p, func(o *sdk.Options) {
			o.Addrs = []string{bad, p.GatewayAddr()}
			o.OnC2C = rec.on
		})
		start := time.Now()
		ctx, cancel := context.WithTimeout(ctxb, 5*time.Second)
		defer cancel()
		if _, err := bob.Login(ctx, creds(101, 2)); err != nil {
			t.Fatalf("login with the first gateway resetting: %v (%d tries on it)", err, tries.Load())
		}
		t.Logf("logged in after %s, %d connections to the resetting address", time.Since(start).Round(time.Millisecond), tries.Load())
		expect(&rec, "first")
		_ = bob.Close()
	})

	t.Run("reconnect", func(t *testing.T) {
		sp := newSwitchProxy(t, p.GatewayAddr())
		var rec received
		var states stateLog
		bob := dial(t, p, func(o *sdk.Options) {
			o.Addrs = []string{sp.addr(), p.GatewayAddr()}
			o.OnC2C = rec.on
			o.OnState = states.record
			// the backoff the default would reach, so a client stuck on
			// the bad address shows within the test's time
			o.BackoffMin, o.BackoffMax = 200*time.Millisecond, 30*time.Second
		})
		ctx, cancel := context.WithTimeout(ctxb, 5*time.Second)
		defer cancel()
		if _, err := bob.Login(ctx, creds(101, 2)); err != nil {
			t.Fatal(err)
		}
		sp.mu.Lock()
		via := len(sp.conns)
		sp.mu.Unlock()
		if via == 0 {
			t.Fatal("the client did not log in through the first address")
		}
		expect(&rec, "via the first address")
		sp.refuse.Store(true)
		sp.cut()
		eventually(t, 5*time.Second, "offline after the cut", func() bool { return states.count(sdk.StateOffline) > 0 })
		eventually(t, 5*time.Second, fmt.Sprintf("online again through the second gateway (%d connections to the bad one)", sp.seen.Load()), func() bool {
			return bob.State() == sdk.StateOnline
		})
		expect(&rec, "second")
	})
}
