package das

import (
	"context"
	"sync"
)

// Gate admits calls to an engine until the engine closes: Shut waits for
// the calls in flight, and calls after it get ErrClosed. The zero Gate is
// open.
type Gate struct {
	mu   sync.RWMutex
	shut bool
}

// Enter admits a call; it fails after Shut and for a done ctx. On success
// the caller must call Exit.
func (g *Gate) Enter(ctx context.Context) error {
	g.mu.RLock()
	if g.shut {
		g.mu.RUnlock()
		return ErrClosed
	}
	if err := ctx.Err(); err != nil {
		g.mu.RUnlock()
		return err
	}
	return nil
}

// Exit ends a call that Enter admitted.
func (g *Gate) Exit() { g.mu.RUnlock() }

// Shut waits for the calls in flight and refuses later ones.
func (g *Gate) Shut() {
	g.mu.Lock()
	g.shut = true
	g.mu.Unlock()
}
