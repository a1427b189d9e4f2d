package vm

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/firerunner/firerunner/internal/guestconfig"
)

// Milestone is one step of a VM's life as seen from the host. The driver
// marks the host-side ones (prepared, VMM started, VMM exited); a
// ConsoleWatcher marks the guest-side ones when their console line appears.
type Milestone int

// Milestones in the order they normally happen.
const (
	MilestoneImageReady  Milestone = iota // the caller has a built image
	MilestonePrepared                     // per-VM files (config drive, dir) ready
	MilestoneVMMStarted                   // VMM process running
	MilestoneKernel                       // guest kernel: "Linux version"
	MilestoneInit                         // guest kernel runs the initramfs /init
	MilestoneAgentStart                   // guestconfig.MarkerAgentStart
	MilestoneJobStart                     // guestconfig.MarkerJobStart
	MilestoneJobEnd                       // guestconfig.MarkerJobEnd
	MilestoneExit                         // guestconfig.ExitMarker
	MilestonePowerOff                     // guestconfig.MarkerPowerOff
	MilestoneVMMExited                    // VMM process gone
	MilestoneDestroyed                    // Destroy finished: nothing left
	MilestoneWarm                         // guestconfig.MarkerWarm: a warm VM's gitlab-runner waits for its config
	MilestoneDockerReady                  // guestconfig.MarkerDockerReady: dockerd answers, helper image loaded
	numMilestones
)

var milestoneNames = [numMilestones]string{
	"image ready", "vm prepared", "vmm started", "guest kernel", "guest init",
	"agent start", "job start", "job end", "exit status", "guest poweroff",
	"vmm exited", "vm destroyed", "warm ready", "docker ready",
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
	{MilestoneWarm, guestconfig.MarkerWarm},
	{MilestoneDockerReady, guestconfig.MarkerDockerReady},
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

// Console logs are bounded in size (issue 11). How, and why this way:
//
// Both VMMs write the guest's serial console straight into the per-VM
// console log: QEMU itself (-chardev file,append=on) and Firecracker as its
// stdout (a file opened O_APPEND). No FireRunner process sits in between,
// so a VM keeps running, and logging, across a FireRunner restart, and its
// exit marker is in the file for the next FireRunner to read. A pipe or
// FIFO with a FireRunner reader would lose that: while no reader is
// attached the VMM's writes fail (EPIPE) or block, and the exit marker or
// the whole guest could be lost with them.
//
// The ConsoleWatcher, which already reads every byte as it is written to
// mark milestones, therefore enforces the cap in place: once the file holds
// more than MaxBytes it keeps the first eighth (kernel and agent start-up)
// and the newest half, and removes the middle with
// fallocate(FALLOC_FL_COLLAPSE_RANGE). The collapse holds the inode lock,
// as O_APPEND writes do, so a write racing with it lands at the new end of
// file: nothing unread is ever removed, and only bytes the watcher has
// already scanned are. Where the file system cannot collapse (tmpfs, btrfs,
// ...) the middle is punched out instead (FALLOC_FL_PUNCH_HOLE): the disk
// space is freed, the file keeps its apparent size, and every reader here
// skips holes. One block at the cut says how much was dropped; it ends
// without a newline so the torn first line of the tail joins it, and a
// fragment of job output can never pass for a marker at a line start.
//
// The cap is checked at every poll (DefaultConsolePoll), so the file may
// exceed it by what the guest writes in one poll interval.

// DefaultConsoleMaxBytes caps a console log when no policy says otherwise
// (config vm.console_log_max_bytes).
const DefaultConsoleMaxBytes = 8 << 20

// Defaults of ConsolePolicy.Keep and MaxAge (vm.console_log_keep and
// vm.console_log_max_age).
const (
	DefaultConsoleLogKeep   = 100
	DefaultConsoleLogMaxAge = 7 * 24 * time.Hour
)

// ConsolePolicy bounds console logs: the live per-VM file and the copies
// kept in vm.console_log_dir. The zero value is the documented defaults.
type ConsolePolicy struct {
	// MaxBytes caps the live log; <= 0 means DefaultConsoleMaxBytes.
	MaxBytes int64
	// Keep is how many copies a console log dir keeps (newest first);
	// 0 means DefaultConsoleLogKeep, < 0 no count limit.
	Keep int
	// MaxAge removes older copies; 0 means DefaultConsoleLogMaxAge, < 0
	// no age limit.
	MaxAge time.Duration
}

// NewConsolePolicy maps vm.console_log_max_bytes, vm.console_log_keep and
// vm.console_log_max_age (where 0 means "no limit" for keep and age) to a
// policy. The drivers' providers call it with their config section.
func NewConsolePolicy(maxBytes int64, keep int, maxAge time.Duration) ConsolePolicy {
	p := ConsolePolicy{MaxBytes: maxBytes, Keep: keep, MaxAge: maxAge}
	if p.Keep == 0 {
		p.Keep = -1
	}
	if p.MaxAge == 0 {
		p.MaxAge = -1
	}
	return p
}

func (p ConsolePolicy) maxBytes() int64 {
	if p.MaxBytes <= 0 {
		return DefaultConsoleMaxBytes
	}
	return p.MaxBytes
}

// Watch starts a ConsoleWatcher on path that enforces p.MaxBytes; tl may be
// nil (a VM adopted after a restart: only the cap matters).
func (p ConsolePolicy) Watch(path string, tl *Timeline) *ConsoleWatcher {
	return WatchConsoleMax(path, tl, 0, p.maxBytes())
}

// ConsoleWatcher tails a console log file, marks guest milestones on a
// Timeline when their line first appears, and keeps the file under its cap
// (see above). Times are host observation times, accurate to the poll
// interval. One watcher per file caps it (an exclusive flock decides);
// others only read.
type ConsoleWatcher struct {
	path     string
	tl       *Timeline
	interval time.Duration
	max      int64

	stop chan struct{}
	done chan struct{}
	once sync.Once

	mu      sync.Mutex
	dropped int64
	capErr  error
}

// DefaultConsolePoll is how often a ConsoleWatcher looks for new output.
const DefaultConsolePoll = 20 * time.Millisecond

// WatchConsole starts watching path (which may not exist yet), marking
// milestones on tl and capping the file at DefaultConsoleMaxBytes.
// interval <= 0 means DefaultConsolePoll. Call Stop.
func WatchConsole(path string, tl *Timeline, interval time.Duration) *ConsoleWatcher {
	return WatchConsoleMax(path, tl, interval, DefaultConsoleMaxBytes)
}

// WatchConsoleMax is WatchConsole with a cap of maxBytes (<= 0: the
// default; the config allows 64 KiB and up).
func WatchConsoleMax(path string, tl *Timeline, interval time.Duration, maxBytes int64) *ConsoleWatcher {
	if interval <= 0 {
		interval = DefaultConsolePoll
	}
	if maxBytes <= 0 {
		maxBytes = DefaultConsoleMaxBytes
	}
	w := &ConsoleWatcher{path: path, tl: tl, interval: interval, max: maxBytes, stop: make(chan struct{}), done: make(chan struct{})}
	go w.run()
	return w
}

// Stop reads whatever output is left, then stops the watcher. It is safe to
// call more than once.
func (w *ConsoleWatcher) Stop() {
	w.once.Do(func() { close(w.stop) })
	<-w.done
}

// Dropped is how many console bytes the cap has removed so far, and the
// error that disabled capping, if any.
func (w *ConsoleWatcher) Dropped() (int64, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.dropped, w.capErr
}

func (w *ConsoleWatcher) run() {
	defer close(w.done)
	var (
		f       *os.File
		c       *capper
		off     int64 // next byte to read
		partial []byte
		buf     = make([]byte, 64<<10)
	)
	defer func() {
		if f != nil {
			f.Close() // also releases the flock
		}
	}()
	drain := func() {
		if f == nil {
			var err error
			if f, err = openConsole(w.path); err != nil {
				f = nil
				return
			}
			c = newCapper(f, w.max)
		}
		for {
			n, err := f.ReadAt(buf, off)
			if n > 0 {
				off += int64(n)
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
				break
			}
		}
		if c != nil {
			off = c.trim(off)
			w.mu.Lock()
			w.dropped, w.capErr = c.dropped, c.err
			w.mu.Unlock()
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

// openConsole opens a console log for reading and, when allowed, writing
// (the cap needs a writable descriptor), never through a symlink.
func openConsole(path string) (*os.File, error) {
	f, err := os.OpenFile(path, os.O_RDWR|unix.O_NOFOLLOW, 0)
	if errors.Is(err, fs.ErrPermission) || errors.Is(err, syscall.EROFS) {
		f, err = os.OpenFile(path, os.O_RDONLY|unix.O_NOFOLLOW, 0)
	}
	if err != nil {
		return nil, err
	}
	if fi, err := f.Stat(); err != nil || !fi.Mode().IsRegular() {
		f.Close()
		return nil, fmt.Errorf("console log %s is not a regular file", path)
	}
	return f, nil
}

func (w *ConsoleWatcher) line(l []byte, at time.Time) {
	if w.tl == nil {
		return
	}
	for _, c := range consoleMilestones {
		if bytes.Contains(l, []byte(c.sub)) {
			w.tl.MarkAt(c.m, at)
		}
	}
}

// forcePunch makes cappers punch holes even where collapsing works (tests).
var forcePunch = false

// capper keeps one console log under max bytes (see the comment above
// DefaultConsoleMaxBytes). All offsets are in bytes; head, the notice block
// and every cut are multiples of the file system's block size, as
// FALLOC_FL_COLLAPSE_RANGE requires.
type capper struct {
	f       *os.File
	max     int64
	blk     int64
	head    int64 // kept from the start of the file
	punch   bool  // the file system cannot collapse: punch holes
	tail    int64 // file offset where the kept tail starts (after a cut)
	cut     bool  // the notice block at [head, head+blk) is written
	dropped int64
	err     error // capping is off after this error
}

// newCapper returns nil when f cannot be capped here: not writable, or
// another watcher holds the file's capping lock.
func newCapper(f *os.File, limit int64) *capper {
	fd := int(f.Fd())
	if fl, err := unix.FcntlInt(uintptr(fd), unix.F_GETFL, 0); err != nil || fl&unix.O_ACCMODE != unix.O_RDWR {
		return nil
	}
	if err := unix.Flock(fd, unix.LOCK_EX|unix.LOCK_NB); err != nil {
		return nil
	}
	blk := int64(4096)
	var st unix.Statfs_t
	if err := unix.Fstatfs(fd, &st); err == nil && st.Bsize > 0 && st.Bsize <= 1<<20 {
		blk = st.Bsize
	}
	// Room for the head, the notice block and half the cap as the tail.
	limit = max(limit, 8*blk)
	head := max(limit/8/blk*blk, blk)
	return &capper{f: f, max: limit, blk: blk, head: head, punch: forcePunch}
}

// kept is how many bytes of the file up to off hold data.
func (c *capper) kept(off int64) int64 {
	if !c.cut {
		return off
	}
	return c.head + c.blk + off - c.tail
}

// trim cuts the file if what was read of it (up to off) is over the cap,
// and returns the read offset in the trimmed file.
func (c *capper) trim(off int64) int64 {
	if c.err != nil || c.kept(off) <= c.max {
		return off
	}
	from := c.head + c.blk // first byte to drop after the notice block
	if c.punch {
		from = max(from, c.tail)
	}
	to := (off - c.max/2) / c.blk * c.blk // keep the newest max/2 bytes read
	if to <= from {
		return off
	}
	// The notice block itself holds dropped bytes; count them once.
	noticeBytes := int64(0)
	if !c.cut {
		noticeBytes = c.blk
	}
	if !c.punch {
		err := unix.Fallocate(int(c.f.Fd()), unix.FALLOC_FL_COLLAPSE_RANGE, from, to-from)
		if err == nil {
			c.cut, c.tail = true, from
			c.dropped += to - from + noticeBytes
			c.err = c.notice()
			return off - (to - from)
		}
		if !errors.Is(err, unix.EOPNOTSUPP) && !errors.Is(err, unix.EINVAL) {
			c.err = fmt.Errorf("console log: collapse: %w", err)
			return off
		}
		c.punch = true // tmpfs, btrfs, NFS...: free the blocks instead
	}
	if err := unix.Fallocate(int(c.f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, from, to-from); err != nil {
		c.err = fmt.Errorf("console log: punch hole: %w", err)
		return off
	}
	c.cut, c.tail = true, to
	c.dropped += to - from + noticeBytes
	c.err = c.notice()
	return off
}

// ConsoleCutMarker starts the line FireRunner writes where it cut a console
// log.
const ConsoleCutMarker = "[firerunner: console log cut here: "

// notice (re)writes the block at [head, head+blk): a line saying how much
// was dropped, padded with spaces and without a trailing newline.
func (c *capper) notice() error {
	b := bytes.Repeat([]byte{' '}, int(c.blk))
	msg := fmt.Sprintf("\n%s%d bytes dropped to keep it under %d bytes] ", ConsoleCutMarker, c.dropped, c.max)
	copy(b, msg)
	if _, err := c.f.WriteAt(b, c.head); err != nil {
		return fmt.Errorf("console log: notice: %w", err)
	}
	return nil
}

// dataReader reads a file sequentially, skipping holes (SEEK_DATA), so a
// console log whose middle was punched out reads as head + notice + tail.
type dataReader struct {
	f   *os.File
	off int64
	end int64 // end of the current data segment; 0: find it
}

func (r *dataReader) Read(p []byte) (int, error) {
	if r.off >= r.end {
		fd := int(r.f.Fd())
		start, err := unix.Seek(fd, r.off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			return 0, io.EOF
		}
		if err != nil { // no SEEK_DATA here: plain reads
			start, r.end = r.off, 1<<62
		} else if r.end, err = unix.Seek(fd, start, unix.SEEK_HOLE); err != nil {
			r.end = 1 << 62
		}
		r.off = start
	}
	if int64(len(p)) > r.end-r.off {
		p = p[:r.end-r.off]
	}
	n, err := r.f.ReadAt(p, r.off)
	r.off += int64(n)
	if errors.Is(err, io.EOF) && n > 0 {
		err = nil
	}
	return n, err
}

// ConsoleExitCode returns the guest workload's exit status from a console
// log: the last line starting with guestconfig.ExitMarker (the agent prints
// it after the workload ended, so a job echoing a fake marker earlier cannot
// override it). It returns -1, false when there is none. The file is never
// opened through a symlink, and holes (a cut log) are skipped.
func ConsoleExitCode(path string) (int, bool, error) {
	f, err := os.OpenFile(path, os.O_RDONLY|unix.O_NOFOLLOW, 0)
	if errors.Is(err, fs.ErrNotExist) {
		return -1, false, nil
	}
	if err != nil {
		return -1, false, err
	}
	defer f.Close()
	return scanExitCode(&dataReader{f: f})
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

// consoleCopyRE names the copies KeepConsoleLog makes; pruning touches
// nothing else in the directory.
var consoleCopyRE = regexp.MustCompile(`^fr-[a-z0-9]{1,12}\.log$`)

// KeepConsoleLog copies VM id's console log src to dir/<id>.log (0600) and
// prunes dir by p.Keep and p.MaxAge. The copy is capped at p.MaxBytes like
// the live log, neither file is ever opened through a symlink, and the copy
// appears by rename, complete or not at all. A missing src is not an error.
func KeepConsoleLog(src, dir, id string, p ConsolePolicy) error {
	if !validID(id) {
		return fmt.Errorf("vm id %q: must match %s", id, IDPattern)
	}
	in, err := os.OpenFile(src, os.O_RDONLY|unix.O_NOFOLLOW, 0)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	defer in.Close()
	if fi, err := in.Stat(); err != nil || !fi.Mode().IsRegular() {
		return fmt.Errorf("console log %s is not a regular file", src)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	out, err := os.CreateTemp(dir, "."+id+".log.tmp-*") // O_EXCL, 0600
	if err != nil {
		return err
	}
	tmp := out.Name()
	defer os.Remove(tmp) // no-op after the rename
	if err := copyCapped(out, &dataReader{f: in}, p.maxBytes()); err != nil {
		out.Close()
		return err
	}
	if err := out.Close(); err != nil {
		return err
	}
	// rename(2) replaces whatever dir/<id>.log is, a symlink included,
	// without following it.
	if err := os.Rename(tmp, filepath.Join(dir, id+".log")); err != nil {
		return err
	}
	return PruneConsoleLogs(dir, p, time.Now())
}

// copyCapped copies src to dst; past limit bytes it keeps the first eighth
// and the newest bytes, with a ConsoleCutMarker line between them.
func copyCapped(dst io.Writer, src io.Reader, limit int64) error {
	limit = max(limit, 64<<10)
	head := limit / 8
	if _, err := io.CopyN(dst, src, head); err != nil {
		if errors.Is(err, io.EOF) {
			return nil
		}
		return err
	}
	// The rest goes through a ring of the newest bytes (256: room for the
	// notice line).
	ring := make([]byte, limit-head-256)
	size := int64(len(ring))
	var total int64 // bytes after the head
	buf := make([]byte, 64<<10)
	for {
		k, err := src.Read(buf)
		for b := buf[:k]; len(b) > 0; {
			c := copy(ring[total%size:], b)
			b, total = b[c:], total+int64(c)
		}
		if err == io.EOF {
			break
		}
		if err != nil {
			return err
		}
	}
	n := min(total, size)
	if dropped := total - n; dropped > 0 {
		msg := fmt.Sprintf("\n%s%d bytes dropped to keep it under %d bytes] ", ConsoleCutMarker, dropped, limit)
		if _, err := io.WriteString(dst, msg); err != nil {
			return err
		}
	}
	start := (total - n) % size // the oldest byte kept
	if _, err := dst.Write(ring[start:min(size, start+n)]); err != nil {
		return err
	}
	if start+n > size {
		if _, err := dst.Write(ring[:start+n-size]); err != nil {
			return err
		}
	}
	return nil
}

// PruneConsoleLogs removes console log copies (<vm id>.log, regular files
// only) in dir older than p.MaxAge and beyond the p.Keep newest, and
// leftovers of interrupted copies older than an hour.
func PruneConsoleLogs(dir string, p ConsolePolicy, now time.Time) error {
	keep, maxAge := p.Keep, p.MaxAge
	if keep == 0 {
		keep = DefaultConsoleLogKeep
	}
	if maxAge == 0 {
		maxAge = DefaultConsoleLogMaxAge
	}
	ents, err := os.ReadDir(dir)
	if err != nil {
		return err
	}
	type copyFile struct {
		name string
		mod  time.Time
	}
	var logs []copyFile
	var errs []error
	for _, e := range ents {
		if !e.Type().IsRegular() { // symlinks, dirs: not ours
			continue
		}
		fi, err := e.Info()
		if err != nil {
			continue
		}
		switch name := e.Name(); {
		case consoleCopyRE.MatchString(name):
			logs = append(logs, copyFile{name, fi.ModTime()})
		case strings.HasPrefix(name, ".fr-") && strings.Contains(name, ".log.tmp-") && now.Sub(fi.ModTime()) > time.Hour:
			errs = append(errs, removeIfExists(filepath.Join(dir, name)))
		}
	}
	sort.Slice(logs, func(i, j int) bool { return logs[i].mod.After(logs[j].mod) })
	for i, l := range logs {
		if (keep > 0 && i >= keep) || (maxAge > 0 && now.Sub(l.mod) > maxAge) {
			errs = append(errs, removeIfExists(filepath.Join(dir, l.name)))
		}
	}
	return errors.Join(errs...)
}

func removeIfExists(p string) error {
	if err := os.Remove(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	return nil
}
