// Package fakevm is a vm.Driver that boots nothing, with configurable delays,
// exit codes and failure injection. For controller unit tests and benchmarks
// only: it has no vm.Provider and is in no driver registry; tests call New.
package fakevm

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"sync"
	"time"

	"github.com/firerunner/firerunner/internal/guestconfig"
	"github.com/firerunner/firerunner/internal/vm"
)

// Options shape the fake VMs.
type Options struct {
	// StartDelay is slept in Start (simulated VMM start).
	StartDelay time.Duration
	// RunFor makes each VM power off by itself after this long; 0 = the VM
	// runs until Exit or Destroy.
	RunFor time.Duration
	// ExitCode is reported when a VM powers off by itself after RunFor.
	ExitCode int
	// StartError, when set, is called by Start; a non-nil result fails Start.
	StartError func(spec vm.Spec) error
	// OnStart is called at the beginning of every Start (benchmark timing).
	OnStart func(spec vm.Spec)
}

type instance struct {
	spec   vm.Spec
	done   chan struct{}
	result vm.Result
	once   sync.Once
	timer  *time.Timer
}

func (i *instance) stop(r vm.Result) {
	i.once.Do(func() {
		i.result = r
		close(i.done)
	})
}

// Driver is the fake driver. Its "host" is memory, so a test simulates a
// FireRunner crash by handing the same Driver to a new controller.
type Driver struct {
	opts Options

	mu        sync.Mutex
	vms       map[string]*instance
	specs     []vm.Spec
	destroyed []string
	assigned  map[string]guestconfig.Assignment
}

// New returns a fake driver.
func New(o Options) *Driver { return &Driver{opts: o, vms: map[string]*instance{}} }

// Name implements vm.Driver.
func (d *Driver) Name() string { return "fake" }

// Start implements vm.Driver: validates the spec like a real driver and
// records it.
func (d *Driver) Start(ctx context.Context, spec vm.Spec) error {
	if d.opts.OnStart != nil {
		d.opts.OnStart(spec)
	}
	if err := spec.Validate(); err != nil {
		return err
	}
	if d.opts.StartDelay > 0 {
		select {
		case <-time.After(d.opts.StartDelay):
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	if d.opts.StartError != nil {
		if err := d.opts.StartError(spec); err != nil {
			return err
		}
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if _, ok := d.vms[spec.ID]; ok {
		return fmt.Errorf("fake: vm %s already exists", spec.ID)
	}
	in := &instance{spec: spec, done: make(chan struct{})}
	if d.opts.RunFor > 0 {
		code := d.opts.ExitCode
		in.timer = time.AfterFunc(d.opts.RunFor, func() { in.stop(vm.Result{ExitCode: code}) })
	}
	d.vms[spec.ID] = in
	d.specs = append(d.specs, spec)
	return nil
}

// Wait implements vm.Driver.
func (d *Driver) Wait(ctx context.Context, id string) (vm.Result, error) {
	d.mu.Lock()
	in, ok := d.vms[id]
	d.mu.Unlock()
	if !ok {
		return vm.Result{}, vm.ErrNotFound
	}
	select {
	case <-in.done:
		return in.result, nil
	case <-ctx.Done():
		return vm.Result{}, ctx.Err()
	}
}

// Destroy implements vm.Driver: kills and forgets the VM (unknown id: nil).
func (d *Driver) Destroy(_ context.Context, id string) error {
	d.mu.Lock()
	in, ok := d.vms[id]
	delete(d.vms, id)
	if ok {
		d.destroyed = append(d.destroyed, id)
		if in.timer != nil { // timer is written under d.mu in Start
			in.timer.Stop()
		}
	}
	d.mu.Unlock()
	if ok {
		in.stop(vm.Result{ExitCode: -1, Reason: "killed"})
	}
	return nil
}

// Assign implements vm.Assigner: a warm VM's assignment is recorded (the
// token included: tests check it reached the right VM).
func (d *Driver) Assign(_ context.Context, id string, a guestconfig.Assignment) error {
	if err := a.Validate(); err != nil {
		return err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	i, ok := d.vms[id]
	if !ok {
		return fmt.Errorf("fake: vm %s: %w", id, vm.ErrNotFound)
	}
	if !i.spec.Guest.Warm {
		return fmt.Errorf("fake: vm %s was not started warm", id)
	}
	if _, dup := d.assigned[id]; dup {
		return fmt.Errorf("fake: vm %s was assigned twice", id)
	}
	if d.assigned == nil {
		d.assigned = map[string]guestconfig.Assignment{}
	}
	d.assigned[id] = a
	return nil
}

// Assignment returns what warm VM id was assigned (ok=false: nothing yet).
func (d *Driver) Assignment(id string) (guestconfig.Assignment, bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	a, ok := d.assigned[id]
	return a, ok
}

// Running reports whether VM id is running (started, not exited or destroyed).
func (d *Driver) Running(id string) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	i, ok := d.vms[id]
	if !ok {
		return false
	}
	select {
	case <-i.done:
		return false
	default:
		return true
	}
}

// List implements vm.Driver. Like the real drivers' it lists VMs that
// powered off but were not destroyed yet, with no PID.
func (d *Driver) List(context.Context) ([]vm.Instance, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	out := make([]vm.Instance, 0, len(d.vms))
	for id, in := range d.vms {
		pid := 1
		select {
		case <-in.done:
			pid = 0
		default:
		}
		out = append(out, vm.Instance{ID: id, PID: pid})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out, nil
}

// ErrUnknown is returned by Exit for an unknown VM.
var ErrUnknown = errors.New("fake: unknown vm")

// Exit makes a VM power off by itself with the given exit code (the guest
// workload finished).
func (d *Driver) Exit(id string, code int) error {
	d.mu.Lock()
	in, ok := d.vms[id]
	d.mu.Unlock()
	if !ok {
		return ErrUnknown
	}
	in.stop(vm.Result{ExitCode: code})
	return nil
}

// Adopt puts a VM on the fake host without Start (a VM left by an earlier
// process, or one FireRunner does not know).
func (d *Driver) Adopt(id string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if _, ok := d.vms[id]; !ok {
		d.vms[id] = &instance{spec: vm.Spec{ID: id}, done: make(chan struct{})}
	}
}

// Specs returns every spec Start accepted, in order.
func (d *Driver) Specs() []vm.Spec {
	d.mu.Lock()
	defer d.mu.Unlock()
	return append([]vm.Spec(nil), d.specs...)
}

// Destroyed returns the ids Destroy removed, in order.
func (d *Driver) Destroyed() []string {
	d.mu.Lock()
	defer d.mu.Unlock()
	return append([]string(nil), d.destroyed...)
}

var _ vm.Driver = (*Driver)(nil)
