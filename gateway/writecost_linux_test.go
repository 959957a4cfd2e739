//go:build linux

package gateway

import (
	"io"
	"net"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// BenchmarkWriteCost splits what one delivery's write costs the kernel:
// a system call that does nothing (the entry and exit that batched
// submission, io_uring's, would save) against a 130-byte frame written to
// a loopback TCP socket (the TCP and loopback work it would not). docs/
// capacity.md uses the ratio to decide whether batched submission pays.
//
//	go test -run xxx -bench WriteCost -count 3 ./gateway/
func BenchmarkWriteCost(b *testing.B) {
	b.Run("syscall", func(b *testing.B) {
		for b.Loop() {
			_ = unix.Getppid()
		}
	})
	b.Run("write-130B-loopback", func(b *testing.B) {
		fd, peer := loopbackFD(b)
		frame := make([]byte, 130)
		drain := make([]byte, 130*1024)
		n := 0
		for b.Loop() {
			if _, err := unix.Write(fd, frame); err != nil {
				b.Fatal(err)
			}
			if n++; n%1024 == 0 { // keep the socket from filling, off the clock
				b.StopTimer()
				if _, err := io.ReadFull(peer, drain); err != nil {
					b.Fatal(err)
				}
				b.StartTimer()
			}
		}
	})
	// A frame to a connection whose reader sleeps until it comes, as a
	// dispatch's recipients do (a frame every 60-80 ms each): the write
	// also wakes the reader. write-ns is the write system call alone; the
	// rest of ns/op is waiting for the reader to take the frame.
	b.Run("write-130B-loopback-wakes-reader", func(b *testing.B) {
		fd, peer := loopbackFD(b)
		frame := make([]byte, 130)
		got := make(chan struct{})
		go func() {
			buf := make([]byte, 130)
			for {
				if _, err := io.ReadFull(peer, buf); err != nil {
					return
				}
				got <- struct{}{}
			}
		}()
		var spent time.Duration
		for b.Loop() {
			t0 := time.Now()
			if _, err := unix.Write(fd, frame); err != nil {
				b.Fatal(err)
			}
			spent += time.Since(t0)
			<-got
		}
		b.ReportMetric(float64(spent.Nanoseconds())/float64(b.N), "write-ns")
	})
}

// loopbackFD returns the blocking descriptor of one end of a loopback TCP
// connection and the other end.
func loopbackFD(b *testing.B) (int, net.Conn) {
	b.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	acc := make(chan net.Conn, 1)
	go func() {
		c, _ := ln.Accept()
		acc <- c
	}()
	peer, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		b.Fatal(err)
	}
	c := <-acc
	if c == nil {
		b.Fatal("accept failed")
	}
	f, err := c.(*net.TCPConn).File() // a blocking duplicate
	_ = c.Close()
	if err != nil {
		b.Fatal(err)
	}
	_ = unix.SetsockoptInt(int(f.Fd()), unix.IPPROTO_TCP, unix.TCP_NODELAY, 1)
	b.Cleanup(func() { _ = f.Close(); _ = peer.Close() })
	return int(f.Fd()), peer
}
