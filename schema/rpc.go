package schema

import "slices"

// The internal RPC command table (PROTOCOL.md, "Internal RPC"): the frames
// tiers exchange over their persistent links. They use the client frame
// unchanged; the numbers live in their own range so that a gateway never
// serves them to a client (Cmd.Known is false for every one of them).
const (
	RPCHello        Cmd = 0x7F01 // gateway -> logic request: RPCHello -> RPCHelloResponse
	RPCLogin        Cmd = 0x7F02 // gateway -> logic request: RPCLogin -> RPCLoginResponse
	RPCLogout       Cmd = 0x7F03 // gateway -> logic request: RPCSessionOnly -> RPCEmpty
	RPCDisconnected Cmd = 0x7F04 // gateway -> logic notify: RPCSessionOnly
	RPCHandle       Cmd = 0x7F05 // gateway -> logic request: RPCHandle -> the client's response body
	RPCAnnounce     Cmd = 0x7F06 // gateway -> logic request: RPCAnnounce -> RPCEmpty
	RPCPush         Cmd = 0x7F10 // logic -> gateway request: RPCPush -> RPCPushResponse
	RPCKick         Cmd = 0x7F11 // logic -> gateway request: RPCKick -> RPCEmpty
	RPCPing         Cmd = 0x7F20 // either way request: RPCEmpty -> RPCEmpty

	// Links between the logic tiers of data centers, either way.
	RPCPeerHello    Cmd = 0x7F30 // request: PeerHello -> PeerHelloResponse
	RPCPeerMirror   Cmd = 0x7F31 // request: PeerMirror -> RPCEmpty
	RPCPeerPush     Cmd = 0x7F32 // request: PeerPush -> RPCPushResponse
	RPCPeerKick     Cmd = 0x7F33 // request: PeerKick -> RPCEmpty
	RPCPeerForward  Cmd = 0x7F34 // request: PeerForward -> the client's response body
	RPCPeerAck      Cmd = 0x7F35 // request: PeerAck -> RPCEmpty
	RPCPeerResync   Cmd = 0x7F36 // request: RPCEmpty -> RPCEmpty: announce your DC's sessions again
	RPCPeerGateways Cmd = 0x7F37 // request: RPCEmpty -> PeerGatewaysResponse: your DC's gateways for clients

	// A broadcast (POST /v1/broadcast) crosses to every other DC once.
	RPCPeerBroadcast Cmd = 0x7F38 // request: PeerBroadcast -> PeerBroadcastResponse: your DC's part of a broadcast
)

var rpcNames = map[Cmd]string{
	RPCHello:        "rpc-hello",
	RPCLogin:        "rpc-login",
	RPCLogout:       "rpc-logout",
	RPCDisconnected: "rpc-disconnected",
	RPCHandle:       "rpc-handle",
	RPCAnnounce:     "rpc-announce",
	RPCPush:         "rpc-push",
	RPCKick:         "rpc-kick",
	RPCPing:         "rpc-ping",
	RPCPeerHello:    "peer-hello",
	RPCPeerMirror:   "peer-mirror",
	RPCPeerPush:     "peer-push",
	RPCPeerKick:     "peer-kick",
	RPCPeerForward:  "peer-forward",
	RPCPeerAck:      "peer-ack",
	RPCPeerResync:   "peer-resync",
	RPCPeerGateways: "peer-gateways",

	RPCPeerBroadcast: "peer-broadcast",
}

// IsRPC reports whether c is in the internal RPC table.
func (c Cmd) IsRPC() bool { _, ok := rpcNames[c]; return ok }

// RPCCmds returns every internal RPC command, sorted by number.
func RPCCmds() []Cmd {
	cs := make([]Cmd, 0, len(rpcNames))
	for c := range rpcNames {
		cs = append(cs, c)
	}
	slices.Sort(cs)
	return cs
}
