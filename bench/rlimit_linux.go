package bench

import (
	"fmt"
	"syscall"
)

// RaiseFileLimit raises this process's soft limit on open files to the
// hard limit and returns both. Child processes inherit the new limit.
func RaiseFileLimit() (soft, hard uint64, err error) {
	var rl syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &rl); err != nil {
		return 0, 0, fmt.Errorf("bench: getrlimit: %w", err)
	}
	if rl.Cur < rl.Max {
		want := rl
		want.Cur = want.Max
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &want); err != nil {
			return rl.Cur, rl.Max, fmt.Errorf("bench: setrlimit to %d: %w", want.Cur, err)
		}
		rl = want
	}
	return rl.Cur, rl.Max, nil
}
