package scenario

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"sync"
	"time"

	"github.com/imd-dev/imd/bench"
)

// A scenario whose connections do not fit in one process (open files)
// re-executes the running program with WorkerArgs as worker processes. A
// worker reads its plan from the environment (EnvWorkerPlan), writes one
// JSON workerMsg per line on stdout, and closes its connections and exits
// when its stdin closes, so it never outlives the parent. A program that
// runs the Conns scenario with workers must therefore call RunWorker when
// it is started with WorkerArgs (cmd/imbench has a hidden worker command).

// EnvWorkerPlan is the environment variable that carries a worker's plan.
const EnvWorkerPlan = "IMBENCH_WORKER_PLAN"

// WorkerArgs are the arguments a worker process is started with.
var WorkerArgs = []string{"worker"}

// workerMsg is one line of a worker's stdout.
type workerMsg struct {
	Opened  int64       `json:"opened"`
	Failed  int64       `json:"failed"`
	Dropped int64       `json:"dropped"`
	RSS     int64       `json:"rss"`
	Result  *openResult `json:"result,omitempty"` // once every connection was attempted
	Closed  bool        `json:"closed,omitempty"` // connections closed; exiting
	Fatal   string      `json:"fatal,omitempty"`
}

// RunWorker is a worker process: it opens the connections of the plan in
// planJSON, reports on stdout, and closes them and returns once stdin
// closes (or ctx ends).
func RunWorker(ctx context.Context, planJSON string, stdin io.Reader, stdout, stderr io.Writer) error {
	var enc struct {
		sync.Mutex
		*json.Encoder
	}
	enc.Encoder = json.NewEncoder(stdout)
	emit := func(m workerMsg) {
		enc.Lock()
		defer enc.Unlock()
		_ = enc.Encode(m)
	}
	var p plan
	if err := json.Unmarshal([]byte(planJSON), &p); err != nil {
		emit(workerMsg{Fatal: "bad plan: " + err.Error()})
		return fmt.Errorf("worker: %s: %w", EnvWorkerPlan, err)
	}
	if _, _, err := bench.RaiseFileLimit(); err != nil {
		fmt.Fprintln(stderr, "imbench worker:", err)
	}

	// The parent closes our stdin to end us (or dies, which closes it too).
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() {
		_, _ = io.Copy(io.Discard, stdin)
		cancel()
	}()

	o := newOpener(p)
	status := func() workerMsg {
		pr := o.progress()
		m := workerMsg{Opened: pr.Opened, Failed: pr.Failed, Dropped: pr.Dropped}
		if st, err := bench.ReadProcStatus(selfPID); err == nil {
			m.RSS = st.VmRSS
		}
		return m
	}
	emit(status()) // the parent takes this RSS as the worker's baseline
	tick := time.NewTicker(500 * time.Millisecond)
	defer tick.Stop()
	go func() {
		for {
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
				emit(status())
			}
		}
	}()
	res := o.run(ctx)
	m := status()
	m.Result = res
	emit(m)
	<-ctx.Done()
	o.closeAll()
	m = status()
	m.Closed = true
	emit(m)
	return nil
}

// workerFleet drives worker processes.
type workerFleet struct {
	procs []*workerProc
}

type workerProc struct {
	cmd   *exec.Cmd
	stdin io.WriteCloser

	mu      sync.Mutex
	last    workerMsg
	baseRSS int64 // from the first report, sent before opening anything
	result  *openResult
	err     error
	exited  chan struct{}
}

// startWorkers starts one worker per plan.
func startWorkers(plans []plan, stderr io.Writer) (*workerFleet, error) {
	exe, err := os.Executable()
	if err != nil {
		return nil, err
	}
	f := &workerFleet{}
	for i, p := range plans {
		js, err := json.Marshal(p)
		if err != nil {
			return nil, err
		}
		cmd := exec.Command(exe, WorkerArgs...)
		cmd.Env = append(os.Environ(), EnvWorkerPlan+"="+string(js))
		cmd.Stderr = stderr
		cmd.SysProcAttr = childAttr()
		stdin, err := cmd.StdinPipe()
		if err != nil {
			return nil, err
		}
		stdout, err := cmd.StdoutPipe()
		if err != nil {
			return nil, err
		}
		if err := cmd.Start(); err != nil {
			_ = f.close()
			return nil, fmt.Errorf("worker %d: %w", i, err)
		}
		w := &workerProc{cmd: cmd, stdin: stdin, exited: make(chan struct{})}
		f.procs = append(f.procs, w)
		go w.read(stdout)
	}
	return f, nil
}

func (w *workerProc) read(r io.Reader) {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 16<<20)
	for sc.Scan() {
		var m workerMsg
		if err := json.Unmarshal(sc.Bytes(), &m); err != nil {
			w.mu.Lock()
			w.err = fmt.Errorf("worker %d: bad report: %w", w.cmd.Process.Pid, err)
			w.mu.Unlock()
			continue
		}
		w.mu.Lock()
		if w.baseRSS == 0 {
			w.baseRSS = m.RSS
		}
		w.last = m
		if m.Result != nil {
			w.result = m.Result
		}
		if m.Fatal != "" {
			w.err = fmt.Errorf("worker %d: %s", w.cmd.Process.Pid, m.Fatal)
		}
		w.mu.Unlock()
	}
	err := w.cmd.Wait()
	w.mu.Lock()
	if err != nil && w.err == nil && !w.last.Closed {
		w.err = fmt.Errorf("worker %d: %w", w.cmd.Process.Pid, err)
	}
	w.mu.Unlock()
	close(w.exited)
}

func (f *workerFleet) progress() progress {
	p := progress{Done: true}
	for _, w := range f.procs {
		w.mu.Lock()
		p.Opened += w.last.Opened
		p.Failed += w.last.Failed
		p.Dropped += w.last.Dropped
		p.ClientRSS += w.last.RSS
		p.ClientRSSBase += w.baseRSS
		if w.result == nil {
			p.Done = false
		}
		w.mu.Unlock()
	}
	return p
}

func (f *workerFleet) wait(ctx context.Context) (*openResult, error) {
	res := &openResult{}
	for _, w := range f.procs {
		for {
			w.mu.Lock()
			r, err := w.result, w.err
			w.mu.Unlock()
			if err != nil {
				return nil, err
			}
			if r != nil {
				res.merge(r)
				break
			}
			select {
			case <-ctx.Done():
				return nil, ctx.Err()
			case <-w.exited:
				w.mu.Lock()
				r, err = w.result, w.err
				w.mu.Unlock()
				if r == nil && err == nil {
					return nil, fmt.Errorf("worker %d exited before reporting", w.cmd.Process.Pid)
				}
			case <-time.After(100 * time.Millisecond):
			}
		}
	}
	return res, nil
}

// close ends every worker: their stdin closes, they close their
// connections and exit; one that lingers is killed.
func (f *workerFleet) close() error {
	for _, w := range f.procs {
		_ = w.stdin.Close()
	}
	var errs []error
	deadline := time.Now().Add(30 * time.Second)
	for _, w := range f.procs {
		select {
		case <-w.exited:
		case <-time.After(time.Until(deadline)):
			_ = w.cmd.Process.Kill()
			<-w.exited
			errs = append(errs, fmt.Errorf("worker %d did not exit; killed", w.cmd.Process.Pid))
		}
		w.mu.Lock()
		if w.err != nil {
			errs = append(errs, w.err)
		}
		w.mu.Unlock()
	}
	return errors.Join(errs...)
}
