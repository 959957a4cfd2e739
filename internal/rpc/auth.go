package rpc

import (
	"crypto/hmac"
	"crypto/sha256"
	"strconv"
	"time"

	"github.com/imd-dev/imd/schema"
	"github.com/imd-dev/imd/schema/pb"
)

// helloSkew is how far a hello's clock may be from the logic node's.
const helloSkew = 5 * time.Minute

func helloMAC(secret, gate string, timeMS int64) []byte {
	h := hmac.New(sha256.New, []byte(secret))
	h.Write([]byte("imd-rpc-hello|" + gate + "|" + strconv.FormatInt(timeMS, 10)))
	return h.Sum(nil)
}

// signHello stamps in with secret (none when secret is empty).
func signHello(in *pb.RPCHello, secret string, now time.Time) {
	if secret == "" {
		return
	}
	in.TimeMs = now.UnixMilli()
	in.Mac = helloMAC(secret, in.GetGate(), in.TimeMs)
}

// checkHello verifies in against secret (anything passes when it is empty).
func checkHello(in *pb.RPCHello, secret string, now time.Time) error {
	if secret == "" {
		return nil
	}
	if len(in.GetMac()) == 0 {
		return schema.Errorf(schema.StatusTokenInvalid, "rpc: this logic node needs the cluster secret (--rpc-secret) in the hello")
	}
	if d := now.Sub(time.UnixMilli(in.GetTimeMs())); d > helloSkew || d < -helloSkew {
		return schema.Errorf(schema.StatusTokenInvalid, "rpc: hello clock %s off this node's; check NTP", d.Round(time.Second))
	}
	if !hmac.Equal(in.GetMac(), helloMAC(secret, in.GetGate(), in.GetTimeMs())) {
		return schema.Errorf(schema.StatusTokenInvalid, "rpc: hello signed with another cluster secret")
	}
	return nil
}
