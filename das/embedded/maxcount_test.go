package embedded

import (
	"testing"

	"github.com/imd-dev/imd/das"
	"github.com/imd-dev/imd/das/dastest"
)

// TestMaxCountConformance: Retention.MaxCount as the conformance suite
// checks it on every engine.
func TestMaxCountConformance(t *testing.T) {
	dastest.RunMaxCount(t, func(t *testing.T) das.Store {
		return openTest(t, Options{JanitorInterval: -1, Retention: das.Retention{MaxCount: dastest.MaxCount}})
	}, func(t *testing.T, s das.Store) {
		t.Helper()
		if _, err := s.(*Store).Sweep(ctx); err != nil {
			t.Fatalf("Sweep: %v", err)
		}
	})
}
