package platform

import (
	"context"
	"fmt"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/imd-dev/imd/schema/pb"
	"github.com/imd-dev/imd/sdk"
	"google.golang.org/protobuf/proto"
)

// convWorld is a user with many one-to-one conversations and a group.
type convWorld struct {
	p      *Platform
	me     uint64
	peers  []uint64
	group  uint64
	sender *sdk.Client // me on 101, which wrote to every peer
}

// newConvWorld gives uid me a conversation with each of n peers (me wrote
// first) and a group with the first peer.
func newConvWorld(t testing.TB, p *Platform, me uint64, n int) *convWorld {
	t.Helper()
	w := &convWorld{p: p, me: me, sender: login(t, p, 101, me, nil)}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	for i := range n {
		peer := me*10000 + uint64(i) + 1
		w.peers = append(w.peers, peer)
		if _, err := w.sender.SendC2C(ctx, &pb.User{Account: 1, Uid: peer}, 0, []byte(fmt.Sprintf("hello %d", peer))); err != nil {
			t.Fatal(err)
		}
	}
	w.group = me*10 + 7
	code := api(t, p, "POST", "/v1/groups", testAPIKey, map[string]any{"group_id": strconv.FormatUint(w.group, 10), "members": []map[string]any{{"uid": me}, {"uid": w.peers[0]}}}, nil)
	if code != 200 {
		t.Fatalf("create group: %d", code)
	}
	return w
}

// say sends text from peer to me (one-to-one, or in the group).
func (w *convWorld) say(t testing.TB, peer uint64, group bool, text string) uint64 {
	t.Helper()
	c := login(t, w.p, 101, peer, nil)
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if group {
		r, err := c.SendGroup(ctx, w.group, 0, []byte(text))
		if err != nil {
			t.Fatal(err)
		}
		return r.Seq
	}
	r, err := c.SendC2C(ctx, &pb.User{Account: 1, Uid: w.me}, 0, []byte(text))
	if err != nil {
		t.Fatal(err)
	}
	return r.Msgid
}

func peerKey(uid uint64) *pb.ConvKey { return &pb.ConvKey{Peer: &pb.User{Account: 1, Uid: uid}} }

// TestConvListSyncsOnlyChanges: a user with 200 one-to-one conversations
// and a group, whose client holds the versions of all of them: after new
// messages in 3 conversations and in the group, the sync returns exactly
// those 4 with the right unread counts and last messages, in a small
// fraction of a full pull's bytes; reading on the phone lowers the PC's
// unread count at once (a mark) and in its next sync; a conversation the
// client holds that is not the user's comes back as gone.
func TestConvListSyncsOnlyChanges(t *testing.T) {
	n := 200
	if raceEnabled {
		n = 60
	}
	p := start(t, nil)
	w := newConvWorld(t, p, 71, n)
	var marks sync.Map
	pc := login(t, p, 102, w.me, func(o *sdk.Options) {
		o.OnConvMark = func(r *pb.ConvRead) { marks.Store(r.GetKey().GetPeer().GetUid(), r.UpTo) }
	})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	var list sdk.ConvList
	full, err := list.Sync(ctx, pc)
	if err != nil {
		t.Fatal(err)
	}
	if len(full.Changed) != n+1 || full.Total != uint32(n+1) || list.Len() != n+1 {
		t.Fatalf("full pull: %d changed, total %d, held %d; want %d", len(full.Changed), full.Total, list.Len(), n+1)
	}
	for _, c := range full.Changed {
		if c.Unread != 0 || c.Last == nil {
			t.Fatalf("before anyone answered: %v", c)
		}
	}

	changedPeers := []uint64{w.peers[3], w.peers[n/2], w.peers[n-1]}
	lastIDs := map[uint64]uint64{}
	for i, peer := range changedPeers {
		for k := range i + 1 { // 1, 2 and 3 new messages
			lastIDs[peer] = w.say(t, peer, false, fmt.Sprintf("from %d #%d", peer, k))
		}
	}
	seq := w.say(t, w.peers[0], true, "in the group")

	delta, err := list.Sync(ctx, pc)
	if err != nil {
		t.Fatal(err)
	}
	if len(delta.Changed) != 4 || len(delta.Gone) != 0 || delta.Total != uint32(n+1) {
		t.Fatalf("after 3 conversations and the group changed: %d changed, %d gone, total %d", len(delta.Changed), len(delta.Gone), delta.Total)
	}
	for _, c := range delta.Changed {
		if c.Key.GetGroupId() == w.group {
			if c.Unread != 1 || c.Version != seq || string(c.Last.GetContent()) != "in the group" {
				t.Fatalf("the group: %v", c)
			}
			continue
		}
		peer := c.Key.GetPeer().GetUid()
		i := -1
		for j, cp := range changedPeers {
			if cp == peer {
				i = j
			}
		}
		if i < 0 || c.Unread != uint32(i+1) || c.Version != lastIDs[peer] || c.Last.GetMsgid() != lastIDs[peer] || string(c.Last.GetContent()) != fmt.Sprintf("from %d #%d", peer, i) {
			t.Fatalf("conversation with %d: %v", peer, c)
		}
	}
	fullBytes, deltaBytes := proto.Size(full), proto.Size(delta)
	if deltaBytes*10 > fullBytes {
		t.Fatalf("the sync of 4 changes took %d bytes, the full pull %d", deltaBytes, fullBytes)
	}
	t.Logf("conversation sync: full pull of %d conversations %d bytes; after 4 changed %d bytes (request of %d versions %d bytes)",
		n+1, fullBytes, deltaBytes, len(list.Known()), proto.Size(&pb.ConvSyncRequest{Known: list.Known()}))

	// Reading on the phone: the PC gets the mark at once and its next sync
	// returns that conversation alone, now read.
	phone := w.sender
	read := changedPeers[2]
	if mark, err := phone.MarkRead(ctx, peerKey(read), lastIDs[read]); err != nil || mark != lastIDs[read] {
		t.Fatalf("mark read: %d %v", mark, err)
	}
	eventually(t, 5*time.Second, "the PC to get the read mark", func() bool {
		v, ok := marks.Load(read)
		return ok && v.(uint64) == lastIDs[read]
	})
	after, err := list.Sync(ctx, pc)
	if err != nil {
		t.Fatal(err)
	}
	if len(after.Changed) != 1 || after.Changed[0].Key.GetPeer().GetUid() != read || after.Changed[0].Unread != 0 || after.Changed[0].Read != lastIDs[read] {
		t.Fatalf("after reading on the phone the PC syncs %v", after.Changed)
	}
	// Marks never move backwards.
	if mark, err := phone.MarkRead(ctx, peerKey(read), 1); err != nil || mark != lastIDs[read] {
		t.Fatalf("a backwards mark: %d %v", mark, err)
	}
	// Group read marks lower the group's unread count.
	if _, err := phone.MarkRead(ctx, &pb.ConvKey{GroupId: w.group}, seq); err != nil {
		t.Fatal(err)
	}
	again, err := list.Sync(ctx, pc)
	if err != nil {
		t.Fatal(err)
	}
	if len(again.Changed) != 1 || again.Changed[0].Key.GetGroupId() != w.group || again.Changed[0].Unread != 0 {
		t.Fatalf("after reading the group: %v", again.Changed)
	}
	// Nothing changed: nothing comes back. A key the client holds that is
	// not the user's comes back as gone.
	known := append(list.Known(), &pb.ConvVersion{Key: peerKey(999999), Version: 1})
	quiet, err := pc.ConvSync(ctx, known)
	if err != nil {
		t.Fatal(err)
	}
	if len(quiet.Changed) != 0 || len(quiet.Gone) != 1 || quiet.Gone[0].GetPeer().GetUid() != 999999 {
		t.Fatalf("a quiet sync: %d changed, gone %v", len(quiet.Changed), quiet.Gone)
	}
}

// TestConvReadReceipt: the peer of a one-to-one conversation learns that
// its messages were read.
func TestConvReadReceipt(t *testing.T) {
	p := start(t, nil)
	receipts := make(chan *pb.ConvRead, 4)
	a := login(t, p, 101, 81, func(o *sdk.Options) { o.OnConvMark = func(r *pb.ConvRead) { receipts <- r } })
	b := login(t, p, 101, 82, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	sent, err := a.SendC2C(ctx, &pb.User{Account: 1, Uid: 82}, 0, []byte("hi"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := b.MarkRead(ctx, peerKey(81), sent.Msgid); err != nil {
		t.Fatal(err)
	}
	select {
	case r := <-receipts:
		if r.By.GetUid() != 82 || r.UpTo != sent.Msgid || r.Key.GetPeer().GetUid() != 82 {
			t.Fatalf("read receipt %v", r)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("no read receipt")
	}
	if _, err := b.MarkRead(ctx, &pb.ConvKey{}, 1); statusOf(err) != 4001 {
		t.Fatalf("a mark without a conversation: %v, want 4001", err)
	}
}
