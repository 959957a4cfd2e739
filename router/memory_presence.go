package router

import (
	"context"
	"sync"
)

// memSubs holds the presence subscriptions of the in-process router: per
// followed user the sessions that follow it, and per session the users it
// follows so that its list can be replaced and dropped.
type memSubs struct {
	mu        sync.Mutex
	followers map[User]map[sessionKey]Session
	follows   map[sessionKey][]User
}

// States implements Presence.
func (m *Memory) States(_ context.Context, us []User) ([]State, error) {
	out := make([]State, len(us))
	for i, u := range us {
		sh := m.shard(u)
		sh.mu.RLock()
		if l := sh.users[u]; len(l) > 0 {
			out[i].Sessions = append([]Session(nil), l...)
		}
		out[i].Version = sh.ver[u]
		sh.mu.RUnlock()
	}
	return out, nil
}

// Follow implements Presence.
func (m *Memory) Follow(_ context.Context, sub Session, us []User) error {
	k := keyOf(&sub)
	p := &m.subs
	p.mu.Lock()
	defer p.mu.Unlock()
	p.dropLocked(k)
	if len(us) == 0 {
		return nil
	}
	if p.followers == nil {
		p.followers = make(map[User]map[sessionKey]Session)
		p.follows = make(map[sessionKey][]User)
	}
	list := make([]User, 0, len(us))
	for _, u := range us {
		f := p.followers[u]
		if f == nil {
			f = make(map[sessionKey]Session)
			p.followers[u] = f
		}
		if _, dup := f[k]; !dup {
			f[k] = sub
			list = append(list, u)
		}
	}
	p.follows[k] = list
	return nil
}

// Unfollow implements Presence.
func (m *Memory) Unfollow(_ context.Context, sub Session) error {
	p := &m.subs
	p.mu.Lock()
	p.dropLocked(keyOf(&sub))
	p.mu.Unlock()
	return nil
}

func (p *memSubs) dropLocked(k sessionKey) {
	for _, u := range p.follows[k] {
		f := p.followers[u]
		delete(f, k)
		if len(f) == 0 {
			delete(p.followers, u)
		}
	}
	delete(p.follows, k)
}

// Followers implements Presence.
func (m *Memory) Followers(_ context.Context, u User) ([]Session, error) {
	p := &m.subs
	p.mu.Lock()
	defer p.mu.Unlock()
	f := p.followers[u]
	if len(f) == 0 {
		return nil, nil
	}
	out := make([]Session, 0, len(f))
	for _, s := range f {
		out = append(out, s)
	}
	return out, nil
}
