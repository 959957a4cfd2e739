package sdk

import (
	"testing"

	"github.com/imd-dev/imd/schema"
)

// TestIsRetryable: what a send retries and what it gives up on.
func TestIsRetryable(t *testing.T) {
	for _, c := range []struct {
		err  error
		want bool
	}{
		{schema.Errorf(schema.StatusUnavailable, "x"), true},
		{schema.Errorf(schema.StatusNotLoggedIn, "x"), true},
		{schema.Errorf(schema.StatusBadRecipient, "x"), false},
		{schema.Errorf(schema.StatusBodyTooLarge, "x"), false},
		{ErrConnLost, true},
		{ErrClosed, false},
	} {
		if got := IsRetryable(c.err); got != c.want {
			t.Errorf("IsRetryable(%v) = %v, want %v", c.err, got, c.want)
		}
	}
}
