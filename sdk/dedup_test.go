package sdk

import "testing"

// TestDedupWindow: the last DedupSize ids are recognised, older ones are
// forgotten, and memory stays bounded by DedupSize.
func TestDedupWindow(t *testing.T) {
	c := &Client{opts: Options{DedupSize: 4}}
	in := newInbox(c)
	for id := uint64(1); id <= 4; id++ {
		if !in.firstTime(id) {
			t.Fatalf("id %d seen before its first time", id)
		}
	}
	for id := uint64(1); id <= 4; id++ {
		if in.firstTime(id) {
			t.Fatalf("id %d within the window not recognised", id)
		}
	}
	for id := uint64(5); id <= 10; id++ {
		in.firstTime(id)
	}
	if len(in.seen) != 4 || len(in.ring) != 4 {
		t.Fatalf("window holds %d ids in a ring of %d, want 4", len(in.seen), len(in.ring))
	}
	if in.firstTime(10) || in.firstTime(7) {
		t.Fatal("recent ids not recognised")
	}
	if !in.firstTime(1) {
		t.Fatal("an id older than the window is still remembered")
	}
}
