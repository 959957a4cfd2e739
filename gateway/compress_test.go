package gateway

import (
	"bytes"
	"encoding/binary"
	"testing"
	"time"

	"github.com/imd-dev/imd/logic"
	"github.com/imd-dev/imd/schema"
	"github.com/imd-dev/imd/schema/pb"
	"github.com/klauspost/compress/s2"
	"google.golang.org/protobuf/proto"
)

// loginFrameS2 is a login that offers s2 body compression.
func loginFrameS2(uid uint64, seq uint32) []byte {
	return encodeFrame(schema.Header{Cmd: schema.CmdLogin, AppCode: 101, UID: uid, Seq: seq},
		&pb.LoginRequest{Token: logic.MintToken(testSecret, 101, uid, time.Now().Add(time.Hour)), DeviceId: "d",
			AcceptCompression: []string{"zstd", schema.CompressionS2}})
}

// compressedRaw is a frame with bit 2 set and block as its body.
func compressedRaw(h schema.Header, block []byte) []byte {
	h.Flags |= schema.FlagCompressed
	return schema.AppendFrame(nil, &h, block)
}

// s2Keepalive is a keepalive request whose body is s2-compressed.
func s2Keepalive(seq uint32) []byte {
	body, _ := proto.Marshal(&pb.KeepaliveRequest{ClientTimeMs: 12345})
	return compressedRaw(schema.Header{Cmd: schema.CmdKeepalive, Seq: seq}, s2.Encode(nil, body))
}

// TestCompressNegotiated: a login that offers s2 gets it; compressed
// requests are served, and bodies of compress_min bytes or more come back
// compressed while smaller ones do not.
func TestCompressNegotiated(t *testing.T) {
	forEachEngine(t, func(t *testing.T, engine string) {
		s := startServer(t, engine, nil)
		c := dialClient(t, s)
		c.write(loginFrameS2(7, 1))
		var lr pb.LoginResponse
		if err := proto.Unmarshal(c.expect(1, schema.StatusOK), &lr); err != nil || lr.Compression != schema.CompressionS2 {
			t.Fatalf("login response %v (%v), want compression s2", &lr, err)
		}
		c.write(s2Keepalive(2))
		var ka pb.KeepaliveResponse
		if err := proto.Unmarshal(c.expect(2, schema.StatusOK), &ka); err != nil || ka.ServerTimeMs == 0 {
			t.Fatalf("keepalive response %v (%v)", &ka, err)
		}
		big := bytes.Repeat([]byte("compress me "), 200) // 2400 bytes
		small := big[:100]
		s.each(func(cn *conn) {
			cn.pushRaw(schema.CmdS2C, 9, 0, big)
			cn.pushRaw(schema.CmdS2C, 9, 0, small)
		})
		for i, want := range [][]byte{big, small} {
			h, body := c.read()
			compressed := h.Flags&schema.FlagCompressed != 0
			if compressed != (i == 0) {
				t.Fatalf("push %d of %d bytes: flags %#x", i, len(want), h.Flags)
			}
			if compressed {
				if len(body) >= len(want) {
					t.Fatalf("compressed body is %d bytes for %d", len(body), len(want))
				}
				var err error
				if body, err = s2.Decode(nil, body); err != nil {
					t.Fatal(err)
				}
			}
			if !bytes.Equal(body, want) {
				t.Fatalf("push %d: body differs", i)
			}
		}
	})
}

// TestCompressOff: with compress_min negative the server declines, and a
// client that did not ask never gets a compressed frame.
func TestCompressOff(t *testing.T) {
	s := startServer(t, EngineGoroutine, func(o *Options) { o.CompressMin = -1 })
	c := dialClient(t, s)
	c.write(loginFrameS2(7, 1))
	var lr pb.LoginResponse
	if err := proto.Unmarshal(c.expect(1, schema.StatusOK), &lr); err != nil || lr.Compression != "" {
		t.Fatalf("login response %v (%v), want no compression", &lr, err)
	}
	c2 := dialClient(t, s)
	c2.login(8)
	big := bytes.Repeat([]byte("x"), 4096)
	s.each(func(cn *conn) { cn.pushRaw(schema.CmdS2C, 9, 0, big) })
	for _, cl := range []*client{c, c2} {
		if h, body := cl.read(); h.Flags&schema.FlagCompressed != 0 || !bytes.Equal(body, big) {
			t.Fatalf("flags %#x, %d bytes", h.Flags, len(body))
		}
	}
}

// TestCompressNotNegotiated: the compressed bit on a connection whose login
// did not negotiate compression, or on the login itself, is a bad frame
// (1001) and closes the connection.
func TestCompressNotNegotiated(t *testing.T) {
	forEachEngine(t, func(t *testing.T, engine string) {
		s := startServer(t, engine, nil)
		c := dialClient(t, s)
		c.login(7)
		c.write(s2Keepalive(2))
		c.expect(2, schema.StatusBadFrame)
		c.expectClosed(5 * time.Second)

		c = dialClient(t, s)
		login := loginFrameS2(8, 1)
		block := s2.Encode(nil, login[schema.HeaderLen:])
		h, _ := schema.ParseHeader(login, 0)
		c.write(compressedRaw(h, block))
		c.expect(1, schema.StatusBadFrame)
		c.expectClosed(5 * time.Second)
	})
}

// TestCompressBomb: a compressed body whose length prefix claims more than
// MaxBody is refused with 1003 and a close, before it is inflated: the
// block holds nothing but the prefix and garbage, so inflating it would
// have failed as corrupt (1004) instead.
func TestCompressBomb(t *testing.T) {
	forEachEngine(t, func(t *testing.T, engine string) {
		s := startServer(t, engine, func(o *Options) { o.MaxBody = 4096 })
		c := dialClient(t, s)
		c.write(loginFrameS2(7, 1))
		c.expect(1, schema.StatusOK)
		block := binary.AppendUvarint(nil, 4097)
		block = append(block, 0xff, 0xff, 0xff, 0xff)
		c.write(compressedRaw(schema.Header{Cmd: schema.CmdKeepalive, Seq: 2}, block))
		c.expect(2, schema.StatusBodyTooLarge)
		c.expectClosed(5 * time.Second)

		// A real one: 1 MiB of zeros compresses to a few KiB.
		c = dialClient(t, s)
		c.write(loginFrameS2(8, 1))
		c.expect(1, schema.StatusOK)
		block = s2.Encode(nil, make([]byte, 1<<20))
		if len(block) > 4096 {
			t.Fatalf("bomb block is %d bytes", len(block))
		}
		c.write(compressedRaw(schema.Header{Cmd: schema.CmdKeepalive, Seq: 3}, block))
		c.expect(3, schema.StatusBodyTooLarge)
		c.expectClosed(5 * time.Second)
	})
}

// TestCompressCorrupt: a compressed body that is not a valid s2 block gets
// 1004; the connection stays usable.
func TestCompressCorrupt(t *testing.T) {
	forEachEngine(t, func(t *testing.T, engine string) {
		s := startServer(t, engine, nil)
		c := dialClient(t, s)
		c.write(loginFrameS2(7, 1))
		c.expect(1, schema.StatusOK)
		block := binary.AppendUvarint(nil, 100)
		block = append(block, 0xff, 0xff, 0xff, 0xff)
		c.write(compressedRaw(schema.Header{Cmd: schema.CmdKeepalive, Seq: 2}, block))
		c.expect(2, schema.StatusBadBody)
		c.write(compressedRaw(schema.Header{Cmd: schema.CmdKeepalive, Seq: 3}, nil)) // empty: no length prefix
		c.expect(3, schema.StatusBadBody)
		c.write(s2Keepalive(4))
		c.expect(4, schema.StatusOK)
	})
}

// TestCompressedFrameAllocs: compressing an outgoing frame into a pooled
// buffer allocates nothing once the pool is warm.
func TestCompressedFrameAllocs(t *testing.T) {
	if compressRaceEnabled {
		t.Skip("the race detector makes sync.Pool drop buffers")
	}
	body := bytes.Repeat([]byte("abcdefgh"), 128)
	allocs := testing.AllocsPerRun(1000, func() {
		h := schema.Header{Cmd: schema.CmdS2C}
		bp := compressedFrame(&h, body)
		if bp == nil {
			t.Fatal("not compressed")
		}
		schema.PutBuf(bp)
	})
	if allocs != 0 {
		t.Fatalf("compressedFrame: %v allocs, want 0", allocs)
	}
}
