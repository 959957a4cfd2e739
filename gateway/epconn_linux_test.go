package gateway

import (
	"testing"
	"unsafe"
)

// TestEpConnSize pins the size of an idle connection's struct: it is most
// of what the epoll engine spends per connection, and one field too many
// moves it to the next size class (256 or 288 bytes).
func TestEpConnSize(t *testing.T) {
	if n := unsafe.Sizeof(epConn{}); n > 240 {
		t.Fatalf("epConn is %d bytes, over the 240-byte size class", n)
	}
}
