package sdk

import (
	"context"

	"github.com/imd-dev/imd/schema"
	"github.com/imd-dev/imd/schema/pb"
)

// SendTransient sends a transient message ("typing...", a shake) to a user
// (to) or to a group (groupID, with to nil): the platform stores nothing
// and the online terminals of the recipients, and this user's other
// terminals, get it now through OnTransient; nobody gets it later. It is
// sent once, never retried: a transient message that missed its moment
// is worth nothing. The answer's Delivered counts the terminals it
// reached. Each user may send a bounded number per second; beyond it the
// error carries status 3001 (rate limited).
func (c *Client) SendTransient(ctx context.Context, to *pb.User, groupID uint64, msgtype uint32, content []byte) (*pb.C2CSendResponse, error) {
	var resp pb.C2CSendResponse
	req := &pb.C2CSendRequest{To: to, GroupId: groupID, Content: content, Transient: true}
	if err := c.Request(ctx, schema.CmdC2CSend, msgtype, req, &resp); err != nil {
		return nil, err
	}
	return &resp, nil
}
