package bench

import (
	"os"
	"runtime"
	"strings"
	"testing"
	"time"
)

const statusText = `Name:	imd
Umask:	0022
State:	S (sleeping)
Pid:	4242
VmPeak:	 1300000 kB
VmSize:	 1234567 kB
VmHWM:	  204800 kB
VmRSS:	  102400 kB
RssAnon:	   90000 kB
Threads:	9
voluntary_ctxt_switches:	10
`

func TestParseProcStatus(t *testing.T) {
	st, err := ParseProcStatus(strings.NewReader(statusText))
	if err != nil {
		t.Fatal(err)
	}
	want := ProcStatus{VmRSS: 102400 << 10, VmHWM: 204800 << 10, VmSize: 1234567 << 10, Threads: 9}
	if st != want {
		t.Fatalf("got %+v, want %+v", st, want)
	}
	for _, bad := range []string{
		"Name:\tx\nThreads:\t1\n", // no VmRSS
		"VmRSS:\tlots kB\n",
		"VmRSS:\t12 MB\n",
		"VmRSS:\t1 kB\nThreads:\tmany\n",
	} {
		if _, err := ParseProcStatus(strings.NewReader(bad)); err == nil {
			t.Errorf("ParseProcStatus(%q) should fail", bad)
		}
	}
}

func TestReadProcStatusSelf(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("needs /proc")
	}
	st, err := ReadProcStatus(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	if st.VmRSS < 1<<20 || st.VmHWM < st.VmRSS || st.Threads < 1 {
		t.Fatalf("implausible status of this test process: %+v", st)
	}
	if _, err := ReadProcStatus(-1); err == nil {
		t.Fatal("pid -1 should fail")
	}
}

func TestPortRange(t *testing.T) {
	lo, hi, err := parsePortRange("32768\t60999\n")
	if err != nil || lo != 32768 || hi != 60999 {
		t.Fatalf("parsePortRange = %d, %d, %v", lo, hi, err)
	}
	for _, bad := range []string{"", "1", "a b", "60999 32768", "0 10", "1 70000"} {
		if _, _, err := parsePortRange(bad); err == nil {
			t.Errorf("parsePortRange(%q) should fail", bad)
		}
	}
	if runtime.GOOS == "linux" {
		if lo, hi, err := EphemeralPortRange(); err != nil || hi-lo < 100 {
			t.Errorf("EphemeralPortRange = %d, %d, %v", lo, hi, err)
		}
	}
}

func TestRaiseFileLimit(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("linux only")
	}
	soft, hard, err := RaiseFileLimit()
	if err != nil {
		t.Fatal(err)
	}
	if soft != hard || soft == 0 {
		t.Fatalf("after raising, soft %d hard %d", soft, hard)
	}
}

func TestParseProcStat(t *testing.T) {
	// A command name with a space and a parenthesis, as a process may name
	// itself; utime 250 ticks, stime 75.
	line := "4242 (imd (all) x) S 1 4242 4242 0 -1 4194560 1200 0 0 0 250 75 0 0 20 0 9 0 100 1234567 25600 18446744073709551615\n"
	c, err := ParseProcStat(line)
	if err != nil {
		t.Fatal(err)
	}
	if c.User != 2500*time.Millisecond || c.System != 750*time.Millisecond || c.Total() != 3250*time.Millisecond {
		t.Fatalf("got %+v", c)
	}
	for _, bad := range []string{"", "1 (x) S 1 2", "1 (x) S 1 4242 4242 0 -1 4194560 1200 0 0 0 lots 75 0"} {
		if _, err := ParseProcStat(bad); err == nil {
			t.Errorf("ParseProcStat(%q) should fail", bad)
		}
	}
}

func TestReadProcCPUSelf(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("needs /proc")
	}
	c0, err := ReadProcCPU(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	// Spin until the ticks show it (the cores may be shared).
	var c1 ProcCPU
	for start := time.Now(); time.Since(start) < 5*time.Second; {
		if c1, err = ReadProcCPU(os.Getpid()); err != nil {
			t.Fatal(err)
		}
		if c1.Total()-c0.Total() >= 50*time.Millisecond {
			break
		}
	}
	if d := c1.Total() - c0.Total(); d < 50*time.Millisecond || d > 10*time.Second {
		t.Fatalf("spinning counted as %s", d)
	}
}
