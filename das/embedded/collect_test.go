package embedded

import (
	"context"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/imd-dev/imd/das"
)

// errorCounter is a slog handler that counts records at Error level.
type errorCounter struct{ n atomic.Int64 }

func (h *errorCounter) Enabled(_ context.Context, l slog.Level) bool { return l >= slog.LevelError }
func (h *errorCounter) Handle(_ context.Context, r slog.Record) error {
	h.n.Add(1)
	return nil
}
func (h *errorCounter) WithAttrs([]slog.Attr) slog.Handler { return h }
func (h *errorCounter) WithGroup(string) slog.Handler      { return h }

// TestCollectorVersusReaders trims timelines to one entry and sweeps every
// millisecond while a writer stores and a reader pages and acks: the
// collector deletes messages as soon as the last row goes, and no reader
// may see an index row without its message, or a message twice.
func TestCollectorVersusReaders(t *testing.T) {
	h := &errorCounter{}
	s := openTest(t, Options{
		Logger:          slog.New(h),
		JanitorInterval: time.Millisecond,
		Retention:       das.Retention{MaxCount: 1},
	})
	a, b := user(1), user(2)
	const n = 400
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := range n {
			m := msgAt(uint64(1000+i), a, b, fmt.Sprint(i))
			if _, _, err := s.PutC2C(ctx, m, []uint32{101}, nil); err != nil {
				t.Error(err)
				return
			}
		}
	}()
	// A second reader pages the same inbox without acking, racing the
	// first reader's acks and the collection that follows them.
	done := make(chan struct{})
	var watched atomic.Int64
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-done:
				return
			default:
			}
			msgs, _, err := s.InboxPage(ctx, term(b, 101), 0, 10)
			if err != nil {
				t.Error(err)
				return
			}
			for _, m := range msgs {
				if string(m.Content) != fmt.Sprint("content ", m.Msgid) {
					t.Errorf("watcher: msgid %d: content %q", m.Msgid, m.Content)
					return
				}
			}
			watched.Add(int64(len(msgs)))
		}
	}()
	seen := map[uint64]bool{}
	deadline := time.Now().Add(30 * time.Second)
	for len(seen) < n && time.Now().Before(deadline) {
		msgs, _, err := s.InboxPage(ctx, term(b, 101), 0, 10)
		if err != nil {
			t.Fatal(err)
		}
		var ids []uint64
		for _, m := range msgs {
			if seen[m.Msgid] {
				t.Fatalf("msgid %d seen twice", m.Msgid)
			}
			if string(m.Content) != fmt.Sprint("content ", m.Msgid) {
				t.Fatalf("msgid %d: content %q", m.Msgid, m.Content)
			}
			seen[m.Msgid] = true
			ids = append(ids, m.Msgid)
		}
		if _, missing, err := s.Ack(ctx, term(b, 101), ids); err != nil || len(missing) != 0 {
			t.Fatalf("ack: missing %v, %v", missing, err)
		}
	}
	close(done)
	wg.Wait()
	if len(seen) != n {
		t.Fatalf("saw %d of %d messages", len(seen), n)
	}
	t.Logf("the second reader read %d messages", watched.Load())
	sweep(t, s)
	if left := countTag(t, s, tagMessage); left != 1 { // the newest, on both timelines
		t.Fatalf("%d messages left after acking all and trimming to 1", left)
	}
	if e := h.n.Load(); e != 0 {
		t.Fatalf("%d errors logged", e)
	}
}
