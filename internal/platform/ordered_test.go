package platform

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/imd-dev/imd/schema/pb"
	"github.com/imd-dev/imd/sdk"
)

// TestC2COrderedSendsUnderCuts: a sender pipelines 400 messages
// (SendC2CAsync, up to 32 in flight) while its connection is cut again
// and again. Every message is stored once, their msgids rise in send
// order, and the recipient shows each exactly once, in send order.
func TestC2COrderedSendsUnderCuts(t *testing.T) {
	const n = 400
	p := start(t, nil)
	px := newProxy(t, p.GatewayAddr())
	var mu sync.Mutex
	var shown []string
	all := make(chan struct{})
	login(t, p, 101, 2, func(o *sdk.Options) {
		o.OnC2C = func(m *pb.C2CMessage) {
			mu.Lock()
			defer mu.Unlock()
			shown = append(shown, string(m.Content))
			if len(shown) == n {
				close(all)
			}
		}
	})
	alice := login(t, p, 101, 1, func(o *sdk.Options) {
		o.Addrs = []string{px.addr()}
		o.SendAttempts = 30
		o.SendBackoffMin, o.SendBackoffMax = 5*time.Millisecond, 50*time.Millisecond
	})

	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	stop := make(chan struct{})
	cutter := make(chan int)
	go func() {
		cuts := 0
		defer func() { cutter <- cuts }()
		for {
			select {
			case <-stop:
				return
			case <-time.After(30 * time.Millisecond):
				if cuts < 12 {
					px.cut()
					cuts++
				}
			}
		}
	}()
	sends := make([]*sdk.AsyncSend, n)
	for i := range sends {
		sends[i] = alice.SendC2CAsync(ctx, acct1(2), 1, fmt.Appendf(nil, "%04d", i))
	}
	var last uint64
	for i, a := range sends {
		resp, err := a.Wait(ctx)
		if err != nil {
			t.Fatalf("send %d: %v", i, err)
		}
		if resp.Msgid <= last {
			t.Fatalf("send %d got msgid %d, not above the previous send's %d", i, resp.Msgid, last)
		}
		last = resp.Msgid
	}
	close(stop)
	cuts := <-cutter
	select {
	case <-all:
	case <-time.After(20 * time.Second):
	}
	mu.Lock()
	defer mu.Unlock()
	lost, twice, disorder := 0, 0, 0
	seen := map[string]bool{}
	prev := ""
	for _, c := range shown {
		if seen[c] {
			twice++
			continue
		}
		seen[c] = true
		if c < prev {
			disorder++
		}
		prev = c
	}
	for i := range n {
		if !seen[fmt.Sprintf("%04d", i)] {
			lost++
		}
	}
	t.Logf("%d messages, %d cuts of the sender's connection: %d shown, lost %d, twice %d, out of order %d", n, cuts, len(shown), lost, twice, disorder)
	if lost != 0 || twice != 0 || disorder != 0 {
		t.Fatalf("lost %d, shown twice %d, out of order %d", lost, twice, disorder)
	}
	if cuts == 0 {
		t.Fatal("the sender's connection was never cut: the test proved nothing about retries")
	}
}
