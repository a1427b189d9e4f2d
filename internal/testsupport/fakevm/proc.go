package fakevm

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"time"

	"github.com/firerunner/firerunner/internal/guestconfig"
	"github.com/firerunner/firerunner/internal/vm"
)

// ProcName is the process-backed fake driver's name.
const ProcName = "fakeproc"

// ProcOptions configure a ProcDriver.
type ProcOptions struct {
	// StateDir is FireRunner's state_dir: VMs live in <StateDir>/vms/<id>/
	// (vm.StateDir), like the real drivers'.
	StateDir string
	// Guest is the argv of the program that plays the guest; the VM's
	// directory is appended. It reads the config drive (config.img) there
	// and prints the console markers (guestconfig) to stdout, which is the
	// VM's console log.
	Guest []string
	// Env is the guest's environment (nil: none).
	Env []string
}

// ProcDriver is a fake vm.Driver whose "VM" is a process: a small guest
// program in its own session, with the real drivers' per-VM directory (meta
// and pid files, the 0600 config drive, the console log). Unlike Driver it
// keeps its VMs across FireRunner processes: a FireRunner killed with
// SIGKILL and started again finds, waits for and destroys the VMs the
// earlier one started, as with QEMU. For the chaos harness and tests only.
type ProcDriver struct {
	sd   vm.StateDir
	opts ProcOptions

	mu  sync.Mutex
	vms map[string]*procVM // started by this process
}

type procVM struct {
	proc   vm.Proc
	cmd    *exec.Cmd
	done   chan struct{} // closed once the child is reaped
	killed bool
}

// NewProc returns a process-backed fake driver.
func NewProc(o ProcOptions) (*ProcDriver, error) {
	if o.StateDir == "" || len(o.Guest) == 0 {
		return nil, errors.New("fakevm: proc driver needs a state dir and a guest program")
	}
	return &ProcDriver{sd: vm.NewStateDir(o.StateDir), opts: o, vms: map[string]*procVM{}}, nil
}

// Name implements vm.Driver.
func (d *ProcDriver) Name() string { return ProcName }

// StateDir is where the VMs live.
func (d *ProcDriver) StateDir() vm.StateDir { return d.sd }

// Start implements vm.Driver: per-VM dir, config drive, meta written before
// the fork (a crash right after it leaves a findable VM), then the guest.
func (d *ProcDriver) Start(_ context.Context, spec vm.Spec) (err error) {
	if err := spec.Validate(); err != nil {
		return err
	}
	if d.sd.Exists(spec.ID) {
		if m, err := d.sd.ReadMeta(spec.ID); err == nil && m.Proc.Alive() {
			return nil
		}
		return fmt.Errorf("vm %s: %w with no running guest; destroy it first", spec.ID, vm.ErrExists)
	}
	dir, err := d.sd.Create(spec.ID)
	if err != nil {
		return err
	}
	defer func() {
		if err != nil {
			_ = d.Destroy(context.Background(), spec.ID)
		}
	}()
	if err := guestconfig.WriteDrive(filepath.Join(dir, vm.ConfigDrive), spec.Guest); err != nil {
		return fmt.Errorf("vm %s: config drive: %w", spec.ID, err)
	}
	argv := append(append([]string(nil), d.opts.Guest...), dir+"/")
	meta := vm.MetaFromSpec(ProcName, spec, time.Now())
	meta.Argv = argv
	if err := d.sd.WriteMeta(meta); err != nil {
		return err
	}
	console, err := os.OpenFile(filepath.Join(dir, vm.ConsoleFile), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	defer console.Close()
	cmd := exec.Command(argv[0], argv[1:]...) // not CommandContext: the VM outlives ctx
	cmd.Dir, cmd.Env = dir, d.opts.Env
	cmd.Stdout, cmd.Stderr = console, console
	cmd.SysProcAttr = vm.SysProcAttr()
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("vm %s: start guest: %w", spec.ID, err)
	}
	proc, perr := vm.LookupProc(cmd.Process.Pid)
	if perr != nil {
		proc = vm.Proc{PID: cmd.Process.Pid}
	}
	in := &procVM{proc: proc, cmd: cmd, done: make(chan struct{})}
	go func() { _ = cmd.Wait(); close(in.done) }()
	d.mu.Lock()
	d.vms[spec.ID] = in
	d.mu.Unlock()
	meta.Proc, meta.Started = proc, time.Now()
	return d.sd.WriteMeta(meta)
}

// Wait implements vm.Driver, also for a VM an earlier process started.
func (d *ProcDriver) Wait(ctx context.Context, id string) (vm.Result, error) {
	d.mu.Lock()
	in, mine := d.vms[id]
	d.mu.Unlock()
	if mine {
		select {
		case <-in.done:
		case <-ctx.Done():
			return vm.Result{ExitCode: -1}, ctx.Err()
		}
		d.mu.Lock()
		killed := in.killed
		d.mu.Unlock()
		return d.result(id, killed), nil
	}
	if !d.sd.Exists(id) {
		return vm.Result{ExitCode: -1}, fmt.Errorf("vm %s: %w", id, vm.ErrNotFound)
	}
	if p := d.find(id); p.Alive() {
		if err := p.WaitGone(ctx); err != nil {
			return vm.Result{ExitCode: -1}, err
		}
	}
	return d.result(id, false), nil
}

// result reads the guest's exit status from its console log.
func (d *ProcDriver) result(id string, killed bool) vm.Result {
	log := d.sd.File(id, vm.ConsoleFile)
	code, found, _ := vm.ConsoleExitCode(log)
	r := vm.Result{ExitCode: code, ConsoleLog: log}
	switch {
	case killed:
		r.Reason = "killed"
	case !found:
		r.Reason = "guest reported no exit status"
	}
	return r
}

// find returns VM id's guest process (zero when there is none).
func (d *ProcDriver) find(id string) vm.Proc {
	if m, err := d.sd.ReadMeta(id); err == nil && m.Proc.PID != 0 {
		return m.Proc
	}
	if p, err := d.sd.ReadPID(id); err == nil {
		return p
	}
	if ps := vm.FindProcs(d.sd.Path(id) + "/"); len(ps) > 0 {
		return ps[0]
	}
	return vm.Proc{}
}

// Destroy implements vm.Driver: kill the guest's process group, wait until
// it is gone, remove the VM's directory. Unknown ids are fine.
func (d *ProcDriver) Destroy(ctx context.Context, id string) error {
	if !vm.ValidID(id) {
		return fmt.Errorf("vm id %q: must match %s", id, vm.IDPattern)
	}
	d.mu.Lock()
	in, mine := d.vms[id]
	if mine {
		select {
		case <-in.done:
		default:
			in.killed = true
		}
	}
	d.mu.Unlock()
	procs := []vm.Proc{d.find(id)}
	if mine {
		procs = append(procs, in.proc)
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
	if mine {
		select {
		case <-in.done:
		case <-ctx.Done():
			return fmt.Errorf("vm %s: reaping the guest: %w", id, ctx.Err())
		}
	}
	if err := d.sd.Remove(id); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	d.mu.Lock()
	delete(d.vms, id)
	d.mu.Unlock()
	return nil
}

// List implements vm.Driver: every VM with a directory, with its guest's
// pid while it runs.
func (d *ProcDriver) List(context.Context) ([]vm.Instance, error) {
	ids, err := d.sd.IDs()
	if err != nil {
		return nil, err
	}
	out := make([]vm.Instance, 0, len(ids))
	for _, id := range ids {
		in := vm.Instance{ID: id}
		if p := d.find(id); p.Alive() {
			in.PID = p.PID
		}
		out = append(out, in)
	}
	return out, nil
}

var _ vm.Driver = (*ProcDriver)(nil)
