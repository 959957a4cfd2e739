package router_test

import (
	"encoding/json"
	"testing"

	"github.com/imd-dev/imd/router"
)

// TestNodeJSON: a gateway's heartbeat carries its client addresses, load
// and draining flag; a logic node's stays as it was, so nodes of an older
// version read both.
func TestNodeJSON(t *testing.T) {
	b, err := json.Marshal(router.Node{ID: "logic/a:7071", Role: "logic", Addr: "a:7071", DC: "dc1"})
	if err != nil {
		t.Fatal(err)
	}
	if want := `{"ID":"logic/a:7071","Role":"logic","Addr":"a:7071","DC":"dc1"}`; string(b) != want {
		t.Fatalf("logic node as %s, want %s", b, want)
	}
	g := router.Node{ID: "g1", Role: "gateway", Addr: "h:7443", DC: "dc1", TLSAddr: "h:7443", WebAddr: "h:7072", Load: 42, Draining: true}
	if b, err = json.Marshal(g); err != nil {
		t.Fatal(err)
	}
	var back router.Node
	if err := json.Unmarshal(b, &back); err != nil || back != g {
		t.Fatalf("gateway node %s read back as %+v (%v)", b, back, err)
	}
}
