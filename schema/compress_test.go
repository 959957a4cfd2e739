package schema

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"testing"
)

func TestCompressRoundTrip(t *testing.T) {
	body := bytes.Repeat([]byte("hello compressed world "), 100)
	dst := make([]byte, CompressBound(len(body)))
	n := Compress(dst, body)
	if n == 0 || n >= len(body) {
		t.Fatalf("Compress: %d bytes for %d", n, len(body))
	}
	dl, err := DecompressedLen(dst[:n], 0)
	if err != nil || dl != len(body) {
		t.Fatalf("DecompressedLen = %d, %v", dl, err)
	}
	out := make([]byte, dl)
	if err := Decompress(out, dst[:n]); err != nil || !bytes.Equal(out, body) {
		t.Fatalf("Decompress: %v", err)
	}
	// Incompressible or too small for dst: 0, send it plain.
	if n := Compress(dst[:10], body); n != 0 {
		t.Fatalf("Compress into a short dst = %d", n)
	}
	if n := Compress(dst, []byte{1, 2, 3}); n != 0 {
		t.Fatalf("Compress of 3 bytes = %d", n)
	}
}

// TestDecompressedLenBomb: the decoded length comes from the block's prefix
// alone, so a block that is nothing but a huge prefix is refused as too
// large (1003), not read as corrupt.
func TestDecompressedLenBomb(t *testing.T) {
	block := binary.AppendUvarint(nil, 1<<30)
	_, err := DecompressedLen(block, 64<<10)
	if !errors.Is(err, ErrBodyTooLarge) || StatusOf(err) != StatusBodyTooLarge {
		t.Fatalf("err %v, want ErrBodyTooLarge", err)
	}
	if _, err := DecompressedLen(binary.AppendUvarint(nil, 64<<10+1), 0); !errors.Is(err, ErrBodyTooLarge) {
		t.Fatalf("DefaultMaxBody+1: %v", err)
	}
	if _, err := DecompressedLen(nil, 0); !errors.Is(err, ErrBadCompressed) {
		t.Fatalf("empty block: %v", err)
	}
	corrupt := append(binary.AppendUvarint(nil, 100), 0xff, 0xff, 0xff)
	if err := Decompress(make([]byte, 100), corrupt); !errors.Is(err, ErrBadCompressed) {
		t.Fatalf("corrupt block: %v", err)
	}
}

func TestCompressZeroAllocs(t *testing.T) {
	if raceEnabled {
		t.Skip("allocation counts differ under the race detector")
	}
	body := bytes.Repeat([]byte("abcdefgh"), 256)
	dst := make([]byte, CompressBound(len(body)))
	out := make([]byte, len(body))
	allocs := testing.AllocsPerRun(1000, func() {
		n := Compress(dst, body)
		if _, err := DecompressedLen(dst[:n], 0); err != nil {
			t.Fatal(err)
		}
		if err := Decompress(out, dst[:n]); err != nil {
			t.Fatal(err)
		}
	})
	if allocs != 0 {
		t.Fatalf("compress and decompress: %v allocs, want 0", allocs)
	}
}

// BenchmarkCompress1K: the per-connection cost compression adds to a 1 KiB
// order-like body on the gateway (Compress) and the client (Decompress).
//
//	go test -run '^$' -bench Compress1K ./schema/
func BenchmarkCompress1K(b *testing.B) {
	var body []byte
	for i := 0; len(body) < 1024; i++ {
		body = fmt.Appendf(body, `{"order":%d,"pickup":"%d Baker Street","lat":51.%04d,"fare":%d.%02d},`, 100000+i*7, 1+i%300, (i*37)%10000, 5+i%40, i%100)
	}
	body = body[:1024]
	dst := make([]byte, CompressBound(len(body)))
	n := Compress(dst, body)
	b.Run("compress", func(b *testing.B) {
		b.SetBytes(int64(len(body)))
		b.ReportAllocs()
		for b.Loop() {
			Compress(dst, body)
		}
		b.ReportMetric(float64(n), "out-B")
	})
	b.Run("decompress", func(b *testing.B) {
		out := make([]byte, len(body))
		b.SetBytes(int64(len(body)))
		b.ReportAllocs()
		for b.Loop() {
			if err := Decompress(out, dst[:n]); err != nil {
				b.Fatal(err)
			}
		}
	})
}
