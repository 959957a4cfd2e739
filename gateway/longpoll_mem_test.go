package gateway

import (
	"bytes"
	"context"
	"net/http"
	"net/http/httptest"
	"os"
	"runtime"
	"strconv"
	"sync"
	"testing"
	"time"
	"unsafe"

	"github.com/imd-dev/imd/schema"
)

// TestLPConnSize pins the size of a long-poll session's struct, most of
// what an idle session costs besides its share of the hub's map.
func TestLPConnSize(t *testing.T) {
	if n := unsafe.Sizeof(lpConn{}); n > 256 {
		t.Fatalf("lpConn is %d bytes, over the 256-byte size class", n)
	}
}

// TestLongPollMemory measures what idle long-poll sessions cost the
// gateway: heap and stacks per session, logged in, first with no poll
// pending and then with one pending each. The requests go straight to the
// handler, so the figures hold the gateway's and logic's share (the
// router's entry is in both) and leave out net/http's own cost of a
// keep-alive connection that carries a pending poll. It runs with
// IMD_LP_MEM=10000 (the number of sessions).
func TestLongPollMemory(t *testing.T) {
	n, _ := strconv.Atoi(os.Getenv("IMD_LP_MEM"))
	if n <= 0 {
		t.Skip("set IMD_LP_MEM to a number of sessions to measure")
	}
	svc := newTestLogic(t)
	s, err := New(Options{Addr: "127.0.0.1:0", Engine: EngineGoroutine, PollTimeout: time.Minute, IdleTimeout: time.Hour}, svc)
	if err != nil {
		t.Fatal(err)
	}
	svc.AttachGate(s.ID(), s)
	h := s.longPollHandler().(*lpHandler)
	do := func(path string, body []byte) *httptest.ResponseRecorder {
		w := httptest.NewRecorder()
		h.ServeHTTP(w, httptest.NewRequest(http.MethodPost, path, bytesReader(body)))
		return w
	}
	used := func() uint64 {
		runtime.GC()
		runtime.GC()
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		return ms.HeapAlloc + ms.StackInuse
	}

	keys := make([]string, 0, n)
	before := used()
	for i := range n {
		c, st := h.hub.open("test")
		if st != schema.StatusOK {
			t.Fatalf("open %d: %s", i, st)
		}
		keys = append(keys, c.key.String())
		// Each session logs in as its own uid.
		if w := do("/lp/send?s="+keys[i], loginFrame(uint64(i+1), 1)); w.Code != http.StatusNoContent {
			t.Fatalf("send %d: %d", i, w.Code)
		}
		if w := do("/lp/poll?s="+keys[i], nil); w.Code != http.StatusOK || w.Body.Len() == 0 {
			t.Fatalf("poll %d: %d", i, w.Code)
		}
	}
	idle := used()
	if h.hub.len() != n {
		t.Fatalf("%d sessions, want %d", h.hub.len(), n)
	}

	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	for _, k := range keys {
		wg.Add(1)
		go func() {
			defer wg.Done()
			w := httptest.NewRecorder()
			h.ServeHTTP(w, httptest.NewRequest(http.MethodPost, "/lp/poll?s="+k, nil).WithContext(ctx))
		}()
	}
	eventually(t, time.Minute, "every poll pending", func() bool {
		pending := 0
		h.hub.mu.Lock()
		for _, c := range h.hub.m {
			c.mu.Lock()
			if c.poll != nil {
				pending++
			}
			c.mu.Unlock()
		}
		h.hub.mu.Unlock()
		return pending == n
	})
	polling := used()
	cancel()
	wg.Wait()

	per := func(a, b uint64) float64 { return float64(int64(b)-int64(a)) / float64(n) }
	t.Logf("%d long-poll sessions, logged in: %.0f B heap+stacks per session with no poll pending; %.0f B with one pending (handler goroutine, request, timer; net/http's connection not included)",
		n, per(before, idle), per(before, polling))
	sctx, scancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer scancel()
	_ = s.Shutdown(sctx)
}

// bytesReader reads b; a nil b is an empty body.
func bytesReader(b []byte) *bytes.Reader { return bytes.NewReader(b) }
