package vm

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/firerunner/firerunner/internal/guestconfig"
)

// Milestone is one step of a VM's life as seen from the host. The driver
// marks the host-side ones (prepared, VMM started, VMM exited); a
// ConsoleWatcher marks the guest-side ones when their console line appears.
type Milestone int

// Milestones in the order they normally happen.
const (
	MilestoneImageReady Milestone = iota // the caller has a built image
	MilestonePrepared                    // per-VM files (config drive, dir) ready
	MilestoneVMMStarted                  // VMM process running
	MilestoneKernel                      // guest kernel: "Linux version"
	MilestoneInit                        // guest kernel runs the initramfs /init
	MilestoneAgentStart                  // guestconfig.MarkerAgentStart
	MilestoneJobStart                    // guestconfig.MarkerJobStart
	MilestoneJobEnd                      // guestconfig.MarkerJobEnd
	MilestoneExit                        // guestconfig.ExitMarker
	MilestonePowerOff                    // guestconfig.MarkerPowerOff
	MilestoneVMMExited                   // VMM process gone
	MilestoneDestroyed                   // Destroy finished: nothing left
	numMilestones
)

var milestoneNames = [numMilestones]string{
	"image ready", "vm prepared", "vmm started", "guest kernel", "guest init",
	"agent start", "job start", "job end", "exit status", "guest poweroff",
	"vmm exited", "vm destroyed",
}

func (m Milestone) String() string {
	if m < 0 || m >= numMilestones {
		return "milestone(" + strconv.Itoa(int(m)) + ")"
	}
	return milestoneNames[m]
}

// consoleMilestones maps a console line substring to its milestone.
var consoleMilestones = []struct {
	m   Milestone
	sub string
}{
	{MilestoneKernel, "Linux version "},
	{MilestoneInit, " as init process"},       // kernel: "Run /init as init process"
	{MilestoneInit, "FIRERUNNER-INIT: start"}, // initramfs /init, when the kernel is quiet
	{MilestoneAgentStart, guestconfig.MarkerAgentStart},
	{MilestoneJobStart, guestconfig.MarkerJobStart},
	{MilestoneJobEnd, guestconfig.MarkerJobEnd},
	{MilestoneExit, guestconfig.ExitMarker},
	{MilestonePowerOff, guestconfig.MarkerPowerOff},
}

// Timeline records when each milestone first happened. It is safe for
// concurrent use; the zero value is ready.
type Timeline struct {
	mu sync.Mutex
	at [numMilestones]time.Time
}

// Mark records m now unless it was recorded before.
func (t *Timeline) Mark(m Milestone) { t.MarkAt(m, time.Now()) }

// MarkAt records m at the given time unless it was recorded before; it
// reports whether this call recorded it.
func (t *Timeline) MarkAt(m Milestone, at time.Time) bool {
	if m < 0 || m >= numMilestones {
		return false
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if !t.at[m].IsZero() {
		return false
	}
	t.at[m] = at
	return true
}

// At returns when m happened.
func (t *Timeline) At(m Milestone) (time.Time, bool) {
	if m < 0 || m >= numMilestones {
		return time.Time{}, false
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.at[m], !t.at[m].IsZero()
}

// Stage is one recorded milestone with its offsets.
type Stage struct {
	Milestone Milestone
	At        time.Time
	// SincePrev is the time since the previous recorded milestone (the
	// duration of this stage); SinceStart since the first one.
	SincePrev, SinceStart time.Duration
}

// Stages lists the recorded milestones in order.
func (t *Timeline) Stages() []Stage {
	t.mu.Lock()
	defer t.mu.Unlock()
	var out []Stage
	var first, prev time.Time
	for m := Milestone(0); m < numMilestones; m++ {
		at := t.at[m]
		if at.IsZero() {
			continue
		}
		if first.IsZero() {
			first, prev = at, at
		}
		out = append(out, Stage{Milestone: m, At: at, SincePrev: at.Sub(prev), SinceStart: at.Sub(first)})
		prev = at
	}
	return out
}

// Between is the time from a to b, and false unless both were recorded.
func (t *Timeline) Between(a, b Milestone) (time.Duration, bool) {
	ta, ok1 := t.At(a)
	tb, ok2 := t.At(b)
	return tb.Sub(ta), ok1 && ok2
}

// String renders the timeline as a small table, one stage per line:
// "  +12.345s  (+1.234s)  agent start".
func (t *Timeline) String() string {
	var b strings.Builder
	for _, s := range t.Stages() {
		fmt.Fprintf(&b, "  %+9.3fs  (%+8.3fs)  %s\n", s.SinceStart.Seconds(), s.SincePrev.Seconds(), s.Milestone)
	}
	return b.String()
}

// TimelineSource is implemented by drivers that keep a Timeline for the VMs
// they started in this process (the controller and demo type-assert to it).
// Fetch it before Destroy: the driver forgets the VM then, but the returned
// Timeline stays valid and gets MilestoneDestroyed.
type TimelineSource interface {
	Timeline(id string) (*Timeline, bool)
}

// summaryStages are the acceptance-level stages; each may fall back to a
// nearby milestone when the preferred one was not seen (e.g. a quiet kernel).
var summaryStages = []struct {
	name string
	ms   []Milestone
}{
	{"image ready", []Milestone{MilestoneImageReady, MilestonePrepared}},
	{"VM process started", []Milestone{MilestoneVMMStarted}},
	{"guest kernel init", []Milestone{MilestoneInit, MilestoneKernel}},
	{"agent start", []Milestone{MilestoneAgentStart}},
	{"command done", []Milestone{MilestoneJobEnd, MilestoneExit}},
	{"VM gone", []Milestone{MilestoneDestroyed, MilestoneVMMExited}},
}

// Summary renders the six stages a human wants (image ready, VM process
// started, guest kernel init, agent start, command done, VM gone), each with
// its time since the first and the duration of the stage that ended there.
func (t *Timeline) Summary() string {
	var b strings.Builder
	var first, prev time.Time
	for _, st := range summaryStages {
		var at time.Time
		for _, m := range st.ms {
			if a, ok := t.At(m); ok {
				at = a
				break
			}
		}
		if at.IsZero() {
			fmt.Fprintf(&b, "  %-19s        -\n", st.name)
			continue
		}
		if first.IsZero() {
			first, prev = at, at
		}
		fmt.Fprintf(&b, "  %-19s %+8.3fs  (stage %.3fs)\n", st.name, at.Sub(first).Seconds(), at.Sub(prev).Seconds())
		prev = at
	}
	return b.String()
}

// ConsoleWatcher tails a console log file and marks guest milestones on a
// Timeline when their line first appears. Times are host observation times,
// accurate to the poll interval.
type ConsoleWatcher struct {
	path     string
	tl       *Timeline
	interval time.Duration

	stop chan struct{}
	done chan struct{}
	once sync.Once
}

// DefaultConsolePoll is how often a ConsoleWatcher looks for new output.
const DefaultConsolePoll = 20 * time.Millisecond

// WatchConsole starts watching path (which may not exist yet) and marking
// milestones on tl. interval <= 0 means DefaultConsolePoll. Call Stop.
func WatchConsole(path string, tl *Timeline, interval time.Duration) *ConsoleWatcher {
	if interval <= 0 {
		interval = DefaultConsolePoll
	}
	w := &ConsoleWatcher{path: path, tl: tl, interval: interval, stop: make(chan struct{}), done: make(chan struct{})}
	go w.run()
	return w
}

// Stop reads whatever output is left, then stops the watcher. It is safe to
// call more than once.
func (w *ConsoleWatcher) Stop() {
	w.once.Do(func() { close(w.stop) })
	<-w.done
}

func (w *ConsoleWatcher) run() {
	defer close(w.done)
	var (
		f       *os.File
		partial []byte
		buf     = make([]byte, 64<<10)
	)
	defer func() {
		if f != nil {
			f.Close()
		}
	}()
	drain := func() {
		if f == nil {
			var err error
			if f, err = os.Open(w.path); err != nil {
				f = nil
				return
			}
		}
		for {
			n, err := f.Read(buf)
			if n > 0 {
				now := time.Now()
				partial = append(partial, buf[:n]...)
				for {
					i := bytes.IndexByte(partial, '\n')
					if i < 0 {
						break
					}
					w.line(partial[:i], now)
					partial = partial[i+1:]
				}
				// A marker is visible before its newline arrives; match the
				// partial line too, but bound it (job output can be huge).
				if len(partial) > 0 {
					w.line(partial, now)
				}
				if len(partial) > 4096 {
					partial = partial[len(partial)-4096:]
				}
			}
			if err != nil || n == 0 {
				return
			}
		}
	}
	t := time.NewTicker(w.interval)
	defer t.Stop()
	for {
		select {
		case <-w.stop:
			drain()
			return
		case <-t.C:
			drain()
		}
	}
}

func (w *ConsoleWatcher) line(l []byte, at time.Time) {
	for _, c := range consoleMilestones {
		if bytes.Contains(l, []byte(c.sub)) {
			w.tl.MarkAt(c.m, at)
		}
	}
}

// ConsoleExitCode returns the guest workload's exit status from a console
// log: the last line starting with guestconfig.ExitMarker (the agent prints
// it after the workload ended, so a job echoing a fake marker earlier cannot
// override it). It returns -1, false when there is none.
func ConsoleExitCode(path string) (int, bool, error) {
	f, err := os.Open(path)
	if errors.Is(err, fs.ErrNotExist) {
		return -1, false, nil
	}
	if err != nil {
		return -1, false, err
	}
	defer f.Close()
	return scanExitCode(f)
}

func scanExitCode(r io.Reader) (int, bool, error) {
	code, found := -1, false
	br := bufio.NewReaderSize(r, 64<<10)
	marker := []byte(guestconfig.ExitMarker)
	for {
		line, err := br.ReadSlice('\n')
		if errors.Is(err, bufio.ErrBufferFull) {
			// An over-long line is job output, not a marker: skip the rest.
			for errors.Is(err, bufio.ErrBufferFull) {
				_, err = br.ReadSlice('\n')
			}
			line = nil
		}
		line = bytes.Trim(line, "\r\n") // serial consoles add stray '\r's
		if rest, ok := bytes.CutPrefix(line, marker); ok {
			if n, perr := strconv.Atoi(strings.TrimSpace(string(rest))); perr == nil {
				code, found = n, true
			}
		}
		if err == io.EOF {
			return code, found, nil
		}
		if err != nil {
			return code, found, err
		}
	}
}
