//go:build linux

package gateway

import (
	"context"
	"encoding/binary"
	"testing"

	"github.com/imd-dev/imd/schema"
)

// TestFlusherCoalesces queues 500 notifies on one connection faster than
// any socket takes them: they arrive complete and in order, and the loop's
// flusher writes several with each system call (a write costs microseconds,
// queueing a frame a fraction of one), so fewer than half as many writes as
// frames.
func TestFlusherCoalesces(t *testing.T) {
	s := startServer(t, EngineEpoll, nil)
	c := dialClient(t, s)
	c.login(42)
	id := onlyConn(t, s)
	const n = 500
	before := counter(s.m.writes)
	got := make(chan error, 1)
	go func() {
		for i := range n {
			h, body := c.read()
			if h.Kind() != schema.KindNotify || len(body) != 8 || binary.BigEndian.Uint64(body) != uint64(i) {
				t.Errorf("frame %d: %s %s, body %x", i, h.Kind(), h.Cmd, body)
				got <- nil
				return
			}
		}
		got <- nil
	}()
	queued := make([]bool, 1)
	for i := range n {
		body := binary.BigEndian.AppendUint64(nil, uint64(i))
		if err := s.Push(context.Background(), []uint64{id}, schema.CmdS2C, 0, 0, body, queued); err != nil || !queued[0] {
			t.Fatalf("push %d: queued %v, %v", i, queued[0], err)
		}
	}
	<-got
	writes := counter(s.m.writes) - before
	t.Logf("%d frames in %.0f writes", n, writes)
	if writes >= n/2 {
		t.Fatalf("%d frames took %.0f writes: the flusher does not coalesce", n, writes)
	}
}
