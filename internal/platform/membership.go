package platform

import (
	"context"
	"slices"
	"sync/atomic"
	"time"

	"github.com/imd-dev/imd/internal/config"
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
	paused      atomic.Bool // tests: skip rounds, as a node cut off from Redis would
	cancel      context.CancelFunc
	done        chan struct{}
}

func startMembership(p *Platform, cfg config.Cluster) *membership {
	m := &membership{p: p, dc: cfg.DC, every: cfg.Heartbeat, ttl: cfg.NodeTTL, static: cfg.LogicAddrs, done: make(chan struct{})}
	if m.every <= 0 {
		m.every = 2 * time.Second
	}
	if m.ttl <= 0 {
		m.ttl = 10 * time.Second
	}
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
				m.tick(ctx)
			}
		}
	}
}

func (m *membership) tick(ctx context.Context) {
	p := m.p
	ctx, cancel := context.WithTimeout(ctx, m.every)
	defer cancel()
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
