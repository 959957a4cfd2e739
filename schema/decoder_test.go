package schema

import (
	"bytes"
	"errors"
	"io"
	"math/rand/v2"
	"testing"
	"testing/iotest"
)

type testFrame struct {
	h    Header
	body []byte
}

// testFrames returns a mix of frames: every kind, empty and non-empty bodies,
// a body of exactly the decoder maximum used in the tests.
func testFrames(maxBody int) []testFrame {
	var fs []testFrame
	sizes := []int{0, 1, 5, 0, 255, 256, 257, 1000, maxBody, 0, 3}
	for i, n := range sizes {
		body := make([]byte, n)
		for j := range body {
			body[j] = byte(i*31 + j)
		}
		h := Header{
			Version: Version, Flags: uint8(i % 3), Cmd: Cmd(i + 1), Status: Status(i * 100),
			AppCode: uint32(1000 + i), MsgType: uint32(i), UID: uint64(1) << (i * 5), Seq: uint32(i * 7),
			LogID: ^uint64(i), BodyLen: uint32(n),
		}
		if i%4 == 3 {
			h.Flags |= FlagCompressed
		}
		fs = append(fs, testFrame{h, body})
	}
	return fs
}

func encodeFrames(fs []testFrame) []byte {
	var b []byte
	for _, f := range fs {
		h := f.h
		b = AppendFrame(b, &h, f.body)
	}
	return b
}

// splitReader returns the stream in chunks whose sizes come from next.
type splitReader struct {
	data []byte
	next func() int
}

func (r *splitReader) Read(p []byte) (int, error) {
	if len(r.data) == 0 {
		return 0, io.EOF
	}
	n := r.next()
	if n < 1 {
		n = 1
	}
	n = min(n, len(p), len(r.data))
	copy(p, r.data[:n])
	r.data = r.data[n:]
	return n, nil
}

func randomSplits(seed uint64) func() int {
	rng := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	return func() int {
		switch rng.IntN(4) {
		case 0:
			return 1
		case 1:
			return 1 + rng.IntN(HeaderLen)
		case 2:
			return 1 + rng.IntN(300)
		}
		return 1 + rng.IntN(5000)
	}
}

func readAll(t *testing.T, r io.Reader, maxBody uint32, want []testFrame) {
	t.Helper()
	d := NewDecoder(r, maxBody)
	var f Frame
	for i, w := range want {
		if err := d.ReadFrame(&f); err != nil {
			t.Fatalf("frame %d: %v", i, err)
		}
		if f.Header != w.h {
			t.Fatalf("frame %d header:\n got %+v\nwant %+v", i, f.Header, w.h)
		}
		if !bytes.Equal(f.Body, w.body) {
			t.Fatalf("frame %d body differs (len %d, want %d)", i, len(f.Body), len(w.body))
		}
		if len(w.body) == 0 && (f.Body != nil || f.buf != nil) {
			t.Fatalf("frame %d: empty body should hold no buffer", i)
		}
	}
	if err := d.ReadFrame(&f); err != io.EOF {
		t.Fatalf("after the last frame: err = %v, want io.EOF", err)
	}
	if f.buf != nil || f.Body != nil {
		t.Fatal("body buffer kept after EOF")
	}
}

func TestDecoderBackToBack(t *testing.T) {
	const maxBody = 4096
	fs := testFrames(maxBody)
	stream := encodeFrames(fs)
	readers := []struct {
		name string
		r    func() io.Reader
	}{
		{"bytes", func() io.Reader { return bytes.NewReader(stream) }},
		{"one byte", func() io.Reader { return iotest.OneByteReader(bytes.NewReader(stream)) }},
		{"half", func() io.Reader { return iotest.HalfReader(bytes.NewReader(stream)) }},
		{"data with EOF", func() io.Reader { return iotest.DataErrReader(bytes.NewReader(stream)) }},
		{"data with EOF one byte", func() io.Reader { return iotest.DataErrReader(iotest.OneByteReader(bytes.NewReader(stream))) }},
	}
	for _, rd := range readers {
		t.Run(rd.name, func(t *testing.T) { readAll(t, rd.r(), maxBody, fs) })
	}
	for seed := range uint64(50) {
		r := &splitReader{data: stream, next: randomSplits(seed)}
		readAll(t, r, maxBody, fs)
	}
}

// TestSplitReader checks the test helper itself, so that the split-read
// tests above mean something.
func TestSplitReader(t *testing.T) {
	stream := encodeFrames(testFrames(100))
	for seed := range uint64(5) {
		if err := iotest.TestReader(&splitReader{data: stream, next: randomSplits(seed)}, stream); err != nil {
			t.Fatal(err)
		}
	}
}

func TestDecoderEOF(t *testing.T) {
	fs := []testFrame{
		{Header{Version: Version, Cmd: CmdLogin, Seq: 1, BodyLen: 10}, []byte("0123456789")},
		{Header{Version: Version, Cmd: CmdKeepalive, Seq: 2}, nil},
		{Header{Version: Version, Cmd: CmdC2S, Seq: 3, BodyLen: 3}, []byte("abc")},
	}
	stream := encodeFrames(fs)
	// Frame boundaries: a cut there is a clean EOF.
	bounds := map[int]int{0: 0}
	off := 0
	for i, f := range fs {
		off += HeaderLen + len(f.body)
		bounds[off] = i + 1
	}
	for cut := 0; cut <= len(stream); cut++ {
		for _, one := range []bool{false, true} {
			var r io.Reader = bytes.NewReader(stream[:cut])
			if one {
				r = iotest.OneByteReader(r)
			}
			d := NewDecoder(r, 0)
			var f Frame
			n := 0
			var err error
			for {
				if err = d.ReadFrame(&f); err != nil {
					break
				}
				n++
			}
			if full, ok := bounds[cut]; ok {
				if err != io.EOF || n != full {
					t.Fatalf("cut %d (one=%v): %d frames, err %v; want %d frames, io.EOF", cut, one, n, err, full)
				}
			} else if err != io.ErrUnexpectedEOF {
				t.Fatalf("cut %d (one=%v): err %v, want io.ErrUnexpectedEOF", cut, one, err)
			}
			if f.buf != nil || f.Body != nil {
				t.Fatalf("cut %d: body buffer kept after an error", cut)
			}
		}
	}
}

func TestDecoderReadErrors(t *testing.T) {
	boom := errors.New("boom")
	fs := []testFrame{{Header{Version: Version, Cmd: CmdC2S, BodyLen: 100}, bytes.Repeat([]byte{1}, 100)}}
	stream := encodeFrames(fs)
	for _, cut := range []int{0, 1, HeaderLen - 1, HeaderLen, HeaderLen + 1, HeaderLen + 99} {
		r := io.MultiReader(bytes.NewReader(stream[:cut]), iotest.ErrReader(boom))
		var f Frame
		if err := NewDecoder(r, 0).ReadFrame(&f); err != boom {
			t.Fatalf("cut %d: err = %v, want boom", cut, err)
		}
		if f.buf != nil || f.Body != nil {
			t.Fatalf("cut %d: body kept after a read error", cut)
		}
	}
	// A timeout in the middle of a stream surfaces as-is.
	r := iotest.TimeoutReader(iotest.OneByteReader(bytes.NewReader(stream)))
	var f Frame
	if err := NewDecoder(r, 0).ReadFrame(&f); err != iotest.ErrTimeout {
		t.Fatalf("timeout: err = %v", err)
	}
}

// strictReader serves data and fails the test if asked for anything past it.
type strictReader struct {
	t    *testing.T
	data []byte
}

func (r *strictReader) Read(p []byte) (int, error) {
	if len(r.data) == 0 {
		r.t.Errorf("decoder asked for %d more bytes past the header", len(p))
		return 0, errors.New("read past header")
	}
	n := copy(p, r.data)
	r.data = r.data[n:]
	return n, nil
}

func TestDecoderRejectsBeforeBody(t *testing.T) {
	tests := []struct {
		name    string
		maxBody uint32
		bodyLen uint32
		want    error
	}{
		{"default max+1", 0, DefaultMaxBody + 1, ErrBodyTooLarge},
		{"custom max+1", 100, 101, ErrBodyTooLarge},
		{"huge", 0, 0xFFFFFFFF, ErrBodyTooLarge},
		{"huge custom", 1 << 20, 0xFFFFFFFF, ErrBodyTooLarge},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := Header{Cmd: CmdC2CSend, Seq: 77, UID: 42, AppCode: 101, BodyLen: tt.bodyLen}
			var b [HeaderLen]byte
			h.Put(b[:])
			d := NewDecoder(&strictReader{t: t, data: b[:]}, tt.maxBody)
			var f Frame
			err := d.ReadFrame(&f)
			if err != tt.want {
				t.Fatalf("err = %v, want %v", err, tt.want)
			}
			if f.Seq != 77 || f.Cmd != CmdC2CSend || f.BodyLen != tt.bodyLen {
				t.Fatalf("header not available on error: %+v", f.Header)
			}
			if f.Body != nil || f.buf != nil {
				t.Fatal("a body buffer was taken for a rejected frame")
			}
		})
	}
	// Exactly the maximum is accepted and read.
	body := bytes.Repeat([]byte{9}, 100)
	h := Header{Cmd: CmdC2S}
	stream := AppendFrame(nil, &h, body)
	var f Frame
	if err := NewDecoder(&strictReader{t: t, data: stream}, 100).ReadFrame(&f); err != nil || !bytes.Equal(f.Body, body) {
		t.Fatalf("body of exactly max: %v", err)
	}
	f.Release()
}

func TestDecoderValidationErrors(t *testing.T) {
	for _, tt := range []struct {
		name string
		mod  func(b []byte)
		want error
	}{
		{"magic", func(b []byte) { b[0] = 'H' }, ErrBadMagic},
		{"version", func(b []byte) { b[2] = 2 }, ErrBadVersion},
		{"flags", func(b []byte) { b[3] = 0x20 }, ErrBadFlags},
		{"kind 3", func(b []byte) { b[3] = 3 }, ErrBadFlags},
	} {
		b := validHeaderBytes()
		tt.mod(b)
		var f Frame
		err := NewDecoder(&strictReader{t: t, data: b}, 0).ReadFrame(&f)
		if err != tt.want {
			t.Errorf("%s: err = %v, want %v", tt.name, err, tt.want)
		}
		if f.Seq != 9 || f.Cmd != CmdC2CSend {
			t.Errorf("%s: header fields lost: %+v", tt.name, f.Header)
		}
	}
}

func TestDecoderDefaultsAndReset(t *testing.T) {
	if d := NewDecoder(nil, 0); d.maxBody != DefaultMaxBody {
		t.Fatalf("maxBody = %d", d.maxBody)
	}
	h := Header{Cmd: CmdKeepalive}
	one := AppendFrame(nil, &h, []byte("x"))
	d := NewDecoder(bytes.NewReader(one), 0)
	var f Frame
	if err := d.ReadFrame(&f); err != nil {
		t.Fatal(err)
	}
	if err := d.ReadFrame(&f); err != io.EOF {
		t.Fatalf("err = %v", err)
	}
	d.Reset(bytes.NewReader(one))
	if err := d.ReadFrame(&f); err != nil || string(f.Body) != "x" {
		t.Fatalf("after Reset: %v %q", err, f.Body)
	}
	f.Release()
}

func TestFrameRelease(t *testing.T) {
	var zero Frame
	zero.Release()
	zero.Release()

	notPooled := Frame{Body: []byte("abc")}
	notPooled.Release()
	if notPooled.Body != nil {
		t.Fatal("Release kept Body")
	}
	notPooled.Release()

	h := Header{Cmd: CmdC2S}
	stream := AppendFrame(nil, &h, []byte("hello"))
	var f Frame
	if err := NewDecoder(bytes.NewReader(stream), 0).ReadFrame(&f); err != nil {
		t.Fatal(err)
	}
	if f.buf == nil {
		t.Fatal("decoded body is not pooled")
	}
	f.Release()
	if f.buf != nil || f.Body != nil {
		t.Fatal("Release left the buffer")
	}
	f.Release() // idempotent: must not put the buffer in the pool twice
	if f.Header.Cmd != CmdC2S {
		t.Fatal("Release cleared the header")
	}
	// ReadFrame releases the previous body itself.
	stream = AppendFrame(stream, &Header{Cmd: CmdKeepalive}, nil)
	d := NewDecoder(bytes.NewReader(stream), 0)
	if err := d.ReadFrame(&f); err != nil || f.buf == nil {
		t.Fatal(err)
	}
	if err := d.ReadFrame(&f); err != nil || f.buf != nil || f.Body != nil {
		t.Fatalf("second frame kept the first body: %v", err)
	}
}

func TestFrameReleaseTwiceNoShare(t *testing.T) {
	if raceEnabled {
		t.Skip("sync.Pool drops items at random under the race detector")
	}
	// A double Release would put one buffer into the pool twice, and two
	// later GetBuf calls would share it.
	p := GetBuf(300)
	f := Frame{Body: *p, buf: p}
	f.Release()
	f.Release()
	a, b := GetBuf(300), GetBuf(300)
	if a == b || &(*a)[:1][0] == &(*b)[:1][0] {
		t.Fatal("two GetBuf calls returned the same buffer")
	}
}

func TestGetPutBuf(t *testing.T) {
	tests := []struct {
		n, cap int
		pooled bool
	}{
		{0, 256, true},
		{1, 256, true},
		{255, 256, true},
		{256, 256, true},
		{257, 512, true},
		{4096, 4096, true},
		{4097, 8192, true},
		{1 << 19, 1 << 19, true},
		{1<<19 + 1, 1 << 20, true},
		{1 << 20, 1 << 20, true},
		{1<<20 + 1, 1<<20 + 1, false},
		{3 << 20, 3 << 20, false},
	}
	for _, tt := range tests {
		p := GetBuf(tt.n)
		if len(*p) != tt.n || cap(*p) != tt.cap {
			t.Errorf("GetBuf(%d): len %d cap %d, want len %d cap %d", tt.n, len(*p), cap(*p), tt.n, tt.cap)
		}
		// The whole slice is writable.
		for i := range *p {
			(*p)[i] = 0xAA
		}
		PutBuf(p)
		if tt.pooled && len(*p) != 0 {
			t.Errorf("PutBuf(%d) left len %d", tt.n, len(*p))
		}
		if !tt.pooled && len(*p) != tt.n {
			t.Errorf("PutBuf(%d) touched a dropped buffer", tt.n)
		}
		// After a Put, a Get of the same size still has the right shape.
		q := GetBuf(tt.n)
		if len(*q) != tt.n || cap(*q) != tt.cap {
			t.Errorf("GetBuf(%d) after Put: len %d cap %d", tt.n, len(*q), cap(*q))
		}
		PutBuf(q)
	}
	// Buffers that are not a pool class are dropped, never handed out with
	// a short capacity.
	for _, c := range []int{0, 1, 255, 300, 1000, 1<<20 + 1, 2 << 20} {
		b := make([]byte, 0, c)
		PutBuf(&b)
	}
	for _, n := range []int{0, 1, 256, 257, 1000, 1 << 20} {
		p := GetBuf(n)
		if len(*p) != n || cap(*p) < n || cap(*p)&(cap(*p)-1) != 0 {
			t.Errorf("GetBuf(%d) after odd Puts: len %d cap %d", n, len(*p), cap(*p))
		}
		PutBuf(p)
	}
}

func TestGetBufReuse(t *testing.T) {
	if raceEnabled {
		t.Skip("sync.Pool drops items at random under the race detector")
	}
	for _, n := range []int{0, 1, 256, 257, 1 << 20} {
		p := GetBuf(n)
		PutBuf(p)
		q := GetBuf(n)
		if p != q {
			t.Errorf("GetBuf(%d) after PutBuf did not reuse the buffer", n)
		}
		PutBuf(q)
	}
	p := GetBuf(1<<20 + 1)
	PutBuf(p)
	if q := GetBuf(1<<20 + 1); p == q {
		t.Error("an oversized buffer was pooled")
	}
}

func TestClassOf(t *testing.T) {
	for _, tt := range []struct{ n, c int }{
		{0, 0}, {1, 0}, {256, 0}, {257, 1}, {512, 1}, {513, 2}, {1 << 20, 12}, {1<<20 + 1, 13},
	} {
		if c := classOf(tt.n); c != tt.c {
			t.Errorf("classOf(%d) = %d, want %d", tt.n, c, tt.c)
		}
	}
	if len(bufPools) != 13 {
		t.Errorf("%d pool classes, want 13 (256 B .. 1 MiB)", len(bufPools))
	}
}
