package schema

import (
	"errors"
	"io"
	"sync"
)

// Frame is one decoded frame. Body aliases a pooled buffer when it came from
// a Decoder: call Release when done with it.
type Frame struct {
	Header
	Body []byte

	buf *[]byte // pooled backing store of Body, nil when not pooled
}

// Release returns the body buffer to the pool. The frame must not be used
// afterwards. It is safe to call on a frame that was not pooled.
func (f *Frame) Release() {
	if f.buf != nil {
		PutBuf(f.buf)
		f.buf = nil
	}
	f.Body = nil
}

// Decoder reads frames from a byte stream. It holds only the 40-byte header
// between frames; body buffers come from a shared pool and are taken only
// while a frame is in flight, so an idle connection costs almost nothing.
// A Decoder is not safe for concurrent use.
type Decoder struct {
	r       io.Reader
	maxBody uint32
	hdr     [HeaderLen]byte
}

// NewDecoder returns a decoder reading from r. maxBody bounds the body
// length (0 means DefaultMaxBody); a larger frame yields ErrBodyTooLarge
// before any body byte is read or any memory is taken for it.
func NewDecoder(r io.Reader, maxBody uint32) *Decoder {
	if maxBody == 0 {
		maxBody = DefaultMaxBody
	}
	return &Decoder{r: r, maxBody: maxBody}
}

// Reset points the decoder at a new reader.
func (d *Decoder) Reset(r io.Reader) { d.r = r }

// ReadFrame reads the next frame into f. On a validation error the header
// fields that could be read are in f.Header. A stream that ends cleanly
// between frames returns io.EOF; one that ends inside a frame returns
// io.ErrUnexpectedEOF.
func (d *Decoder) ReadFrame(f *Frame) error {
	f.Release()
	if _, err := io.ReadFull(d.r, d.hdr[:]); err != nil {
		return err
	}
	h, err := ParseHeader(d.hdr[:], d.maxBody)
	f.Header = h
	if err != nil {
		return err
	}
	if h.BodyLen == 0 {
		return nil
	}
	f.buf = GetBuf(int(h.BodyLen))
	f.Body = *f.buf
	if _, err := io.ReadFull(d.r, f.Body); err != nil {
		f.Release()
		if errors.Is(err, io.EOF) {
			return io.ErrUnexpectedEOF
		}
		return err
	}
	return nil
}

// Buffer pool in power-of-two size classes from 256 B to 1 MiB. Larger
// buffers are allocated and dropped.
const (
	minClassShift = 8
	maxClassShift = 20
)

var bufPools [maxClassShift - minClassShift + 1]sync.Pool

func classOf(n int) int {
	c := 0
	for size := 1 << minClassShift; size < n; size <<= 1 {
		c++
	}
	return c
}

// GetBuf returns a pooled buffer whose slice has length n. Callers hand the
// same pointer back to PutBuf, so a round trip allocates nothing.
func GetBuf(n int) *[]byte {
	c := classOf(n)
	if c >= len(bufPools) {
		b := make([]byte, n)
		return &b
	}
	if p, ok := bufPools[c].Get().(*[]byte); ok {
		*p = (*p)[:n]
		return p
	}
	b := make([]byte, n, 1<<(minClassShift+c))
	return &b
}

// PutBuf returns a buffer taken with GetBuf. Buffers whose capacity is not a
// pool class are dropped.
func PutBuf(p *[]byte) {
	c := cap(*p)
	if c < 1<<minClassShift || c > 1<<maxClassShift || c&(c-1) != 0 {
		return
	}
	*p = (*p)[:0]
	bufPools[classOf(c)].Put(p)
}
