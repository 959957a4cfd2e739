package platform

import (
	"context"
	"errors"
	"net"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/imd-dev/imd/gateway"
	"github.com/imd-dev/imd/internal/config"
	"github.com/imd-dev/imd/logic"
	"github.com/imd-dev/imd/router"
)

// Gateway discovery (GET /v1/gateways on logic nodes): a gateway's
// heartbeat carries its client addresses, its load and whether it is
// draining; a logic node lists the live gateways that are not draining
// from its DC's membership and asks the other DCs for theirs over the DC
// links (rpc.Rooms.Gateways). Logic ranks them for the client.

// How long this node uses a read of the membership's gateways before it
// reads again, and how long it still serves its last read, marked stale,
// while Redis does not answer.
const (
	gatewaysFresh = time.Second
	gatewaysStale = time.Minute
)

// discovery is the Platform's share of gateway discovery.
type discovery struct {
	// draining is set before the gateway starts draining: its heartbeat
	// says so from then on (leaveDiscovery).
	draining atomic.Bool
	addrs    gatewayAddrs // this node's gateway's, for its heartbeat; set at start
	// round is held by each round of the membership's loop and by
	// drain's heartbeat, so that no round in flight sends an older
	// heartbeat after drain's.
	round sync.Mutex

	mu    sync.Mutex // held while reading the membership: one read at a time
	asked time.Time  // the last read, answered or not
	at    time.Time  // the last read answered
	list  []logic.GatewayInfo
}

// gatewayAddrs are where clients dial a gateway; "" for a listener it
// does not have.
type gatewayAddrs struct{ tcp, tls, web string }

// clientAddrs are gw's client listeners as clients should dial them: the
// listener's port on gateway.public_host, else on the host this node
// advertises (cluster.advertise, or the listen address's host, this
// host's name when it binds every interface).
func clientAddrs(cfg config.Config, gw *gateway.Server) gatewayAddrs {
	at := func(a net.Addr) string {
		if a == nil {
			return ""
		}
		_, port, err := net.SplitHostPort(a.String())
		if err != nil {
			return a.String()
		}
		host := cfg.Gateway.PublicHost
		if host == "" {
			adv := advertise(cfg.Cluster.Advertise, a)
			if host, _, err = net.SplitHostPort(adv); err != nil {
				host = adv // an advertised host without a port
			}
		}
		return net.JoinHostPort(host, port)
	}
	return gatewayAddrs{tcp: at(gw.Addr()), tls: at(gw.TLSAddr()), web: at(gw.WebAddr())}
}

// gatewayNode is this node's gateway as its heartbeat announces it now.
func (m *membership) gatewayNode() router.Node {
	p := m.p
	a := p.disc.addrs
	return router.Node{ID: p.Gateway.ID(), Role: memberGateway, Addr: p.gateAddr, DC: m.dc,
		TCPAddr: a.tcp, TLSAddr: a.tls, WebAddr: a.web, Load: int64(p.Gateway.LoggedIn()),
		Draining: p.disc.draining.Load() || p.Gateway.Draining()}
}

// refreshGateway brings the gateway's heartbeat up to date (its load, and
// whether it drains) before a round sends it. A round calls it, or drain
// under disc.round.
func (m *membership) refreshGateway() {
	for i := range m.nodes {
		if m.nodes[i].Role == memberGateway {
			m.nodes[i] = m.gatewayNode()
		}
	}
}

// drain sends the gateway's heartbeat, marked draining, now: between two
// rounds, so that no round in flight sends an older one after it. The
// rounds go on (the gateway keeps heartbeating while it drains, so logic
// does not purge the sessions of clients it is still moving) and stop
// retires it as before.
func (m *membership) drain() {
	m.p.disc.round.Lock()
	defer m.p.disc.round.Unlock()
	m.refreshGateway()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	for _, n := range m.nodes {
		if n.Role != memberGateway {
			continue
		}
		if _, err := m.p.redis.Heartbeat(ctx, n, m.ttl); err != nil {
			m.p.log.Warn("membership: heartbeat marked draining", "node", n.ID, "err", err)
		}
	}
}

// leaveDiscovery takes this node's gateway out of GET /v1/gateways before
// it starts draining: clients that reconnect when it sends them away are
// not sent back to it. It is still live in the membership meanwhile.
func (p *Platform) leaveDiscovery() {
	if p.disc.draining.Swap(true) {
		return
	}
	if p.members != nil && p.Gateway != nil {
		p.members.drain()
	}
	p.disc.mu.Lock()
	p.disc.asked = time.Time{} // this node reads again at the next request
	p.disc.mu.Unlock()
}

// memberGateways returns the live gateways of the membership that are not
// draining, of every DC it holds (normally this node's DC only): read at
// most every gatewaysFresh; while Redis does not answer, the last read for
// gatewaysStale, marked stale (fresh false). Without Redis the list is this
// process's gateway, if it has one.
func (p *Platform) memberGateways(ctx context.Context) (gws []logic.GatewayInfo, fresh bool, err error) {
	d := &p.disc
	d.mu.Lock()
	defer d.mu.Unlock()
	if now := time.Now(); now.Sub(d.asked) >= gatewaysFresh {
		d.asked = now
		list, err := p.readGateways(ctx)
		if err == nil {
			d.list, d.at = list, now
		} else {
			if d.at.IsZero() || time.Since(d.at) > gatewaysStale {
				return nil, false, err
			}
			p.log.Warn("gateway discovery: membership unreadable; listing its last gateways for a while", "err", err, "read", d.at)
		}
	}
	fresh = d.at.Equal(d.asked)
	gws = slices.Clone(d.list)
	if !fresh {
		for i := range gws {
			gws[i].Stale = true
		}
	}
	return gws, fresh, nil
}

// readGateways reads the gateways from the membership.
func (p *Platform) readGateways(ctx context.Context) ([]logic.GatewayInfo, error) {
	if p.redis == nil {
		if p.Gateway == nil || p.disc.draining.Load() || p.Gateway.Draining() {
			return nil, nil
		}
		a := p.disc.addrs
		return []logic.GatewayInfo{{ID: p.Gateway.ID(), Addr: a.tcp, TLSAddr: a.tls, WebAddr: a.web, Load: int64(p.Gateway.LoggedIn())}}, nil
	}
	ctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	nodes, err := p.redis.Live(ctx, memberGateway)
	if err != nil {
		return nil, err
	}
	var out []logic.GatewayInfo
	for _, n := range nodes {
		// A gateway of an older version announces no client addresses:
		// its Addr may be a TLS port, so it is left out rather than
		// offered to clients that would dial it in plain TCP.
		if n.Draining || (n.TCPAddr == "" && n.TLSAddr == "" && n.WebAddr == "") {
			continue
		}
		out = append(out, logic.GatewayInfo{DC: n.DC, ID: n.ID, Addr: n.TCPAddr, TLSAddr: n.TLSAddr, WebAddr: n.WebAddr, Load: n.Load})
	}
	return out, nil
}

// dcGatewaysOf answers the other DCs' peer-gateways (rpc.RoomsOptions.
// Gateways) with the gateways of dc, this node's DC. A list that is not
// fresh is an error, so that the asking DC marks its last answer stale
// itself.
func (p *Platform) dcGatewaysOf(dc string) func(context.Context) ([]logic.GatewayInfo, error) {
	return func(ctx context.Context) ([]logic.GatewayInfo, error) {
		gws, fresh, err := p.memberGateways(ctx)
		if err == nil && !fresh {
			err = errors.New("the membership is unreadable")
		}
		if err != nil {
			return nil, err
		}
		return slices.DeleteFunc(gws, func(g logic.GatewayInfo) bool { return g.DC != dc }), nil
	}
}

// gatewayLister is this node's logic.GatewayLister for the HTTP API.
type gatewayLister struct {
	p  *Platform
	dc string
}

func (p *Platform) gatewayLister(dc string) logic.GatewayLister { return gatewayLister{p: p, dc: dc} }

// DC implements logic.GatewayLister.
func (l gatewayLister) DC() string { return l.dc }

// Gateways implements logic.GatewayLister: the membership's gateways, and
// those of the other DCs the DC links reach (but for a DC the membership
// itself lists, as one Redis shared by several DCs does).
func (l gatewayLister) Gateways(ctx context.Context) ([]logic.GatewayInfo, error) {
	gws, _, err := l.p.memberGateways(ctx)
	if l.p.rooms == nil {
		return gws, err
	}
	known := map[string]bool{}
	for _, g := range gws {
		known[g.DC] = true
	}
	others := slices.DeleteFunc(l.p.rooms.Gateways(ctx), func(g logic.GatewayInfo) bool { return known[g.DC] })
	if err != nil && len(others) == 0 {
		return nil, err
	}
	return append(gws, others...), nil
}
