package rpc

import (
	"context"
	"log/slog"
	"testing"
	"time"

	"github.com/imd-dev/imd/logic"
)

// TestPeerGatewaysStale: while another DC does not answer (its link is
// down), its last answer is listed marked stale, and not asked for again
// within peerGatewaysFresh; past peerGatewaysStale the DC is left out.
func TestPeerGatewaysStale(t *testing.T) {
	p := &peer{r: &Rooms{log: slog.New(slog.DiscardHandler)}, dc: "dc2"} // no link
	long := time.Now().Add(-10 * time.Second)
	c := &dcGateways{list: []logic.GatewayInfo{{DC: "dc2", ID: "g", Addr: "g:7070"}}, at: long, asked: long}
	got := c.get(context.Background(), p)
	if len(got) != 1 || !got[0].Stale || got[0].Addr != "g:7070" {
		t.Fatalf("with the link down: %+v, want the last answer, stale", got)
	}
	if c.list[0].Stale {
		t.Fatal("the cached answer itself was marked")
	}
	if time.Since(c.asked) > time.Second {
		t.Fatal("the failed ask was not noted")
	}
	c.at = time.Now().Add(-peerGatewaysStale - time.Second)
	if got := c.get(context.Background(), p); got != nil {
		t.Fatalf("past peerGatewaysStale: %+v, want none", got)
	}
	// Answered at the last ask: not stale.
	now := time.Now()
	c.at, c.asked = now, now
	if got := c.get(context.Background(), p); len(got) != 1 || got[0].Stale {
		t.Fatalf("fresh answer: %+v", got)
	}
}
