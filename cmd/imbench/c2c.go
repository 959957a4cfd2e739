package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"sync/atomic"

	"github.com/imd-dev/imd/schema/pb"
	"github.com/imd-dev/imd/sdk"
)

const c2cSynopsis = `Durable chat messages end to end at a fixed offered rate: --pairs sender
clients each send to their own recipient client through the gateway, logic
and the message store, with the real Go SDK (SendC2C, OnC2C). The load is
open loop: message g of a run is due at start + g/rate whatever became of
the earlier ones, each sender keeps up to --inflight sends outstanding, and
latency runs from the scheduled send time to the recipient's OnC2C, so a
slow server shows in the figures instead of slowing the clients down. The
table gives delivered msgs/s, failed sends and latency p50/p90/p99/p99.9/
max; --rates runs one rate after another and charts latency against
throughput. The run fails (exit 1) when a send fails or a stored message
is not delivered within --drain.`

// c2cSetup is the c2c scenario's shape, as the report gives it.
type c2cSetup struct {
	Pairs    int    `json:"pairs"`
	Inflight int    `json:"inflight_per_sender"`
	Size     int    `json:"content_bytes"`
	MsgType  uint32 `json:"msgtype"`
	UIDs     string `json:"uids"`
}

func runC2C(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	var f loadFlags
	var pairs int
	var msgtype uint
	fs := newFlagSet("c2c", c2cSynopsis, stdout, stderr)
	f.bind(fs, "msgs", 2000, 100)
	fs.IntVar(&pairs, "pairs", 32, "sender/recipient client pairs")
	fs.IntVar(&f.inflight, "inflight", 32, "sends outstanding per sender connection (the gateway allows 64 requests in flight)")
	fs.UintVar(&msgtype, "msgtype", 1, "msgtype of the messages")
	if err := parseFlags(fs, args, os.LookupEnv); err != nil {
		return err
	}
	errs := f.validate(msgHeader)
	if pairs < 1 {
		errs = append(errs, errors.New("--pairs must be >= 1"))
	}
	if f.inflight < 1 {
		errs = append(errs, errors.New("--inflight must be >= 1"))
	}
	if err := errors.Join(errs...); err != nil {
		fmt.Fprintf(stderr, "imbench c2c: %v\n", err)
		return errUsage
	}
	c := &c2c{f: &f, pairs: pairs, msgtype: uint32(msgtype)}
	sc := &loadScenario{
		name: "c2c", opUnit: "msgs", deliveryUnit: "msgs", senders: pairs, inflight: f.inflight, perOp: 1,
		setup: c2cSetup{Pairs: pairs, Inflight: f.inflight, Size: f.size, MsgType: uint32(msgtype),
			UIDs: fmt.Sprintf("senders %d..%d, recipients %d..%d", f.uidBase, f.uidBase+uint64(pairs)-1,
				f.uidBase+uint64(pairs), f.uidBase+2*uint64(pairs)-1)},
		prepare: c.prepare,
		begin:   func(rs *runState) { c.cur.Store(rs) },
		op:      c.op,
		close:   func() { closeClients(c.senders); closeClients(c.recipients) },
	}
	return runLoad(ctx, sc, &f, append([]string{"imbench", "c2c"}, args...), stdout, stderr)
}

type c2c struct {
	f       *loadFlags
	pairs   int
	msgtype uint32

	senders, recipients []*sdk.Client
	account             uint32
	cur                 atomic.Pointer[runState]
}

func (c *c2c) prepare(ctx context.Context, t *target, stderr io.Writer) error {
	var err error
	c.recipients, err = loginClients(ctx, t, uidRange(c.f.uidBase+uint64(c.pairs), c.pairs), c.f.loginConc,
		func(i int) sdk.Options {
			return sdk.Options{NoReconnect: true, OnC2C: func(m *pb.C2CMessage) { c.received(i, m) }}
		}, stderr, "recipients")
	if err != nil {
		return err
	}
	c.senders, err = loginClients(ctx, t, uidRange(c.f.uidBase, c.pairs), c.f.loginConc,
		func(int) sdk.Options { return sdk.Options{NoReconnect: true} }, stderr, "senders")
	if err != nil {
		return err
	}
	c.account = c.senders[0].LoginInfo().GetAccount()
	return nil
}

// received is recipient i's OnC2C.
func (c *c2c) received(i int, m *pb.C2CMessage) {
	rs := c.cur.Load()
	run, idx, at, sent, ok := getHeader(m.Content)
	if !ok || rs == nil || run != rs.id {
		return // a late message of an earlier run
	}
	rs.deliver(i, idx, at, sent)
}

func (c *c2c) op(ctx context.Context, rs *runState, s int, g int64, at int64) error {
	content := newContent(c.f.size)
	putHeader(content, rs.id, g, at, mono())
	to := &pb.User{Account: c.account, Uid: c.f.uidBase + uint64(c.pairs+s)}
	if _, err := c.senders[s].SendC2C(ctx, to, c.msgtype, content); err != nil {
		return err
	}
	rs.expected.Add(1)
	return nil
}
