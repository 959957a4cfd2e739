package logic

import (
	"context"
	"time"

	"github.com/imd-dev/imd/das"
	"github.com/imd-dev/imd/internal/ratelimit"
	"github.com/imd-dev/imd/router"
	"github.com/imd-dev/imd/schema"
	"github.com/imd-dev/imd/schema/pb"
	"google.golang.org/protobuf/proto"
)

// Transient configures transient messages ("typing...", a shake): sent
// with c2c-send and transient = true, never stored, acked or pulled.
type Transient struct {
	// Rate bounds each user's transient sends per second on one logic
	// node (a token bucket). Default 20.
	Rate float64 `yaml:"rate"`
	// Burst is the bucket's size. Default 2 x Rate.
	Burst int `yaml:"burst"`
}

func (t *Transient) setDefaults() {
	if t.Rate <= 0 {
		t.Rate = 20
	}
	if t.Burst <= 0 {
		t.Burst = int(2 * t.Rate)
	}
}

// limiters is the per-user bucket of transient messages.
type limiters = ratelimit.Keyed[das.User]

func newLimiters(t Transient) *limiters {
	return ratelimit.NewKeyed[das.User](ratelimit.Rate{Rate: t.Rate, Burst: t.Burst})
}

// transientSend delivers a transient message to the online terminals of
// the recipient (a user, or a group's members) and of the sender's other
// terminals, and stores nothing. Its answer counts the terminals reached;
// validation of the common fields is c2cSend's.
func (s *Service) transientSend(ctx context.Context, sess router.Session, h *schema.Header, req *pb.C2CSendRequest) ([]byte, error) {
	from := das.User{Account: sess.Account, UID: sess.UID}
	if !s.transientLimits.Allow(from, time.Now()) {
		s.mTransient.WithLabelValues("rate_limited").Inc()
		s.limits.m.WithLabelValues(limTransient).Inc()
		return nil, schema.Errorf(schema.StatusRateLimited, "over %g transient messages a second", s.transientLimits.Rate().Rate)
	}
	n := &pb.TransientNotify{
		From: &pb.User{Account: sess.Account, Uid: sess.UID}, FromAppcode: sess.AppCode,
		GroupId: req.GroupId, Msgtype: h.MsgType, Content: req.Content, SentAtMs: time.Now().UnixMilli(),
	}
	var users []router.User
	if req.GroupId != 0 {
		if err := s.needGroups(); err != nil {
			return nil, err
		}
		info, err := s.groups.Group(ctx, req.GroupId)
		if err != nil || info.Dissolved {
			if err == nil {
				err = das.ErrGroupUnknown
			}
			return nil, groupErr("transient", err)
		}
		members, _, err := s.groupCache.Members(ctx, req.GroupId, info.MemberSeq)
		if err != nil {
			return nil, groupErr("transient", err)
		}
		member := false
		for _, m := range members {
			users = append(users, router.User{Account: m.User.Account, UID: m.User.UID})
			member = member || m.User == from
		}
		if !member {
			return nil, schema.Errorf(schema.StatusNotMember, "not a member of group %d", req.GroupId)
		}
	} else {
		to := req.GetTo()
		n.To = &pb.User{Account: to.Account, Uid: to.Uid}
		users = append(users, router.User{Account: to.Account, UID: to.Uid})
		if to.Account != sess.Account || to.Uid != sess.UID {
			users = append(users, router.User{Account: sess.Account, UID: sess.UID})
		}
	}
	sessions, err := s.router.LookupMany(ctx, users)
	if err != nil {
		return nil, schema.Errorf(schema.StatusUnavailable, "router: %v", err)
	}
	delivered := 0
	if targets := otherTerminals(sessions, &sess); len(targets) > 0 {
		body, _ := proto.Marshal(n)
		delivered = s.pushCount(ctx, targets, schema.CmdTransient, h.MsgType, body, h.LogID)
	}
	s.mTransient.WithLabelValues("sent").Inc()
	return proto.Marshal(&pb.C2CSendResponse{Delivered: uint32(delivered)})
}
