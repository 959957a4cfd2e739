package logic

import (
	"context"

	"github.com/imd-dev/imd/internal/acl"
	"github.com/imd-dev/imd/router"
	"github.com/imd-dev/imd/schema"
	"github.com/imd-dev/imd/schema/pb"
)

func errBlockedUID(account uint32, uid uint64) error {
	return schema.Errorf(schema.StatusForbidden, "uid %d of account %d is blocked", uid, account)
}

func adminKick() *pb.Kickout {
	return &pb.Kickout{Reason: pb.KickReason_KICK_REASON_ADMIN, Detail: "blocked by an administrator"}
}

// ACL returns the black and white lists this service applies at login.
func (s *Service) ACL() *acl.ACL { return s.acl }

// SetACL replaces the lists in force (shared with the gateway of the same
// process, whose accept path reads the address lists) and kicks the live
// sessions of every uid they newly block, with KICK_REASON_ADMIN. Invalid
// lists are refused whole (StatusBadArgument) and change nothing.
func (s *Service) SetACL(ctx context.Context, l acl.Lists) error {
	added, err := s.acl.Set(l)
	if err != nil {
		return schema.Errorf(schema.StatusBadArgument, "%v", err)
	}
	if len(added) == 0 {
		return nil
	}
	us := make([]router.User, len(added))
	for i, u := range added {
		us[i] = router.User{Account: u.Account, UID: u.UID}
	}
	sessions, err := s.router.LookupMany(ctx, us)
	if err != nil {
		return schema.Errorf(schema.StatusUnavailable, "router: %v", err)
	}
	for i, ss := range sessions {
		for _, sess := range ss {
			s.log.Info("kicking a blocked user", "account", us[i].Account, "uid", us[i].UID, "appcode", sess.AppCode, "gate", sess.Gate, "conn", sess.Conn)
			s.kick(ctx, sess, adminKick(), 0)
		}
	}
	return nil
}
