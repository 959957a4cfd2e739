package sdk

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
)

// discoveryState is the client's share of gateway discovery
// (Options.DiscoveryURL), under Client.mu but for httpc, set at Dial.
type discoveryState struct {
	httpc *http.Client
	stale bool   // ask for the list before the next dial
	away  string // the gateway that sent this client away: last in the next list
}

// maxDiscoveryBody bounds the discovery answer read.
const maxDiscoveryBody = 1 << 20

// newDiscoveryClient is the HTTP client of o.DiscoveryURL: o's, or one
// that keeps no idle connection (discovery is rare, and a kept connection
// would outlive the Client with its goroutines) and dials through
// o.Dialer when there is one.
func newDiscoveryClient(o *Options) *http.Client {
	if o.DiscoveryClient != nil {
		return o.DiscoveryClient
	}
	dial := o.Dialer
	if dial == nil {
		dial = (&net.Dialer{Timeout: o.DialTimeout}).DialContext
	}
	return &http.Client{Transport: &http.Transport{
		Proxy:               http.ProxyFromEnvironment,
		DialContext:         dial,
		DisableKeepAlives:   true,
		TLSHandshakeTimeout: o.DiscoveryTimeout,
	}}
}

// discoveryStale reports whether the list must be asked for before the
// next dial.
func (c *Client) discoveryStale() bool {
	if c.opts.DiscoveryURL == "" {
		return false
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.disc.stale
}

// goneAway notes, with c.mu held, that the gateway at addr sent the
// client away (it is draining): the list is asked for again before the
// next dial, with addr last should the answer still name it (a logic node
// caches the list for a second).
func (c *Client) goneAway(addr string) {
	if c.opts.DiscoveryURL != "" {
		c.disc.stale, c.disc.away = true, addr
	}
}

// discover asks DiscoveryURL for the gateways and makes them the list to
// dial, in the answer's order, followed by the Options.Addrs it does not
// name; the next dial starts at the first. On an error the list stays as
// it was, and is asked for again only when none of its gateways answers
// or one sends the client away: a reconnect to a gateway that works does
// not wait for a discovery endpoint that does not.
func (c *Client) discover(ctx context.Context) error {
	addrs, err := c.fetchGateways(ctx)
	c.mu.Lock()
	defer c.mu.Unlock()
	c.disc.stale = false
	if err != nil {
		c.log.Warn("sdk: gateway discovery failed; dialling the gateways known", "url", c.opts.DiscoveryURL, "err", err)
		return fmt.Errorf("sdk: gateway discovery: %w", err)
	}
	if i := slices.Index(addrs, c.disc.away); i >= 0 && len(addrs) > 1 {
		addrs = append(slices.Delete(addrs, i, i+1), c.disc.away)
	}
	for _, a := range c.opts.Addrs {
		if !slices.Contains(addrs, a) {
			addrs = append(addrs, a)
		}
	}
	c.addrs, c.preferred = addrs, 0
	c.disc.away = ""
	c.log.Debug("sdk: gateways discovered", "addrs", addrs)
	return nil
}

// fetchGateways asks DiscoveryURL, within DiscoveryTimeout, for the
// gateways' addresses: the plain-TCP ones, or the TLS ones when the
// client dials TLS, in the answer's order.
func (c *Client) fetchGateways(ctx context.Context) ([]string, error) {
	ctx, cancel := context.WithTimeout(ctx, c.opts.DiscoveryTimeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, c.opts.DiscoveryURL, nil)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Accept", "application/json")
	resp, err := c.disc.httpc.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	body := io.LimitReader(resp.Body, maxDiscoveryBody)
	if resp.StatusCode != http.StatusOK {
		_, _ = io.Copy(io.Discard, body)
		return nil, fmt.Errorf("HTTP %d", resp.StatusCode)
	}
	var ans struct {
		Gateways []struct {
			Addr    string `json:"addr"`
			TLSAddr string `json:"tls_addr"`
		} `json:"gateways"`
	}
	if err := json.NewDecoder(body).Decode(&ans); err != nil {
		return nil, fmt.Errorf("answer: %w", err)
	}
	var addrs []string
	for _, g := range ans.Gateways {
		a := g.Addr
		if c.opts.TLS != nil {
			a = g.TLSAddr
		}
		if a != "" && !slices.Contains(addrs, a) {
			addrs = append(addrs, a)
		}
	}
	if len(addrs) == 0 {
		if c.opts.TLS != nil {
			return nil, errors.New("no gateway listed with a TLS address")
		}
		return nil, errors.New("no gateway listed with a plain-TCP address")
	}
	return addrs, nil
}
