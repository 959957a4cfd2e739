package schema

import (
	"fmt"
	"testing"
)

// loopReader serves data over and over without allocating.
type loopReader struct {
	data []byte
	off  int
}

func (r *loopReader) Read(p []byte) (int, error) {
	if r.off == len(r.data) {
		r.off = 0
	}
	n := copy(p, r.data[r.off:])
	r.off += n
	return n, nil
}

// frameStream returns count back-to-back frames whose bodies are size bytes.
func frameStream(count, size int) []byte {
	body := make([]byte, size)
	for i := range body {
		body[i] = byte(i)
	}
	var b []byte
	for i := range count {
		h := Header{Flags: uint8(KindRequest), Cmd: CmdC2CSend, AppCode: 101, UID: 42, Seq: uint32(i), LogID: uint64(i)}
		b = AppendFrame(b, &h, body)
	}
	return b
}

var benchHeader = Header{
	Flags: uint8(KindResponse), Cmd: CmdC2CSend, Status: StatusOK, AppCode: 101, MsgType: 7,
	UID: 42, Seq: 123456, LogID: 0xDEADBEEF, BodyLen: 100,
}

var sinkHeader Header

func BenchmarkHeaderPut(b *testing.B) {
	b.ReportAllocs()
	b.SetBytes(HeaderLen)
	var buf [HeaderLen]byte
	h := benchHeader
	for i := 0; b.Loop(); i++ {
		h.Seq = uint32(i)
		h.Put(buf[:])
	}
	sinkHeader.Flags = buf[3]
}

func BenchmarkParseHeader(b *testing.B) {
	b.ReportAllocs()
	b.SetBytes(HeaderLen)
	var buf [HeaderLen]byte
	benchHeader.Put(buf[:])
	for b.Loop() {
		h, err := ParseHeader(buf[:], 0)
		if err != nil {
			b.Fatal(err)
		}
		sinkHeader = h
	}
}

func BenchmarkAppendFrame(b *testing.B) {
	for _, size := range []int{0, 100, 4096} {
		b.Run(fmt.Sprintf("body=%d", size), func(b *testing.B) {
			b.ReportAllocs()
			b.SetBytes(int64(HeaderLen + size))
			body := make([]byte, size)
			buf := make([]byte, 0, HeaderLen+size)
			h := benchHeader
			for b.Loop() {
				buf = AppendFrame(buf[:0], &h, body)
			}
		})
	}
}

func BenchmarkDecoderReadFrame(b *testing.B) {
	for _, size := range []int{0, 100, 4096} {
		b.Run(fmt.Sprintf("body=%d", size), func(b *testing.B) {
			b.ReportAllocs()
			b.SetBytes(int64(HeaderLen + size))
			d := NewDecoder(&loopReader{data: frameStream(64, size)}, 0)
			var f Frame
			for b.Loop() {
				if err := d.ReadFrame(&f); err != nil {
					b.Fatal(err)
				}
				f.Release()
			}
		})
	}
}

func TestHeaderZeroAllocs(t *testing.T) {
	var buf [HeaderLen]byte
	h := benchHeader
	allocs := testing.AllocsPerRun(1000, func() {
		h.Seq++
		h.Put(buf[:])
		got, err := ParseHeader(buf[:], 0)
		if err != nil || got.Seq != h.Seq {
			t.Fatal("round trip failed", err)
		}
		sinkHeader = got
	})
	if allocs != 0 {
		t.Fatalf("Put+ParseHeader: %v allocs/op, want 0", allocs)
	}
	dst := make([]byte, 0, 1024)
	body := make([]byte, 100)
	allocs = testing.AllocsPerRun(1000, func() {
		dst = AppendFrame(dst[:0], &h, body)
	})
	if allocs != 0 {
		t.Fatalf("AppendFrame into a reused buffer: %v allocs/op, want 0", allocs)
	}
}

func TestReadFrameZeroAllocs(t *testing.T) {
	if raceEnabled {
		t.Skip("sync.Pool drops items at random under the race detector")
	}
	for _, size := range []int{0, 1, 100, 256, 257, 4096, DefaultMaxBody} {
		d := NewDecoder(&loopReader{data: frameStream(8, size)}, 0)
		var f Frame
		cycle := func() {
			if err := d.ReadFrame(&f); err != nil {
				t.Fatal(err)
			}
			f.Release()
		}
		cycle() // warm the pool
		if allocs := testing.AllocsPerRun(1000, cycle); allocs != 0 {
			t.Errorf("ReadFrame+Release, body %d: %v allocs/op, want 0", size, allocs)
		}
	}
}
