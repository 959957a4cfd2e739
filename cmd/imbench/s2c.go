package main

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/imd-dev/imd/internal/config"
	"github.com/imd-dev/imd/schema/pb"
	"github.com/imd-dev/imd/sdk"
)

const s2cSynopsis = `App-server pushes fanned out to online clients at a fixed offered rate:
--clients SDK clients log in with an OnS2C callback, then --pushers HTTP
clients POST /v1/push (Authorization: Bearer <api key>), each push to
--fanout of the clients (0: all of them; successive pushes rotate over the
clients when fewer), at --rate pushes/s over all pushers (open loop: push
g is due at start + g/rate, and each pusher has --inflight requests
outstanding at most). Every push carries its scheduled and real send
times (monotonic ns) in its content; latency runs from the scheduled time
to each recipient's OnS2C. The table gives deliveries/s (notifies that
reached a callback), failed pushes and latency percentiles. The run fails
(exit 1) when a push fails or a delivery is missing after --drain.`

type s2cSetup struct {
	Clients  int    `json:"clients"`
	Pushers  int    `json:"pushers"`
	Fanout   int    `json:"fanout"`
	Inflight int    `json:"inflight_per_pusher"`
	Size     int    `json:"content_bytes"`
	MsgType  uint32 `json:"msgtype"`
	UIDs     string `json:"uids"`
}

func runS2C(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	var f loadFlags
	var clients, pushers, fanout int
	var msgtype uint
	fs := newFlagSet("s2c", s2cSynopsis, stdout, stderr)
	f.bind(fs, "pushes", 20, 100)
	fs.IntVar(&clients, "clients", 500, "online recipient clients")
	fs.IntVar(&pushers, "pushers", 4, "concurrent HTTP pushers (app-server connections)")
	fs.IntVar(&fanout, "fanout", 0, "recipients per push (0: every client)")
	fs.IntVar(&f.inflight, "inflight", 1, "requests outstanding per pusher")
	fs.UintVar(&msgtype, "msgtype", 2, "msgtype of the pushes")
	if err := parseFlags(fs, args, os.LookupEnv); err != nil {
		return err
	}
	errs := f.validate(msgHeader)
	if fanout == 0 {
		fanout = clients
	}
	if clients < 1 || pushers < 1 || f.inflight < 1 {
		errs = append(errs, errors.New("--clients, --pushers and --inflight must be >= 1"))
	}
	if fanout < 1 || fanout > clients {
		errs = append(errs, errors.New("--fanout must be in [0, clients]"))
	}
	if err := errors.Join(errs...); err != nil {
		fmt.Fprintf(stderr, "imbench s2c: %v\n", err)
		return errUsage
	}
	s := &s2c{f: &f, n: clients, k: fanout, msgtype: uint32(msgtype)}
	s.http = &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: pushers * f.inflight, MaxConnsPerHost: pushers * f.inflight,
		IdleConnTimeout: time.Minute}}
	sc := &loadScenario{
		name: "s2c", opUnit: "pushes", deliveryUnit: "deliveries", senders: pushers, inflight: f.inflight, perOp: int64(fanout),
		setup: s2cSetup{Clients: clients, Pushers: pushers, Fanout: fanout, Inflight: f.inflight, Size: f.size,
			MsgType: uint32(msgtype), UIDs: fmt.Sprintf("%d..%d", f.uidBase, f.uidBase+uint64(clients)-1)},
		tweak: func(c *config.Config) error {
			c.S2C.MaxRecipients = max(1000, fanout)
			c.S2C.MaxBody = max(1<<20, fanout*48+2*f.size+1024)
			return nil
		},
		prepare: s.prepare,
		begin:   func(rs *runState) { s.cur.Store(rs) },
		op:      s.op,
		close:   func() { closeClients(s.clients); s.http.CloseIdleConnections() },
	}
	return runLoad(ctx, sc, &f, append([]string{"imbench", "s2c"}, args...), stdout, stderr)
}

type s2c struct {
	f       *loadFlags
	n, k    int // clients, recipients per push
	msgtype uint32

	clients []*sdk.Client
	http    *http.Client
	url     string
	key     string
	appcode uint32
	cur     atomic.Pointer[runState]
}

func (s *s2c) prepare(ctx context.Context, t *target, stderr io.Writer) error {
	if t.apiKey == "" {
		return errors.New("s2c needs the server's API key: --api-key with --addr")
	}
	s.url, s.key, s.appcode = "http://"+t.HTTP+"/v1/push", t.apiKey, t.AppCode
	var err error
	s.clients, err = loginClients(ctx, t, uidRange(s.f.uidBase, s.n), s.f.loginConc, func(i int) sdk.Options {
		return sdk.Options{NoReconnect: true, OnS2C: func(m *pb.S2CNotify) { s.received(i, m) }}
	}, stderr, "recipients")
	return err
}

// first is the index of the first client push g goes to.
func (s *s2c) first(g int64) int64 { return g * int64(s.k) % int64(s.n) }

// received is client i's OnS2C: push g reached its recipient number
// (i - first(g)) mod n.
func (s *s2c) received(i int, m *pb.S2CNotify) {
	rs := s.cur.Load()
	run, g, at, sent, ok := getHeader(m.Content)
	if !ok || rs == nil || run != rs.id {
		return
	}
	j := (int64(i) - s.first(g) + int64(s.n)) % int64(s.n)
	if j >= int64(s.k) {
		rs.stray.Add(1)
		return
	}
	rs.deliver(i, g*int64(s.k)+j, at, sent)
}

func (s *s2c) op(ctx context.Context, rs *runState, _ int, g int64, at int64) error {
	content := newContent(s.f.size)
	putHeader(content, rs.id, g, at, mono())
	b := make([]byte, 0, s.k*32+base64.StdEncoding.EncodedLen(len(content))+64)
	b = append(b, `{"to":[`...)
	first := s.first(g)
	for j := range int64(s.k) {
		if j > 0 {
			b = append(b, ',')
		}
		b = append(b, `{"appcode":`...)
		b = strconv.AppendUint(b, uint64(s.appcode), 10)
		b = append(b, `,"uid":`...)
		b = strconv.AppendUint(b, s.f.uidBase+uint64((first+j)%int64(s.n)), 10)
		b = append(b, '}')
	}
	b = append(b, `],"msgtype":`...)
	b = strconv.AppendUint(b, uint64(s.msgtype), 10)
	b = append(b, `,"content":"`...)
	b = base64.StdEncoding.AppendEncode(b, content)
	b = append(b, `"}`...)

	req, err := http.NewRequestWithContext(ctx, http.MethodPost, s.url, bytes.NewReader(b))
	if err != nil {
		return err
	}
	req.Header.Set("Authorization", "Bearer "+s.key)
	req.Header.Set("Content-Type", "application/json")
	resp, err := s.http.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if err != nil {
		return err
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("push: HTTP %s: %s", resp.Status, bytes.TrimSpace(body[:min(len(body), 200)]))
	}
	var res struct {
		Online int `json:"online"`
	}
	if err := json.Unmarshal(body, &res); err != nil {
		return fmt.Errorf("push response: %w", err)
	}
	// Every recipient was logged in: one that was not online counts as
	// missing.
	rs.expected.Add(int64(s.k))
	if res.Online < s.k {
		rs.note(fmt.Sprintf("push found %d of %d recipients offline", s.k-res.Online, s.k))
	}
	return nil
}
