package bench

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"time"
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

// clockTicks is USER_HZ, the unit of the CPU times in /proc/<pid>/stat.
// Linux fixes it at 100 for user space whatever the kernel's own tick
// rate (sysconf(_SC_CLK_TCK) answers 100 on every mainstream platform).
const clockTicks = 100

// ProcCPU is the CPU time a process used so far, from /proc/<pid>/stat:
// user and system time of all its threads, in clock ticks of 10 ms.
type ProcCPU struct {
	User   time.Duration
	System time.Duration
}

// Total is user plus system time.
func (c ProcCPU) Total() time.Duration { return c.User + c.System }

// ReadProcCPU reads the CPU time of process pid from /proc/<pid>/stat
// (Linux only). It costs the measured process nothing, unlike a scrape of
// its metrics, and has the same 10 ms resolution as the
// process_cpu_seconds_total of Go's Prometheus client.
func ReadProcCPU(pid int) (ProcCPU, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return ProcCPU{}, fmt.Errorf("bench: %w", err)
	}
	return ParseProcStat(string(b))
}

// ParseProcStat parses the text of /proc/<pid>/stat for the CPU times
// (fields 14 and 15, utime and stime). The command name in parentheses may
// hold spaces and parentheses itself, so fields are counted from its last
// closing parenthesis.
func ParseProcStat(s string) (ProcCPU, error) {
	end := strings.LastIndexByte(s, ')')
	if end < 0 {
		return ProcCPU{}, fmt.Errorf("bench: stat %.40q has no command name", s)
	}
	// After the name: state (field 3), ppid (4), ... utime (14), stime (15).
	f := strings.Fields(s[end+1:])
	if len(f) < 13 {
		return ProcCPU{}, fmt.Errorf("bench: stat has %d fields after the name, want at least 13", len(f))
	}
	ut, err1 := strconv.ParseUint(f[11], 10, 64)
	st, err2 := strconv.ParseUint(f[12], 10, 64)
	if err1 != nil || err2 != nil {
		return ProcCPU{}, fmt.Errorf("bench: stat utime %q stime %q do not parse", f[11], f[12])
	}
	tick := time.Second / clockTicks
	return ProcCPU{User: time.Duration(ut) * tick, System: time.Duration(st) * tick}, nil
}
