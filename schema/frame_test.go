package schema

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
	"testing"
)

// validHeaderBytes returns the 40 encoded bytes of a valid request header
// with every field set to a distinct value.
func validHeaderBytes() []byte {
	h := Header{
		Flags: uint8(KindRequest), Cmd: CmdC2CSend, AppCode: 101, MsgType: 7,
		UID: 42, Seq: 9, LogID: 0x0102030405060708, BodyLen: 100,
	}
	b := make([]byte, HeaderLen)
	h.Put(b)
	return b
}

func TestHeaderRoundTrip(t *testing.T) {
	max := Header{
		Version: Version, Flags: uint8(KindNotify) | FlagCompressed | FlagEncrypted,
		Cmd: math.MaxUint16, Status: math.MaxUint16, AppCode: math.MaxUint32,
		MsgType: math.MaxUint32, UID: math.MaxUint64, Seq: math.MaxUint32,
		LogID: math.MaxUint64, BodyLen: DefaultMaxBody,
	}
	tests := []struct {
		name string
		h    Header
	}{
		{"zero", Header{Version: Version}},
		{"all max", max},
		{"one", Header{Version: Version, Flags: uint8(KindResponse), Cmd: 1, Status: 1, AppCode: 1, MsgType: 1, UID: 1, Seq: 1, LogID: 1, BodyLen: 1}},
		{"high bits", Header{Version: Version, Cmd: 0x8000, Status: 0x8000, AppCode: 1 << 31, MsgType: 1 << 31, UID: 1 << 63, Seq: 1 << 31, LogID: 1 << 63, BodyLen: 1 << 15}},
		{"distinct bytes", Header{Version: Version, Flags: FlagCompressed, Cmd: 0x0102, Status: 0x0304, AppCode: 0x05060708, MsgType: 0x090a0b0c, UID: 0x0d0e0f1011121314, Seq: 0x15161718, LogID: 0x191a1b1c1d1e1f20, BodyLen: 0x2122}},
		{"kind request", Header{Version: Version, Flags: uint8(KindRequest)}},
		{"kind response", Header{Version: Version, Flags: uint8(KindResponse)}},
		{"kind notify", Header{Version: Version, Flags: uint8(KindNotify)}},
		{"compressed", Header{Version: Version, Flags: FlagCompressed}},
		{"encrypted", Header{Version: Version, Flags: FlagEncrypted}},
		{"bodylen max", Header{Version: Version, BodyLen: DefaultMaxBody}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var b [HeaderLen]byte
			tt.h.Put(b[:])
			got, err := ParseHeader(b[:], 0)
			if err != nil {
				t.Fatalf("ParseHeader: %v", err)
			}
			if got != tt.h {
				t.Fatalf("round trip:\n got %+v\nwant %+v", got, tt.h)
			}
			// Put with Version 0 writes Version.
			h0 := tt.h
			h0.Version = 0
			var b0 [HeaderLen]byte
			h0.Put(b0[:])
			if b0 != b {
				t.Fatalf("Put with Version 0 differs:\n% x\n% x", b0, b)
			}
		})
	}
}

func TestHeaderPutLayout(t *testing.T) {
	h := Header{Flags: 0x06, Cmd: 0x0102, Status: 0x0304, AppCode: 0x05060708, MsgType: 0x090a0b0c,
		UID: 0x0d0e0f1011121314, Seq: 0x15161718, LogID: 0x191a1b1c1d1e1f20, BodyLen: 0x21222324}
	var b [HeaderLen]byte
	h.Put(b[:])
	want := []byte{
		0x58, 0x44, 0x01, 0x06, // magic, version, flags
		0x01, 0x02, 0x03, 0x04, // cmd, status
		0x05, 0x06, 0x07, 0x08, // appcode
		0x09, 0x0a, 0x0b, 0x0c, // msgtype
		0x0d, 0x0e, 0x0f, 0x10, 0x11, 0x12, 0x13, 0x14, // uid
		0x15, 0x16, 0x17, 0x18, // seq
		0x19, 0x1a, 0x1b, 0x1c, 0x1d, 0x1e, 0x1f, 0x20, // logid
		0x21, 0x22, 0x23, 0x24, // bodylen
	}
	if !bytes.Equal(b[:], want) {
		t.Fatalf("layout:\n got % x\nwant % x", b[:], want)
	}
	// Put writes only the first HeaderLen bytes.
	big := bytes.Repeat([]byte{0xEE}, HeaderLen+8)
	h.Put(big)
	if !bytes.Equal(big[HeaderLen:], bytes.Repeat([]byte{0xEE}, 8)) {
		t.Fatalf("Put wrote past the header: % x", big[HeaderLen:])
	}
}

func TestHeaderPutShortPanics(t *testing.T) {
	defer func() {
		if recover() == nil {
			t.Fatal("Put into a 39-byte buffer did not panic")
		}
	}()
	var h Header
	h.Put(make([]byte, HeaderLen-1))
}

func TestKind(t *testing.T) {
	var h Header
	h.Flags = FlagCompressed | FlagEncrypted | 0x03
	for _, k := range []Kind{KindRequest, KindResponse, KindNotify} {
		h.SetKind(k)
		if h.Kind() != k {
			t.Fatalf("SetKind(%v): Kind() = %v", k, h.Kind())
		}
		if h.Flags&^kindMask != FlagCompressed|FlagEncrypted {
			t.Fatalf("SetKind(%v) touched other flags: %#x", k, h.Flags)
		}
	}
	for k, s := range map[Kind]string{KindRequest: "request", KindResponse: "response", KindNotify: "notify", 3: "kind(3)"} {
		if k.String() != s {
			t.Errorf("Kind(%d).String() = %q, want %q", k, k.String(), s)
		}
	}
}

func TestParseHeaderErrors(t *testing.T) {
	mod := func(f func(b []byte)) []byte {
		b := validHeaderBytes()
		f(b)
		return b
	}
	setLen := func(n uint32) []byte {
		return mod(func(b []byte) { binary.BigEndian.PutUint32(b[36:], n) })
	}
	tests := []struct {
		name    string
		b       []byte
		maxBody uint32
		want    error
	}{
		{"valid", validHeaderBytes(), 0, nil},
		{"valid with trailing bytes", append(validHeaderBytes(), 1, 2, 3), 0, nil},
		{"empty", nil, 0, ErrShortHeader},
		{"one byte", []byte{Magic0}, 0, ErrShortHeader},
		{"39 bytes", validHeaderBytes()[:HeaderLen-1], 0, ErrShortHeader},
		{"magic byte 0 zero", mod(func(b []byte) { b[0] = 0 }), 0, ErrBadMagic},
		{"magic byte 0 is magic1", mod(func(b []byte) { b[0] = Magic1 }), 0, ErrBadMagic},
		{"magic byte 0 off by one", mod(func(b []byte) { b[0] = Magic0 + 1 }), 0, ErrBadMagic},
		{"magic byte 1 zero", mod(func(b []byte) { b[1] = 0 }), 0, ErrBadMagic},
		{"magic byte 1 is magic0", mod(func(b []byte) { b[1] = Magic0 }), 0, ErrBadMagic},
		{"magic byte 1 0xff", mod(func(b []byte) { b[1] = 0xff }), 0, ErrBadMagic},
		{"magic swapped", mod(func(b []byte) { b[0], b[1] = Magic1, Magic0 }), 0, ErrBadMagic},
		{"bad magic wins over bad version", mod(func(b []byte) { b[0], b[2] = 0, 9 }), 0, ErrBadMagic},
		{"version 0", mod(func(b []byte) { b[2] = 0 }), 0, ErrBadVersion},
		{"version 2", mod(func(b []byte) { b[2] = 2 }), 0, ErrBadVersion},
		{"version 255", mod(func(b []byte) { b[2] = 255 }), 0, ErrBadVersion},
		{"kind 3", mod(func(b []byte) { b[3] = 3 }), 0, ErrBadFlags},
		{"kind 3 with flags", mod(func(b []byte) { b[3] = 3 | FlagCompressed | FlagEncrypted }), 0, ErrBadFlags},
		{"ordered request ok", mod(func(b []byte) { b[3] = FlagOrdered }), 0, nil},
		{"ordered compressed notify ok", mod(func(b []byte) { b[3] = 2 | FlagOrdered | FlagCompressed }), 0, nil},
		{"reserved bit 5", mod(func(b []byte) { b[3] = 1 << 5 }), 0, ErrBadFlags},
		{"reserved bit 6", mod(func(b []byte) { b[3] = 1 << 6 }), 0, ErrBadFlags},
		{"reserved bit 7", mod(func(b []byte) { b[3] = 1 << 7 }), 0, ErrBadFlags},
		{"all flags", mod(func(b []byte) { b[3] = 0xff }), 0, ErrBadFlags},
		{"compressed encrypted notify ok", mod(func(b []byte) { b[3] = 2 | FlagCompressed | FlagEncrypted }), 0, nil},
		{"bodylen 0", setLen(0), 0, nil},
		{"bodylen default max", setLen(DefaultMaxBody), 0, nil},
		{"bodylen default max+1", setLen(DefaultMaxBody + 1), 0, ErrBodyTooLarge},
		{"bodylen max uint32", setLen(math.MaxUint32), 0, ErrBodyTooLarge},
		{"bodylen custom max", setLen(100), 100, nil},
		{"bodylen custom max+1", setLen(101), 100, ErrBodyTooLarge},
		{"bodylen max 1 ok", setLen(1), 1, nil},
		{"bodylen max 1 over", setLen(2), 1, ErrBodyTooLarge},
		{"bodylen max uint32 limit", setLen(math.MaxUint32), math.MaxUint32, nil},
		{"bad flags wins over body size", mod(func(b []byte) { b[3] = 0x80; binary.BigEndian.PutUint32(b[36:], math.MaxUint32) }), 0, ErrBadFlags},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h, err := ParseHeader(tt.b, tt.maxBody)
			if err != tt.want {
				t.Fatalf("err = %v, want %v", err, tt.want)
			}
			if errors.Is(err, ErrShortHeader) {
				if h != (Header{}) {
					t.Fatalf("short header returned fields: %+v", h)
				}
				return
			}
			// Every field is readable even on error, so the caller can
			// answer with the right cmd and seq.
			if h.Cmd != CmdC2CSend || h.Seq != 9 || h.AppCode != 101 || h.UID != 42 || h.MsgType != 7 || h.LogID != 0x0102030405060708 {
				t.Fatalf("fields not decoded on error: %+v", h)
			}
			if h.Version != tt.b[2] || h.Flags != tt.b[3] || h.BodyLen != binary.BigEndian.Uint32(tt.b[36:]) {
				t.Fatalf("version/flags/bodylen not decoded: %+v", h)
			}
		})
	}
}

func TestStatusOf(t *testing.T) {
	tests := []struct {
		err  error
		want Status
	}{
		{nil, StatusOK},
		{ErrShortHeader, StatusBadFrame},
		{ErrBadMagic, StatusBadFrame},
		{ErrBadFlags, StatusBadFrame},
		{ErrBadVersion, StatusBadVersion},
		{ErrBodyTooLarge, StatusBodyTooLarge},
		{fmt.Errorf("conn 7: %w", ErrBodyTooLarge), StatusBodyTooLarge},
		{fmt.Errorf("wrapped: %w", ErrBadMagic), StatusBadFrame},
		{fmt.Errorf("wrapped: %w", ErrBadVersion), StatusBadVersion},
		{io.EOF, StatusInternal},
		{io.ErrUnexpectedEOF, StatusInternal},
		{errors.New("other"), StatusInternal},
	}
	for _, tt := range tests {
		if got := StatusOf(tt.err); got != tt.want {
			t.Errorf("StatusOf(%v) = %v, want %v", tt.err, got, tt.want)
		}
	}
	// Every status StatusOf returns for a frame error closes the connection.
	for _, err := range []error{ErrShortHeader, ErrBadMagic, ErrBadFlags, ErrBadVersion, ErrBodyTooLarge} {
		if !StatusOf(err).Fatal() {
			t.Errorf("StatusOf(%v) = %v is not Fatal", err, StatusOf(err))
		}
	}
}

func TestAppendFrame(t *testing.T) {
	h := Header{Flags: uint8(KindResponse), Cmd: CmdLogin, Seq: 5, UID: 42, AppCode: 101, BodyLen: 999}
	tests := []struct {
		name string
		dst  []byte
		body []byte
	}{
		{"nil dst empty body", nil, nil},
		{"nil dst", nil, []byte("hello")},
		{"prefix no room", []byte("pre"), []byte("hello")},
		{"prefix exact room", append(make([]byte, 0, 3+HeaderLen+5), "pre"...), []byte("hello")},
		{"prefix large room", append(make([]byte, 0, 4096), "pre"...), bytes.Repeat([]byte{7}, 1000)},
		{"room for header only", append(make([]byte, 0, 3+HeaderLen), "pre"...), []byte("hello")},
		{"max body", nil, bytes.Repeat([]byte{0xAB}, DefaultMaxBody)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			prefix := append([]byte(nil), tt.dst...)
			hh := h
			out := AppendFrame(tt.dst, &hh, tt.body)
			if hh.BodyLen != uint32(len(tt.body)) {
				t.Fatalf("h.BodyLen = %d, want %d", hh.BodyLen, len(tt.body))
			}
			if len(out) != len(prefix)+HeaderLen+len(tt.body) {
				t.Fatalf("len = %d, want %d", len(out), len(prefix)+HeaderLen+len(tt.body))
			}
			if !bytes.Equal(out[:len(prefix)], prefix) {
				t.Fatalf("prefix clobbered")
			}
			got, err := ParseHeader(out[len(prefix):], 0)
			if err != nil {
				t.Fatal(err)
			}
			want := h
			want.Version = Version
			want.BodyLen = uint32(len(tt.body))
			if got != want {
				t.Fatalf("header:\n got %+v\nwant %+v", got, want)
			}
			if !bytes.Equal(out[len(prefix)+HeaderLen:], tt.body) {
				t.Fatalf("body differs")
			}
			if cap(tt.dst)-len(tt.dst) >= HeaderLen+len(tt.body) && len(tt.dst) > 0 && &out[0] != &tt.dst[0] {
				t.Fatalf("reallocated although dst had room")
			}
		})
	}
}

func TestAppendFrameSequence(t *testing.T) {
	var buf []byte
	var want []Header
	for i := range 20 {
		h := Header{Flags: uint8(KindNotify), Cmd: CmdS2C, Seq: uint32(i)}
		buf = AppendFrame(buf, &h, bytes.Repeat([]byte{byte(i)}, i*13))
		h.Version = Version
		want = append(want, h)
	}
	for i, w := range want {
		got, err := ParseHeader(buf, 0)
		if err != nil || got != w {
			t.Fatalf("frame %d: %+v, %v; want %+v", i, got, err, w)
		}
		buf = buf[HeaderLen:]
		if !bytes.Equal(buf[:got.BodyLen], bytes.Repeat([]byte{byte(i)}, i*13)) {
			t.Fatalf("frame %d body differs", i)
		}
		buf = buf[got.BodyLen:]
	}
	if len(buf) != 0 {
		t.Fatalf("%d trailing bytes", len(buf))
	}
}

func TestCmdAndStatusStrings(t *testing.T) {
	for _, c := range Cmds() {
		if !c.Known() || c.String() != cmdNames[c] {
			t.Errorf("cmd %#04x: Known=%v String=%q", uint16(c), c.Known(), c.String())
		}
	}
	if Cmd(0xBEEF).Known() || Cmd(0xBEEF).String() != "cmd(0xbeef)" {
		t.Errorf("unknown cmd: %v %q", Cmd(0xBEEF).Known(), Cmd(0xBEEF).String())
	}
	if Status(9999).String() != "status(9999)" {
		t.Errorf("unknown status: %q", Status(9999).String())
	}
	if len(Cmds()) != len(cmdNames) || len(Statuses()) != len(statusNames) {
		t.Fatal("Cmds/Statuses do not list the whole table")
	}
	for i := 1; i < len(Cmds()); i++ {
		if Cmds()[i-1] >= Cmds()[i] {
			t.Fatal("Cmds not sorted")
		}
	}
	for i := 1; i < len(Statuses()); i++ {
		if Statuses()[i-1] >= Statuses()[i] {
			t.Fatal("Statuses not sorted")
		}
	}
	for _, s := range Statuses() {
		if s.Retryable() && s.Fatal() {
			t.Errorf("status %d is both retryable and fatal", s)
		}
	}
	e := Errorf(StatusRateLimited, "slow down %d", 1)
	if e.Error() != "status 3001 (rate limited): slow down 1" || !e.Retryable() {
		t.Errorf("Errorf: %q retryable=%v", e.Error(), e.Retryable())
	}
	if (&Error{Status: StatusBadBody}).Error() != "status 1004 (bad body)" {
		t.Errorf("Error without message: %q", (&Error{Status: StatusBadBody}).Error())
	}
}
