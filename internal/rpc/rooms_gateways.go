package rpc

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"

	"github.com/imd-dev/imd/logic"
	"github.com/imd-dev/imd/schema"
	"github.com/imd-dev/imd/schema/pb"
	"google.golang.org/protobuf/proto"
)

// Another DC's gateways (peer-gateways) for GET /v1/gateways: asked over
// the DC link at most every peerGatewaysFresh, each ask bounded by
// peerGatewaysWait. While a DC does not answer (its link is down, or it is
// slow), its last answer is still listed, marked stale, for
// peerGatewaysStale after it was given; then the DC is left out. Clients
// reach the other DC over the internet, not over the link between the
// DCs, so a gateway listed a moment ago is a better fallback than none.
const (
	peerGatewaysFresh = 3 * time.Second
	peerGatewaysWait  = time.Second
	peerGatewaysStale = time.Minute
)

// gatewayCache holds the last answer of each other DC. The zero value is
// ready.
type gatewayCache struct {
	mu  sync.Mutex
	dcs map[string]*dcGateways
}

// dcGateways is one DC's last answer.
type dcGateways struct {
	mu    sync.Mutex // held while asking: one ask per DC at a time
	asked time.Time  // the last ask, answered or not
	at    time.Time  // the last answer
	list  []logic.GatewayInfo
}

func (c *gatewayCache) of(dc string) *dcGateways {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.dcs == nil {
		c.dcs = map[string]*dcGateways{}
	}
	g := c.dcs[dc]
	if g == nil {
		g = &dcGateways{}
		c.dcs[dc] = g
	}
	return g
}

// Gateways returns the gateways of the other DCs that clients may dial
// (live, not draining), from each DC's answer to peer-gateways: cached
// for a few seconds, stale while the DC does not answer, none for a DC
// that has not answered for a minute. It waits at most about a second.
func (r *Rooms) Gateways(ctx context.Context) []logic.GatewayInfo {
	got := make(chan []logic.GatewayInfo, len(r.peers))
	for _, p := range r.peers {
		go func() { got <- r.gws.of(p.dc).get(ctx, p) }()
	}
	var all []logic.GatewayInfo
	for range r.peers {
		all = append(all, <-got...)
	}
	return all
}

func (c *dcGateways) get(ctx context.Context, p *peer) []logic.GatewayInfo {
	c.mu.Lock()
	defer c.mu.Unlock()
	if now := time.Now(); now.Sub(c.asked) >= peerGatewaysFresh {
		c.asked = now
		gws, err := p.askGateways(ctx)
		if err == nil {
			c.list, c.at = gws, now
		} else {
			p.r.log.Debug("dc gateways not listed; its last answer is kept for a while", "dc", p.dc, "err", err)
		}
	}
	if c.at.IsZero() || time.Since(c.at) > peerGatewaysStale {
		return nil
	}
	out := slices.Clone(c.list)
	if !c.at.Equal(c.asked) {
		for i := range out {
			out[i].Stale = true
		}
	}
	return out
}

// askGateways sends peer-gateways to p's DC.
func (p *peer) askGateways(ctx context.Context) ([]logic.GatewayInfo, error) {
	l := p.current()
	if l == nil {
		return nil, errors.New("the link is down")
	}
	ctx, cancel := context.WithTimeout(ctx, peerGatewaysWait)
	defer cancel()
	rb, err := l.CallRaw(ctx, schema.Header{Cmd: schema.RPCPeerGateways}, nil)
	if err != nil {
		return nil, err
	}
	var resp pb.PeerGatewaysResponse
	if err := proto.Unmarshal(rb, &resp); err != nil {
		return nil, fmt.Errorf("peer-gateways answer: %w", err)
	}
	if resp.GetDc() != p.dc {
		return nil, fmt.Errorf("peer-gateways answered for DC %q, not %q", resp.GetDc(), p.dc)
	}
	out := make([]logic.GatewayInfo, 0, len(resp.GetGateways()))
	for _, g := range resp.GetGateways() {
		out = append(out, logic.GatewayInfo{DC: p.dc, ID: g.GetId(), Addr: g.GetTcpAddr(),
			TLSAddr: g.GetTlsAddr(), WebAddr: g.GetWebAddr(), Load: g.GetLoad()})
	}
	return out, nil
}

// serveGateways answers another DC's peer-gateways with this DC's
// gateways (RoomsOptions.Gateways).
func (r *Rooms) serveGateways(ctx context.Context) ([]byte, error) {
	resp := &pb.PeerGatewaysResponse{Dc: r.o.DC}
	if r.o.Gateways != nil {
		gws, err := r.o.Gateways(ctx)
		if err != nil {
			return nil, schema.Errorf(schema.StatusUnavailable, "this DC's gateways: %v", err)
		}
		for _, g := range gws {
			resp.Gateways = append(resp.Gateways, &pb.PeerGateway{Id: g.ID, TcpAddr: g.Addr, TlsAddr: g.TLSAddr, WebAddr: g.WebAddr, Load: g.Load})
		}
	}
	return proto.Marshal(resp)
}
