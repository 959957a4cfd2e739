package platform

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"sync"
	"time"

	"github.com/imd-dev/imd/internal/acl"
	"github.com/imd-dev/imd/internal/config"
)

// aclPollInterval is how often a node with Redis reads the lists there:
// a change made on one node applies on every other within it.
var aclPollInterval = time.Second

// aclSync keeps this node's lists in step with the copy in Redis.
type aclSync struct {
	mu   sync.Mutex // orders applying a PUT and a poll
	last []byte     // the Redis copy last applied; nil: none yet
	stop context.CancelFunc
	done chan struct{}
}

// openACL makes the node's lists from the config file; with Redis, lists
// that the admin API stored there take their place.
func (p *Platform) openACL(cfg config.Config) error {
	a, err := acl.New(cfg.ACL)
	if err != nil {
		return fmt.Errorf("config: %w", err)
	}
	p.acl = a
	if p.redis != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := p.pollACL(ctx); err != nil {
			p.log.Warn("acl: read the lists in redis; running with the config file's until the next poll", "err", err)
		}
	}
	return nil
}

// applyACL puts l in force on this node. Logic kicks the users it newly
// blocks (every logic node does, so a login that a node let in just
// before it learned of the change is kicked too); a gateway-only node only
// needs the address lists.
func (p *Platform) applyACL(ctx context.Context, l acl.Lists) error {
	if p.Logic != nil {
		return p.Logic.SetACL(ctx, l)
	}
	_, err := p.acl.Set(l)
	return err
}

// putACL applies lists that the admin API received: stored in Redis for
// every node when there is one, and in force here at once.
func (p *Platform) putACL(ctx context.Context, l acl.Lists) error {
	if p.redis == nil {
		return p.applyACL(ctx, l)
	}
	n, err := acl.New(l) // normalized, so that every node compares the same bytes
	if err != nil {
		return err
	}
	b, err := json.Marshal(n.Lists())
	if err != nil {
		return err
	}
	s := &p.aclSync
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := p.redis.SetACL(ctx, b); err != nil {
		return fmt.Errorf("acl: store in redis: %w", err)
	}
	s.last = b
	return p.applyACL(ctx, l)
}

// pollACL applies the lists stored in Redis when they changed since the
// last poll.
func (p *Platform) pollACL(ctx context.Context) error {
	b, err := p.redis.GetACL(ctx)
	if err != nil || b == nil {
		return err
	}
	s := &p.aclSync
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.last != nil && bytes.Equal(b, s.last) {
		return nil
	}
	var l acl.Lists
	if err := json.Unmarshal(b, &l); err != nil {
		s.last = b // do not log it every poll
		return fmt.Errorf("acl: the lists in redis do not parse: %w", err)
	}
	if err := p.applyACL(ctx, l); err != nil {
		s.last = b
		return err
	}
	s.last = b
	p.log.Info("acl: lists applied from redis", "ip_block", len(l.IPBlock), "ip_allow", len(l.IPAllow), "uid_block", len(l.UIDBlock))
	return nil
}

func (p *Platform) startACLPoll() {
	s := &p.aclSync
	ctx, cancel := context.WithCancel(context.Background())
	s.stop, s.done = cancel, make(chan struct{})
	go func() {
		defer close(s.done)
		t := time.NewTicker(aclPollInterval)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
			pctx, pcancel := context.WithTimeout(ctx, 5*time.Second)
			if err := p.pollACL(pctx); err != nil && ctx.Err() == nil {
				p.log.Warn("acl: poll redis", "err", err)
			}
			pcancel()
		}
	}()
}

func (p *Platform) stopACLPoll() {
	if s := &p.aclSync; s.stop != nil {
		s.stop()
		<-s.done
	}
}
