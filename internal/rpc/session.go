package rpc

import (
	"github.com/imd-dev/imd/router"
	"github.com/imd-dev/imd/schema/pb"
)

func sessionToPB(s router.Session) *pb.RPCSession {
	return &pb.RPCSession{
		Account: s.Account, Appcode: s.AppCode, Uid: s.UID, Gate: s.Gate,
		Conn: s.Conn, Epoch: s.Epoch, DeviceId: s.DeviceID, LoginMs: s.LoginMS,
	}
}

func sessionFromPB(p *pb.RPCSession) router.Session {
	return router.Session{
		Account: p.GetAccount(), AppCode: p.GetAppcode(), UID: p.GetUid(), Gate: p.GetGate(),
		Conn: p.GetConn(), Epoch: p.GetEpoch(), DeviceID: p.GetDeviceId(), LoginMS: p.GetLoginMs(),
	}
}
