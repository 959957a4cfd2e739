package embedded

import (
	"bufio"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2"

	"github.com/imd-dev/imd/das"
	"github.com/imd-dev/imd/das/dastest"
	"github.com/imd-dev/imd/schema/pb"
)

func TestGroupConformance(t *testing.T) {
	dastest.RunGroups(t, func(t *testing.T) das.GroupStore {
		return openTest(t, Options{JanitorInterval: -1})
	})
}

// TestGroupConformanceBusyJanitor runs the group suite while the janitor
// sweeps every millisecond (group retention and idempotency expiry with
// bounds the suite never reaches).
func TestGroupConformanceBusyJanitor(t *testing.T) {
	if testing.Short() {
		t.Skip("short")
	}
	dastest.RunGroups(t, func(t *testing.T) das.GroupStore {
		return openTest(t, Options{
			JanitorInterval: time.Millisecond,
			Retention:       das.Retention{MaxAge: 24 * time.Hour, IdempotencyTTL: time.Hour},
		})
	})
}

// groupMsg is a chat message of group id from u's terminal 101.
func groupMsg(id, msgid uint64, u das.User, cmid string) *pb.C2CMessage {
	return &pb.C2CMessage{
		Msgid:       msgid,
		From:        &pb.User{Account: u.Account, Uid: u.UID},
		FromAppcode: 101,
		To:          &pb.User{},
		GroupId:     id,
		Content:     []byte(fmt.Sprint("group message ", msgid)),
		ClientMsgId: cmid,
	}
}

func groupEvent(id uint64, kind pb.GroupEventKind) *pb.C2CMessage {
	return &pb.C2CMessage{Msgid: dastest.NewMsgid(), From: &pb.User{}, To: &pb.User{}, GroupId: id, Event: &pb.GroupEvent{Kind: kind}}
}

func mustCreate(t *testing.T, s *Store, id uint64, members ...das.User) {
	t.Helper()
	if _, err := s.CreateGroup(ctx, id, members, len(members), groupEvent(id, pb.GroupEventKind_GROUP_EVENT_CREATED)); err != nil {
		t.Fatalf("CreateGroup(%d): %v", id, err)
	}
}

func mustAppend(t *testing.T, s *Store, m *pb.C2CMessage) das.Appended {
	t.Helper()
	a, err := s.AppendGroup(ctx, m)
	if err != nil {
		t.Fatalf("AppendGroup(%d): %v", m.Msgid, err)
	}
	return a
}

// countPrefix counts the keys with prefix p.
func countPrefix(t *testing.T, s *Store, p []byte) int {
	t.Helper()
	it, err := s.db.NewIter(&pebble.IterOptions{LowerBound: p, UpperBound: prefixEnd(p)})
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for ok := it.First(); ok; ok = it.Next() {
		n++
	}
	if err := it.Close(); err != nil {
		t.Fatal(err)
	}
	return n
}

func groupSeqs(t *testing.T, s *Store, id uint64) []uint64 {
	t.Helper()
	msgs, more, err := s.GroupPage(ctx, id, 0, 0, 1000)
	if err != nil || more {
		t.Fatalf("GroupPage(%d): more %v, %v", id, more, err)
	}
	var seqs []uint64
	for _, m := range msgs {
		seqs = append(seqs, m.Seq)
	}
	return seqs
}

// TestGroupStoredOnce: a message to a group of 200 is one row, whatever
// the number of members; nothing goes to the c2c tables.
func TestGroupStoredOnce(t *testing.T) {
	s := openTest(t, Options{JanitorInterval: -1})
	var members []das.User
	for i := range 200 {
		members = append(members, user(uint64(1000+i)))
	}
	const id = 42
	mustCreate(t, s, id, members...)
	for i := range 5 {
		mustAppend(t, s, groupMsg(id, dastest.NewMsgid(), members[i], fmt.Sprint("once-", i)))
	}
	if n := countPrefix(t, s, groupMsgPrefix(id)); n != 6 {
		t.Fatalf("%d message rows for 6 messages", n)
	}
	for _, tag := range []byte{tagMessage, tagInbox, tagTimeline, tagConv} {
		if n := countPrefix(t, s, []byte{tag}); n != 0 {
			t.Fatalf("%d rows of table %c for group messages", n, tag)
		}
	}
	if n := countIdem(t, s, tagGroupIdem); n != 5 {
		t.Fatalf("%d group idempotency keys, want 5", n)
	}
}

// TestGroupRetention: the janitor deletes the old prefix of each group's
// stream, a page then starts at the oldest kept seq, and the head and the
// next seq are unaffected. A new message stops the trim even if older
// ones follow it, so the kept seqs never have holes.
func TestGroupRetention(t *testing.T) {
	s := openTest(t, Options{JanitorInterval: -1, Retention: das.Retention{MaxAge: 24 * time.Hour}})
	a := user(1)
	const g1, g2, g3 = 7, 8, 9
	for _, id := range []uint64{g1, g2, g3} {
		mustCreate(t, s, id, a)
	}
	old := func() uint64 { return das.MsgidAt(time.Now().Add(-48*time.Hour)) + dastest.NewMsgid()%1000 }
	// g1: events at seq 1 are new; old messages after them stay.
	mustAppend(t, s, groupMsg(g1, old(), a, ""))
	// g2 and g3 start with old messages (written as if long ago).
	for _, id := range []uint64{g2, g3} {
		k := groupMsgKey(id, 1)
		v, closer, err := s.db.Get(k)
		if err != nil {
			t.Fatal(err)
		}
		_, body, _ := decodeGroupMsgValue(v)
		v2 := encodeGroupMsgValue(old(), slices.Clone(body))
		_ = closer.Close()
		if err := s.db.Set(k, v2, pebble.Sync); err != nil {
			t.Fatal(err)
		}
		mustAppend(t, s, groupMsg(id, old(), a, ""))
		mustAppend(t, s, groupMsg(id, old(), a, ""))
	}
	mustAppend(t, s, groupMsg(g2, dastest.NewMsgid(), a, ""))
	mustAppend(t, s, groupMsg(g3, dastest.NewMsgid(), a, ""))
	mustAppend(t, s, groupMsg(g3, old(), a, "")) // late, with an old msgid

	st, err := s.Sweep(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if st.GroupMessages != 6 {
		t.Fatalf("swept %d group messages, want 6 (%+v)", st.GroupMessages, st)
	}
	for id, want := range map[uint64][]uint64{g1: {1, 2}, g2: {4}, g3: {4, 5}} {
		if got := groupSeqs(t, s, id); !slices.Equal(got, want) {
			t.Fatalf("group %d after the sweep: seqs %v, want %v", id, got, want)
		}
	}
	if got := mustAppend(t, s, groupMsg(g2, dastest.NewMsgid(), a, "")); got.Seq != 5 {
		t.Fatalf("append after the sweep: seq %d, want 5", got.Seq)
	}
	if msgs, _, err := s.GroupPage(ctx, g2, 0, 3, 10); err != nil || len(msgs) != 0 {
		t.Fatalf("page of trimmed seqs: %d messages, %v", len(msgs), err)
	}
	if st, err := s.Sweep(ctx); err != nil || st.GroupMessages != 0 {
		t.Fatalf("second sweep: %+v, %v", st, err)
	}
}

// TestGroupIdempotencyExpiry: a group idempotency key counts until
// IdempotencyTTL, the janitor drops its epoch once every key of it
// expired (one epoch later at most), and a retry after that is a new
// message.
func TestGroupIdempotencyExpiry(t *testing.T) {
	s := openTest(t, Options{JanitorInterval: -1, Retention: das.Retention{IdempotencyTTL: time.Hour}})
	now := time.Now()
	s.now = func() time.Time { return now }
	a := user(1)
	const id = 5
	mustCreate(t, s, id, a)
	first := mustAppend(t, s, groupMsg(id, dastest.NewMsgid(), a, "cm"))
	if got := mustAppend(t, s, groupMsg(id, dastest.NewMsgid(), a, "cm")); !got.Dup || got.Seq != first.Seq {
		t.Fatalf("retry within the TTL = %+v, want dup of %+v", got, first)
	}
	// A c2c message with the same client id is not a retry of it.
	if _, dup, err := s.PutC2C(ctx, msgAt(dastest.NewMsgid(), a, user(2), "cm"), []uint32{101}, nil); err != nil || dup {
		t.Fatalf("c2c with the client id of a group message: dup %v, %v", dup, err)
	}
	now = now.Add(time.Hour + time.Duration(s.idemEpochMs)*time.Millisecond)
	st, err := s.Sweep(ctx)
	if err != nil || st.Idempotency != 2 {
		t.Fatalf("sweep after the TTL and an epoch: %+v, %v; want 2 keys expired", st, err)
	}
	if n := countIdem(t, s, 0) + countPrefix(t, s, []byte{tagIdemQueue}); n != 0 {
		t.Fatalf("%d idempotency rows left", n)
	}
	if got := mustAppend(t, s, groupMsg(id, dastest.NewMsgid(), a, "cm")); got.Dup || got.Seq != first.Seq+1 {
		t.Fatalf("retry after expiry = %+v, want a new seq", got)
	}
	// Expired but not swept: replaced in a newer epoch, which lookups
	// read first.
	now = now.Add(time.Hour)
	if got := mustAppend(t, s, groupMsg(id, dastest.NewMsgid(), a, "cm")); got.Dup || got.Seq != first.Seq+2 {
		t.Fatalf("retry after an unswept expiry = %+v, want a new seq", got)
	}
	if got := mustAppend(t, s, groupMsg(id, dastest.NewMsgid(), a, "cm")); !got.Dup || got.Seq != first.Seq+2 {
		t.Fatalf("retry of the replacing message = %+v, want a dup of seq %d", got, first.Seq+2)
	}
	if n, q := countIdem(t, s, tagGroupIdem), countPrefix(t, s, []byte{tagIdemQueue}); n != 2 || q != 0 {
		t.Fatalf("%d keys (the replaced one and its replacement), %d queue rows; want 2, 0", n, q)
	}
}

// countIdem counts the idempotency keys of every epoch whose logical key
// has tag (0: all).
func countIdem(t testing.TB, s *Store, tag byte) int {
	t.Helper()
	it, err := s.db.NewIter(&pebble.IterOptions{LowerBound: []byte{tagIdemEpoch}, UpperBound: []byte{tagIdemEpoch + 1}})
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for ok := it.First(); ok; ok = it.Next() {
		if k := it.Key(); tag == 0 || (len(k) > idemEpochHead && k[idemEpochHead] == tag) {
			n++
		}
	}
	if err := it.Close(); err != nil {
		t.Fatal(err)
	}
	return n
}

const groupCrashEnv = "IMD_DAS_GROUP_CRASH_DIR"

const crashGroup = 77

// init turns the test binary into the group crash writer when
// TestGroupCrashSafety runs it as a child (before TestMain, which
// dispatches the c2c one).
func init() {
	if dir := os.Getenv(groupCrashEnv); dir != "" {
		groupCrashChild(dir)
		os.Exit(0)
	}
}

// groupCrashChild appends to one group from four goroutines as fast as it
// can and prints "ok <seq> <msgid>" after each AppendGroup that returned
// nil. The first run creates the group.
func groupCrashChild(dir string) {
	s, err := Open(dir, Options{JanitorInterval: time.Millisecond})
	if err != nil {
		fmt.Println("open:", err)
		os.Exit(2)
	}
	senders := []das.User{crashFrom, crashTo}
	if _, err := s.CreateGroup(ctx, crashGroup, senders, 10, groupEvent(crashGroup, pb.GroupEventKind_GROUP_EVENT_CREATED)); err != nil && !errors.Is(err, das.ErrGroupExists) {
		fmt.Println("append: create:", err)
		os.Exit(2)
	}
	var out sync.Mutex
	var wg sync.WaitGroup
	for w := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				id := dastest.NewMsgid()
				m := groupMsg(crashGroup, id, senders[w%2], "c"+strconv.FormatUint(id, 10))
				a, err := s.AppendGroup(ctx, m)
				if err != nil || a.Dup {
					fmt.Println("append:", err, a.Dup)
					os.Exit(2)
				}
				out.Lock()
				os.Stdout.WriteString(fmt.Sprintf("ok %d %d\n", a.Seq, id))
				out.Unlock()
			}
		}()
	}
	wg.Wait()
}

// TestGroupCrashSafety kills a process appending to a group with SIGKILL
// three times and checks, by counting, that every acknowledged append is
// in the stream at the seq it was given, that the stream has no gap or
// repeat from 1 to the head, and that every stored message's idempotency
// key survived with it (one synced batch per append).
func TestGroupCrashSafety(t *testing.T) {
	if testing.Short() {
		t.Skip("short")
	}
	dir := t.TempDir()
	acked := map[uint64]uint64{} // seq -> msgid
	for round := range 3 {
		cmd := exec.Command(os.Args[0], "-test.run=^$")
		cmd.Env = append(os.Environ(), groupCrashEnv+"="+dir)
		stdout, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		cmd.Stderr = os.Stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		killAfter := 50 + rand.IntN(150)
		sc := bufio.NewScanner(stdout)
		n := 0
		for sc.Scan() {
			line := sc.Text()
			if strings.HasPrefix(line, "append:") || strings.HasPrefix(line, "open:") {
				t.Fatalf("child: %s", line)
			}
			var seq, id uint64
			if _, err := fmt.Sscanf(line, "ok %d %d", &seq, &id); err != nil {
				continue
			}
			if prev, ok := acked[seq]; ok {
				t.Fatalf("seq %d acknowledged for msgids %d and %d", seq, prev, id)
			}
			acked[seq] = id
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
	}

	s, err := Open(dir, Options{JanitorInterval: -1})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	info, err := s.Group(ctx, crashGroup)
	if err != nil {
		t.Fatal(err)
	}
	var all []*pb.C2CMessage
	for after := uint64(0); ; {
		msgs, more, err := s.GroupPage(ctx, crashGroup, after, 0, 500)
		if err != nil {
			t.Fatal(err)
		}
		all = append(all, msgs...)
		if !more {
			break
		}
		after = msgs[len(msgs)-1].Seq
	}
	if uint64(len(all)) != info.Head {
		t.Fatalf("%d messages for head %d", len(all), info.Head)
	}
	for i, m := range all {
		if m.Seq != uint64(i+1) {
			t.Fatalf("message %d has seq %d", i, m.Seq)
		}
		if id, ok := acked[m.Seq]; ok && id != m.Msgid {
			t.Fatalf("seq %d: acknowledged msgid %d, stored %d", m.Seq, id, m.Msgid)
		}
		if i == 0 {
			continue
		}
		if string(m.Content) != fmt.Sprint("group message ", m.Msgid) {
			t.Fatalf("seq %d is damaged: %v", m.Seq, m)
		}
		// Its idempotency key was in the same batch: a retry is a dup.
		retry := groupMsg(crashGroup, dastest.NewMsgid(), userOf(m.From), m.ClientMsgId)
		if a, err := s.AppendGroup(ctx, retry); err != nil || !a.Dup || a.Seq != m.Seq || a.Msgid != m.Msgid {
			t.Fatalf("retry of seq %d after the crash = %+v, %v", m.Seq, a, err)
		}
	}
	for seq := range acked {
		if seq > info.Head {
			t.Fatalf("acknowledged seq %d lost (head %d)", seq, info.Head)
		}
	}
	t.Logf("%d acknowledged appends, head %d", len(acked), info.Head)
}
