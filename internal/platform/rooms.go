package platform

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strconv"
	"strings"
	"time"

	"github.com/imd-dev/imd/internal/config"
	"github.com/imd-dev/imd/internal/rpc"
	"github.com/imd-dev/imd/router"
	"github.com/prometheus/client_golang/prometheus"
)

// parseRooms turns the config's rooms into the RPC's, checking that this
// node's DC is one of them. nil when the deployment has one DC.
func parseRooms(k config.Cluster) ([]rpc.Room, error) {
	if len(k.Rooms) == 0 {
		return nil, nil
	}
	out := make([]rpc.Room, 0, len(k.Rooms))
	self := false
	for _, r := range k.Rooms {
		lo, hi, err := parseIDRange(r.NodeIDs)
		if err != nil {
			return nil, fmt.Errorf("cluster.rooms: dc %s: node_ids: %w", r.DC, err)
		}
		out = append(out, rpc.Room{DC: r.DC, Peers: r.Peers, NodeLo: lo, NodeHi: hi})
		self = self || r.DC == k.DC
	}
	if !self {
		return nil, fmt.Errorf("cluster.rooms: this node's dc %q (--dc) is not among them", k.DC)
	}
	return out, nil
}

// parseIDRange parses "lo-hi" within 0-1023.
func parseIDRange(s string) (lo, hi int64, err error) {
	a, b, ok := strings.Cut(strings.TrimSpace(s), "-")
	if !ok {
		return 0, 0, fmt.Errorf("%q is not lo-hi", s)
	}
	if lo, err = strconv.ParseInt(strings.TrimSpace(a), 10, 64); err == nil {
		hi, err = strconv.ParseInt(strings.TrimSpace(b), 10, 64)
	}
	if err != nil || lo < 0 || hi > 1023 || lo > hi {
		return 0, 0, fmt.Errorf("%q is not a range within 0-1023", s)
	}
	return lo, hi, nil
}

// nodeIDRange is the range this node's DC leases node ids from.
func nodeIDRange(k config.Cluster) (lo, hi int64) {
	rooms, err := parseRooms(k)
	if err != nil {
		return 0, 1023
	}
	for _, r := range rooms {
		if r.DC == k.DC {
			return r.NodeLo, r.NodeHi
		}
	}
	return 0, 1023
}

// startRooms links this logic node to the other DCs' logic tiers.
func (p *Platform) startRooms(cfg config.Config, node string, log *slog.Logger, reg prometheus.Registerer) error {
	rooms, err := parseRooms(cfg.Cluster)
	if err != nil || rooms == nil {
		return err
	}
	if p.redis == nil {
		return errors.New("cluster.rooms: a many-DC deployment needs each DC's Redis (--redis-addrs) for its router and membership")
	}
	srvTLS, cliTLS, err := rpcTLS(cfg.Cluster)
	if err != nil {
		return err
	}
	addr := cfg.Cluster.PeerAddr
	if addr == "" {
		addr = ":7074"
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("peer link: listen %s: %w", addr, err)
	}
	rr := p.redis
	r, err := rpc.NewRooms(rpc.RoomsOptions{
		DC: cfg.Cluster.DC, Node: node, Version: Version, Rooms: rooms, Svc: p.Logic,
		Secret: cfg.Cluster.Secret, ServerTLS: srvTLS, ClientTLS: cliTLS, QueueBytes: cfg.Cluster.PeerQueueBytes,
		Logger: log.With("tier", "rooms"), Registry: reg, Gateways: p.dcGatewaysOf(cfg.Cluster.DC),
		Resync: func() {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			// Requests within half a second are one: every gateway
			// announces at its next heartbeat, after all of them.
			bumped, err := rr.BumpAnnounce(ctx, 500*time.Millisecond)
			switch {
			case err != nil:
				log.Warn("ask this DC's gateways to announce their sessions again", "err", err)
			case bumped:
				log.Info("asked this DC's gateways to announce their sessions again, for the other DCs' mirrors")
			}
		},
	})
	if err != nil {
		_ = ln.Close()
		return err
	}
	p.Logic.SetRooms(r)
	p.rooms, p.peerLn = r, ln
	go func() {
		if err := r.Serve(ln); err != nil {
			p.serveErr <- err
		}
	}()
	if cfg.Cluster.Secret == "" && !isLoopback(ln.Addr()) {
		log.Warn("the DC link port listens beyond loopback with no --rpc-secret: anyone who reaches it can act as another DC's logic node", "peer_addr", ln.Addr().String())
	}
	log.Info("linking to the other data centers", "dc", cfg.Cluster.DC, "peer_addr", ln.Addr().String(), "rooms", len(rooms))
	return nil
}

// PeerAddr is where this logic node accepts other DCs' links, or "".
func (p *Platform) PeerAddr() string {
	if p.peerLn == nil {
		return ""
	}
	return p.peerLn.Addr().String()
}

// Rooms is this node's links to the other DCs, or nil.
func (p *Platform) Rooms() *rpc.Rooms { return p.rooms }

// checkAnnounce has a gateway announce its sessions again when a logic
// node of its DC asked for it (router.Redis.BumpAnnounce): another DC
// needs them for its mirror.
func (m *membership) checkAnnounce(ctx context.Context) {
	p := m.p
	if p.Gateway == nil || (p.rpcClient == nil && m.self == "") {
		return
	}
	gen, err := p.redis.AnnounceGen(ctx)
	if err != nil {
		p.log.Warn("membership: read the announce generation", "err", err)
		return
	}
	first := m.announceGen == nil
	if !first && *m.announceGen == gen {
		return
	}
	m.announceGen = &gen
	if first {
		return
	}
	ss := p.Gateway.Sessions()
	announce := func(ctx context.Context, ss []router.Session) error {
		if m.self != "" { // our own logic, in this process
			return p.Logic.Announce(ctx, ss)
		}
		return p.rpcClient.Announce(ctx, ss)
	}
	if err := announce(ctx, ss); err != nil {
		p.log.Warn("announce sessions again for the other DCs", "err", err)
		m.announceGen = nil // try again next round
		return
	}
	m.reannounced.Add(1)
	p.log.Info("sessions announced again for the other DCs", "sessions", len(ss))
}
