package rpc

import (
	"context"
	"slices"
	"time"

	"github.com/imd-dev/imd/logic"
	"github.com/imd-dev/imd/schema"
	"github.com/imd-dev/imd/schema/pb"
	"google.golang.org/protobuf/proto"
)

// broadcastTimeout bounds another DC's part of a broadcast: its fan-out
// to every online session of an appcode there.
const broadcastTimeout = time.Minute

var _ logic.BroadcastRooms = (*Rooms)(nil)

// DCs implements logic.BroadcastRooms: every DC, in the rooms' order.
func (r *Rooms) DCs() []string { return slices.Clone(r.order) }

// Broadcast implements logic.BroadcastRooms with one peer-broadcast on
// the link to dc. A broadcast reaches the terminals online now: when the
// link is down it is not kept for the link, and the error says so.
func (r *Rooms) Broadcast(ctx context.Context, dc string, appcode uint32, notify []byte, logid uint64) (logic.BroadcastPart, error) {
	p := r.peers[dc]
	if p == nil {
		return logic.BroadcastPart{}, schema.Errorf(schema.StatusBadArgument, "data center %s is not linked to this one", dc)
	}
	l := p.current()
	if l == nil {
		return logic.BroadcastPart{}, schema.Errorf(schema.StatusUnavailable, "data center %s is unreachable: its terminals did not get the broadcast", dc)
	}
	b, err := proto.Marshal(&pb.PeerBroadcast{Appcode: appcode, Notify: notify})
	if err != nil {
		return logic.BroadcastPart{}, err
	}
	ctx, cancel := context.WithTimeout(ctx, broadcastTimeout)
	defer cancel()
	rb, err := p.call(ctx, l, schema.Header{Cmd: schema.RPCPeerBroadcast, AppCode: appcode, LogID: logid}, b, "broadcast")
	if err != nil {
		return logic.BroadcastPart{}, err
	}
	var resp pb.PeerBroadcastResponse
	if err := proto.Unmarshal(rb, &resp); err != nil {
		return logic.BroadcastPart{}, schema.Errorf(schema.StatusInternal, "rpc: peer-broadcast answer from %s: %v", dc, err)
	}
	return logic.BroadcastPart{
		DC: dc, Recipients: int(resp.GetRecipients()), Online: int(resp.GetOnline()),
		Unreachable: int(resp.GetUnreachable()), Gates: int(resp.GetGates()), Error: resp.GetError(),
	}, nil
}

// serveBroadcast answers peer-broadcast from DC dc.
func (r *Rooms) serveBroadcast(ctx context.Context, dc string, f *schema.Frame) ([]byte, error) {
	var in pb.PeerBroadcast
	if err := proto.Unmarshal(f.Body, &in); err != nil {
		return nil, badBody(f.Cmd, err)
	}
	p, err := r.o.Svc.ServeBroadcast(ctx, dc, in.GetAppcode(), in.GetNotify(), f.LogID)
	if err != nil {
		return nil, err
	}
	return proto.Marshal(&pb.PeerBroadcastResponse{
		Recipients: uint32(p.Recipients), Online: uint32(p.Online), Unreachable: uint32(p.Unreachable),
		Gates: uint32(p.Gates), Error: p.Error,
	})
}
