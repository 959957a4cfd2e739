package bench

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
)

// ProcStatus is the memory of a process as Linux reports it in
// /proc/<pid>/status, in bytes.
type ProcStatus struct {
	VmRSS   int64 `json:"vm_rss_bytes"` // resident set now
	VmHWM   int64 `json:"vm_hwm_bytes"` // peak resident set
	VmSize  int64 `json:"vm_size_bytes"`
	Threads int   `json:"threads"`
}

// ReadProcStatus reads /proc/<pid>/status (Linux only).
func ReadProcStatus(pid int) (ProcStatus, error) {
	f, err := os.Open("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return ProcStatus{}, fmt.Errorf("bench: %w", err)
	}
	defer f.Close()
	return ParseProcStatus(f)
}

// ParseProcStatus parses the text of /proc/<pid>/status. VmRSS is
// required; the other fields are filled in when present.
func ParseProcStatus(r io.Reader) (ProcStatus, error) {
	var st ProcStatus
	sawRSS := false
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		key, val, ok := strings.Cut(sc.Text(), ":")
		if !ok {
			continue
		}
		val = strings.TrimSpace(val)
		var dst *int64
		switch key {
		case "VmRSS":
			dst, sawRSS = &st.VmRSS, true
		case "VmHWM":
			dst = &st.VmHWM
		case "VmSize":
			dst = &st.VmSize
		case "Threads":
			n, err := strconv.Atoi(val)
			if err != nil {
				return ProcStatus{}, fmt.Errorf("bench: status Threads %q: %w", val, err)
			}
			st.Threads = n
			continue
		default:
			continue
		}
		num, unit, _ := strings.Cut(val, " ")
		n, err := strconv.ParseInt(num, 10, 64)
		if err != nil || (unit != "kB" && unit != "") {
			return ProcStatus{}, fmt.Errorf("bench: status %s %q does not parse", key, val)
		}
		if unit == "kB" {
			n *= 1024
		}
		*dst = n
	}
	if err := sc.Err(); err != nil {
		return ProcStatus{}, fmt.Errorf("bench: status: %w", err)
	}
	if !sawRSS {
		return ProcStatus{}, errors.New("bench: status has no VmRSS (a kernel thread or a zombie?)")
	}
	return st, nil
}

// EphemeralPortRange reads the kernel's range of local ports for outgoing
// connections (Linux: /proc/sys/net/ipv4/ip_local_port_range). One source
// address can hold hi-lo+1 connections to one server address.
func EphemeralPortRange() (lo, hi int, err error) {
	b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range")
	if err != nil {
		return 0, 0, fmt.Errorf("bench: %w", err)
	}
	return parsePortRange(string(b))
}

func parsePortRange(s string) (lo, hi int, err error) {
	f := strings.Fields(s)
	if len(f) != 2 {
		return 0, 0, fmt.Errorf("bench: port range %q does not parse", s)
	}
	lo, err1 := strconv.Atoi(f[0])
	hi, err2 := strconv.Atoi(f[1])
	if err1 != nil || err2 != nil || lo < 1 || hi > 65535 || lo > hi {
		return 0, 0, fmt.Errorf("bench: port range %q does not parse", s)
	}
	return lo, hi, nil
}
