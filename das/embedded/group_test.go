package embedded

import (
	"testing"
	"time"

	"github.com/imd-dev/imd/das"
	"github.com/imd-dev/imd/das/dastest"
)

func TestGroupConformance(t *testing.T) {
	dastest.RunGroups(t, func(t *testing.T) das.GroupStore {
		return openTest(t, Options{JanitorInterval: -1})
	})
}

// TestGroupConformanceBusyJanitor runs the group suite while the janitor
// sweeps every millisecond (group retention and idempotency expiry with
// bounds the suite never reaches).
func TestGroupConformanceBusyJanitor(t *testing.T) {
	if testing.Short() {
		t.Skip("short")
	}
	dastest.RunGroups(t, func(t *testing.T) das.GroupStore {
		return openTest(t, Options{
			JanitorInterval: time.Millisecond,
			Retention:       das.Retention{MaxAge: 24 * time.Hour, IdempotencyTTL: time.Hour},
		})
	})
}
