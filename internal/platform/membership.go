package platform

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"slices"
	"sync/atomic"
	"time"

	"github.com/imd-dev/imd/internal/config"
	"github.com/imd-dev/imd/logic"
	"github.com/imd-dev/imd/router"
)

// Membership roles in Redis.
const (
	memberLogic   = "logic"
	memberGateway = "gateway"
)

// membership keeps this node's heartbeat in Redis, points the gateway's
// links at the live logic nodes of its DC, and has logic purge the
// sessions of gateways that stopped heartbeating.
type membership struct {
	p      *Platform
	dc     string
	every  time.Duration
	ttl    time.Duration
	static []string
	self   string // this node's logic address when its gateway reaches it directly
	nodes  []router.Node
	beats  int // heartbeat rounds done
	// reannounced counts the times this gateway announced its sessions
	// again after its membership lapsed.
	reannounced atomic.Int64
	announceGen *string     // the announce generation seen last (rooms.go)
	paused      atomic.Bool // tests: skip rounds, as a node cut off from Redis would
	cancel      context.CancelFunc
	done        chan struct{}

	shards shardWatch // restarts of the router's Redis masters (shardwatch.go)
}

func startMembership(p *Platform, cfg config.Cluster) *membership {
	m := &membership{p: p, dc: cfg.DC, static: cfg.LogicAddrs, done: make(chan struct{})}
	m.every, m.ttl = clusterTiming(cfg)
	if p.Logic != nil && !cfg.Split {
		m.self = p.rpcAddr
	}
	if p.Logic != nil && p.rpcAddr != "" {
		m.nodes = append(m.nodes, router.Node{ID: "logic/" + p.rpcAddr, Role: memberLogic, Addr: p.rpcAddr, DC: m.dc})
	}
	if p.Gateway != nil {
		m.nodes = append(m.nodes, router.Node{ID: p.Gateway.ID(), Role: memberGateway, Addr: p.gateAddr, DC: m.dc})
	}
	var ctx context.Context
	ctx, m.cancel = context.WithCancel(context.Background())
	m.tick(ctx) // a node is visible and sees the others before Start returns
	go m.run(ctx)
	return m
}

func (m *membership) run(ctx context.Context) {
	defer close(m.done)
	t := time.NewTicker(m.every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			if !m.paused.Load() {
				m.p.disc.round.Lock() // drain's heartbeat waits (discovery.go)
				m.tick(ctx)
				m.p.disc.round.Unlock()
			}
		}
	}
}

func (m *membership) tick(ctx context.Context) {
	p := m.p
	ctx, cancel := context.WithTimeout(ctx, m.every)
	defer cancel()
	if p.idLease != nil {
		p.renewNodeID(ctx)
	}
	announced := m.reannounced.Load()
	m.refreshGateway() // its load and whether it drains (discovery.go)
	for _, n := range m.nodes {
		joined, err := p.redis.Heartbeat(ctx, n, m.ttl)
		if err != nil {
			p.log.Warn("membership heartbeat failed", "node", n.ID, "err", err)
			continue
		}
		if joined && m.beats > 0 && n.Role == memberGateway && p.rpcClient != nil {
			// Our heartbeats lapsed (Redis was slow or away) and logic
			// purged our sessions: they are all still here, announce them.
			ss := p.Gateway.Sessions()
			p.log.Warn("membership lapsed and this gateway's sessions were purged; announcing them again", "gate", n.ID, "sessions", len(ss))
			if err := p.rpcClient.Announce(ctx, ss); err != nil {
				p.log.Error("announce sessions after a membership lapse", "err", err)
			} else {
				m.reannounced.Add(1)
			}
		}
	}
	m.beats++
	m.watchShards(ctx, m.reannounced.Load() != announced)
	m.checkAnnounce(ctx)
	if c := p.rpcClient; c != nil {
		live, err := p.redis.Live(ctx, memberLogic)
		if err != nil {
			p.log.Warn("membership: list logic nodes", "err", err)
		} else {
			addrs := slices.Clone(m.static)
			for _, n := range live {
				// Gateways talk to logic in their own DC; a gateway in the
				// same process as its logic reaches it directly.
				if n.DC != m.dc || n.Addr == m.self {
					continue
				}
				if !slices.Contains(addrs, n.Addr) {
					addrs = append(addrs, n.Addr)
				}
			}
			c.SetAddrs(addrs)
		}
	}
	if p.Logic != nil {
		dead, err := p.redis.Expired(ctx, memberGateway)
		if err != nil {
			p.log.Warn("membership: find dead gateways", "err", err)
		}
		for _, id := range dead {
			p.log.Warn("gateway stopped heartbeating; purging its sessions", "gate", id)
			p.Logic.DetachGate(ctx, id)
		}
	}
}

// stop ends the heartbeats. A logic node leaves, so that gateways stop
// dialling it at once instead of after the TTL; a gateway retires, so that
// logic purges whatever of its sessions a lost disconnect left behind.
func (m *membership) stop() {
	m.cancel()
	<-m.done
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	for _, n := range m.nodes {
		var err error
		if n.Role == memberGateway {
			err = m.p.redis.Retire(ctx, n)
		} else {
			err = m.p.redis.Leave(ctx, n)
		}
		if err != nil {
			m.p.log.Warn("membership: leave", "node", n.ID, "err", err)
		}
	}
}

// clusterTiming is the membership's heartbeat interval and node TTL, with
// their defaults: 2s and 10s.
func clusterTiming(cfg config.Cluster) (every, ttl time.Duration) {
	every, ttl = cfg.Heartbeat, cfg.NodeTTL
	if every <= 0 {
		every = 2 * time.Second
	}
	if ttl <= 0 {
		ttl = 10 * time.Second
	}
	return every, ttl
}

// idLease is a logic node's lease of its snowflake node id in Redis
// (logic/ids.go explains what it guards). It is taken before the node
// serves, renewed with each membership heartbeat and released at
// shutdown; only the membership's goroutine touches it after start.
type idLease struct {
	want   int64  // the static --node-id, -1: any free id
	holder string // this process's token in Redis
	ttl    time.Duration
	id     int64 // the id held, -1: none
	lo, hi int64 // the range free ids are sought in (this DC's)
}

// leaseNodeID takes this logic node's id. A static id that another holder
// has leased is waited for while that lease runs out: a holder that renews
// meanwhile is alive, and the start is refused.
func (p *Platform) leaseNodeID(cfg config.Config) error {
	if cfg.NodeID < -1 || cfg.NodeID > logic.MaxNodeID {
		return fmt.Errorf("node id %d is outside 0-%d (or -1 to lease one)", cfg.NodeID, logic.MaxNodeID)
	}
	_, ttl := clusterTiming(cfg.Cluster)
	var nonce [4]byte
	_, _ = rand.Read(nonce[:])
	host, _ := os.Hostname()
	lo, hi := nodeIDRange(cfg.Cluster)
	if cfg.NodeID >= 0 && (cfg.NodeID < lo || cfg.NodeID > hi) {
		return fmt.Errorf("node id %d is outside this DC's range %d-%d (cluster.rooms)", cfg.NodeID, lo, hi)
	}
	l := &idLease{want: cfg.NodeID, ttl: ttl, id: -1, lo: lo, hi: hi,
		holder: fmt.Sprintf("%s/pid %d/%s", host, os.Getpid(), hex.EncodeToString(nonce[:]))}
	p.idLease = l
	var seen *router.NodeIDHeldError
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		err := p.acquireNodeID(ctx, l)
		cancel()
		var held *router.NodeIDHeldError
		if !errors.As(err, &held) {
			return err
		}
		if seen != nil && (held.Holder != seen.Holder || held.TTL > seen.TTL) {
			return fmt.Errorf("node id %d is held by a live logic node (%s, which renewed its lease while this one waited): give this node another --node-id, or none to lease a free one", l.want, held.Holder)
		}
		if seen == nil {
			p.log.Warn("node id leased by another holder: waiting for its lease to run out (a holder that renews it is alive, and this start is refused)", "node_id", l.want, "holder", held.Holder, "left", held.TTL)
		}
		seen = held
		time.Sleep(min(held.TTL+time.Millisecond, 100*time.Millisecond))
	}
}

// acquireNodeID leases l's id and lets logic mint with it.
func (p *Platform) acquireNodeID(ctx context.Context, l *idLease) error {
	start := time.Now() // the lease ends, here, no later than in Redis
	window := (l.ttl + p.Logic.MaxClockSkew()).Milliseconds()
	lease, err := p.redis.AcquireNodeIDIn(ctx, l.want, l.lo, l.hi, l.holder, l.ttl, p.Logic.IDCeiling(l.ttl), window)
	if err != nil {
		return fmt.Errorf("node id: %w", err)
	}
	p.Logic.HoldNodeID(lease.ID, lease.PrevCeiling, lease.Ceiling, start.Add(l.ttl))
	l.id = lease.ID
	p.log.Info("node id leased", "node_id", lease.ID, "static", l.want >= 0, "holder", l.holder)
	return nil
}

// renewNodeID renews the lease, or takes one again when it lapsed.
func (p *Platform) renewNodeID(ctx context.Context) {
	l := p.idLease
	if l.id >= 0 {
		start := time.Now()
		hi, held, err := p.redis.RenewNodeID(ctx, l.id, l.holder, l.ttl, p.Logic.IDCeiling(l.ttl))
		switch {
		case err != nil:
			p.log.Warn("node id lease not renewed: msgids are refused once it runs out", "node_id", l.id, "err", err)
			return
		case held:
			p.Logic.HoldNodeID(l.id, -1, hi, start.Add(l.ttl))
			return
		}
		p.Logic.ReleaseNodeID() // it lapsed here too: no id is minted with it
		p.log.Error("node id lease lapsed (Redis unreachable for longer than the node TTL): leasing again", "node_id", l.id)
		l.id = -1
	}
	if err := p.acquireNodeID(ctx, l); err != nil {
		p.log.Error("no node id lease: msgids are refused", "want", l.want, "err", err)
	}
}

// releaseNodeID stops minting and hands the id back with the time of its
// last msgid, which its next holder starts above.
func (p *Platform) releaseNodeID() {
	l := p.idLease
	if l == nil || p.Logic == nil {
		return
	}
	node, last := p.Logic.ReleaseNodeID()
	if l.id < 0 || node != l.id {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if err := p.redis.ReleaseNodeID(ctx, l.id, l.holder, last); err != nil {
		p.log.Warn("node id lease not released: it runs out on its own", "node_id", l.id, "err", err)
	}
	l.id = -1
}
