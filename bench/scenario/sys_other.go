//go:build !linux

package scenario

import (
	"syscall"
	"time"
)

func bindNoPort(_, _ string, _ syscall.RawConn) error { return nil }

func childAttr() *syscall.SysProcAttr { return nil }

func selfCPU() time.Duration { return 0 }
