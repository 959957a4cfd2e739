package gateway

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"syscall"
	"testing"
	"time"

	"github.com/imd-dev/imd/logic"
	"github.com/imd-dev/imd/router"
	"github.com/imd-dev/imd/schema"
	"github.com/imd-dev/imd/schema/pb"
	"github.com/klauspost/compress/s2"
	"google.golang.org/protobuf/proto"
)

const fuzzSecret = "fuzz-secret-0123456789abcdef"

func fuzzFrame(h schema.Header, m proto.Message) []byte {
	var body []byte
	if m != nil {
		body, _ = proto.Marshal(m)
	}
	return schema.AppendFrame(nil, &h, body)
}

// fuzzSeeds are byte streams a client might send: a clean session, and
// sessions with bad frames at different points.
func fuzzSeeds() [][]byte {
	login := fuzzFrame(schema.Header{Cmd: schema.CmdLogin, AppCode: 101, UID: 5, Seq: 1},
		&pb.LoginRequest{Token: logic.MintToken(fuzzSecret, 101, 5, time.Now().Add(24*365*time.Hour)), DeviceId: "d"})
	ka := fuzzFrame(schema.Header{Cmd: schema.CmdKeepalive, Seq: 2}, &pb.KeepaliveRequest{ClientTimeMs: 1})
	logout := fuzzFrame(schema.Header{Cmd: schema.CmdLogout, Seq: 3}, &pb.LogoutRequest{})
	unknown := fuzzFrame(schema.Header{Cmd: 0x7777, Seq: 4}, nil)
	c2c := fuzzFrame(schema.Header{Cmd: schema.CmdC2CSend, Seq: 5}, &pb.C2CSendRequest{})
	loginS2 := fuzzFrame(schema.Header{Cmd: schema.CmdLogin, AppCode: 101, UID: 5, Seq: 1},
		&pb.LoginRequest{Token: logic.MintToken(fuzzSecret, 101, 5, time.Now().Add(24*365*time.Hour)), DeviceId: "d",
			AcceptCompression: []string{schema.CompressionS2}})
	kaS2 := append([]byte(nil), ka...) // compressed keepalive: flag bit 2, s2 block body
	kaS2[3] |= schema.FlagCompressed
	kaS2 = append(kaS2[:schema.HeaderLen], s2.Encode(nil, ka[schema.HeaderLen:])...)
	binary.BigEndian.PutUint32(kaS2[36:], uint32(len(kaS2)-schema.HeaderLen))
	cat := func(parts ...[]byte) []byte { return bytes.Join(parts, nil) }
	return [][]byte{
		cat(loginS2, kaS2, ka, logout),
		cat(login, kaS2),
		cat(login, ka, logout),
		cat(login, ka, ka, unknown, c2c, ka),
		cat(login, login),
		cat(ka, login),
		login[:len(login)-3],
		cat(login, ka[:20]),
		cat(login, []byte("GET / HTTP/1.1\r\n\r\n")),
		{},
	}
}

// FuzzConnInput feeds arbitrary bytes to a live gateway connection of each
// engine (backed by the real logic service and in-memory router) and checks
// the gateway answers only with well-formed frames, never panics, and lets
// go of the connection once the peer leaves. The epoll engine gets the
// bytes through a real socket, so its reads split where the kernel splits
// them.
func FuzzConnInput(f *testing.F) {
	for _, s := range fuzzSeeds() {
		f.Add(s)
	}
	svc, err := logic.New(logic.Options{
		Apps:   []logic.App{{AppCode: 101, Account: 1, Secrets: []string{fuzzSecret}}},
		Router: router.NewMemory(),
	})
	if err != nil {
		f.Fatal(err)
	}
	var servers []*Server
	for _, engine := range testEngines {
		s, err := New(Options{Addr: "127.0.0.1:0", Engine: engine, LoginTimeout: time.Second, IdleTimeout: 2 * time.Second, WriteTimeout: time.Second}, svc)
		if err != nil {
			f.Fatal(err)
		}
		svc.AttachGate(s.ID(), s)
		servers = append(servers, s)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		for _, s := range servers {
			fuzzOne(t, s, data)
		}
	})
}

func fuzzOne(t *testing.T, s *Server, data []byte) {
	client := engineConn(t, s)
	read := make(chan error, 1)
	go func() { read <- readAnswers(client) }()
	_ = client.SetWriteDeadline(time.Now().Add(2 * time.Second))
	_, _ = client.Write(data)
	// A socket is half-closed, so every answer can still be read; a pipe
	// has no half-close.
	if hc, ok := client.(interface{ CloseWrite() error }); ok {
		_ = hc.CloseWrite()
		_ = client.SetReadDeadline(time.Now().Add(5 * time.Second))
	} else {
		_ = client.Close()
	}
	if err := <-read; err != nil {
		t.Fatalf("%s: %v", s.opts.Engine, err)
	}
	_ = client.Close()
	deadline := time.Now().Add(3 * time.Second)
	for s.Conns() != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("%s: gateway still holds %d connections after the peer left", s.opts.Engine, s.Conns())
		}
		time.Sleep(time.Millisecond)
	}
}

// readAnswers reads a fuzzed connection's answers to the end and reports
// the first that breaks the protocol: a frame that is neither a response
// nor a notify, or an error response without a matching Error body. The
// stream may end inside a frame (a close by either side cuts one in
// flight short) or with a reset when the gateway closes on unread data:
// neither is a bad frame.
func readAnswers(r io.Reader) error {
	dec := schema.NewDecoder(r, 1<<20)
	for {
		var fr schema.Frame
		if err := dec.ReadFrame(&fr); err != nil {
			if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, io.ErrClosedPipe) || errors.Is(err, syscall.ECONNRESET) {
				return nil
			}
			return err
		}
		if k := fr.Kind(); k != schema.KindResponse && k != schema.KindNotify {
			return errors.New("gateway sent a frame of kind " + k.String())
		}
		if fr.Status != schema.StatusOK {
			var e pb.Error
			if err := proto.Unmarshal(fr.Body, &e); err != nil || e.Code != uint32(fr.Status) {
				return errors.New("error response without a matching Error body")
			}
		}
		fr.Release()
	}
}
