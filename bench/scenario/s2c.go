package scenario

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"slices"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/imd-dev/imd/schema/pb"
	"github.com/imd-dev/imd/sdk"
)

// S2CSynopsis describes the s2c scenario (the command's help).
const S2CSynopsis = `App-server pushes fanned out to online clients at a fixed offered rate:
--clients clients log in, then --pushers HTTP clients POST /v1/push
(Authorization: Bearer <api key>) at --rate pushes/s over all pushers (open
loop: push g is due at start + g/rate, and each pusher has --inflight
requests outstanding at most). The shape of a push:
  --shape broadcast  every push to all --clients (the default when --fanout is 0),
                     named in POST /v1/push, or with --endpoint broadcast one
                     POST /v1/broadcast to every online terminal of the appcode
  --shape dispatch   every push to --fanout random clients (default 50), like an
                     order offered to the drivers around it
  --shape rotate     every push to --fanout consecutive clients, the next push
                     to the next ones (the default when --fanout is set)
The clients are lean by default (--client raw): a few goroutines read every
connection, decode only what counting needs and acknowledge all the pushes
of one read in one frame, so the clients cost less CPU than the server;
--client sdk uses the Go SDK (OnS2C). Every push carries its scheduled and
real send times (monotonic ns) in its content; latency runs from the
scheduled time to each recipient's read (svc: from the push call). The
table gives deliveries/s, failed pushes, latency percentiles and the
server's CPU per delivery and per push. The run fails (exit 1) when a push
fails or a delivery is missing after --drain.`

// Shapes of the s2c scenario.
const (
	ShapeBroadcast = "broadcast" // every push to every client
	ShapeDispatch  = "dispatch"  // every push to Fanout random clients
	ShapeRotate    = "rotate"    // every push to Fanout consecutive clients, rotating
)

// Endpoints the s2c scenario pushes through.
const (
	EndpointPush      = "push"      // POST /v1/push naming every recipient
	EndpointBroadcast = "broadcast" // POST /v1/broadcast: every online terminal of the appcode (ShapeBroadcast)
)

// DefaultDispatchFanout is the recipients of a dispatch push when Fanout
// is not set: an order offered to fifty drivers.
const DefaultDispatchFanout = 50

// S2C is the s2c scenario: HTTP pushes fanned out to online clients.
type S2C struct {
	Load    LoadOptions
	Clients int    // online recipient clients
	Pushers int    // concurrent HTTP pushers (app-server connections)
	Fanout  int    // recipients per push; 0: every client (broadcast), DefaultDispatchFanout (dispatch)
	Shape   string // ShapeBroadcast, ShapeDispatch or ShapeRotate; "" picks broadcast when Fanout is 0, else rotate
	Client  string // ClientRaw (the lean client) or ClientSDK
	// Endpoint is EndpointPush (the default) or, with ShapeBroadcast,
	// EndpointBroadcast: then every online terminal of the appcode gets
	// each push, so the server must hold no other session of it.
	Endpoint string
	MsgType  uint32
	// Loops is how many goroutines read the lean clients (0: the usable
	// CPUs, at most 4).
	Loops int
	// Seed draws the recipients of dispatch pushes.
	Seed uint64
	// NoAcks: the lean clients never acknowledge a push (what acks cost
	// the server is the difference).
	NoAcks bool
	// AckDelay is how long a lean client's push ids wait to be
	// acknowledged together (0: at each read); the SDK's PushAckDelay
	// default, 250 ms, unless set.
	AckDelay time.Duration
}

// NewS2C returns the scenario with the command line's defaults.
func NewS2C() *S2C {
	return &S2C{Load: DefaultLoadOptions(20, 100, 1), Clients: 500, Pushers: 4, Client: ClientRaw, MsgType: 2, Seed: 1, AckDelay: 250 * time.Millisecond}
}

type s2cSetup struct {
	Shape    string `json:"shape"`
	Endpoint string `json:"endpoint"`
	Client   string `json:"client"`
	Clients  int    `json:"clients"`
	Pushers  int    `json:"pushers"`
	Fanout   int    `json:"fanout"`
	Inflight int    `json:"inflight_per_pusher"`
	Size     int    `json:"content_bytes"`
	MsgType  uint32 `json:"msgtype"`
	UIDs     string `json:"uids"`
	Loops    int    `json:"lean_read_loops,omitempty"`
	NoAcks   bool   `json:"no_acks,omitempty"`
	AckDelay int64  `json:"lean_ack_delay_ms"`
}

func (s s2cSetup) chartName() string { return "s2c " + s.Shape }

// S2CExtra is the s2c scenario's part of the report.
type S2CExtra struct {
	// Lean counts what the lean clients read and wrote over the whole
	// scenario, the warm-up included.
	Lean *LeanStats `json:"lean_client,omitempty"`
}

// Validate checks the options, resolving Shape and Fanout.
func (s *S2C) Validate() error {
	errs := s.Load.validate(MsgHeader)
	if s.Shape == "" {
		s.Shape = ShapeRotate
		if s.Fanout == 0 || s.Fanout == s.Clients {
			s.Shape = ShapeBroadcast
		}
	}
	switch s.Shape {
	case ShapeBroadcast:
		if s.Fanout == 0 {
			s.Fanout = s.Clients
		}
		if s.Fanout != s.Clients {
			errs = append(errs, errors.New("--shape broadcast pushes to every client: --fanout must be 0"))
		}
	case ShapeDispatch:
		if s.Fanout == 0 {
			s.Fanout = min(DefaultDispatchFanout, s.Clients)
		}
	case ShapeRotate:
		if s.Fanout == 0 {
			s.Fanout = s.Clients
		}
	default:
		errs = append(errs, fmt.Errorf("--shape %q: want broadcast, dispatch or rotate", s.Shape))
	}
	if s.Client != ClientRaw && s.Client != ClientSDK {
		errs = append(errs, fmt.Errorf("--client %q: want raw or sdk", s.Client))
	}
	switch s.Endpoint {
	case "":
		s.Endpoint = EndpointPush
	case EndpointPush:
	case EndpointBroadcast:
		if s.Shape != ShapeBroadcast {
			errs = append(errs, errors.New("--endpoint broadcast goes with --shape broadcast"))
		}
	default:
		errs = append(errs, fmt.Errorf("--endpoint %q: want push or broadcast", s.Endpoint))
	}
	if s.Clients < 1 || s.Pushers < 1 || s.Load.Inflight < 1 {
		errs = append(errs, errors.New("--clients, --pushers and --inflight must be >= 1"))
	}
	if s.Fanout < 1 || s.Fanout > s.Clients {
		errs = append(errs, errors.New("--fanout must be in [0, clients]"))
	}
	if s.Loops < 0 || s.AckDelay < 0 {
		errs = append(errs, errors.New("--loops and --ack-delay must be >= 0"))
	}
	if s.NoAcks && s.Client != ClientRaw {
		errs = append(errs, errors.New("--no-acks goes with --client raw (the SDK always acknowledges)"))
	}
	return errors.Join(errs...)
}

// Run runs the scenario on the server l gives. A report comes back with an
// error when the scenario ran but a push failed or a delivery went missing.
func (s *S2C) Run(ctx context.Context, l Launcher, env Env) (*LoadReport, error) {
	if err := s.Validate(); err != nil {
		return nil, err
	}
	f := &s.Load
	r := &s2cRun{o: s, n: s.Clients, k: s.Fanout}
	conns := s.Pushers * f.Inflight
	r.http = &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: conns, MaxConnsPerHost: conns, IdleConnTimeout: time.Minute}}
	setup := s2cSetup{Shape: s.Shape, Endpoint: s.Endpoint, Client: s.Client, Clients: s.Clients, Pushers: s.Pushers, Fanout: s.Fanout,
		Inflight: f.Inflight, Size: f.Size, MsgType: s.MsgType, NoAcks: s.NoAcks, AckDelay: s.AckDelay.Milliseconds(), UIDs: fmt.Sprintf("%d..%d", f.UIDBase, f.UIDBase+uint64(s.Clients)-1)}
	sc := &loadScenario{
		name: "s2c", opUnit: "pushes", deliveryUnit: "deliveries", senders: s.Pushers, inflight: f.Inflight, perOp: int64(s.Fanout),
		needs:   ServerNeeds{MaxRecipients: max(1000, s.Fanout), MaxBody: max(1<<20, s.Fanout*48+2*f.Size+1024)},
		prepare: r.prepare,
		begin:   r.begin,
		op:      r.op,
		finish: func(context.Context, *LoadReport) (any, error) {
			if r.lean == nil {
				return nil, nil
			}
			r.lean.FlushAcks()
			st := r.lean.Stats()
			return &S2CExtra{Lean: &st}, nil
		},
		close: r.close,
	}
	rep, err := runLoad(ctx, sc, f, l, env)
	if rep != nil {
		if r.lean != nil {
			setup.Loops = r.lean.Stats().Loops
			if ex, ok := rep.Extra.(*S2CExtra); ok && ex.Lean != nil {
				rep.Notes = append(rep.Notes, leanNote(ex.Lean))
			}
		}
		rep.Setup = setup
	}
	return rep, err
}

// leanNote sums up what the lean clients did.
func leanNote(st *LeanStats) string {
	return fmt.Sprintf("lean clients: %d connections on %d read loops; %d reads brought %d frames (%.2f per read), %d ack frames for %d push ids, %d group acks, %d dropped, %d error responses%s",
		st.Conns, st.Loops, st.Reads, st.Frames, st.FramesPerRead(), st.AckFrames, st.AckedIDs, st.GroupAcks, st.Dropped, st.ErrorResps,
		map[bool]string{true: "; last error: " + st.LastError, false: ""}[st.LastError != ""])
}

type s2cRun struct {
	o    *S2C
	n, k int // clients, recipients per push

	clients []*sdk.Client
	lean    *LeanFleet
	http    *http.Client
	url     string
	key     string
	appcode uint32
	allTo   []byte // broadcast: the "to" list of every push
	cur     atomic.Pointer[s2cCur]
}

// s2cCur is the current run and, for dispatch, the sorted recipients of
// each of its pushes.
type s2cCur struct {
	rs    *runState
	lists [][]int32
}

func (s *s2cRun) prepare(ctx context.Context, t *Target, log io.Writer) error {
	if t.APIKey == "" {
		return errors.New("s2c needs the server's API key: --api-key with --addr")
	}
	s.url, s.key, s.appcode = "http://"+t.HTTP+"/v1/"+s.o.Endpoint, t.APIKey, t.AppCode
	f := &s.o.Load
	if s.o.Shape == ShapeBroadcast && s.o.Endpoint == EndpointPush {
		for i := range s.n {
			s.allTo = s.appendTo(s.allTo, i, i == 0)
		}
	}
	uids := uidRange(f.UIDBase, s.n)
	if s.o.Client == ClientRaw {
		var err error
		s.lean, err = DialLean(ctx, LeanOptions{Addrs: []string{t.Gateway}, AppCode: t.AppCode, Secret: t.Secret, UIDs: uids,
			LoginConc: f.LoginConc, Loops: s.o.Loops, Log: log, NoAcks: s.o.NoAcks, PushAckDelay: s.o.AckDelay,
			OnS2C: func(conn, loop int, _ uint64, content []byte) { s.received(conn, loop, content) }})
		return err
	}
	var err error
	s.clients, err = loginClients(ctx, t, uids, f.LoginConc, func(i int) sdk.Options {
		return sdk.Options{NoReconnect: true, OnS2C: func(m *pb.S2CNotify) { s.received(i, i, m.Content) }}
	}, log, "recipients")
	return err
}

func (s *s2cRun) close() {
	if s.lean != nil {
		_ = s.lean.Close()
	}
	closeClients(s.clients)
	s.http.CloseIdleConnections()
}

// begin draws the recipients of every push of a dispatch run before it
// starts, so the receivers can look them up.
func (s *s2cRun) begin(rs *runState) {
	c := &s2cCur{rs: rs}
	if s.o.Shape == ShapeDispatch {
		c.lists = make([][]int32, rs.n)
		all := make([]int32, rs.n*int64(s.k))
		for g := range rs.n {
			c.lists[g] = s.draw(rs.id, g, all[g*int64(s.k):(g+1)*int64(s.k)])
		}
	}
	s.cur.Store(c)
}

// draw fills dst with distinct random clients for push g of run id, in
// order (Floyd's sampling, then a sort).
func (s *s2cRun) draw(run uint32, g int64, dst []int32) []int32 {
	rng := rand.New(rand.NewPCG(s.o.Seed, uint64(run)<<40|uint64(g)))
	n, k := s.n, len(dst)
	chosen := make(map[int32]struct{}, k)
	dst = dst[:0]
	for j := n - k; j < n; j++ {
		v := int32(rng.IntN(j + 1))
		if _, dup := chosen[v]; dup {
			v = int32(j)
		}
		chosen[v] = struct{}{}
		dst = append(dst, v)
	}
	slices.Sort(dst)
	return dst
}

// first is the index of the first client push g goes to (rotate).
func (s *s2cRun) first(g int64) int64 { return g * int64(s.k) % int64(s.n) }

// slot returns which recipient of push g client i is, if it is one.
func (s *s2cRun) slot(c *s2cCur, g int64, i int) (int64, bool) {
	switch s.o.Shape {
	case ShapeBroadcast:
		return int64(i), i < s.n
	case ShapeDispatch:
		if g < 0 || g >= int64(len(c.lists)) {
			return 0, false
		}
		j, ok := slices.BinarySearch(c.lists[g], int32(i))
		return int64(j), ok
	}
	j := (int64(i) - s.first(g) + int64(s.n)) % int64(s.n)
	return j, j < int64(s.k)
}

// received counts a push that reached client i; shard spreads the
// bookkeeping of concurrent receivers.
func (s *s2cRun) received(i, shard int, content []byte) {
	c := s.cur.Load()
	run, g, at, sent, ok := getHeader(content)
	if !ok || c == nil || run != c.rs.id {
		return
	}
	j, ok := s.slot(c, g, i)
	if !ok {
		c.rs.stray.Add(1)
		return
	}
	c.rs.deliver(shard, g*int64(s.k)+j, at, sent)
}

func (s *s2cRun) appendTo(b []byte, i int, first bool) []byte {
	if !first {
		b = append(b, ',')
	}
	b = append(b, `{"appcode":`...)
	b = strconv.AppendUint(b, uint64(s.appcode), 10)
	b = append(b, `,"uid":`...)
	b = strconv.AppendUint(b, s.o.Load.UIDBase+uint64(i), 10)
	return append(b, '}')
}

func (s *s2cRun) op(ctx context.Context, rs *runState, _ int, g int64, at int64) error {
	content := newContent(s.o.Load.Size)
	b := make([]byte, 0, len(s.allTo)+s.k*32+base64.StdEncoding.EncodedLen(len(content))+64)
	b = append(b, `{"to":[`...)
	switch {
	case s.o.Endpoint == EndpointBroadcast:
		b = append(b[:0], `{"appcode":`...)
		b = strconv.AppendUint(b, uint64(s.appcode), 10)
	case s.o.Shape == ShapeBroadcast:
		b = append(b, s.allTo...)
	case s.o.Shape == ShapeDispatch:
		for j, i := range s.cur.Load().lists[g] {
			b = s.appendTo(b, int(i), j == 0)
		}
	default:
		first := s.first(g)
		for j := range int64(s.k) {
			b = s.appendTo(b, int((first+j)%int64(s.n)), j == 0)
		}
	}
	if s.o.Endpoint == EndpointPush {
		b = append(b, ']')
	}
	b = append(b, `,"msgtype":`...)
	b = strconv.AppendUint(b, uint64(s.o.MsgType), 10)
	b = append(b, `,"content":"`...)
	putHeader(content, rs.id, g, at, mono())
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
	switch {
	case s.o.Endpoint == EndpointBroadcast && res.Online != s.k:
		// Other sessions of the appcode get it too (they count as stray
		// if they are imbench's), or some clients were not reached.
		rs.note(fmt.Sprintf("broadcast reached %d sessions, %d clients are logged in", res.Online, s.k))
	case res.Online < s.k:
		rs.note(fmt.Sprintf("push found %d of %d recipients offline", s.k-res.Online, s.k))
	}
	return nil
}
