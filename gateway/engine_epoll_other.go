//go:build !linux

package gateway

// defaultEngine is the engine used when none is configured.
const defaultEngine = EngineGoroutine

// newEpollEngine returns nil: epoll is Linux only, and the gateway falls
// back to the goroutine engine.
func newEpollEngine(*Server) engine { return nil }
