// Command testpeer is the other end of the TypeScript SDK's end-to-end
// tests (sdk-ts/test): a user logged in with the Go SDK that speaks JSON
// lines on stdin and stdout, so that a test in another language can make
// it send chat messages and see what it receives.
//
// Input lines:
//
//	{"op":"send","id":"r1","to_account":1,"to_uid":2,"msgtype":1,"content":"hi","client_msg_id":"..."}
//	{"op":"send_group","id":"r2","group_id":"7","msgtype":1,"content":"hi","client_msg_id":"..."}
//	{"op":"close"}
//
// Output lines: {"event":"ready","account":1} after the login,
// {"event":"sent","id":"r1","msgid":"...","duplicate":false} or
// {"event":"send_error","id":"r1","error":"..."} for each send,
// {"event":"c2c","msgid":"...","from_uid":"...","content":"..."} for each
// message received, {"event":"group","group_id":"...","seq":"...","msgid":"...",
// "from_uid":"...","content":"...","kind":0} for each group message (kind is
// the GroupEventKind of a system message, 0 for chat; a group send's answer
// adds "seq") and {"event":"receipt","msgid":"..."} for each receipt.
// 64-bit ids are decimal strings, as JSON numbers cannot hold them.
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"strconv"
	"sync"
	"time"

	"github.com/imd-dev/imd/schema/pb"
	"github.com/imd-dev/imd/sdk"
)

type input struct {
	Op          string `json:"op"`
	ID          string `json:"id"`
	ToAccount   uint32 `json:"to_account"`
	ToUID       uint64 `json:"to_uid,string"`
	GroupID     uint64 `json:"group_id,string"`
	MsgType     uint32 `json:"msgtype"`
	Content     string `json:"content"`
	ClientMsgID string `json:"client_msg_id"`
}

func main() {
	addr := flag.String("addr", "127.0.0.1:7070", "gateway TCP address")
	appcode := flag.Uint("appcode", 101, "appcode to log in with")
	uid := flag.Uint64("uid", 0, "uid to log in as")
	token := flag.String("token", "", "login token")
	flag.Parse()
	if err := run(*addr, uint32(*appcode), *uid, *token); err != nil {
		fmt.Fprintln(os.Stderr, "testpeer:", err)
		os.Exit(1)
	}
}

func run(addr string, appcode uint32, uid uint64, token string) error {
	var outMu sync.Mutex
	out := json.NewEncoder(os.Stdout)
	emit := func(v map[string]any) {
		outMu.Lock()
		defer outMu.Unlock()
		_ = out.Encode(v)
	}
	ctx := context.Background()
	c, err := sdk.Dial(ctx, sdk.Options{
		Addrs: []string{addr},
		OnC2C: func(m *pb.C2CMessage) {
			emit(map[string]any{
				"event":    "c2c",
				"msgid":    strconv.FormatUint(m.Msgid, 10),
				"from_uid": strconv.FormatUint(m.GetFrom().GetUid(), 10),
				"msgtype":  m.Msgtype,
				"content":  string(m.Content),
			})
		},
		OnGroup: func(m *pb.C2CMessage) {
			emit(map[string]any{
				"event":    "group",
				"group_id": strconv.FormatUint(m.GroupId, 10),
				"seq":      strconv.FormatUint(m.Seq, 10),
				"msgid":    strconv.FormatUint(m.Msgid, 10),
				"from_uid": strconv.FormatUint(m.GetFrom().GetUid(), 10),
				"msgtype":  m.Msgtype,
				"content":  string(m.Content),
				"kind":     int32(m.GetEvent().GetKind()),
			})
		},
		OnReceipt: func(r *pb.C2CReceipt) {
			emit(map[string]any{"event": "receipt", "msgid": strconv.FormatUint(r.Msgid, 10)})
		},
	})
	if err != nil {
		return err
	}
	defer c.Close()
	resp, err := c.Login(ctx, sdk.Credentials{AppCode: appcode, UID: uid, Token: token})
	if err != nil {
		return err
	}
	emit(map[string]any{"event": "ready", "account": resp.Account})
	sc := bufio.NewScanner(os.Stdin)
	for sc.Scan() {
		var in input
		if err := json.Unmarshal(sc.Bytes(), &in); err != nil {
			emit(map[string]any{"event": "error", "error": err.Error()})
			continue
		}
		switch in.Op {
		case "send":
			// Sends run one after the other, as the order rule asks.
			sctx, cancel := context.WithTimeout(ctx, 30*time.Second)
			id := in.ClientMsgID
			if id == "" {
				id = sdk.NewClientMsgID()
			}
			r, err := c.SendC2CWithID(sctx, &pb.User{Account: in.ToAccount, Uid: in.ToUID}, in.MsgType, id, []byte(in.Content))
			cancel()
			if err != nil {
				emit(map[string]any{"event": "send_error", "id": in.ID, "error": err.Error()})
				continue
			}
			emit(map[string]any{"event": "sent", "id": in.ID, "msgid": strconv.FormatUint(r.Msgid, 10), "duplicate": r.Duplicate})
		case "send_group":
			sctx, cancel := context.WithTimeout(ctx, 30*time.Second)
			id := in.ClientMsgID
			if id == "" {
				id = sdk.NewClientMsgID()
			}
			r, err := c.SendGroupWithID(sctx, in.GroupID, in.MsgType, id, []byte(in.Content))
			cancel()
			if err != nil {
				emit(map[string]any{"event": "send_error", "id": in.ID, "error": err.Error()})
				continue
			}
			emit(map[string]any{
				"event": "sent", "id": in.ID, "msgid": strconv.FormatUint(r.Msgid, 10),
				"seq": strconv.FormatUint(r.Seq, 10), "duplicate": r.Duplicate,
			})
		case "close":
			return nil
		default:
			emit(map[string]any{"event": "error", "error": "unknown op " + in.Op})
		}
	}
	return sc.Err()
}
