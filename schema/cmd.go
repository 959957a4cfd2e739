package schema

import (
	"fmt"
	"slices"
)

// Cmd is the 16-bit command number of a frame. The table is documented in
// PROTOCOL.md; numbers are never reused.
type Cmd uint16

// The command table. "req" commands are sent by the client as requests and
// answered with a response of the same Cmd and Seq; "notify" commands are
// pushed by the server (or, for acks, by the client) and get no response.
const (
	CmdLogin     Cmd = 0x0001 // req: LoginRequest -> LoginResponse
	CmdLogout    Cmd = 0x0002 // req: LogoutRequest -> LogoutResponse
	CmdKeepalive Cmd = 0x0003 // req: KeepaliveRequest -> KeepaliveResponse
	CmdKickout   Cmd = 0x0004 // notify s->c: Kickout; the server closes after it
	CmdGoAway    Cmd = 0x0005 // notify s->c: GoAway; the server is draining

	CmdC2S Cmd = 0x0010 // req: C2SRequest -> C2SResponse

	CmdS2C    Cmd = 0x0020 // notify s->c: S2CNotify
	CmdS2CAck Cmd = 0x0021 // notify c->s: S2CAck

	CmdC2CSend    Cmd = 0x0030 // req: C2CSendRequest -> C2CSendResponse
	CmdC2CNotify  Cmd = 0x0031 // notify s->c: C2CNotify
	CmdC2CAck     Cmd = 0x0032 // req: C2CAckRequest -> C2CAckResponse
	CmdC2CReceipt Cmd = 0x0033 // notify s->c: C2CReceipt (delivered receipt to the sender)

	CmdOfflineCount Cmd = 0x0040 // req: OfflineCountRequest -> OfflineCountResponse
	CmdOfflinePull  Cmd = 0x0041 // req: OfflinePullRequest -> OfflinePullResponse

	CmdHistorySync Cmd = 0x0050 // req: HistorySyncRequest -> HistorySyncResponse

	CmdGroupNotify Cmd = 0x0060 // notify s->c: GroupNotify (group messages; sent with CmdC2CSend)
	CmdGroupSync   Cmd = 0x0061 // req: GroupSyncRequest -> GroupSyncResponse
	CmdGroupPull   Cmd = 0x0062 // req: GroupPullRequest -> GroupPullResponse
	CmdGroupAck    Cmd = 0x0063 // req: GroupAckRequest -> GroupAckResponse

	CmdTransient Cmd = 0x0064 // notify s->c: TransientNotify (sent with CmdC2CSend, transient = true)

	CmdConvSync Cmd = 0x0070 // req: ConvSyncRequest -> ConvSyncResponse
	CmdConvRead Cmd = 0x0071 // req: ConvReadRequest -> ConvReadResponse
	CmdConvMark Cmd = 0x0072 // notify s->c: ConvRead (a read mark of this user elsewhere, or of the peer)

	CmdPresenceSubscribe Cmd = 0x0080 // req: PresenceSubscribeRequest -> PresenceSubscribeResponse
	CmdPresenceNotify    Cmd = 0x0081 // notify s->c: PresenceNotify
	CmdGroupPresence     Cmd = 0x0082 // req: GroupPresenceRequest -> GroupPresenceResponse
)

var cmdNames = map[Cmd]string{
	CmdLogin:        "login",
	CmdLogout:       "logout",
	CmdKeepalive:    "keepalive",
	CmdKickout:      "kickout",
	CmdGoAway:       "goaway",
	CmdC2S:          "c2s",
	CmdS2C:          "s2c",
	CmdS2CAck:       "s2c-ack",
	CmdC2CSend:      "c2c-send",
	CmdC2CNotify:    "c2c-notify",
	CmdC2CAck:       "c2c-ack",
	CmdC2CReceipt:   "c2c-receipt",
	CmdOfflineCount: "offline-count",
	CmdOfflinePull:  "offline-pull",
	CmdHistorySync:  "history-sync",
	CmdGroupNotify:  "group-notify",
	CmdGroupSync:    "group-sync",
	CmdGroupPull:    "group-pull",
	CmdGroupAck:     "group-ack",
	CmdTransient:    "transient",
	CmdConvSync:     "conv-sync",
	CmdConvRead:     "conv-read",
	CmdConvMark:     "conv-mark",

	CmdPresenceSubscribe: "presence-subscribe",
	CmdPresenceNotify:    "presence-notify",
	CmdGroupPresence:     "group-presence",
}

// Known reports whether c is in the command table.
func (c Cmd) Known() bool { _, ok := cmdNames[c]; return ok }

func (c Cmd) String() string {
	if n, ok := cmdNames[c]; ok {
		return n
	}
	if n, ok := rpcNames[c]; ok {
		return n
	}
	return fmt.Sprintf("cmd(0x%04x)", uint16(c))
}

// Cmds returns every command in the table, sorted by number.
func Cmds() []Cmd {
	cs := make([]Cmd, 0, len(cmdNames))
	for c := range cmdNames {
		cs = append(cs, c)
	}
	slices.Sort(cs)
	return cs
}
