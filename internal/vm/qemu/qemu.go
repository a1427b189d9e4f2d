// Package qemu is the VM driver that boots FireRunner guests under QEMU's
// microvm machine (KVM when a boot probe shows it works, TCG otherwise).
package qemu

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/firerunner/firerunner/internal/guestconfig"
	"github.com/firerunner/firerunner/internal/vm"
)

// Name is the driver's name (vm.driver), see Provider.
const Name = "qemu"

// Per-VM files besides the shared ones in package vm.
const (
	vmmLogFile = "vmm.log"     // qemu's own stdout/stderr
	resultFile = "result.json" // how the VM ended, once known
)

// Options configures a Driver.
type Options struct {
	// Binary is the qemu-system-x86_64 to run; default "qemu-system-x86_64".
	Binary string
	// Accel is "auto" (default), "kvm" or "tcg".
	Accel string
	// StateDir is the daemon's state_dir; VMs live in StateDir/vms/<id>/.
	StateDir string
	// NetworkMode is "user" (default; QEMU user-mode networking) or "tap"
	// (every Spec must carry a tap in Spec.Network).
	NetworkMode string
	// ConsoleLogDir, when set, keeps a copy of each console log
	// (<dir>/<id>.log, 0600) when the VM is destroyed.
	ConsoleLogDir string
	// Console caps the live console log and prunes ConsoleLogDir (zero
	// value: the defaults; see vm.NewConsolePolicy).
	Console vm.ConsolePolicy
	// KernelArgs are appended to the kernel command line (e.g. "quiet"). They
	// must not be secret: the kernel command line is readable in the guest.
	KernelArgs []string
	// TSCkHz overrides host TSC detection (0 = detect; see HostTSCkHz).
	TSCkHz int
	// Logger defaults to slog.Default().
	Logger *slog.Logger
}

// Validate reports the first problem with the options.
func (o Options) Validate() error {
	switch o.Accel {
	case AccelAuto, AccelKVM, AccelTCG:
	default:
		return fmt.Errorf("qemu: accel %q is not one of auto, kvm, tcg", o.Accel)
	}
	switch o.NetworkMode {
	case "user", "tap":
	default:
		return fmt.Errorf("qemu: network mode %q is not one of user, tap", o.NetworkMode)
	}
	if o.StateDir == "" {
		return errors.New("qemu: state dir is required")
	}
	if strings.ContainsAny(o.StateDir, ",:") {
		return fmt.Errorf("qemu: state dir %q must not contain ',' or ':' (QEMU option syntax)", o.StateDir)
	}
	return nil
}

// Driver runs VMs as qemu-system-x86_64 processes. Each VM is its own
// process group with a pidfile and meta file in its state dir, so a later
// FireRunner process can wait for, list and destroy it.
type Driver struct {
	opts   Options
	binary string
	sd     vm.StateDir
	log    *slog.Logger

	mu  sync.Mutex
	vms map[string]*instance // VMs started by this process
}

// instance is a VM this process started: we are the VMM's parent and reap it.
type instance struct {
	id       string
	cmd      *exec.Cmd
	proc     vm.Proc
	tl       *vm.Timeline
	watcher  *vm.ConsoleWatcher
	done     chan struct{} // closed once the VMM is reaped and result is set
	result   vm.Result
	mu       sync.Mutex
	timedOut bool
	killed   bool
}

var _ vm.Driver = (*Driver)(nil)
var _ vm.TimelineSource = (*Driver)(nil)

// New checks the options and the QEMU binary.
func New(o Options) (*Driver, error) {
	if o.Binary == "" {
		o.Binary = "qemu-system-x86_64"
	}
	if o.Accel == "" {
		o.Accel = AccelAuto
	}
	if o.NetworkMode == "" {
		o.NetworkMode = "user"
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	if err := o.Validate(); err != nil {
		return nil, err
	}
	bin, err := exec.LookPath(o.Binary)
	if err != nil {
		return nil, fmt.Errorf("qemu: %w (install qemu-system-x86)", err)
	}
	abs, err := filepath.Abs(o.StateDir)
	if err != nil {
		return nil, err
	}
	o.StateDir = abs
	return &Driver{
		opts: o, binary: bin, sd: vm.NewStateDir(abs),
		log: o.Logger.With("driver", Name), vms: map[string]*instance{},
	}, nil
}

// Name implements vm.Driver.
func (d *Driver) Name() string { return Name }

// StateDir is the per-VM directory tree this driver uses.
func (d *Driver) StateDir() vm.StateDir { return d.sd }

// Timeline returns the timeline of a VM started by this process.
func (d *Driver) Timeline(id string) (*vm.Timeline, bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if in, ok := d.vms[id]; ok {
		return in.tl, true
	}
	return nil, false
}

// ResolveAccel returns the accelerator VMs will use and why. With accel
// "auto" the first call runs the KVM boot probe (up to 15 s on a host whose
// KVM hangs guests) and caches it; call it at daemon start-up to take that
// off the first job's path. kernel is the image's vmlinux.
func (d *Driver) ResolveAccel(ctx context.Context, kernel string) (accel, reason string) {
	return resolveAccel(ctx, d.binary, d.opts.Accel, kernel)
}

// Prepare creates VM spec.ID's state dir and its config drive: all the
// per-VM disk preparation there is (the root disk is the shared read-only
// base image), so it costs O(1) whatever the image size.
func (d *Driver) Prepare(spec vm.Spec) (string, error) {
	dir, err := d.sd.Create(spec.ID)
	if err != nil {
		return "", err
	}
	g := spec.Guest
	if g.Hostname == "" {
		g.Hostname = spec.ID
	}
	if g.UnixTimeNano == 0 {
		g.UnixTimeNano = time.Now().UnixNano()
	}
	if len(g.EntropySeed) == 0 {
		g.EntropySeed = make([]byte, 64)
		if _, err := rand.Read(g.EntropySeed); err != nil {
			return dir, err
		}
	}
	if err := guestconfig.WriteDrive(filepath.Join(dir, vm.ConfigDrive), g); err != nil {
		return dir, fmt.Errorf("vm %s: write config drive: %w", spec.ID, err)
	}
	if spec.ScratchDiskBytes > 0 {
		if err := vm.CreateScratchDisk(context.Background(), filepath.Join(dir, vm.ScratchDisk), spec.ScratchDiskBytes, spec.Image.DockerSeed); err != nil {
			return dir, fmt.Errorf("vm %s: %w", spec.ID, err)
		}
	}
	return dir, nil
}

// Start implements vm.Driver. Starting a VM that is already running is a
// no-op; starting over the leftovers of a dead one is an error (Destroy first).
func (d *Driver) Start(ctx context.Context, spec vm.Spec) (err error) {
	if err := spec.Validate(); err != nil {
		return err
	}
	if err := checkNet(spec, d.opts.NetworkMode); err != nil {
		return err
	}
	for _, f := range []string{spec.Image.Kernel, spec.Image.Initrd, spec.Image.Rootfs} {
		if fi, err := os.Stat(f); err != nil || !fi.Mode().IsRegular() {
			return fmt.Errorf("vm %s: image file %s: not a readable regular file (%v)", spec.ID, f, err)
		}
	}
	d.mu.Lock()
	_, mine := d.vms[spec.ID]
	d.mu.Unlock()
	if mine {
		return nil
	}
	if d.sd.Exists(spec.ID) {
		if m, err := d.sd.ReadMeta(spec.ID); err == nil && m.Proc.Alive() {
			return nil
		}
		return fmt.Errorf("vm %s: %w with no running VMM; destroy it first", spec.ID, vm.ErrExists)
	}

	tl := &vm.Timeline{}
	created := time.Now()
	dir, err := d.Prepare(spec)
	if err != nil {
		if !errors.Is(err, vm.ErrExists) && dir != "" {
			_ = d.sd.Remove(spec.ID)
		}
		return err
	}
	defer func() {
		if err != nil {
			_ = d.Destroy(context.Background(), spec.ID)
		}
	}()
	tl.Mark(vm.MilestonePrepared)

	accel, why := resolveAccel(ctx, d.binary, d.opts.Accel, spec.Image.Kernel)
	l := launch{
		accel:       accel,
		consoleLog:  filepath.Join(dir, vm.ConsoleFile),
		configDrive: filepath.Join(dir, vm.ConfigDrive),
		extraKernel: d.opts.KernelArgs,
	}
	if spec.ScratchDiskBytes > 0 {
		l.scratchDisk = filepath.Join(dir, vm.ScratchDisk)
	}
	if spec.Guest.Warm {
		l.assignSock = filepath.Join(dir, vm.AssignFile)
	}
	if accel == AccelTCG {
		l.tscKHz = d.opts.TSCkHz
		if l.tscKHz == 0 {
			k, _, terr := HostTSCkHz()
			if terr != nil {
				d.log.Warn("no tsc_early_khz: TCG boots may hang", "vm", spec.ID, "err", terr)
			}
			l.tscKHz = k
		}
	}
	if spec.Network != nil && accel == AccelKVM {
		_, verr := os.Stat("/dev/vhost-net")
		l.vhostNet = verr == nil
	}
	args := qemuArgs(spec, l)

	meta := vm.MetaFromSpec(Name, spec, created)
	meta.Argv = append([]string{d.binary}, args...)
	// Written before the fork so a crash right after it leaves a findable VM.
	if err := d.sd.WriteMeta(meta); err != nil {
		return err
	}
	logf, err := os.OpenFile(filepath.Join(dir, vmmLogFile), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	defer logf.Close()
	cmd := exec.Command(d.binary, args...) // not CommandContext: the VM outlives ctx
	cmd.Dir = dir
	cmd.Env = []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin"}
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = vm.SysProcAttr()
	watcher := d.opts.Console.Watch(l.consoleLog, tl)
	if err := cmd.Start(); err != nil {
		watcher.Stop()
		return fmt.Errorf("vm %s: start qemu: %w", spec.ID, err)
	}
	tl.Mark(vm.MilestoneVMMStarted)
	proc, perr := vm.LookupProc(cmd.Process.Pid) // our unreaped child: /proc entry exists
	if perr != nil {
		proc = vm.Proc{PID: cmd.Process.Pid}
	}
	meta.Proc = proc
	meta.Started = time.Now()
	if spec.Timeout > 0 {
		meta.Deadline = meta.Started.Add(spec.Timeout)
	}
	in := &instance{id: spec.ID, cmd: cmd, proc: proc, tl: tl, watcher: watcher, done: make(chan struct{})}
	d.mu.Lock()
	d.vms[spec.ID] = in
	d.mu.Unlock()
	go d.supervise(in, cmd, meta.Deadline)
	if err := d.sd.WriteMeta(meta); err != nil {
		return err
	}
	d.log.Info("vm started", "vm", spec.ID, "pid", proc.PID, "accel", accel, "accel_reason", why,
		"vcpus", spec.VCPUs, "memory_mib", spec.MemoryMiB, "tap", tapName(spec), "timeout", spec.Timeout)
	return nil
}

func tapName(s vm.Spec) string {
	if s.Network == nil {
		return ""
	}
	return s.Network.TapName
}

// supervise reaps the VMM, enforces the deadline and records the result.
func (d *Driver) supervise(in *instance, cmd *exec.Cmd, deadline time.Time) {
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	var timer <-chan time.Time
	if !deadline.IsZero() {
		t := time.NewTimer(time.Until(deadline))
		defer t.Stop()
		timer = t.C
	}
	var werr error
	select {
	case werr = <-exited:
	case <-timer:
		in.mu.Lock()
		in.timedOut = true
		in.mu.Unlock()
		d.log.Warn("vm timed out; killing", "vm", in.id, "pid", in.proc.PID)
		_ = in.proc.KillGroup()
		werr = <-exited
	}
	in.watcher.Stop() // first: its final read stamps the last console lines
	in.tl.Mark(vm.MilestoneVMMExited)
	in.mu.Lock()
	timedOut, killed := in.timedOut, in.killed
	in.mu.Unlock()
	res := d.result(in.id, vmmStatus(cmd.ProcessState, werr), timedOut, killed)
	in.result = res
	d.saveResult(in.id, res)
	close(in.done)
}

// vmmStatus describes how the qemu process ended; "" for a clean exit 0.
func vmmStatus(ps *os.ProcessState, err error) string {
	if ps == nil {
		if err != nil {
			return err.Error()
		}
		return ""
	}
	if ws, ok := ps.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
		return "killed by " + ws.Signal().String()
	}
	if c := ps.ExitCode(); c != 0 {
		return fmt.Sprintf("exit status %d", c)
	}
	return ""
}

// result builds a Result from the console log and what we know of the VMM.
func (d *Driver) result(id, vmmStatus string, timedOut, killed bool) vm.Result {
	log := d.sd.File(id, vm.ConsoleFile)
	code, found, _ := vm.ConsoleExitCode(log)
	r := vm.Result{ExitCode: code, ConsoleLog: log}
	switch {
	case timedOut:
		r.Reason = "timeout"
	case killed:
		r.Reason = "killed"
	case vmmStatus != "":
		r.Reason = "vmm exited: " + vmmStatus + d.vmmLogTail(id)
	case !found:
		r.Reason = "vmm exited: guest reported no exit status" + d.vmmLogTail(id)
	}
	return r
}

// vmmLogTail is the last line qemu wrote to stderr, for error reasons.
func (d *Driver) vmmLogTail(id string) string {
	b, err := os.ReadFile(d.sd.File(id, vmmLogFile))
	if err != nil {
		return ""
	}
	s := strings.TrimSpace(string(b))
	if i := strings.LastIndexByte(s, '\n'); i >= 0 {
		s = s[i+1:]
	}
	if s == "" {
		return ""
	}
	if len(s) > 300 {
		s = s[:300]
	}
	return " (" + s + ")"
}

func (d *Driver) saveResult(id string, r vm.Result) {
	b, _ := json.Marshal(r)
	p := d.sd.File(id, resultFile)
	if err := os.WriteFile(p+".tmp", b, 0o600); err == nil {
		_ = os.Rename(p+".tmp", p)
	}
}

func (d *Driver) loadResult(id string) (vm.Result, bool) {
	var r vm.Result
	b, err := os.ReadFile(d.sd.File(id, resultFile))
	if err != nil || json.Unmarshal(b, &r) != nil {
		return r, false
	}
	return r, true
}

// Assign implements vm.Assigner: it connects to the warm VM's assignment
// socket (QEMU listens on it for the virtio-serial port) and hands over the
// job's runner.
func (d *Driver) Assign(ctx context.Context, id string, a guestconfig.Assignment) error {
	if !d.sd.Exists(id) {
		return fmt.Errorf("vm %s: %w", id, vm.ErrNotFound)
	}
	var dl net.Dialer
	conn, err := dl.DialContext(ctx, "unix", d.sd.File(id, vm.AssignFile))
	if err != nil {
		return fmt.Errorf("vm %s: assignment channel: %w", id, err)
	}
	defer conn.Close()
	return vm.SendAssignment(ctx, conn, a)
}

// Wait implements vm.Driver. For a VM started by an earlier FireRunner
// process it watches the pid (pidfd) and enforces the recorded deadline.
func (d *Driver) Wait(ctx context.Context, id string) (vm.Result, error) {
	d.mu.Lock()
	in, mine := d.vms[id]
	d.mu.Unlock()
	if mine {
		select {
		case <-in.done:
			return in.result, nil
		case <-ctx.Done():
			return vm.Result{ExitCode: -1}, ctx.Err()
		}
	}
	if !d.sd.Exists(id) {
		return vm.Result{ExitCode: -1}, fmt.Errorf("vm %s: %w", id, vm.ErrNotFound)
	}
	if r, ok := d.loadResult(id); ok {
		return r, nil
	}
	meta, err := d.sd.ReadMeta(id)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return vm.Result{ExitCode: -1}, err
	}
	proc := meta.Proc
	if proc.PID == 0 {
		proc = d.findVMM(id)
	}
	timedOut := false
	if proc.Alive() {
		// Adopted after a restart: keep its console log capped meanwhile.
		w := d.opts.Console.Watch(d.sd.File(id, vm.ConsoleFile), nil)
		defer w.Stop() // an early return; otherwise stopped below
		wctx := ctx
		if !meta.Deadline.IsZero() {
			var cancel context.CancelFunc
			wctx, cancel = context.WithDeadline(ctx, meta.Deadline)
			defer cancel()
		}
		if err := proc.WaitGone(wctx); err != nil {
			if ctx.Err() != nil {
				return vm.Result{ExitCode: -1}, ctx.Err()
			}
			// Our deadline, not the caller's: enforce the VM's timeout.
			d.log.Warn("adopted vm timed out; killing", "vm", id, "pid", proc.PID)
			_ = proc.KillGroup()
			kctx, cancel := context.WithTimeout(ctx, 30*time.Second)
			defer cancel()
			if err := proc.WaitGone(kctx); err != nil {
				return vm.Result{ExitCode: -1}, fmt.Errorf("vm %s: pid %d survived SIGKILL: %w", id, proc.PID, err)
			}
			timedOut = true
		}
		w.Stop() // its last read and cut come before the console is scanned
	}
	// Not our child: its exit status is unknown; the console tells the rest.
	r := d.result(id, "", timedOut, false)
	d.saveResult(id, r)
	return r, nil
}

// findVMM looks for a qemu whose argv names the VM's state dir (a VMM whose
// meta file never got its pid).
func (d *Driver) findVMM(id string) vm.Proc {
	if p, err := d.sd.ReadPID(id); err == nil {
		return p
	}
	if ps := vm.FindProcs(d.sd.Path(id) + "/"); len(ps) > 0 {
		return ps[0]
	}
	return vm.Proc{}
}

// Destroy implements vm.Driver: SIGKILL the VMM's process group, reap it,
// keep a copy of the console log if configured, remove the state dir.
func (d *Driver) Destroy(ctx context.Context, id string) error {
	if !vm.ValidID(id) {
		return fmt.Errorf("vm id %q: must match %s", id, vm.IDPattern)
	}
	d.mu.Lock()
	in, mine := d.vms[id]
	d.mu.Unlock()
	if mine {
		in.mu.Lock()
		select {
		case <-in.done:
		default:
			in.killed = true
		}
		in.mu.Unlock()
		if err := in.proc.KillGroup(); err != nil {
			return err
		}
		// Belt and braces: os.Process signals through a pidfd, so this can
		// never hit a reused pid even if /proc lookups failed at Start.
		_ = in.cmd.Process.Kill()
		select {
		case <-in.done: // supervise reaped it: no zombie
		case <-ctx.Done():
			return fmt.Errorf("vm %s: waiting for the VMM to die: %w", id, ctx.Err())
		}
	} else if d.sd.Exists(id) {
		meta, _ := d.sd.ReadMeta(id)
		procs := []vm.Proc{meta.Proc}
		if meta.Proc.PID == 0 || !meta.Proc.Exists() {
			procs = vm.FindProcs(d.sd.Path(id) + "/")
		}
		for _, p := range procs {
			if err := p.KillGroup(); err != nil {
				return err
			}
			wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
			err := p.WaitGone(wctx)
			cancel()
			if err != nil {
				return fmt.Errorf("vm %s: pid %d survived SIGKILL: %w", id, p.PID, err)
			}
		}
	}
	if d.opts.ConsoleLogDir != "" && d.sd.Exists(id) {
		if err := vm.KeepConsoleLog(d.sd.File(id, vm.ConsoleFile), d.opts.ConsoleLogDir, id, d.opts.Console); err != nil {
			d.log.Warn("could not keep console log", "vm", id, "err", err)
		}
	}
	if err := d.sd.Remove(id); err != nil {
		return err
	}
	if mine {
		in.tl.Mark(vm.MilestoneDestroyed)
		d.mu.Lock()
		delete(d.vms, id)
		d.mu.Unlock()
	}
	return nil
}

// List implements vm.Driver: every VM with a state dir, with its VMM pid
// when one is alive.
func (d *Driver) List(ctx context.Context) ([]vm.Instance, error) {
	ids, err := d.sd.IDs()
	if err != nil {
		return nil, err
	}
	out := make([]vm.Instance, 0, len(ids))
	for _, id := range ids {
		inst := vm.Instance{ID: id}
		meta, err := d.sd.ReadMeta(id)
		p := meta.Proc
		if err != nil || p.PID == 0 {
			p = d.findVMM(id)
		}
		if p.Alive() {
			inst.PID = p.PID
		}
		out = append(out, inst)
	}
	return out, nil
}
