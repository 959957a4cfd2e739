package sdk

import (
	"context"
	"sync"

	"github.com/imd-dev/imd/schema"
	"github.com/imd-dev/imd/schema/pb"
	"google.golang.org/protobuf/proto"
)

// presenceState is the client's presence part: the list it follows (sent
// again after every login, since the server's list ends with the session)
// and the last version applied per user, so that a notify that is a
// duplicate or older than what the application saw is dropped.
type presenceState struct {
	mu       sync.Mutex
	followed []*pb.User // nil: Follow was never called
	applied  map[presenceKey]uint64

	// cb serializes the check of a version with its callback, so that
	// OnPresence sees each user's changes in version order even when the
	// reader and a re-sent subscription deliver at once.
	cb sync.Mutex
}

type presenceKey struct {
	account uint32
	uid     uint64
}

// take records n's version and reports whether it is above the last one
// applied for its user (any version is, for a user never seen).
func (p *presenceState) take(n *pb.PresenceNotify) bool {
	k := presenceKey{n.GetUser().GetAccount(), n.GetUser().GetUid()}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.applied == nil {
		p.applied = make(map[presenceKey]uint64)
	}
	if last, seen := p.applied[k]; seen && n.Version <= last {
		return false
	}
	p.applied[k] = n.Version
	return true
}

// apply hands n to OnPresence unless its version is not above the last
// one applied for its user.
func (c *Client) applyPresence(n *pb.PresenceNotify) {
	p := &c.pres
	p.cb.Lock()
	defer p.cb.Unlock()
	if p.take(n) && c.opts.OnPresence != nil {
		c.opts.OnPresence(n)
	}
}

// presenceNotified receives a presence-notify from the connection.
func (c *Client) presenceNotified(h schema.Header, body []byte) {
	if c.opts.OnPresence == nil {
		c.queueMessage(h, body)
		return
	}
	var n pb.PresenceNotify
	if err := proto.Unmarshal(body, &n); err == nil {
		c.applyPresence(&n)
	}
}

// Follow replaces the users this terminal follows (at most the server's
// bound, default 200: a longer list fails with status 4011 and keeps the
// previous one) and returns their state now. Every change after it comes
// to Options.OnPresence. The client sends the list again after every
// reconnect and login, and hands the states that changed meanwhile to
// OnPresence. An empty list follows nobody.
func (c *Client) Follow(ctx context.Context, users []*pb.User) (*pb.PresenceSubscribeResponse, error) {
	list := make([]*pb.User, len(users))
	for i, u := range users {
		list[i] = proto.Clone(u).(*pb.User)
	}
	var resp pb.PresenceSubscribeResponse
	if err := c.Request(ctx, schema.CmdPresenceSubscribe, 0, &pb.PresenceSubscribeRequest{Users: list}, &resp); err != nil {
		return nil, err
	}
	c.pres.mu.Lock()
	c.pres.followed = list
	c.pres.mu.Unlock()
	// The answer is the application's, not OnPresence's: only remember
	// the versions so that a notify duplicating a state is dropped.
	for _, st := range resp.States {
		c.pres.cb.Lock()
		c.pres.take(st)
		c.pres.cb.Unlock()
	}
	return &resp, nil
}

// refollow sends the followed list again on l, which just logged in, and
// applies the answered states: those newer than what OnPresence saw are
// the changes missed while the client was offline.
func (c *Client) refollow(l *link) {
	c.pres.mu.Lock()
	list := c.pres.followed
	c.pres.mu.Unlock()
	if list == nil {
		return
	}
	go func() {
		ctx, cancel := c.withTimeout(context.Background())
		defer cancel()
		var resp pb.PresenceSubscribeResponse
		if err := l.roundTrip(ctx, schema.Header{Cmd: schema.CmdPresenceSubscribe}, &pb.PresenceSubscribeRequest{Users: list}, &resp); err != nil {
			// A lost connection subscribes again at its next login.
			c.log.Warn("sdk: follow again after login", "users", len(list), "err", err)
			return
		}
		for _, st := range resp.States {
			c.applyPresence(st)
		}
	}()
}

// GroupPresence returns a page of the online members of a group, in
// (account, uid) order after after (nil: from the start); pageSize 0 lets
// the server choose. Ask for the next page with the last user of this one
// while More is set. Presence of group members is pulled, never pushed.
func (c *Client) GroupPresence(ctx context.Context, groupID uint64, after *pb.User, pageSize uint32) (*pb.GroupPresenceResponse, error) {
	var resp pb.GroupPresenceResponse
	if err := c.Request(ctx, schema.CmdGroupPresence, 0, &pb.GroupPresenceRequest{GroupId: groupID, After: after, PageSize: pageSize}, &resp); err != nil {
		return nil, err
	}
	return &resp, nil
}
