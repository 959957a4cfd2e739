package platform

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/imd-dev/imd/sdk"
)

// TestC2CSoak: users on two terminals each exchange messages while
// connections are cut at random and some sends are duplicated. Counting,
// not sampling: every message whose send returned is delivered exactly
// once to each terminal of its recipient and to the sender's other
// terminal, in per-sender order, and every inbox ends empty. It sends 20,000 messages (4,000 under the race
// detector or -short; `make test` runs it both ways); IMD_SOAK_MESSAGES
// overrides the count.
func TestC2CSoak(t *testing.T) {
	const users = 20
	total := 20000
	if raceEnabled || testing.Short() {
		total = 4000
	}
	if v := os.Getenv("IMD_SOAK_MESSAGES"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < users {
			t.Fatalf("IMD_SOAK_MESSAGES=%q: want a count >= %d", v, users)
		}
		total = n
	}
	perUser := total / users
	p := start(t, nil)
	px := newProxy(t, p.GatewayAddr())

	type terminal struct {
		c   *sdk.Client
		rec *received
	}
	terms := make(map[uint64][2]*terminal) // uid -> [101, 102]
	opts := func(rec *received) func(*sdk.Options) {
		return func(o *sdk.Options) {
			o.Addrs = []string{px.addr()}
			o.OnC2C = rec.on
			o.PageSize = 20
			o.BackoffMin, o.BackoffMax = 5*time.Millisecond, 50*time.Millisecond
			o.SendBackoffMin, o.SendBackoffMax = 5*time.Millisecond, 100*time.Millisecond
			o.SendAttempts = 50
			o.RequestTimeout = 3 * time.Second
		}
	}
	for uid := uint64(1); uid <= users; uid++ {
		var pair [2]*terminal
		for i, app := range []uint32{101, 102} {
			rec := &received{}
			pair[i] = &terminal{c: login(t, p, app, uid, opts(rec)), rec: rec}
		}
		terms[uid] = pair
	}

	// Chaos: cut a random connection every few milliseconds while sending.
	stop := make(chan struct{})
	var cuts atomic.Int64
	var chaos sync.WaitGroup
	chaos.Add(1)
	go func() {
		defer chaos.Done()
		r := rand.New(rand.NewPCG(1, 2))
		for {
			select {
			case <-stop:
				return
			case <-time.After(time.Duration(2+r.IntN(8)) * time.Millisecond):
				if px.cutOne(r) {
					cuts.Add(1)
				}
			}
		}
	}()

	// Each user sends from its 101 terminal to random other users.
	// sent[from] lists, in order, the contents whose send returned.
	type sentMsg struct {
		to      uint64
		content string
	}
	sent := make([][]sentMsg, users+1)
	var failed, dups atomic.Int64
	var wg sync.WaitGroup
	began := time.Now()
	for uid := uint64(1); uid <= users; uid++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewPCG(uid, 7))
			c := terms[uid][0].c
			for i := range perUser {
				to := uint64(1 + r.IntN(users-1))
				if to >= uid {
					to++
				}
				content := fmt.Sprintf("u%02d-%06d", uid, i)
				id := sdk.NewClientMsgID()
				ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
				resp, err := c.SendC2CWithID(ctx, acct1(to), 0, id, []byte(content))
				if err == nil && r.IntN(20) == 0 {
					// A duplicated packet: the same send again.
					again, err2 := c.SendC2CWithID(ctx, acct1(to), 0, id, []byte(content))
					if err2 == nil && (again.Msgid != resp.Msgid || !again.Duplicate) {
						t.Errorf("duplicate send got msgid %d dup=%v, want %d", again.Msgid, again.Duplicate, resp.Msgid)
					}
					dups.Add(1)
				}
				cancel()
				if err != nil {
					// Possibly stored: we cannot count it either way, and a
					// send must not fail at all with 50 attempts.
					failed.Add(1)
					t.Errorf("send %s: %v", content, err)
					if errors.Is(err, sdk.ErrClosed) {
						return
					}
					continue
				}
				sent[uid] = append(sent[uid], sentMsg{to: to, content: content})
			}
		}()
	}
	wg.Wait()
	sendTime := time.Since(began)
	close(stop)
	chaos.Wait()

	// Expected per terminal: each sender's contents in order; the
	// sender's own 102 terminal (index 1) shows what it sent from 101.
	want := make(map[uint64][2]map[uint64][]string) // uid -> terminal -> from -> contents
	add := func(uid uint64, term int, from uint64, c string) {
		w := want[uid]
		if w[term] == nil {
			w[term] = map[uint64][]string{}
		}
		w[term][from] = append(w[term][from], c)
		want[uid] = w
	}
	stored := 0
	for from := uint64(1); from <= users; from++ {
		for _, m := range sent[from] {
			add(m.to, 0, from, m.content)
			add(m.to, 1, from, m.content)
			add(from, 1, from, m.content)
			stored++
		}
	}
	expect := func(uid uint64, term int) int {
		n := 0
		for _, l := range want[uid][term] {
			n += len(l)
		}
		return n
	}
	deadline := time.Now().Add(60 * time.Second)
	for uid := uint64(1); uid <= users; uid++ {
		for i, tm := range terms[uid] {
			for tm.rec.len() < expect(uid, i) && time.Now().Before(deadline) {
				time.Sleep(10 * time.Millisecond)
			}
			if tm.rec.len() < expect(uid, i) {
				t.Fatalf("uid %d terminal %d: %d of %d messages delivered", uid, i, tm.rec.len(), expect(uid, i))
			}
		}
	}
	time.Sleep(200 * time.Millisecond) // let duplicates, if any, show up
	for uid := uint64(1); uid <= users; uid++ {
		for i, tm := range terms[uid] {
			got := map[uint64][]string{}
			seen := map[string]bool{}
			for _, c := range tm.rec.contents() {
				if seen[c] {
					t.Fatalf("uid %d terminal %d: %q delivered twice", uid, i, c)
				}
				seen[c] = true
				from, _ := strconv.ParseUint(c[1:3], 10, 64)
				got[from] = append(got[from], c)
			}
			for from, w := range want[uid][i] {
				g := got[from]
				if len(g) != len(w) {
					t.Fatalf("uid %d terminal %d from %d: got %d messages, want %d", uid, i, from, len(g), len(w))
				}
				for k := range w {
					if g[k] != w[k] {
						t.Fatalf("uid %d terminal %d from %d: message %d is %q, want %q (order or loss)", uid, i, from, k, g[k], w[k])
					}
				}
			}
			if len(got) != len(want[uid][i]) {
				t.Fatalf("uid %d terminal %d: messages from unexpected senders", uid, i)
			}
		}
	}
	// Every inbox drains once the acks are in.
	for uid := uint64(1); uid <= users; uid++ {
		for i, tm := range terms[uid] {
			eventually(t, 10*time.Second, fmt.Sprintf("uid %d terminal %d inbox empty", uid, i), func() bool {
				r, err := tm.c.OfflineCount(context.Background())
				return err == nil && r.Count == 0
			})
		}
	}
	t.Logf("%d messages stored and delivered to %d terminals in %s (%.0f sends/s), %d connections cut, %d duplicate sends, %d failed",
		stored, 2*users, sendTime.Round(time.Millisecond), float64(stored)/sendTime.Seconds(), cuts.Load(), dups.Load(), failed.Load())
}
