//go:build !linux

package bench

import "errors"

// RaiseFileLimit is only implemented on Linux, the platform imbench
// measures on.
func RaiseFileLimit() (soft, hard uint64, err error) {
	return 0, 0, errors.New("bench: RaiseFileLimit is implemented on Linux only")
}
