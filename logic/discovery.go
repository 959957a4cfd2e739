package logic

import (
	"cmp"
	"context"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"slices"
	"strconv"
	"time"

	"github.com/imd-dev/imd/internal/ratelimit"
	"github.com/imd-dev/imd/schema"
	"github.com/valyala/fasthttp"
)

// GatewayInfo is a gateway a client may dial, one entry of the answer of
// GET /v1/gateways (schema/openapi.yaml, "Gateway").
type GatewayInfo struct {
	DC      string `json:"dc"`
	ID      string `json:"id"`       // the gate id (LoginResponse.gate_id once logged in)
	Addr    string `json:"addr"`     // plain TCP; "" when the gateway has none
	TLSAddr string `json:"tls_addr"` // TLS; "" when the gateway has none
	WebAddr string `json:"web_addr"` // WebSocket (/ws) and long-poll (/lp/); "" when off
	Load    int64  `json:"load"`     // logged-in connections at its last heartbeat
	// Weight is the share of new clients the gateway should get among
	// the gateways of its DC, 1-100; RankGateways sets it from the loads.
	Weight int `json:"weight"`
	// Stale marks the gateways of a DC that did not answer this time
	// (its link is down): its last answer, kept for a while.
	Stale bool `json:"stale,omitempty"`
}

// GatewayLister lists the gateways clients may dial; the platform
// implements it from the membership of this DC and, over the links
// between DCs, of the others. It must be safe for concurrent use and
// answer quickly (from a cache): clients call it before every login.
type GatewayLister interface {
	// DC names this node's data center.
	DC() string
	// Gateways returns the live gateways that are not draining, of this
	// DC and of the other DCs it reaches, in any order and without
	// weights. An error means none could be listed.
	Gateways(ctx context.Context) ([]GatewayInfo, error)
}

// loadSmoothing keeps near-idle gateways near-equal in weight: a gateway
// with 10 connections is not ten times worse than one with 1.
const loadSmoothing = 100

// gatewayWeight is the weight of a gateway with load among gateways whose
// least load is least: 100 × (least + 100) / (load + 100), rounded, at
// least 1. The least loaded gateway of a DC weighs 100, one with twice
// its load (well past 100) about 50: a client that picks at random in
// proportion to the weights evens the loads out. Weights are whole, so
// loads less than about half a percent apart weigh the same.
func gatewayWeight(load, least int64) int {
	load, least = max(load, 0), max(least, 0)
	w := (100*(least+loadSmoothing) + (load+loadSmoothing)/2) / (load + loadSmoothing)
	return int(min(max(w, 1), 100))
}

// RankGateways sets the weights of gws (per DC) and orders them for a
// client: the gateways of DC first first, then those of the other DCs by
// DC name; within a DC by weight, heaviest (least loaded) first. Gateways
// of equal weight come in a random order (shuffle: rand.Shuffle when nil),
// so that clients that all ask at once, as after a gateway died, spread
// over them instead of all dialling the same one. It sorts gws in place
// and returns it.
func RankGateways(gws []GatewayInfo, first string, shuffle func(n int, swap func(i, j int))) []GatewayInfo {
	least := map[string]int64{}
	for _, g := range gws {
		if l, ok := least[g.DC]; !ok || g.Load < l {
			least[g.DC] = g.Load
		}
	}
	for i := range gws {
		gws[i].Weight = gatewayWeight(gws[i].Load, least[gws[i].DC])
	}
	if shuffle == nil {
		shuffle = rand.Shuffle
	}
	shuffle(len(gws), func(i, j int) { gws[i], gws[j] = gws[j], gws[i] })
	slices.SortStableFunc(gws, func(a, b GatewayInfo) int {
		if (a.DC == first) != (b.DC == first) {
			if a.DC == first {
				return -1
			}
			return 1
		}
		return cmp.Or(cmp.Compare(a.DC, b.DC), cmp.Compare(b.Weight, a.Weight))
	})
	return gws
}

// maxGatewaysLimit bounds ?limit= of GET /v1/gateways.
const maxGatewaysLimit = 1000

// handleGateways serves GET /v1/gateways: the gateways a client should
// dial, its nearest DC's first. Clients call it before they log in, so it
// takes no API key; a per-source-address rate limit (limits.discovery_per_ip)
// guards it instead, and it is answered from the lister's cache.
func handleGateways(svc *Service, o HTTPOptions, ctx *fasthttp.RequestCtx) {
	if !ctx.IsGet() && !ctx.IsHead() {
		writeError(ctx, fasthttp.StatusMethodNotAllowed, 0, "use GET")
		return
	}
	// Browsers on any origin may ask: the answer is public.
	ctx.Response.Header.Set("Access-Control-Allow-Origin", "*")
	ctx.Response.Header.Set("Cache-Control", "no-store") // each asker gets its own order of equal gateways
	if o.Gateways == nil {
		writeError(ctx, fasthttp.StatusNotFound, 0, "gateway discovery is off on this node")
		return
	}
	src, _ := netip.AddrFromSlice(ctx.RemoteIP())
	if err := svc.limits.allowDiscovery(src.Unmap(), svc.acl.AllowedIP(src.Unmap())); err != nil {
		ctx.Response.Header.Set("Retry-After", "1")
		writeStatusError(ctx, err)
		return
	}
	q := ctx.QueryArgs()
	first := o.Gateways.DC()
	if v := q.Peek("dc"); len(v) > 0 {
		if len(v) > 64 {
			writeError(ctx, fasthttp.StatusBadRequest, schema.StatusBadArgument, "dc: at most 64 bytes")
			return
		}
		first = string(v)
	}
	limit := maxGatewaysLimit
	if v := q.Peek("limit"); len(v) > 0 {
		n, err := strconv.Atoi(string(v))
		if err != nil || n < 1 || n > maxGatewaysLimit {
			writeError(ctx, fasthttp.StatusBadRequest, schema.StatusBadArgument, fmt.Sprintf("limit must be a number from 1 to %d", maxGatewaysLimit))
			return
		}
		limit = n
	}
	lctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	gws, err := o.Gateways.Gateways(lctx)
	cancel()
	if err != nil {
		writeStatusError(ctx, schema.Errorf(schema.StatusUnavailable, "no gateway list: %v", err))
		return
	}
	gws = RankGateways(gws, first, nil)
	if len(gws) > limit {
		gws = gws[:limit]
	}
	if gws == nil {
		gws = []GatewayInfo{}
	}
	writeJSON(ctx, fasthttp.StatusOK, map[string]any{"dc": o.Gateways.DC(), "gateways": gws})
}

// allowDiscovery takes a token of src's discovery bucket, or returns the
// 3001 error; addresses of the ACL's allowed ranges bypass the limit.
func (l *limits) allowDiscovery(src netip.Addr, allowed bool) error {
	if allowed || l.discovery.Allow(ratelimit.Source(src), time.Now()) {
		return nil
	}
	l.m.WithLabelValues(limDiscovery).Inc()
	return schema.Errorf(schema.StatusRateLimited, "over %g gateway lists a second from this address; retry later", l.discovery.Rate().Rate)
}
