package gateway

import (
	"context"
	"testing"
	"time"
)

// TestReqCtxsShareAndExpire: requests within one slice share a context,
// each context ends within [timeout - slice, timeout] of its requests'
// start, a later request gets a fresh one, and cancelling the parent ends
// them all.
func TestReqCtxsShareAndExpire(t *testing.T) {
	parent, cancel := context.WithCancel(context.Background())
	r := newReqCtxs(parent, 200*time.Millisecond) // slices of 10ms
	start := time.Now()
	a, b := r.get(), r.get()
	if a != b {
		t.Fatal("two requests in the same slice got different contexts")
	}
	dl, ok := a.Deadline()
	if !ok || dl.Sub(start) > 205*time.Millisecond || dl.Sub(start) < 190*time.Millisecond {
		t.Fatalf("deadline %v after start, want about 200ms", dl.Sub(start))
	}
	time.Sleep(15 * time.Millisecond)
	c := r.get()
	if c == a {
		t.Fatal("a request after the slice got the old context")
	}
	select {
	case <-a.Done():
	case <-time.After(time.Second):
		t.Fatal("the shared context did not end at its deadline")
	}
	if c.Err() != nil && time.Since(start) < 205*time.Millisecond {
		t.Fatal("the newer context ended with the older one")
	}
	d := r.get()
	cancel()
	select {
	case <-d.Done():
	case <-time.After(time.Second):
		t.Fatal("cancelling the parent did not end the request contexts")
	}
}

func BenchmarkReqCtx(b *testing.B) {
	r := newReqCtxs(context.Background(), 10*time.Second)
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			_ = r.get()
		}
	})
}
