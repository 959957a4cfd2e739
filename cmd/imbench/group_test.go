package main

import (
	"bytes"
	"context"
	"encoding/json"
	"strings"
	"testing"

	"github.com/imd-dev/imd/bench/scenario"
)

func TestGroupEndToEnd(t *testing.T) {
	t.Run("raw", func(t *testing.T) { testGroupEndToEnd(t, "raw") })
	t.Run("sdk", func(t *testing.T) { testGroupEndToEnd(t, "sdk") })
}

func testGroupEndToEnd(t *testing.T, client string) {
	b, table, _ := runScenario(t, 0, "group", "--members", "30", "--online", "12", "--senders", "2", "--rate", "20",
		"--duration", "1s", "--warmup", "200ms", "--settle", "0s", "--drain", "10s", "--client", client)
	rep := decodeLoad(t, b)
	if !rep.OK || rep.Scenario != "group" || len(rep.Runs) != 1 || rep.Warmup == nil {
		t.Fatalf("ok %v, %d runs, warm-up %v: want one clean run after a warm-up", rep.OK, len(rep.Runs), rep.Warmup)
	}
	r := rep.Runs[0]
	if r.Scheduled != 20 || r.Delivered != 240 {
		t.Errorf("%d msgs, %d deliveries: want 20 msgs to 12 online members = 240", r.Scheduled, r.Delivered)
	}
	checkRun(t, r, 12)
	if r.OfferedDeliveries != 240 {
		t.Errorf("offered %v deliveries/s, want 20 msgs/s x 12", r.OfferedDeliveries)
	}

	var ex scenario.GroupExtra
	raw, _ := json.Marshal(rep.Extra)
	if err := json.Unmarshal(raw, &ex); err != nil {
		t.Fatal(err)
	}
	if ex.GroupID == 0 || len(ex.Runs) != 1 || len(ex.LastMemberP99Ms) != 1 || len(ex.Errors) != 0 {
		t.Fatalf("extra %+v", ex)
	}
	g := ex.Runs[0]
	if g.Messages != 20 || g.Incomplete != 0 || g.LastMember.Count != 20 {
		t.Errorf("group run: %d msgs, %d incomplete, last-member count %d: want 20, 0, 20", g.Messages, g.Incomplete, g.LastMember.Count)
	}
	// The last member of a message is its slowest delivery, so its
	// latency is at least each member's, and the slowest of all is the
	// last member of some message.
	if g.LastMember.P50Ms < r.Latency.P50Ms || g.LastMember.MaxMs < r.Latency.MaxMs || g.LastMember.MaxMs > r.Latency.MaxMs+50 {
		t.Errorf("last-member latency %+v against each member's %+v", g.LastMember, r.Latency)
	}
	// Every message was stored once and notified to the other 11 online
	// members; every one of them moved its cursor.
	if g.StoredAppends != 20 || g.DuplicateSends != 0 || g.RefusedSends != 0 || g.ServerNotifies != 20*11 {
		t.Errorf("stored %v, duplicate %v, refused %v, notifies %v: want 20, 0, 0, 220", g.StoredAppends, g.DuplicateSends, g.RefusedSends, g.ServerNotifies)
	}
	if g.CursorWrites < 12 || g.CursorWritesPerMs <= 0 || g.CursorWritesPerMs > 12 || g.AckBatches <= 0 || g.CursorWritesPerAck <= 0 || g.CursorWritesPerAck > 1.01 {
		t.Errorf("cursor writes %v (%v per msg), ack batches ~%v (%v writes each): want at most one write per member per message, one group per batch",
			g.CursorWrites, g.CursorWritesPerMs, g.AckBatches, g.CursorWritesPerAck)
	}
	// The members were cached at the creation (or the warm-up) and never
	// changed: every fan-out of the run and every ack's membership check
	// was a hit.
	if g.CacheHits < 20 || g.CacheMisses != 0 || g.CacheHitRate != 1 || g.MemberRowsRead != 0 {
		t.Errorf("cache: %v hits, %v misses (rate %v), %v member rows read: want at least 20 hits and no miss", g.CacheHits, g.CacheMisses, g.CacheHitRate, g.MemberRowsRead)
	}
	if g.ServerCPUUsPerMsg <= 0 || !strings.HasPrefix(g.StoreBatchesPerMs, "1 by design") {
		t.Errorf("server us/msg %v, store batches %q", g.ServerCPUUsPerMsg, g.StoreBatchesPerMs)
	}
	for _, want := range []string{"deliveries/s", "last p99", "cursor writes/ack batch", "cache hit rate", "store writes per group message"} {
		if !strings.Contains(table, want) {
			t.Errorf("table lacks %q:\n%s", want, table)
		}
	}
	if setup := rep.Setup.(map[string]any); setup["client"] != client {
		t.Errorf("setup %v, want client %s", setup, client)
	}
	switch {
	case client == "sdk" && ex.Lean != nil:
		t.Errorf("lean stats %+v with the SDK", ex.Lean)
	case client == "raw" && (ex.Lean == nil || ex.Lean.Conns != 10 || ex.Lean.GroupAcks == 0 || ex.Lean.Dropped != 0 || ex.Lean.ErrorResps != 0):
		t.Errorf("lean stats %+v: want 10 members that acked their cursors", ex.Lean)
	case client == "raw" && !strings.Contains(table, "lean clients: 10 connections"):
		t.Errorf("table lacks the lean clients' line:\n%s", table)
	}
}

func TestGroupFlagsValidate(t *testing.T) {
	var stdout, stderr bytes.Buffer
	for _, args := range [][]string{
		{"group", "--online", "20", "--members", "10"}, {"group", "--senders", "5", "--online", "4"},
		{"group", "--members", "0"}, {"group", "--inflight", "0"}, {"group", "--rate", "0"}, {"group", "--ack-delay", "-1s"},
	} {
		if code := run(context.Background(), args, &stdout, &stderr); code != 2 {
			t.Errorf("%v: exit %d, want 2", args, code)
		}
	}
	stdout.Reset()
	if code := run(context.Background(), []string{"group", "--help"}, &stdout, &stderr); code != 0 || !strings.Contains(stdout.String(), "-online") {
		t.Errorf("group --help: exit %d\n%s", code, &stdout)
	}
	stdout.Reset()
	if code := run(context.Background(), []string{"help"}, &stdout, &stderr); code != 0 || !strings.Contains(stdout.String(), "group ") {
		t.Errorf("help does not list group:\n%s", &stdout)
	}
}
