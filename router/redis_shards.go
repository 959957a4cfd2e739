package router

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
)

// ShardRuns returns the run id (the run_id of INFO server) of each master
// the router's Redis is made of, by address: one entry for a single Redis,
// one per master of a Redis Cluster. A Redis server draws a new run id
// each time it starts, so an address whose run id changed is a master that
// restarted: the router keeps nothing on disk, so the sessions, gate index
// entries and presence of its slots are gone (a replica promoted in its
// place may also miss the latest writes). Gateways then announce their
// sessions again; ShardRestarts compares two results.
//
// Masters are asked side by side. Those that do not answer (down,
// restarting) are left out of the map and named in the error, which comes
// with the map of the others.
func (r *Redis) ShardRuns(ctx context.Context) (map[string]string, error) {
	type answer struct {
		addr, run string
		master    bool
		err       error
	}
	nodes := r.c.Nodes()
	out := make(chan answer, len(nodes))
	var wg sync.WaitGroup
	for addr, n := range nodes {
		wg.Go(func() {
			res := n.DoMulti(ctx, n.B().Role().Build(), n.B().Info().Section("server").Build())
			a := answer{addr: addr}
			role, err := res[0].ToArray()
			if err == nil && len(role) > 0 {
				var s string
				s, err = role[0].ToString()
				a.master = s == "master"
			}
			var info string
			if err == nil {
				info, err = res[1].ToString()
			}
			if err == nil {
				a.run = infoField(info, "run_id")
				if a.run == "" {
					err = errors.New("INFO server has no run_id")
				}
			}
			if err != nil {
				a.err = fmt.Errorf("%s: %w", addr, err)
			}
			out <- a
		})
	}
	wg.Wait()
	close(out)
	runs := make(map[string]string, len(nodes))
	var errs []error
	for a := range out {
		switch {
		case a.err != nil:
			errs = append(errs, a.err)
		case a.master:
			runs[a.addr] = a.run
		}
	}
	if len(errs) > 0 {
		return runs, fmt.Errorf("router: redis shard runs: %w", errors.Join(errs...))
	}
	return runs, nil
}

// infoField returns the value of "name:value" in an INFO reply.
func infoField(info, name string) string {
	for line := range strings.Lines(info) {
		if v, ok := strings.CutPrefix(line, name+":"); ok {
			return strings.TrimSpace(v)
		}
	}
	return ""
}

// ShardRestarts returns, sorted, the addresses of now (a ShardRuns result)
// whose master restarted since known (the run ids seen so far): a run id
// other than the one known, or a master at an address not known at all (a
// replica promoted, or a master added, either of which may lack entries of
// its slots). With nothing known yet, nothing restarted. Addresses of known
// that are missing from now (down, or no longer masters) are not counted:
// a master that comes back is, with its new run id.
func ShardRestarts(known, now map[string]string) []string {
	if len(known) == 0 {
		return nil
	}
	var out []string
	for addr, run := range now {
		if known[addr] != run {
			out = append(out, addr)
		}
	}
	slices.Sort(out)
	return out
}
