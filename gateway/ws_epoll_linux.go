//go:build linux

package gateway

import (
	"encoding/binary"
	"fmt"
	"net"
	"syscall"

	"github.com/gobwas/ws"
	"github.com/imd-dev/imd/schema"
	"golang.org/x/sys/unix"
)

// wsEpConn is an epoll connection that was upgraded to WebSocket on the web
// listener. It is an epConn in every other respect (the same loop, wheel,
// read buffer, queue and writev), with the WebSocket framing between the
// socket and the frame parser: a read is unmasked and stripped of its
// WebSocket headers in place in the loop's buffer, and each flush sends the
// queued frames as one binary message. An idle WebSocket connection
// therefore costs what a TCP one costs plus this state; keeping it outside
// epConn keeps TCP connections in their size class.
type wsEpConn struct {
	epConn
	ws wsState
}

// wsState is the WebSocket framing state of a connection.
type wsState struct {
	// The read side, used by its owner only, as epConn.part is.
	hdr     [14]byte  // a WebSocket frame header, possibly split across reads
	hlen    uint8     // bytes of hdr filled
	inFrame bool      // the header is parsed and payload is being read
	inMsg   bool      // a binary message has started and not finished
	fin     bool      // the current frame ends its message
	op      ws.OpCode // the current frame's opcode
	mask    [4]byte
	left    uint64 // payload bytes of the current frame still to come
	moff    int    // payload bytes of the current frame unmasked so far
	msgLen  uint64 // payload bytes of the current message so far
	ctl     []byte // a control frame's payload (at most 125 bytes)
	// The protocol frames inside the message stream: bytes of the current
	// one seen (0 at a boundary) and, once its header is in, its length.
	fpos, flen uint64
	oversize   bool // a frame header announced a body over MaxBody

	// The write side, guarded by conn.mu.
	pending   int           // entries at the front of conn.out already framed (a header and its frames, or a control frame)
	closeSent bool          // a close frame is queued or gone
	code      ws.StatusCode // the close code decided by the read side, if any
}

// wsVerdict is what decoding a read found besides payload: nothing, the
// peer's close, or input that ends the connection.
type wsVerdict struct {
	code      ws.StatusCode // 0: go on
	peerClose bool          // the peer sent a close frame (code is its code)
	st        schema.Status // the error frame to send before closing; 0: none
	msg       string
}

// wsConn returns c's WebSocket half, nil on a TCP connection.
func (c *epConn) wsConn() *wsEpConn {
	w, _ := c.io.(*wsEpConn)
	return w
}

// adoptWS takes over an upgraded WebSocket connection: the loops serve a
// duplicate of its socket and the net.Conn (and with it Go's netpoller
// registration) is closed.
func (e *epollEngine) adoptWS(nc net.Conn) error {
	defer func() { _ = nc.Close() }()
	sc, ok := nc.(syscall.Conn)
	if !ok {
		return fmt.Errorf("gateway: websocket: %T has no descriptor", nc)
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return fmt.Errorf("gateway: websocket: %w", err)
	}
	fd := -1
	var derr error
	if err := rc.Control(func(f uintptr) { fd, derr = unix.FcntlInt(f, unix.F_DUPFD_CLOEXEC, 0) }); err != nil {
		return fmt.Errorf("gateway: websocket: %w", err)
	}
	if derr != nil {
		return fmt.Errorf("gateway: websocket: dup: %w", derr)
	}
	return e.adoptAs(fd, true)
}

// read serves bytes read from the socket (in the loop's buffer, which it
// rewrites) on the loop.
func (w *wsEpConn) read(data []byte) {
	payload, v := w.decode(data)
	if v.code != 0 && !v.peerClose {
		w.wsFail(v)
		w.stopReading()
		return
	}
	a := actNext
	if len(payload) > 0 {
		a = w.feed(payload, false)
	}
	switch {
	case v.peerClose:
		w.srv.m.closed.WithLabelValues("ws_close").Inc()
		w.mu.Lock()
		w.ws.code = v.code // echoed, as RFC 6455 asks
		w.mu.Unlock()
		w.closeAfterFlush()
		if a != actBlock { // a blocking call owns the read side and stops it itself
			w.stopReading()
		}
	case a == actStop:
		w.stopReading()
	}
}

// wsFail answers input that is not a message of whole frames: an error
// frame where there is one to send, then a close frame, then the close.
func (w *wsEpConn) wsFail(v wsVerdict) {
	s := w.srv
	s.m.closed.WithLabelValues("ws_bad_message").Inc()
	s.log.Info("bad websocket message; closing", "conn", w.id, "remote", w.remoteAddr(), "code", int(v.code), "err", v.msg)
	w.mu.Lock()
	w.ws.code = v.code
	w.mu.Unlock()
	if v.st != 0 {
		w.respondErr(&schema.Header{}, v.st, v.msg)
	}
	w.closeAfterFlush()
}

// closeFrame implements closeFramer: a connection that ends on bad input
// says so with 1003 (a bad frame) or 1009 (one over the body limit), as
// PROTOCOL.md asks; a frame before login gets 1008; anything else (logout,
// kickout, a refused login, a drain, a timeout) is a normal closure whose
// reason is in the frame before.
func (w *wsEpConn) closeFrame(failed schema.Status) *[]byte {
	if w.ws.closeSent {
		return nil
	}
	w.ws.closeSent = true
	code := w.ws.code
	if code == 0 {
		switch failed {
		case schema.StatusBodyTooLarge:
			code = ws.StatusMessageTooBig
		case schema.StatusBadFrame, schema.StatusBadVersion:
			code = ws.StatusUnsupportedData
		case schema.StatusNotLoggedIn:
			code = ws.StatusPolicyViolation
		default:
			code = ws.StatusNormalClosure
		}
	}
	return wsCloseFrame(code, "")
}

// wsCloseFrame encodes a close frame in a pooled buffer.
func wsCloseFrame(code ws.StatusCode, reason string) *[]byte {
	if len(reason) > 120 {
		reason = reason[:120]
	}
	return wsControlFrame(ws.OpClose, ws.NewCloseFrameBody(code, reason))
}

// wsControlFrame encodes an unmasked control frame (payload at most 125
// bytes) in a pooled buffer. Its first byte is never schema.Magic0, which
// is how flush tells it from a protocol frame.
func wsControlFrame(op ws.OpCode, payload []byte) *[]byte {
	bp := schema.GetBuf(2 + len(payload))
	b := *bp
	b[0] = 0x80 | byte(op)
	b[1] = byte(len(payload))
	copy(b[2:], payload)
	return bp
}

// frameOut, called by flush with conn.mu held and nothing of a message
// under way, frames the front of the queue: a queued control frame goes
// as it is; a run of protocol frames gets one binary message header, put
// in the queue before them.
func (w *wsEpConn) frameOut() {
	if (*w.out[0])[0] != schema.Magic0 {
		w.ws.pending = 1
		return
	}
	m, total := 0, 0
	for _, p := range w.out {
		if m == maxIov-1 || (*p)[0] != schema.Magic0 {
			break
		}
		m++
		total += len(*p)
	}
	hp := schema.GetBuf(10)
	h := *hp
	h[0] = 0x80 | byte(ws.OpBinary)
	switch {
	case total < 126:
		h[1] = byte(total)
		h = h[:2]
	case total <= 0xFFFF:
		h[1] = 126
		binary.BigEndian.PutUint16(h[2:], uint16(total))
		h = h[:4]
	default:
		h[1] = 127
		binary.BigEndian.PutUint64(h[2:], uint64(total))
	}
	*hp = h
	w.out = append(w.out, nil)
	copy(w.out[1:], w.out)
	w.out[0] = hp
	w.outBytes += len(h)
	w.ws.pending = m + 1
}

// decode unmasks data in place and moves the payload of binary messages to
// its front, which it returns with what else it found. A control frame
// is answered (ping) or reported (close); anything that breaks the rules
// of PROTOCOL.md (a text message, a frame across messages, a message over
// the body limit) or of RFC 6455 ends decoding with a verdict to close.
func (w *wsEpConn) decode(data []byte) ([]byte, wsVerdict) {
	st := &w.ws
	maxMsg := uint64(w.srv.opts.MaxBody) + schema.HeaderLen
	out := 0
	for i := 0; i < len(data) || (st.inFrame && st.left == 0); {
		if !st.inFrame {
			need := 2
			if st.hlen >= 2 {
				need = wsHeaderSize(st.hdr[1])
			}
			for int(st.hlen) < need && i < len(data) {
				st.hdr[st.hlen] = data[i]
				st.hlen++
				i++
				if st.hlen == 2 {
					need = wsHeaderSize(st.hdr[1])
				}
			}
			if int(st.hlen) < need {
				break
			}
			if v := st.startFrame(maxMsg); v.code != 0 {
				return data[:out], v
			}
		}
		k := int(min(st.left, uint64(len(data)-i)))
		p := data[i : i+k]
		ws.Cipher(p, st.mask, st.moff)
		st.moff += k
		st.left -= uint64(k)
		i += k
		if st.op.IsData() {
			n := copy(data[out:], p)
			st.track(data[out:out+n], w.srv.opts.MaxBody)
			out += n
		} else {
			st.ctl = append(st.ctl, p...)
		}
		if st.left > 0 {
			continue
		}
		st.inFrame, st.hlen = false, 0
		if v := w.endFrame(); v.code != 0 {
			return data[:out], v
		}
	}
	return data[:out], wsVerdict{}
}

// wsHeaderSize is the size of a client frame's header (always masked) by
// its second byte.
func wsHeaderSize(b1 byte) int {
	switch b1 & 0x7f {
	case 126:
		return 2 + 2 + 4
	case 127:
		return 2 + 8 + 4
	}
	return 2 + 4
}

func protocolError(msg string) wsVerdict {
	return wsVerdict{code: ws.StatusProtocolError, msg: msg}
}

// startFrame checks the header in st.hdr and starts reading its payload.
func (st *wsState) startFrame(maxMsg uint64) wsVerdict {
	b0, b1 := st.hdr[0], st.hdr[1]
	fin, op := b0&0x80 != 0, ws.OpCode(b0&0x0f)
	if b0&0x70 != 0 {
		return protocolError("reserved bits set (no extension was negotiated)")
	}
	if b1&0x80 == 0 {
		return protocolError("client frames must be masked")
	}
	var n uint64
	var mask []byte
	switch b1 & 0x7f {
	case 126:
		n, mask = uint64(binary.BigEndian.Uint16(st.hdr[2:])), st.hdr[4:8]
	case 127:
		n, mask = binary.BigEndian.Uint64(st.hdr[2:]), st.hdr[10:14]
	default:
		n, mask = uint64(b1&0x7f), st.hdr[2:6]
	}
	switch {
	case op.IsReserved():
		return protocolError("reserved opcode")
	case op.IsControl():
		if !fin || n > 125 {
			return protocolError("control frames are whole and at most 125 bytes")
		}
	case op == ws.OpText && !st.inMsg:
		return wsVerdict{code: ws.StatusUnsupportedData, st: schema.StatusBadFrame, msg: "text message: frames travel in binary messages"}
	case op == ws.OpContinuation && !st.inMsg, op != ws.OpContinuation && st.inMsg:
		return protocolError("bad continuation")
	default:
		if op == ws.OpBinary {
			st.inMsg, st.msgLen = true, 0
		}
		st.msgLen += n
		if st.msgLen > maxMsg {
			return wsVerdict{code: ws.StatusMessageTooBig, st: schema.StatusBodyTooLarge, msg: fmt.Sprintf("a message carries at most %d bytes", maxMsg)}
		}
		st.fin = fin
	}
	st.op = op
	if op == ws.OpContinuation {
		st.op = ws.OpBinary // the rest of a binary message
	}
	copy(st.mask[:], mask)
	st.left, st.moff, st.inFrame = n, 0, true
	return wsVerdict{}
}

// track follows the protocol frames in message payload p, so that a
// message's end can be checked to fall between two of them.
func (st *wsState) track(p []byte, maxBody uint32) {
	for len(p) > 0 {
		if st.fpos < schema.HeaderLen {
			n := min(uint64(len(p)), schema.HeaderLen-st.fpos)
			for j := range n { // bodylen is the header's last 4 bytes
				if st.fpos+j >= schema.HeaderLen-4 {
					st.flen = st.flen<<8 | uint64(p[j])
				}
			}
			st.fpos += n
			p = p[n:]
			if st.fpos == schema.HeaderLen {
				if st.flen > uint64(maxBody) {
					st.oversize = true
				}
				st.flen += schema.HeaderLen
			}
		} else {
			n := min(uint64(len(p)), st.flen-st.fpos)
			st.fpos += n
			p = p[n:]
		}
		if st.fpos >= schema.HeaderLen && st.fpos == st.flen {
			st.fpos, st.flen = 0, 0
		}
	}
}

// endFrame acts on a frame whose payload is all in.
func (w *wsEpConn) endFrame() wsVerdict {
	st := &w.ws
	switch st.op {
	case ws.OpBinary:
		if st.fin {
			st.inMsg = false
			if st.oversize {
				return wsVerdict{code: ws.StatusMessageTooBig, st: schema.StatusBodyTooLarge, msg: fmt.Sprintf("a frame's body is over max_body %d", w.srv.opts.MaxBody)}
			}
			if st.fpos != 0 {
				return wsVerdict{code: ws.StatusUnsupportedData, st: schema.StatusBadFrame, msg: "a frame must not span two messages"}
			}
		}
	case ws.OpPing:
		w.enqueueBuf(wsControlFrame(ws.OpPong, st.ctl))
	case ws.OpClose:
		code := ws.StatusNormalClosure
		if len(st.ctl) >= 2 {
			code = ws.StatusCode(binary.BigEndian.Uint16(st.ctl))
		}
		if code < 1000 || code == ws.StatusNoStatusRcvd || code == ws.StatusAbnormalClosure || code == ws.StatusTLSHandshake {
			code = ws.StatusNormalClosure // codes that must not travel in a close frame
		}
		st.ctl = nil
		return wsVerdict{code: code, peerClose: true}
	}
	st.ctl = nil
	return wsVerdict{}
}
