package schema

import (
	"errors"
	"fmt"

	"github.com/klauspost/compress/s2"
)

// CompressionS2 names the only body compression scheme of protocol version
// 1: one S2 block (github.com/klauspost/compress/s2, Encode/Decode), which
// starts with the uvarint length of the decompressed body. A client offers
// it in LoginRequest.accept_compression; the server's choice comes back in
// LoginResponse.compression.
const CompressionS2 = "s2"

// ErrBadCompressed: a body with FlagCompressed set is not a valid S2 block.
var ErrBadCompressed = errors.New("schema: corrupt compressed body")

// CompressBound is the buffer size Compress needs for a body of n bytes.
func CompressBound(n int) int { return s2.MaxEncodedLen(n) }

// Compress writes body as an S2 block into dst, which must hold at least
// CompressBound(len(body)) bytes, and returns the block's length. It
// returns 0 when the block would not be smaller than body: send the body
// as it is then. It does not allocate.
func Compress(dst, body []byte) int {
	if len(dst) < CompressBound(len(body)) {
		return 0
	}
	n := len(s2.Encode(dst, body))
	if n >= len(body) {
		return 0
	}
	return n
}

// DecompressedLen returns the length a compressed body decodes to, read
// from the block's length prefix alone: nothing is inflated, so a small
// block that claims more than maxBody (0 means DefaultMaxBody) is refused
// with ErrBodyTooLarge before any memory is taken for it.
func DecompressedLen(block []byte, maxBody uint32) (int, error) {
	if maxBody == 0 {
		maxBody = DefaultMaxBody
	}
	n, err := s2.DecodedLen(block)
	if err != nil {
		return 0, ErrBadCompressed
	}
	if n > int(maxBody) {
		return n, fmt.Errorf("%w: decompressed body of %d bytes", ErrBodyTooLarge, n)
	}
	return n, nil
}

// Decompress decodes block into dst, whose length must be the block's
// DecompressedLen. It does not allocate.
func Decompress(dst, block []byte) error {
	out, err := s2.Decode(dst, block)
	if err != nil || len(out) != len(dst) || (len(out) > 0 && &out[0] != &dst[0]) {
		return ErrBadCompressed
	}
	return nil
}
