package sdk

import (
	"context"
	"strconv"
	"sync"

	"github.com/imd-dev/imd/schema"
	"github.com/imd-dev/imd/schema/pb"
)

// ConvSync asks for the conversation list: every one-to-one and group
// conversation of the user that is new or changed (a new message, a read
// mark) since the versions in known, with its unread count and last
// message; known keys that are no longer the user's come back in Gone.
// known nil asks for everything. ConvList keeps the versions for you.
func (c *Client) ConvSync(ctx context.Context, known []*pb.ConvVersion) (*pb.ConvSyncResponse, error) {
	var resp pb.ConvSyncResponse
	if err := c.Request(ctx, schema.CmdConvSync, 0, &pb.ConvSyncRequest{Known: known}, &resp); err != nil {
		return nil, err
	}
	return &resp, nil
}

// MarkRead moves the user's read mark of a conversation to upTo (a msgid
// one-to-one, a seq in a group) and returns the mark now (it never moves
// backwards). The mark is the user's: its other terminals get it through
// OnConvMark at once and in their next ConvSync; one-to-one, the peer
// gets it too (a read receipt).
func (c *Client) MarkRead(ctx context.Context, key *pb.ConvKey, upTo uint64) (uint64, error) {
	var resp pb.ConvReadResponse
	if err := c.Request(ctx, schema.CmdConvRead, 0, &pb.ConvReadRequest{Key: key, UpTo: upTo}, &resp); err != nil {
		return 0, err
	}
	return resp.Read, nil
}

// ConvList is a client's copy of its conversation list: it remembers the
// version of each conversation it was given, so that Sync after a login
// asks only for what changed. An app keeps one per terminal (and may save
// Known and restore it with Restore across restarts). It is safe for
// concurrent use.
type ConvList struct {
	mu    sync.Mutex
	convs map[string]*pb.Conversation
}

func convID(k *pb.ConvKey) string {
	if k.GetGroupId() != 0 {
		return "g" + strconv.FormatUint(k.GroupId, 10)
	}
	return "u" + strconv.FormatUint(uint64(k.GetPeer().GetAccount()), 10) + ":" + strconv.FormatUint(k.GetPeer().GetUid(), 10)
}

// Known returns the versions held, for ConvSync.
func (l *ConvList) Known() []*pb.ConvVersion {
	l.mu.Lock()
	defer l.mu.Unlock()
	out := make([]*pb.ConvVersion, 0, len(l.convs))
	for _, c := range l.convs {
		out = append(out, &pb.ConvVersion{Key: c.Key, Version: c.Version, Read: c.Read})
	}
	return out
}

// Restore sets the versions held (as saved from Known); the conversations
// themselves come with the next sync that changes them.
func (l *ConvList) Restore(known []*pb.ConvVersion) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.convs = make(map[string]*pb.Conversation, len(known))
	for _, v := range known {
		l.convs[convID(v.Key)] = &pb.Conversation{Key: v.Key, Version: v.Version, Read: v.Read}
	}
}

// Apply merges a sync's answer and returns the conversations it changed.
func (l *ConvList) Apply(resp *pb.ConvSyncResponse) []*pb.Conversation {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.convs == nil {
		l.convs = make(map[string]*pb.Conversation)
	}
	for _, k := range resp.Gone {
		delete(l.convs, convID(k))
	}
	for _, c := range resp.Changed {
		l.convs[convID(c.Key)] = c
	}
	return resp.Changed
}

// Get returns what the list holds of a conversation, or nil.
func (l *ConvList) Get(key *pb.ConvKey) *pb.Conversation {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.convs[convID(key)]
}

// Len is the number of conversations held.
func (l *ConvList) Len() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.convs)
}

// Sync asks c for what changed since the versions held and applies it.
func (l *ConvList) Sync(ctx context.Context, c *Client) (*pb.ConvSyncResponse, error) {
	resp, err := c.ConvSync(ctx, l.Known())
	if err != nil {
		return nil, err
	}
	l.Apply(resp)
	return resp, nil
}
