package embedded

import (
	"bufio"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/imd-dev/imd/das"
	"github.com/imd-dev/imd/das/dastest"
	"github.com/imd-dev/imd/schema/pb"
)

const crashEnv = "IMD_DAS_CRASH_DIR"

var crashFrom, crashTo = das.User{Account: 7, UID: 1}, das.User{Account: 7, UID: 2}

func crashContent(id uint64) string { return "body of " + strconv.FormatUint(id, 10) }

// TestMain turns the test binary into the crash writer when TestCrashSafety
// runs it as a child (crashEnv set); otherwise it runs the tests.
func TestMain(m *testing.M) {
	if dir := os.Getenv(crashEnv); dir != "" {
		crashChild(dir)
		return
	}
	os.Exit(m.Run())
}

// crashChild is the writer that TestCrashSafety runs in a child process and
// kills: four goroutines store messages as fast as they can and print
// "ok <msgid>" after each PutC2C that returned nil.
func crashChild(dir string) {
	s, err := Open(dir, Options{JanitorInterval: time.Millisecond})
	if err != nil {
		fmt.Println("open:", err)
		os.Exit(2)
	}
	var out sync.Mutex
	var wg sync.WaitGroup
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				id := dastest.NewMsgid()
				m := &pb.C2CMessage{
					Msgid:       id,
					From:        &pb.User{Account: crashFrom.Account, Uid: crashFrom.UID},
					FromAppcode: 101,
					To:          &pb.User{Account: crashTo.Account, Uid: crashTo.UID},
					Content:     []byte(crashContent(id)),
					ClientMsgId: "c" + strconv.FormatUint(id, 10),
				}
				if _, _, err := s.PutC2C(ctx, m, []uint32{101, 102}, nil); err != nil {
					fmt.Println("put:", err)
					os.Exit(2)
				}
				out.Lock()
				// One write per line, unbuffered: once written, the
				// parent can read it even after the kill.
				os.Stdout.WriteString("ok " + strconv.FormatUint(id, 10) + "\n")
				out.Unlock()
			}
		}()
	}
	wg.Wait()
}

// TestCrashSafety kills a writing process with SIGKILL three times at
// random points and then checks, by counting, that every PutC2C that
// returned nil is in both inboxes, both timelines and the conversation
// index, that its idempotency key survived, and that no message is
// visible in part. SIGKILL keeps the OS page cache, so this tests process
// crashes; the fsync on every commit is what covers power loss, and
// TestGroupCommit shows it happens.
func TestCrashSafety(t *testing.T) {
	if testing.Short() {
		t.Skip("short")
	}
	dir := t.TempDir()
	acked := map[uint64]bool{}
	for round := range 3 {
		cmd := exec.Command(os.Args[0])
		cmd.Env = append(os.Environ(), crashEnv+"="+dir)
		stdout, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		cmd.Stderr = os.Stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		killAfter := 100 + rand.IntN(300)
		sc := bufio.NewScanner(stdout)
		n := 0
		for sc.Scan() {
			line := sc.Text()
			id, ok := strings.CutPrefix(line, "ok ")
			if !ok {
				if strings.HasPrefix(line, "put:") || strings.HasPrefix(line, "open:") {
					t.Fatalf("child: %s", line)
				}
				continue
			}
			v, err := strconv.ParseUint(id, 10, 64)
			if err != nil {
				t.Fatalf("child line %q", line)
			}
			acked[v] = true
			if n++; n == killAfter {
				if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
					t.Fatal(err)
				}
			}
		}
		err = cmd.Wait()
		if ws, ok := cmd.ProcessState.Sys().(syscall.WaitStatus); !ok || !ws.Signaled() || ws.Signal() != syscall.SIGKILL {
			t.Fatalf("round %d: child ended with %v, not by SIGKILL", round, err)
		}
		t.Logf("round %d: killed after %d acknowledged puts (%d lines read)", round, killAfter, n)
	}

	s, err := Open(dir, Options{JanitorInterval: -1})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	readAll := func(what string, page func(after uint64) ([]*pb.C2CMessage, bool, error)) map[uint64]bool {
		seen := map[uint64]bool{}
		after := uint64(0)
		for {
			msgs, more, err := page(after)
			if err != nil {
				t.Fatalf("%s: %v", what, err)
			}
			for _, m := range msgs {
				if seen[m.Msgid] {
					t.Fatalf("%s: msgid %d twice", what, m.Msgid)
				}
				if string(m.Content) != crashContent(m.Msgid) || m.ClientMsgId != "c"+strconv.FormatUint(m.Msgid, 10) {
					t.Fatalf("%s: message %d is damaged: %v", what, m.Msgid, m)
				}
				seen[m.Msgid] = true
				after = m.Msgid
			}
			if !more {
				return seen
			}
		}
	}
	views := map[string]map[uint64]bool{}
	for _, app := range []uint32{101, 102} {
		views[fmt.Sprint("inbox ", app)] = readAll("inbox", func(after uint64) ([]*pb.C2CMessage, bool, error) {
			return s.InboxPage(ctx, term(crashTo, app), after, 1000)
		})
	}
	for name, u := range map[string]das.User{"sender": crashFrom, "recipient": crashTo} {
		views[name+" timeline"] = readAll(name, func(after uint64) ([]*pb.C2CMessage, bool, error) {
			return s.History(ctx, u, nil, after, 1000)
		})
	}
	peer := crashTo
	views["conversation"] = readAll("conversation", func(after uint64) ([]*pb.C2CMessage, bool, error) {
		return s.History(ctx, crashFrom, &peer, after, 1000)
	})
	stored := views["inbox 101"]
	for name, v := range views {
		for id := range acked {
			if !v[id] {
				t.Fatalf("%s: acknowledged msgid %d lost", name, id)
			}
		}
		// All or nothing: every view holds the same messages, so none
		// is visible in part (in one index and not another).
		if len(v) != len(stored) {
			t.Fatalf("%s holds %d messages, inbox 101 holds %d", name, len(v), len(stored))
		}
		for id := range v {
			if !stored[id] {
				t.Fatalf("msgid %d in %s but not in inbox 101", id, name)
			}
		}
	}
	if n, _, _ := s.InboxCount(ctx, term(crashTo, 102)); n != len(stored) {
		t.Fatalf("InboxCount = %d, want %d", n, len(stored))
	}
	// Idempotency keys were in the same batches: every retry is a dup.
	for id := range stored {
		m := &pb.C2CMessage{Msgid: id + 1, From: &pb.User{Account: crashFrom.Account, Uid: crashFrom.UID}, FromAppcode: 101,
			To: &pb.User{Account: crashTo.Account, Uid: crashTo.UID}, ClientMsgId: "c" + strconv.FormatUint(id, 10)}
		if got, dup, err := s.PutC2C(ctx, m, []uint32{101, 102}, nil); err != nil || !dup || got != id {
			t.Fatalf("retry of %d after the crash = %d, dup %v, %v", id, got, dup, err)
		}
	}
	t.Logf("%d acknowledged puts, %d stored (the rest were in flight at a kill)", len(acked), len(stored))
}
