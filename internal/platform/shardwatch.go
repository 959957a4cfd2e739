package platform

import (
	"context"
	"maps"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/imd-dev/imd/router"
)

// shardWatch notices, at each membership round, that a master of the
// router's Redis restarted (router.ShardRuns): a Redis Cluster master
// that restarts comes back empty, so the sessions of its slots are gone
// from the router although their users are still connected. A gateway
// then announces all its sessions again, as after its membership lapsed;
// every node logs the restart and counts it in
// imd_router_shard_restarts_total. Only the membership goroutine uses it.
type shardWatch struct {
	known    map[string]string // master address -> run id, as last seen
	restarts prometheus.Counter
	announce bool   // a restart was seen and this gateway has not announced since
	lastErr  string // the last ShardRuns failure logged, so an outage logs once
}

// watchShards runs after the heartbeats of a round; announced reports
// that the round announced this gateway's sessions already.
func (m *membership) watchShards(ctx context.Context, announced bool) {
	p, w := m.p, &m.shards
	if w.restarts == nil {
		w.restarts = prometheus.NewCounter(prometheus.CounterOpts{Namespace: "imd", Subsystem: "router", Name: "shard_restarts_total",
			Help: "Restarts of a master of the router's Redis seen by this node (a new run id): the sessions of its slots were lost, and gateways announce theirs again."})
		if err := p.Registry.Register(w.restarts); err != nil {
			p.log.Warn("router shard restarts metric not registered", "err", err)
		}
	}
	runs, err := p.redis.ShardRuns(ctx)
	switch {
	case err != nil && err.Error() != w.lastErr:
		p.log.Warn("router: a Redis master does not answer; its restart will be noticed when it does", "err", err)
		w.lastErr = err.Error()
	case err == nil && w.lastErr != "":
		p.log.Info("router: every Redis master answers again")
		w.lastErr = ""
	}
	if restarted := router.ShardRestarts(w.known, runs); len(restarted) > 0 {
		w.restarts.Add(float64(len(restarted)))
		w.announce = true
		p.log.Warn("router: a Redis master restarted and lost the sessions of its slots", "masters", restarted,
			"gateway_announces", p.Gateway != nil)
		if p.rooms != nil {
			// It held the other DCs' mirrored sessions too.
			p.rooms.RequestResync()
		}
	}
	if w.known == nil {
		w.known = map[string]string{}
	}
	maps.Copy(w.known, runs)
	if !w.announce || p.Gateway == nil || (p.rpcClient == nil && m.self == "") {
		w.announce = false
		return
	}
	if !announced {
		ss := p.Gateway.Sessions()
		var err error
		if m.self != "" { // this process's own logic
			err = p.Logic.Announce(ctx, ss)
		} else {
			err = p.rpcClient.Announce(ctx, ss)
		}
		if err != nil {
			p.log.Error("announce sessions after a Redis master restarted (tried again next round)", "sessions", len(ss), "err", err)
			return
		}
		p.log.Warn("announced this gateway's sessions again after a Redis master restarted", "sessions", len(ss))
		m.reannounced.Add(1)
	}
	w.announce = false
}
