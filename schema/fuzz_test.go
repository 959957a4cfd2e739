package schema

import (
	"bytes"
	"errors"
	"io"
	"testing"
	"testing/iotest"

	"github.com/imd-dev/imd/schema/pb"
	"google.golang.org/protobuf/proto"
)

// fuzzMaxBody is the small limit of the second decoder in FuzzDecoder, so
// that the fuzzer reaches the "too large" path with ordinary lengths.
const fuzzMaxBody = 300

// seedFrame encodes one frame for the seed corpus.
func seedFrame(h Header, body []byte) []byte {
	return AppendFrame(nil, &h, body)
}

func mustMarshal(m proto.Message) []byte {
	b, err := proto.Marshal(m)
	if err != nil {
		panic(err)
	}
	return b
}

// decoderSeeds are the in-code seeds of FuzzDecoder; testdata/fuzz/FuzzDecoder
// holds the same kinds of inputs as files.
func decoderSeeds() map[string][]byte {
	login := seedFrame(Header{Cmd: CmdLogin, AppCode: 101, UID: 42, Seq: 1},
		mustMarshal(&pb.LoginRequest{Token: "101.42.1893456000.sig", DeviceId: "dev-1"}))
	keepalive := seedFrame(Header{Cmd: CmdKeepalive, Seq: 2}, mustMarshal(&pb.KeepaliveRequest{ClientTimeMs: 1700000000000}))
	c2c := seedFrame(Header{Cmd: CmdC2CSend, Seq: 3, MsgType: 1},
		mustMarshal(&pb.C2CSendRequest{To: &pb.User{Account: 1, Uid: 7}, ClientMsgId: "m1", Content: []byte(`{"t":"hi"}`)}))
	ack := seedFrame(Header{Flags: uint8(KindNotify), Cmd: CmdS2CAck}, mustMarshal(&pb.S2CAck{PushIds: []uint64{1, 2, 3}}))
	empty := seedFrame(Header{Cmd: CmdOfflineCount, Seq: 4}, nil)

	badMagic := bytes.Clone(login)
	badMagic[0] = 'H'
	badVersion := bytes.Clone(empty)
	badVersion[2] = 2
	badFlags := bytes.Clone(empty)
	badFlags[3] = 0x83
	oversized := seedFrame(Header{Cmd: CmdC2S, Seq: 5}, nil)
	oversized[36], oversized[37], oversized[38], oversized[39] = 0xFF, 0xFF, 0xFF, 0xFF
	overSmall := seedFrame(Header{Cmd: CmdC2S, Seq: 6}, bytes.Repeat([]byte{'a'}, fuzzMaxBody+1))

	return map[string][]byte{
		"empty-input":        {},
		"valid-frame":        empty,
		"login-frame":        login,
		"stream":             bytes.Join([][]byte{login, keepalive, c2c, ack, empty}, nil),
		"truncated-header":   login[:HeaderLen-3],
		"truncated-body":     login[:len(login)-2],
		"bad-magic":          badMagic,
		"bad-version":        badVersion,
		"bad-flags":          badFlags,
		"oversized":          oversized,
		"over-small-max":     overSmall,
		"valid-then-garbage": append(bytes.Clone(keepalive), "GET / HTTP/1.1\r\n\r\n"...),
	}
}

// countingReader counts the bytes handed to the decoder.
type countingReader struct {
	r io.Reader
	n int
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += n
	return n, err
}

// inputSplits derives read sizes from the input itself (its bytes read
// backwards, 1..64 each), so the fuzzer controls the split points.
func inputSplits(data []byte) func() int {
	i := 0
	return func() int {
		if len(data) == 0 {
			return 1
		}
		s := int(data[len(data)-1-i%len(data)])%64 + 1
		i++
		return s
	}
}

func fuzzDecode(t *testing.T, data []byte, r io.Reader, maxBody uint32) {
	cr := &countingReader{r: r}
	d := NewDecoder(cr, maxBody)
	var f Frame
	consumed := 0
	for frames := 0; ; frames++ {
		err := d.ReadFrame(&f)
		if err != nil {
			switch {
			case err == io.EOF:
				if cr.n != len(data) || consumed != len(data) {
					t.Fatalf("io.EOF after %d of %d bytes", cr.n, len(data))
				}
			case err == io.ErrUnexpectedEOF:
				if cr.n != len(data) || len(data)-consumed == 0 {
					t.Fatalf("ErrUnexpectedEOF after %d of %d bytes (frames end at %d)", cr.n, len(data), consumed)
				}
			case errors.Is(err, ErrBadMagic), errors.Is(err, ErrBadVersion), errors.Is(err, ErrBadFlags), errors.Is(err, ErrBodyTooLarge):
				// Rejected on the header alone: nothing of the body was read.
				if cr.n != consumed+HeaderLen {
					t.Fatalf("%v: read %d bytes, header ended at %d", err, cr.n, consumed+HeaderLen)
				}
				if _, perr := ParseHeader(data[consumed:], maxBody); perr != err {
					t.Fatalf("decoder says %v, ParseHeader says %v", err, perr)
				}
				if StatusOf(err) == StatusInternal {
					t.Fatalf("validation error %v maps to StatusInternal", err)
				}
			default:
				t.Fatalf("unexpected error %v", err)
			}
			if f.Body != nil || f.buf != nil {
				t.Fatal("a body is held after an error")
			}
			return
		}
		if uint32(len(f.Body)) != f.BodyLen {
			t.Fatalf("frame %d: len(Body) %d != BodyLen %d", frames, len(f.Body), f.BodyLen)
		}
		if len(f.Body) > int(maxBody) {
			t.Fatalf("frame %d: body of %d bytes over the maximum %d", frames, len(f.Body), maxBody)
		}
		// Re-encoding gives exactly the bytes consumed.
		end := consumed + HeaderLen + len(f.Body)
		if cr.n != end {
			t.Fatalf("frame %d: decoder read %d bytes, frame ends at %d", frames, cr.n, end)
		}
		re := make([]byte, HeaderLen, HeaderLen+len(f.Body))
		f.Header.Put(re)
		re = append(re, f.Body...)
		if !bytes.Equal(re, data[consumed:end]) {
			t.Fatalf("frame %d re-encodes differently:\n got % x\nwant % x", frames, re, data[consumed:end])
		}
		consumed = end
		f.Release()
	}
}

func FuzzDecoder(f *testing.F) {
	for _, s := range decoderSeeds() {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		// Default limit, split reads derived from the input.
		fuzzDecode(t, data, &splitReader{data: data, next: inputSplits(data)}, DefaultMaxBody)
		// Small limit, one byte at a time.
		fuzzDecode(t, data, iotest.OneByteReader(bytes.NewReader(data)), fuzzMaxBody)
		// Small limit, data and EOF together.
		fuzzDecode(t, data, iotest.DataErrReader(bytes.NewReader(data)), fuzzMaxBody)
	})
}

// clientBodies are the bodies a server parses from a client: request bodies
// and client notifies.
var clientBodies = []func() proto.Message{
	func() proto.Message { return new(pb.LoginRequest) },
	func() proto.Message { return new(pb.LogoutRequest) },
	func() proto.Message { return new(pb.KeepaliveRequest) },
	func() proto.Message { return new(pb.C2SRequest) },
	func() proto.Message { return new(pb.S2CAck) },
	func() proto.Message { return new(pb.C2CSendRequest) },
	func() proto.Message { return new(pb.C2CAckRequest) },
	func() proto.Message { return new(pb.OfflineCountRequest) },
	func() proto.Message { return new(pb.OfflinePullRequest) },
	func() proto.Message { return new(pb.HistorySyncRequest) },
	func() proto.Message { return new(pb.GroupSyncRequest) },
	func() proto.Message { return new(pb.GroupPullRequest) },
	func() proto.Message { return new(pb.GroupAckRequest) },
}

func bodySeeds() map[string][]byte {
	return map[string][]byte{
		"empty":      {},
		"login":      mustMarshal(&pb.LoginRequest{Token: "101.42.1893456000.sig", DeviceId: "dev-1", Platform: "android", SdkVersion: "1.0.0"}),
		"keepalive":  mustMarshal(&pb.KeepaliveRequest{ClientTimeMs: -1}),
		"c2s":        mustMarshal(&pb.C2SRequest{Content: []byte{0, 1, 2, 0xff}, ClientMsgId: "c1"}),
		"s2c-ack":    mustMarshal(&pb.S2CAck{PushIds: []uint64{1, 1 << 63, 0}}),
		"c2c-send":   mustMarshal(&pb.C2CSendRequest{To: &pb.User{Account: 3, Uid: 1 << 40}, ClientMsgId: "x", Content: []byte("hi"), GroupId: 9}),
		"c2c-ack":    mustMarshal(&pb.C2CAckRequest{Msgids: []uint64{5, 6, 7}}),
		"pull":       mustMarshal(&pb.OfflinePullRequest{PageSize: 50, AfterMsgid: 100, AckMsgids: []uint64{98, 99}}),
		"history":    mustMarshal(&pb.HistorySyncRequest{Peer: &pb.User{Account: 1, Uid: 2}, SinceMsgid: 3, Limit: 4}),
		"group-send": mustMarshal(&pb.C2CSendRequest{GroupId: 1 << 62, ClientMsgId: "g", Content: []byte("hi all"), AfterMsgid: 77}),
		"group-pull": mustMarshal(&pb.GroupPullRequest{GroupId: 5, AfterSeq: 10, PageSize: 0, AckSeq: 10}),
		"group-ack":  mustMarshal(&pb.GroupAckRequest{Cursors: []*pb.GroupCursor{{GroupId: 5, Seq: 11}, {GroupId: 6, Seq: 1 << 63}}}),
		// repeated uint64 unpacked (field 1, varint), then an unknown field 15.
		"unpacked-unknown": {0x08, 0x01, 0x08, 0x02, 0x78, 0x05},
		// A length-delimited field running past the end.
		"truncated-len": {0x0a, 0x10, 'a'},
		// Invalid UTF-8 in a string field.
		"bad-utf8": {0x0a, 0x02, 0xff, 0xfe},
		// Nested User with an unknown field inside.
		"nested-unknown": {0x0a, 0x04, 0x08, 0x01, 0x20, 0x07},
	}
}

func FuzzBodies(f *testing.F) {
	for _, s := range bodySeeds() {
		f.Add(s)
	}
	det := proto.MarshalOptions{Deterministic: true}
	f.Fuzz(func(t *testing.T, data []byte) {
		for _, newMsg := range clientBodies {
			m1 := newMsg()
			if err := proto.Unmarshal(data, m1); err != nil {
				continue
			}
			name := m1.ProtoReflect().Descriptor().FullName()
			b1, err := det.Marshal(m1)
			if err != nil {
				t.Fatalf("%s: re-marshal of a parsed message failed: %v", name, err)
			}
			m2 := newMsg()
			if err := proto.Unmarshal(b1, m2); err != nil {
				t.Fatalf("%s: re-marshaled bytes do not parse: %v\n% x", name, err, b1)
			}
			if !proto.Equal(m1, m2) {
				t.Fatalf("%s: round trip differs:\n%v\n%v", name, m1, m2)
			}
			b2, err := det.Marshal(m2)
			if err != nil || !bytes.Equal(b1, b2) {
				t.Fatalf("%s: marshal is not stable: %v\n% x\n% x", name, err, b1, b2)
			}
		}
	})
}
