package cassandra

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/imd-dev/imd/das"
)

// TestFault stops Cassandra while senders store messages and a consumer
// pulls and acks, then starts it again. It restarts the shared server of
// scripts/services.sh, so it runs only with IMD_TEST_CASSANDRA_FAULT=1.
//
// Each sender stores a sequence of messages, each with its own client id;
// on an error it retries the same client id (with a new msgid, as logic
// does) until a call succeeds. It checks that every error is
// das.ErrUnavailable, and at the end the test counts: every recipient
// terminal's inbox and every sender's timeline hold exactly the msgids
// that the successful calls returned (one per client id, none missing,
// none extra, none twice), and the consumer received each of its
// terminal's messages once (more than once only after an Ack that
// failed).
func TestFault(t *testing.T) {
	if os.Getenv("IMD_TEST_CASSANDRA_FAULT") != "1" {
		t.Skip("set IMD_TEST_CASSANDRA_FAULT=1 to run (it stops and restarts the Cassandra of scripts/services.sh)")
	}
	cfg := needCassandra(t)
	cfg.Timeout = 2 * time.Second
	cfg.ConnectTimeout = 2 * time.Second
	cfg.ReconnectInterval = time.Second
	cfg.Retries = 1
	s := openTest(t, cfg)
	script, err := filepath.Abs(filepath.Join("..", "..", "scripts", "services.sh"))
	if err != nil {
		t.Fatal(err)
	}
	services := func(args ...string) time.Duration {
		t.Helper()
		start := time.Now()
		ctx, cancel := context.WithTimeout(context.Background(), 6*time.Minute)
		defer cancel()
		out, err := exec.CommandContext(ctx, "bash", append([]string{script}, args...)...).CombinedOutput()
		if err != nil {
			t.Fatalf("services.sh %v: %v\n%s", args, err, out)
		}
		return time.Since(start)
	}
	restarted := false
	t.Cleanup(func() {
		if !restarted {
			services("up", "cassandra")
		}
	})

	const senders, recipients = 8, 4
	var from, to []das.User
	for range senders {
		from = append(from, newUser())
	}
	for range recipients {
		to = append(to, newUser())
	}
	consumer := term(to[0], 101)

	var (
		stop     atomic.Bool
		down     atomic.Bool // between "down" and the first success after "up"
		okBefore atomic.Int64
		okAfter  atomic.Int64
		errsDown atomic.Int64
		errsAll  atomic.Int64
		dups     atomic.Int64
		attempts atomic.Int64
		mu       sync.Mutex
		stored   = map[string]uint64{} // client id -> msgid
		rcptOf   = map[uint64]das.User{}
		badErr   error
	)
	fail := func(err error) {
		mu.Lock()
		badErr = cmpOr(badErr, err)
		mu.Unlock()
		stop.Store(true)
	}
	var wg sync.WaitGroup
	for w := range senders {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; !stop.Load(); i++ {
				cmid := fmt.Sprintf("fault-%d-%d-%d", from[w].UID, w, i)
				rcpt := to[(w+i)%recipients]
				backoff := 50 * time.Millisecond
				deadline := time.Now().Add(4 * time.Minute)
				for {
					m := newMsg(msgidAround(time.Now()), from[w], rcpt, cmid)
					cctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
					id, dup, err := s.PutC2C(cctx, m, []uint32{101, 102}, nil)
					cancel()
					attempts.Add(1)
					if err == nil {
						mu.Lock()
						if prev, ok := stored[cmid]; ok && prev != id {
							badErr = cmpOr(badErr, fmt.Errorf("client id %s stored as %d and %d", cmid, prev, id))
						}
						stored[cmid] = id
						rcptOf[id] = rcpt
						mu.Unlock()
						if dup {
							dups.Add(1)
						}
						if down.Load() {
							okAfter.Add(1)
						} else {
							okBefore.Add(1)
						}
						break
					}
					if !errors.Is(err, das.ErrUnavailable) {
						fail(fmt.Errorf("sender %d: PutC2C: %w (not ErrUnavailable)", w, err))
						return
					}
					errsAll.Add(1)
					if down.Load() {
						errsDown.Add(1)
					}
					if time.Now().After(deadline) {
						fail(fmt.Errorf("sender %d: client id %s not stored after 4 minutes: %w", w, cmid, err))
						return
					}
					time.Sleep(backoff)
					backoff = min(2*backoff, time.Second)
				}
			}
		}()
	}

	// The consumer pulls its terminal's inbox and acks each page.
	var (
		delivered   = map[uint64]int{}
		ackFailures atomic.Int64
		readErrs    atomic.Int64
	)
	pull := func() error {
		cctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		msgs, _, err := s.InboxPage(cctx, consumer, 0, 50)
		if err != nil {
			return err
		}
		if len(msgs) == 0 {
			return nil
		}
		for _, m := range msgs {
			delivered[m.Msgid]++
		}
		if _, _, err := s.Ack(cctx, consumer, ids(msgs)); err != nil {
			ackFailures.Add(1)
			return err
		}
		return nil
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		for !stop.Load() {
			if err := pull(); err != nil {
				if !errors.Is(err, das.ErrUnavailable) {
					fail(fmt.Errorf("consumer: %w (not ErrUnavailable)", err))
					return
				}
				readErrs.Add(1)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}()

	time.Sleep(3 * time.Second)
	down.Store(true)
	tDown := services("down", "cassandra")
	// Requests in flight when the stop began may have succeeded while
	// Cassandra drained; none can once its process is gone.
	before := okAfter.Load()
	t.Logf("cassandra stopped in %v; %d messages stored before the stop, %d while it stopped",
		tDown.Round(time.Millisecond), okBefore.Load(), before)
	time.Sleep(5 * time.Second)
	if okAfter.Load() != before {
		t.Errorf("%d stores succeeded with Cassandra stopped", okAfter.Load()-before)
	}
	// Reads fail as retryable too.
	if _, _, err := s.InboxCount(context.Background(), consumer); !errors.Is(err, das.ErrUnavailable) {
		t.Errorf("InboxCount with Cassandra down: %v, want ErrUnavailable", err)
	}
	errsWhileDown := errsDown.Load()
	tUp := services("up", "cassandra")
	restarted = true
	upAt := time.Now()
	t.Logf("cassandra started in %v; %d sender errors while down", tUp.Round(time.Millisecond), errsWhileDown)
	for okAfter.Load() < before+50 && time.Since(upAt) < 2*time.Minute && !stop.Load() {
		time.Sleep(100 * time.Millisecond)
	}
	t.Logf("stores resumed %v after the start", time.Since(upAt).Round(time.Millisecond))
	time.Sleep(3 * time.Second)
	stop.Store(true)
	wg.Wait()
	if badErr != nil {
		t.Fatal(badErr)
	}
	if errsWhileDown == 0 || okBefore.Load() == 0 || okAfter.Load() <= before {
		t.Fatalf("the fault was not exercised: %d stored before, %d errors while down, %d stored after", okBefore.Load(), errsWhileDown, okAfter.Load()-before)
	}
	// Drain the consumer's inbox.
	for {
		cctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		n, _, err := s.InboxCount(cctx, consumer)
		cancel()
		if err != nil {
			t.Fatalf("InboxCount after the restart: %v", err)
		}
		if n == 0 {
			break
		}
		if err := pull(); err != nil {
			t.Fatalf("pull after the restart: %v", err)
		}
	}

	// Count.
	want := map[das.Terminal][]uint64{}
	bySender := map[das.User][]uint64{}
	seqs := make([][]uint64, senders) // msgids per sender by sequence number
	for cmid, id := range stored {
		r := rcptOf[id]
		for _, app := range []uint32{101, 102} {
			want[term(r, app)] = append(want[term(r, app)], id)
		}
		var w, i int
		var uid uint64
		if _, err := fmt.Sscanf(cmid, "fault-%d-%d-%d", &uid, &w, &i); err != nil {
			t.Fatal(err)
		}
		bySender[from[w]] = append(bySender[from[w]], id)
		for len(seqs[w]) <= i {
			seqs[w] = append(seqs[w], 0)
		}
		seqs[w][i] = id
	}
	// Per-sender order: each message's msgid (its first attempt's) is
	// above the previous one's, since a sender starts a message only after
	// the previous one was stored.
	for w, seq := range seqs {
		for i := 1; i < len(seq); i++ {
			if seq[i] <= seq[i-1] {
				t.Errorf("sender %d: message %d has msgid %d, not above message %d's %d", w, i, seq[i], i-1, seq[i-1])
			}
		}
	}
	readAll := func(tm das.Terminal) []uint64 {
		var got []uint64
		after := uint64(0)
		for {
			msgs, more, err := s.InboxPage(context.Background(), tm, after, 500)
			if err != nil {
				t.Fatal(err)
			}
			got = append(got, ids(msgs)...)
			if !more {
				return got
			}
			after = msgs[len(msgs)-1].Msgid
		}
	}
	for _, r := range to {
		for _, app := range []uint32{101, 102} {
			tm := term(r, app)
			if tm == consumer {
				continue
			}
			sameSet(t, fmt.Sprintf("inbox of %v", tm), readAll(tm), want[tm])
		}
	}
	var got []uint64
	redelivered := 0
	for id, n := range delivered {
		got = append(got, id)
		redelivered += n - 1
	}
	sameSet(t, "consumer's deliveries", got, want[consumer])
	if redelivered > 0 && ackFailures.Load() == 0 {
		t.Errorf("%d messages delivered twice without a failed ack", redelivered)
	}
	for _, u := range from {
		var tl []uint64
		for _, m := range history(t, s, u, nil, 500) {
			tl = append(tl, m.Msgid)
		}
		sameSet(t, fmt.Sprintf("timeline of sender %v", u), tl, bySender[u])
	}
	t.Logf("%d messages stored (%d before the stop, %d after), %d calls, %d retryable errors (%d while down), "+
		"%d retries answered as duplicates, consumer: %d delivered, %d redelivered after %d failed acks, %d read errors",
		len(stored), okBefore.Load(), okAfter.Load(), attempts.Load(), errsAll.Load(), errsWhileDown, dups.Load(),
		len(delivered), redelivered, ackFailures.Load(), readErrs.Load())
}

// sameSet fails unless got holds exactly the ids of want, each once.
func sameSet(t *testing.T, what string, got, want []uint64) {
	t.Helper()
	g, w := slices.Clone(got), slices.Clone(want)
	slices.Sort(g)
	slices.Sort(w)
	if len(slices.Compact(slices.Clone(g))) != len(g) {
		t.Errorf("%s: an id twice", what)
	}
	if !slices.Equal(g, w) {
		missing, extra := 0, 0
		for _, id := range w {
			if _, ok := slices.BinarySearch(g, id); !ok {
				missing++
			}
		}
		for _, id := range g {
			if _, ok := slices.BinarySearch(w, id); !ok {
				extra++
			}
		}
		t.Errorf("%s: %d ids, want %d (%d missing, %d extra)", what, len(g), len(w), missing, extra)
	}
}

func cmpOr(a, b error) error {
	if a != nil {
		return a
	}
	return b
}
