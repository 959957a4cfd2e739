package logic

import (
	"context"
	"sync"
	"time"

	"github.com/imd-dev/imd/das"
	"github.com/imd-dev/imd/router"
	"github.com/imd-dev/imd/schema"
	"github.com/imd-dev/imd/schema/pb"
	"golang.org/x/time/rate"
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

// limiters holds a token bucket per user, dropping buckets idle for a
// minute so that memory follows the users active now.
type limiters struct {
	mu      sync.Mutex
	limit   rate.Limit
	burst   int
	m       map[das.User]*userLimiter
	sweptAt time.Time
}

type userLimiter struct {
	l    *rate.Limiter
	used time.Time
}

func newLimiters(t Transient) *limiters {
	return &limiters{limit: rate.Limit(t.Rate), burst: t.Burst, m: make(map[das.User]*userLimiter)}
}

// allow takes a token of u's bucket and reports whether there was one.
func (l *limiters) allow(u das.User, now time.Time) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if now.Sub(l.sweptAt) > time.Minute {
		for k, v := range l.m {
			if now.Sub(v.used) > time.Minute {
				delete(l.m, k)
			}
		}
		l.sweptAt = now
	}
	ul := l.m[u]
	if ul == nil {
		ul = &userLimiter{l: rate.NewLimiter(l.limit, l.burst)}
		l.m[u] = ul
	}
	ul.used = now
	return ul.l.AllowN(now, 1)
}

// transientSend delivers a transient message to the online terminals of
// the recipient (a user, or a group's members) and of the sender's other
// terminals, and stores nothing. Its answer counts the terminals reached;
// validation of the common fields is c2cSend's.
func (s *Service) transientSend(ctx context.Context, sess router.Session, h *schema.Header, req *pb.C2CSendRequest) ([]byte, error) {
	from := das.User{Account: sess.Account, UID: sess.UID}
	if !s.transientLimits.allow(from, time.Now()) {
		s.mTransient.WithLabelValues("rate_limited").Inc()
		return nil, schema.Errorf(schema.StatusRateLimited, "over %g transient messages a second", float64(s.transientLimits.limit))
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
	var targets []router.Session
	for _, ss := range sessions {
		for _, x := range ss {
			if x.Account == sess.Account && x.UID == sess.UID && x.AppCode == sess.AppCode {
				continue // the sending terminal
			}
			targets = append(targets, x)
		}
	}
	delivered := 0
	if len(targets) > 0 {
		body, _ := proto.Marshal(n)
		queued := make([]bool, len(targets))
		s.pushSessions(ctx, targets, schema.CmdTransient, h.MsgType, body, queued, h.LogID)
		for _, q := range queued {
			if q {
				delivered++
			}
		}
	}
	s.mTransient.WithLabelValues("sent").Inc()
	return proto.Marshal(&pb.C2CSendResponse{Delivered: uint32(delivered)})
}
