// Package firecracker is the Firecracker VM driver: it boots each VM through the
// official firecracker-go-sdk, optionally under the jailer, and cleans up after it.
package firecracker

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/firerunner/firerunner/internal/vm"
)

// Name is the driver's name (vm.driver), see Provider.
const Name = "firecracker"

// Options configure the driver. Zero values get the documented defaults.
type Options struct {
	// Binary is the firecracker executable; under the jailer its file name
	// must contain "firecracker" (the jailer enforces it).
	Binary string
	// JailerBinary is the jailer executable (UseJailer only).
	JailerBinary string
	// UseJailer runs every VM in its own chroot as UID:GID, in a new PID
	// namespace with cgroup v2 limits. Without it Firecracker runs as the
	// daemon's user (development only).
	UseJailer bool
	UID, GID  int
	// ChrootBase is the jailer's --chroot-base-dir (default /srv/jailer).
	ChrootBase string
	// StateDir is the daemon state_dir; VMs live in <StateDir>/vms/<id>.
	StateDir string
	// CgroupRoot is the cgroup v2 mount (default /sys/fs/cgroup); only used
	// to remove a VM's cgroup the jailer created.
	CgroupRoot string
	// ParentCgroup is the jailer's --parent-cgroup ("" = jailer default,
	// the exec file name): a relative path under CgroupRoot. Under systemd
	// point it into a delegated subtree.
	ParentCgroup string
	// MemoryOverheadMiB is added to the guest memory for the cgroup's
	// memory.max: Firecracker itself, its device queues and buffers.
	// Default 64.
	MemoryOverheadMiB int
	// MemoryOverheadMiBPerGiB is added per GiB of guest memory: KVM's page
	// tables for the guest (about 4 MiB per GiB without THP), charged to
	// the VM's cgroup. Default 8.
	MemoryOverheadMiBPerGiB int
	// ExtraBootArgs are appended to DefaultBootArgs (never secrets).
	ExtraBootArgs []string
	// LogLevel is Firecracker's log level (Error, Warning, Info, Debug);
	// default Warning.
	LogLevel string
	// SocketTimeout bounds the wait for the API socket (default 10s).
	SocketTimeout time.Duration
	// JailerTimeout bounds the jailer's run: it builds the jail, spawns
	// Firecracker into its PID namespace and exits (default 30s). A jailer
	// still running then is killed and the start fails.
	JailerTimeout time.Duration
	// SerialBytesPerSec is the rate limit of the guest's serial console
	// through Firecracker's own limiter (PUT /serial rate_limiter): bytes
	// per second, with a one-time burst of four seconds' worth for the boot.
	// Output past it is dropped by Firecracker. 0 = the default, 256 KiB/s;
	// negative = no limiter.
	SerialBytesPerSec int64
	// VMUIDBase, when not 0, lets each VM run as the uid/gid its
	// vm.NetAttachment names (a per-VM user from the range netsetup hands
	// out, >= VMUIDBase); VMs without one run as UID/GID.
	VMUIDBase int
	// SnapshotRefill lets pools refill from a snapshot of a booted warm VM
	// of the size (vm.WarmCloner; jailer only, see clone.go).
	SnapshotRefill bool
	// Console caps the live console log (zero value: the defaults; see
	// vm.NewConsolePolicy).
	Console vm.ConsolePolicy
	// Logger receives driver and SDK logs (default slog.Default()).
	Logger *slog.Logger
}

// Defaults of the VM cgroup's memory overhead (Options).
const (
	DefaultMemoryOverheadMiB       = 64
	DefaultMemoryOverheadMiBPerGiB = 8
)

// ValidParentCgroup checks a --parent-cgroup as the jailer does: a
// relative path without "." or ".." components ("" = the jailer's
// default).
func ValidParentCgroup(p string) error {
	if p == "" {
		return nil
	}
	if filepath.IsAbs(p) {
		return fmt.Errorf("parent cgroup %q must be relative to the cgroup mount (the jailer refuses an absolute one)", p)
	}
	for _, c := range strings.Split(p, "/") {
		if c == "" || c == "." || c == ".." {
			return fmt.Errorf("parent cgroup %q: empty, \".\" and \"..\" components are refused by the jailer", p)
		}
	}
	return nil
}

// DefaultSerialBytesPerSec is the serial console's default rate limit:
// far above what a booting guest and the agent's markers write (the job's
// own output goes to GitLab, not the console), far below what a guest
// flooding its UART could make the VMM write.
const DefaultSerialBytesPerSec = 256 << 10

var levelRe = regexp.MustCompile(`^(Error|Warning|Info|Debug)$`)

// Validate reports the first problem with the options.
func (o Options) Validate() error {
	if o.Binary == "" {
		return errors.New("firecracker: binary must be set")
	}
	if o.StateDir == "" || !filepath.IsAbs(o.StateDir) {
		return fmt.Errorf("firecracker: state dir %q must be an absolute path", o.StateDir)
	}
	if !levelRe.MatchString(o.LogLevel) {
		return fmt.Errorf("firecracker: log level %q is not one of Error, Warning, Info, Debug", o.LogLevel)
	}
	if o.MemoryOverheadMiB < 0 || o.MemoryOverheadMiBPerGiB < 0 {
		return errors.New("firecracker: memory overhead must not be negative")
	}
	if err := ValidParentCgroup(o.ParentCgroup); err != nil {
		return fmt.Errorf("firecracker: %w", err)
	}
	if _, err := BootArgs(o.ExtraBootArgs); err != nil {
		return fmt.Errorf("firecracker: %w", err)
	}
	if o.UseJailer {
		if o.JailerBinary == "" {
			return errors.New("firecracker: jailer binary must be set when use_jailer is on")
		}
		if !strings.Contains(filepath.Base(o.Binary), "firecracker") {
			return fmt.Errorf("firecracker: binary %q: the jailer requires the file name to contain \"firecracker\"", o.Binary)
		}
		if o.ChrootBase == "" || !filepath.IsAbs(o.ChrootBase) {
			return fmt.Errorf("firecracker: chroot base %q must be an absolute path", o.ChrootBase)
		}
		if o.UID <= 0 || o.GID <= 0 {
			return fmt.Errorf("firecracker: jail uid/gid must be > 0 (got %d:%d): a jailed VMM never runs as root", o.UID, o.GID)
		}
		if !filepath.IsAbs(o.CgroupRoot) {
			return fmt.Errorf("firecracker: cgroup root %q must be absolute", o.CgroupRoot)
		}
	}
	return nil
}

func (o Options) withDefaults() Options {
	if o.ChrootBase == "" {
		o.ChrootBase = "/srv/jailer"
	}
	if o.CgroupRoot == "" {
		o.CgroupRoot = "/sys/fs/cgroup"
	}
	if o.MemoryOverheadMiB == 0 {
		o.MemoryOverheadMiB = DefaultMemoryOverheadMiB
	}
	if o.MemoryOverheadMiBPerGiB == 0 {
		o.MemoryOverheadMiBPerGiB = DefaultMemoryOverheadMiBPerGiB
	}
	if o.LogLevel == "" {
		o.LogLevel = "Warning"
	}
	if o.SocketTimeout <= 0 {
		o.SocketTimeout = 10 * time.Second
	}
	if o.JailerTimeout <= 0 {
		o.JailerTimeout = 30 * time.Second
	}
	if o.SerialBytesPerSec == 0 {
		o.SerialBytesPerSec = DefaultSerialBytesPerSec
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	return o
}

// Driver runs Firecracker microVMs. It is safe for concurrent use.
type Driver struct {
	opts Options
	sd   vm.StateDir
	log  *slog.Logger
	// swapAccounted: the cgroup hierarchy has memory.swap.max (jailer only).
	swapAccounted bool
	// stageMu serialises staging image files in the chroot base.
	stageMu sync.Mutex
	// snapMu serialises making and discarding pool snapshots.
	snapMu sync.Mutex

	mu   sync.Mutex
	runs map[string]*vmRun // VMs started by this process
}

// vmRun is what only the starting process knows about a VM: its child
// process (to reap it and learn its exit status) and its timeline.
type vmRun struct {
	tl      *vm.Timeline
	watcher *vm.ConsoleWatcher
	reaped  chan struct{} // closed when the direct child was reaped
	spawned atomic.Bool   // the direct child was started: reaped will close
	waitErr error
	killed  atomic.Bool // Destroy killed it (Wait reports "killed")
}

// New builds a driver.
func New(o Options) (*Driver, error) {
	o = o.withDefaults()
	if err := o.Validate(); err != nil {
		return nil, err
	}
	// The jailer canonicalizes --chroot-base-dir too (see resolveExec).
	if r, err := filepath.EvalSymlinks(o.ChrootBase); err == nil {
		o.ChrootBase = r
	}
	d := &Driver{opts: o, sd: vm.NewStateDir(o.StateDir), log: o.Logger.With("driver", Name), runs: map[string]*vmRun{}}
	if o.UseJailer {
		if d.swapAccounted = swapAccounting(o.CgroupRoot); !d.swapAccounted {
			d.log.Warn("the cgroup hierarchy has no swap accounting (no memory.swap.max): VMs' memory can be swapped; boot the host with swap accounting (cgroup v2 memory controller) to pin it",
				"cgroup_root", o.CgroupRoot)
		}
	}
	return d, nil
}

// Name implements vm.Driver.
func (d *Driver) Name() string { return Name }

// fcMeta is the driver's own record next to vm.Meta: where the VM's
// Firecracker-specific files are, so Destroy finds them after a restart.
type fcMeta struct {
	Jailed bool   `json:"jailed"`
	Socket string `json:"socket"`
	// Exec is the canonical firecracker path the jailer was given (and
	// named the jail, pid file and cgroup after); see resolveExec.
	Exec string `json:"exec,omitempty"`
	// UID and GID the jailed VMM runs as.
	UID       int    `json:"uid,omitempty"`
	GID       int    `json:"gid,omitempty"`
	JailDir   string `json:"jail_dir,omitempty"`
	CgroupDir string `json:"cgroup_dir,omitempty"`
	// Vsock: the VM has the vsock device of the assignment channel (a
	// warm VM, see assign.go).
	Vsock bool `json:"vsock,omitempty"`
	// Restored: started from a snapshot (Snapshot names it); its guest
	// resumed with the source's identity and gets its own with the
	// assignment. GuestMAC is the MAC its spec asked for.
	Restored bool   `json:"restored,omitempty"`
	Snapshot string `json:"snapshot,omitempty"`
	GuestMAC string `json:"guest_mac,omitempty"`
}

const fcMetaFile = "firecracker.json"

// Per-VM file names (besides vm.ConfigDrive, vm.ConsoleFile, vm.MetaFile).
const (
	socketFile  = "api.sock"
	logFile     = "firecracker.log"
	metricsFile = "firecracker.metrics"
	stderrFile  = "vmm.stderr"
)

func (d *Driver) readFCMeta(id string) (fcMeta, error) {
	var m fcMeta
	b, err := os.ReadFile(d.sd.File(id, fcMetaFile))
	if err != nil {
		return m, err
	}
	return m, json.Unmarshal(b, &m)
}

// validMAC is the aa:bb:cc:dd:ee:ff form Firecracker takes for guest_mac.
var validMAC = regexp.MustCompile(`^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$`)

// vmmUser is the uid/gid VM spec's jailed VMM runs as: its own from the
// range (vm.NetAttachment, with firecracker.vm_uid_base), else UID/GID.
func (d *Driver) vmmUser(spec vm.Spec) (uid, gid int, err error) {
	n := spec.Network
	if n == nil || (n.UID == 0 && n.GID == 0) || !d.opts.UseJailer {
		return d.opts.UID, d.opts.GID, nil
	}
	if d.opts.VMUIDBase <= 0 || n.UID < d.opts.VMUIDBase || n.GID < d.opts.VMUIDBase {
		return 0, 0, fmt.Errorf("vm %s: VMM user %d:%d is not from the per-VM range (firecracker.vm_uid_base %d)", spec.ID, n.UID, n.GID, d.opts.VMUIDBase)
	}
	return n.UID, n.GID, nil
}

// validateSpec adds the driver's limits to Spec.Validate.
func validateSpec(spec vm.Spec) error {
	if err := spec.Validate(); err != nil {
		return err
	}
	if spec.VCPUs > 32 {
		return fmt.Errorf("vm %s: firecracker supports at most 32 vcpus, got %d", spec.ID, spec.VCPUs)
	}
	if n := spec.Network; n != nil {
		if n.TapName == "" || len(n.TapName) > 15 {
			return fmt.Errorf("vm %s: tap name %q must be 1-15 bytes", spec.ID, n.TapName)
		}
		if n.MAC != "" && !validMAC.MatchString(n.MAC) {
			return fmt.Errorf("vm %s: guest mac %q is not aa:bb:cc:dd:ee:ff", spec.ID, n.MAC)
		}
	}
	return nil
}

// Start implements vm.Driver: prepare the per-VM files, start Firecracker and
// configure and boot the guest through the step chain (see steps.go).
func (d *Driver) Start(ctx context.Context, spec vm.Spec) error {
	if err := validateSpec(spec); err != nil {
		return err
	}
	bootArgs, err := BootArgs(d.opts.ExtraBootArgs, spec.Guest.RunnerToken)
	if err != nil {
		return fmt.Errorf("vm %s: %w", spec.ID, err)
	}
	if m, err := d.sd.ReadMeta(spec.ID); err == nil && m.Driver == Name && m.Proc.Alive() {
		return nil // already running: Start is idempotent
	}
	b, err := d.newBoot(spec, bootArgs)
	if err != nil {
		return err
	}
	if err := b.run(ctx); err != nil {
		if b.created { // never clean up another start's files (id reuse)
			// Firecracker's own log says why; it lives in the VM's dir or
			// jail, which the cleanup removes: keep a copy first.
			kept, vmmLog := d.keepFailedStart(spec.ID)
			d.log.Warn("vm start failed; cleaning up", "vm", spec.ID, "err", err, "kept_logs", kept, "firecracker_log_tail", vmmLog)
			if kept != "" {
				err = fmt.Errorf("%w (firecracker's log and stderr kept in %s)", err, kept)
			}
			if derr := d.Destroy(context.WithoutCancel(ctx), spec.ID); derr != nil {
				err = errors.Join(err, fmt.Errorf("cleanup: %w", derr))
			}
		}
		return fmt.Errorf("vm %s: start: %w", spec.ID, err)
	}
	return nil
}

// FailedStartsDir is where, under state_dir, the logs of a failed start
// are kept (<vm id>.log, 0600; pruned like console log copies).
const FailedStartsDir = "failed-starts"

// keepFailedStart copies what explains a failed start, Firecracker's own
// log, its stderr and the serial console, each capped, into
// <state_dir>/failed-starts/<id>.log before the cleanup removes them, and
// prunes that directory by the console policy (keep, max age). It returns
// the copy's path ("" if none was made) and the log's last lines. The
// files may be in the jail, writable by the jail user: none is opened
// through a symlink, and only regular files are read.
func (d *Driver) keepFailedStart(id string) (kept, logTail string) {
	vmmLog := d.sd.File(id, logFile)
	if fm, err := d.readFCMeta(id); err == nil && fm.Jailed {
		vmmLog = d.inJail(id, jailLog)
	}
	var buf bytes.Buffer
	for _, f := range []struct{ name, path string }{
		{"firecracker log", vmmLog},
		{"firecracker stderr", d.sd.File(id, stderrFile)},
		{"serial console", d.sd.File(id, vm.ConsoleFile)},
	} {
		b := tailNoFollow(f.path, failedLogMax)
		if f.path == vmmLog {
			logTail = lastLines(b, 20)
		}
		fmt.Fprintf(&buf, "==> %s (%s, last %d bytes at most) <==\n%s\n", f.name, f.path, failedLogMax, b)
	}
	dir := filepath.Join(d.opts.StateDir, FailedStartsDir)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		d.log.Warn("cannot keep the failed start's logs", "vm", id, "err", err)
		return "", logTail
	}
	tmp, err := os.CreateTemp(dir, "."+id+".log.tmp-*") // 0600
	if err == nil {
		_, err = tmp.Write(buf.Bytes())
		if cerr := tmp.Close(); err == nil {
			err = cerr
		}
		if err == nil {
			err = os.Rename(tmp.Name(), filepath.Join(dir, id+".log"))
		}
		os.Remove(tmp.Name()) // after a failure; a no-op after the rename
	}
	if err != nil {
		d.log.Warn("cannot keep the failed start's logs", "vm", id, "err", err)
		return "", logTail
	}
	if err := vm.PruneConsoleLogs(dir, d.opts.Console, time.Now()); err != nil {
		d.log.Warn("pruning kept logs of failed starts", "dir", dir, "err", err)
	}
	return filepath.Join(dir, id+".log"), logTail
}

// failedLogMax caps each file keepFailedStart copies (its newest bytes).
const failedLogMax = 256 << 10

// tailNoFollow returns up to limit of the newest bytes of a regular file,
// never opened through a symlink; nothing for anything else.
func tailNoFollow(path string, limit int64) []byte {
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NOFOLLOW|syscall.O_NONBLOCK, 0)
	if err != nil {
		return nil
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil || !fi.Mode().IsRegular() {
		return nil
	}
	off := max(fi.Size()-limit, 0)
	b, _ := io.ReadAll(io.NewSectionReader(f, off, limit))
	return b
}

// lastLines is the last n lines of b.
func lastLines(b []byte, n int) string {
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	return strings.Join(lines[max(len(lines)-n, 0):], "\n")
}

// Timeline implements vm.TimelineSource for VMs started by this process.
func (d *Driver) Timeline(id string) (*vm.Timeline, bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	r, ok := d.runs[id]
	if !ok {
		return nil, false
	}
	return r.tl, true
}

// Wait implements vm.Driver. It works for VMs started by an earlier process
// too: the VMM is found through the meta/pid file and watched by pidfd.
func (d *Driver) Wait(ctx context.Context, id string) (vm.Result, error) {
	meta, err := d.sd.ReadMeta(id)
	if errors.Is(err, fs.ErrNotExist) || (err == nil && meta.Driver != Name) {
		return vm.Result{}, fmt.Errorf("vm %s: %w", id, vm.ErrNotFound)
	}
	if err != nil {
		return vm.Result{}, err
	}
	res := vm.Result{ExitCode: -1, ConsoleLog: d.sd.File(id, vm.ConsoleFile)}
	d.mu.Lock()
	run := d.runs[id] // before waiting: a concurrent Destroy forgets it
	d.mu.Unlock()
	var adopted *vm.ConsoleWatcher
	if run == nil && meta.Proc.Alive() {
		// Adopted after a restart: keep its console log capped meanwhile.
		adopted = d.opts.Console.Watch(res.ConsoleLog, nil)
		defer adopted.Stop() // early returns; Stop is idempotent
	}
	wctx, cancel := ctx, context.CancelFunc(func() {})
	if !meta.Deadline.IsZero() {
		wctx, cancel = context.WithDeadline(ctx, meta.Deadline)
	}
	err = meta.Proc.WaitGone(wctx)
	cancel()
	if err != nil {
		if ctx.Err() != nil {
			return vm.Result{}, ctx.Err()
		}
		// Spec.Timeout hit: kill the VM; the guest never finished.
		d.log.Warn("vm timed out; killing it", "vm", id, "timeout", meta.Timeout)
		if err := meta.Proc.KillGroup(); err != nil {
			return vm.Result{}, err
		}
		if err := meta.Proc.WaitGone(ctx); err != nil {
			return vm.Result{}, err
		}
		res.Reason = "timeout"
	}
	if run != nil {
		select {
		case <-run.reaped:
		case <-ctx.Done():
			return vm.Result{}, ctx.Err()
		}
		run.tl.Mark(vm.MilestoneVMMExited)
		if run.watcher != nil {
			run.watcher.Stop()
		}
	}
	if adopted != nil {
		adopted.Stop() // its last read and cut come before the scan
	}
	code, found, err := vm.ConsoleExitCode(res.ConsoleLog)
	if err != nil {
		return vm.Result{}, err
	}
	res.ExitCode = code
	if res.Reason == "" && run != nil && run.killed.Load() {
		res.Reason = "killed"
	}
	if res.Reason == "" && !found {
		why := "guest reported no exit status"
		if run != nil && run.waitErr != nil {
			why = run.waitErr.Error()
		}
		res.Reason = "vmm exited: " + why
	}
	return res, nil
}

// Destroy implements vm.Driver: kill the VMM (its process group, and with
// the jailer its whole PID namespace), then remove the per-VM directory,
// the jail and the cgroup. Unknown ids are not an error.
func (d *Driver) Destroy(ctx context.Context, id string) error {
	if !vmIDRe.MatchString(id) {
		return fmt.Errorf("vm id %q: must match %s", id, vm.IDPattern)
	}
	meta, merr := d.sd.ReadMeta(id)
	if merr == nil && meta.Driver != "" && meta.Driver != Name {
		return nil // another driver's VM
	}
	fm, _ := d.readFCMeta(id)
	procs := d.findProcs(id, meta)
	d.mu.Lock()
	if r := d.runs[id]; r != nil && len(procs) > 0 {
		r.killed.Store(true)
	}
	d.mu.Unlock()
	for _, p := range procs {
		if err := p.KillGroup(); err != nil {
			return fmt.Errorf("vm %s: %w", id, err)
		}
	}
	kctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
	defer cancel()
	for _, p := range procs {
		if err := p.WaitGone(kctx); err != nil {
			return fmt.Errorf("vm %s: vmm pid %d did not die: %w", id, p.PID, err)
		}
	}
	d.mu.Lock()
	run := d.runs[id]
	delete(d.runs, id)
	d.mu.Unlock()
	if run != nil {
		if run.spawned.Load() {
			select { // our child: let the reaper collect it
			case <-run.reaped:
			case <-kctx.Done():
			}
		}
		if run.watcher != nil {
			run.watcher.Stop()
		}
		run.tl.Mark(vm.MilestoneDestroyed)
	}
	var errs []error
	jailDirs := []string{fm.JailDir}
	cgDirs := []string{fm.CgroupDir}
	if d.opts.UseJailer {
		jailDirs = append(jailDirs, d.jailDir(id))
		cgDirs = append(cgDirs, d.cgroupDir(id))
	}
	for _, j := range jailDirs {
		if j != "" {
			if err := os.RemoveAll(j); err != nil {
				errs = append(errs, fmt.Errorf("remove jail: %w", err))
			}
		}
	}
	for _, c := range cgDirs {
		if c != "" {
			if err := removeCgroup(kctx, c); err != nil {
				errs = append(errs, err)
			}
		}
	}
	if err := d.sd.Remove(id); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// removeCgroup rmdirs a cgroup directory; it may be busy for a moment while
// the kernel finishes tearing down the killed processes.
func removeCgroup(ctx context.Context, dir string) error {
	for {
		err := syscall.Rmdir(dir)
		if err == nil || errors.Is(err, syscall.ENOENT) {
			return nil
		}
		if !errors.Is(err, syscall.EBUSY) {
			return fmt.Errorf("remove cgroup %s: %w", dir, err)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("remove cgroup %s: still busy: %w", dir, err)
		case <-time.After(20 * time.Millisecond):
		}
	}
}

var vmIDRe = regexp.MustCompile(vm.IDPattern)

// findProcs collects every live process that is this VM's VMM: from the meta
// file, the pidfile, the jailer's pid file, and a /proc scan (a crash may
// have happened before any file was written).
func (d *Driver) findProcs(id string, meta vm.Meta) []vm.Proc {
	seen := map[int]bool{}
	var out []vm.Proc
	add := func(p vm.Proc) {
		if p.PID > 0 && !seen[p.PID] && p.Exists() {
			seen[p.PID] = true
			out = append(out, p)
		}
	}
	add(meta.Proc)
	if p, err := d.sd.ReadPID(id); err == nil {
		add(p)
	}
	if p, err := d.jailPID(id); err == nil {
		add(p)
	}
	for _, p := range d.scanProcs()[id] {
		add(p)
	}
	return out
}

// List implements vm.Driver: VMs with a state directory of ours, a jail, or
// a live Firecracker process pointing into our directories.
func (d *Driver) List(ctx context.Context) ([]vm.Instance, error) {
	ids := map[string]bool{}
	sdIDs, err := d.sd.IDs()
	if err != nil {
		return nil, err
	}
	for _, id := range sdIDs {
		if m, err := d.sd.ReadMeta(id); err == nil && m.Driver != Name {
			continue
		} else if err != nil {
			if _, ferr := d.readFCMeta(id); ferr != nil {
				continue // not ours (or not yet known to be)
			}
		}
		ids[id] = true
	}
	if d.opts.UseJailer {
		// Jails are named after the canonical firecracker file, which a
		// symlink switched to a new release changes: every
		// <chroot_base>/*firecracker*/<vm id>.
		jails, _ := filepath.Glob(filepath.Join(d.opts.ChrootBase, "*firecracker*", "*"))
		for _, j := range jails {
			if fi, err := os.Lstat(j); err == nil && fi.IsDir() && vmIDRe.MatchString(filepath.Base(j)) {
				ids[filepath.Base(j)] = true
			}
		}
	}
	scan := d.scanProcs()
	for id := range scan {
		ids[id] = true
	}
	var out []vm.Instance
	for id := range ids {
		inst := vm.Instance{ID: id}
		meta, _ := d.sd.ReadMeta(id)
		for _, p := range append([]vm.Proc{meta.Proc}, scan[id]...) {
			if p.Alive() {
				inst.PID = p.PID
				break
			}
		}
		out = append(out, inst)
	}
	sortInstances(out)
	return out, ctx.Err()
}

// command builds the VMM command for one VM: firecracker directly, or the
// jailer that execs it.
func (d *Driver) command(spec vm.Spec, socket string, uid, gid int) *exec.Cmd {
	if d.opts.UseJailer {
		return exec.Command(d.opts.JailerBinary, d.jailArgs(spec.ID, spec.VCPUs, spec.MemoryMiB, uid, gid)...)
	}
	// Seccomp stays at Firecracker's default (on); the SDK's builder would
	// add --no-seccomp unless told otherwise.
	return exec.Command(d.opts.Binary, "--api-sock", socket, "--id", spec.ID)
}

// compile-time checks
var (
	_ vm.Driver         = (*Driver)(nil)
	_ vm.TimelineSource = (*Driver)(nil)
)
