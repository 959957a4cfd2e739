package scenario

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync/atomic"

	"github.com/imd-dev/imd/schema/pb"
	"github.com/imd-dev/imd/sdk"
)

// C2CSynopsis describes the c2c scenario (the command's help).
const C2CSynopsis = `Durable chat messages end to end at a fixed offered rate: --pairs sender
clients each send to their own recipient client through the gateway, logic
and the message store, with the real Go SDK (SendC2C, OnC2C). The load is
open loop: message g of a run is due at start + g/rate whatever became of
the earlier ones, each sender keeps up to --inflight sends outstanding, and
latency runs from the scheduled send time to the recipient's OnC2C, so a
slow server shows in the figures instead of slowing the clients down. The
table gives delivered msgs/s, failed sends, latency p50/p90/p99/p99.9/
max and the server's CPU per message; --rates runs one rate after another
and charts latency against throughput. The run fails (exit 1) when a send
fails or a stored message is not delivered within --drain.`

// C2C is the c2c scenario: durable chat messages between pairs of SDK
// clients at an offered rate.
type C2C struct {
	Load    LoadOptions
	Pairs   int    // sender/recipient client pairs
	MsgType uint32 // msgtype of the messages
}

// NewC2C returns the scenario with the command line's defaults.
func NewC2C() *C2C {
	return &C2C{Load: DefaultLoadOptions(2000, 100, 32), Pairs: 32, MsgType: 1}
}

// c2cSetup is the c2c scenario's shape, as the report gives it.
type c2cSetup struct {
	Pairs    int    `json:"pairs"`
	Inflight int    `json:"inflight_per_sender"`
	Size     int    `json:"content_bytes"`
	MsgType  uint32 `json:"msgtype"`
	UIDs     string `json:"uids"`
}

// Validate checks the options (and fills Load.Rates from Load.Rate).
func (c *C2C) Validate() error {
	errs := c.Load.validate(MsgHeader)
	if c.Pairs < 1 {
		errs = append(errs, errors.New("--pairs must be >= 1"))
	}
	if c.Load.Inflight < 1 {
		errs = append(errs, errors.New("--inflight must be >= 1"))
	}
	return errors.Join(errs...)
}

// Run runs the scenario on the server l gives. A report comes back with an
// error when the scenario ran but a send failed or a message went missing.
func (c *C2C) Run(ctx context.Context, l Launcher, env Env) (*LoadReport, error) {
	if err := c.Validate(); err != nil {
		return nil, err
	}
	r := &c2cRun{o: c}
	f := &c.Load
	sc := &loadScenario{
		name: "c2c", opUnit: "msgs", deliveryUnit: "msgs", senders: c.Pairs, inflight: f.Inflight, perOp: 1,
		setup: c2cSetup{Pairs: c.Pairs, Inflight: f.Inflight, Size: f.Size, MsgType: c.MsgType,
			UIDs: fmt.Sprintf("senders %d..%d, recipients %d..%d", f.UIDBase, f.UIDBase+uint64(c.Pairs)-1,
				f.UIDBase+uint64(c.Pairs), f.UIDBase+2*uint64(c.Pairs)-1)},
		prepare: r.prepare,
		begin:   func(rs *runState) { r.cur.Store(rs) },
		op:      r.op,
		close:   func() { closeClients(r.senders); closeClients(r.recipients) },
	}
	return runLoad(ctx, sc, f, l, env)
}

type c2cRun struct {
	o *C2C

	senders, recipients []*sdk.Client
	account             uint32
	cur                 atomic.Pointer[runState]
}

func (c *c2cRun) prepare(ctx context.Context, t *Target, log io.Writer) error {
	f := &c.o.Load
	var err error
	c.recipients, err = loginClients(ctx, t, uidRange(f.UIDBase+uint64(c.o.Pairs), c.o.Pairs), f.LoginConc,
		func(i int) sdk.Options {
			return sdk.Options{NoReconnect: true, OnC2C: func(m *pb.C2CMessage) { c.received(i, m) }}
		}, log, "recipients")
	if err != nil {
		return err
	}
	c.senders, err = loginClients(ctx, t, uidRange(f.UIDBase, c.o.Pairs), f.LoginConc,
		func(int) sdk.Options { return sdk.Options{NoReconnect: true} }, log, "senders")
	if err != nil {
		return err
	}
	c.account = c.senders[0].LoginInfo().GetAccount()
	return nil
}

// received is recipient i's OnC2C.
func (c *c2cRun) received(i int, m *pb.C2CMessage) {
	rs := c.cur.Load()
	run, idx, at, sent, ok := getHeader(m.Content)
	if !ok || rs == nil || run != rs.id {
		return // a late message of an earlier run
	}
	rs.deliver(i, idx, at, sent)
}

func (c *c2cRun) op(ctx context.Context, rs *runState, s int, g int64, at int64) error {
	content := newContent(c.o.Load.Size)
	putHeader(content, rs.id, g, at, mono())
	to := &pb.User{Account: c.account, Uid: c.o.Load.UIDBase + uint64(c.o.Pairs+s)}
	if _, err := c.senders[s].SendC2C(ctx, to, c.o.MsgType, content); err != nil {
		return err
	}
	rs.expected.Add(1)
	return nil
}
