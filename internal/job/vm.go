package job

import (
	"crypto/rand"
	"fmt"
	"strings"
	"time"

	"github.com/firerunner/firerunner/internal/tags"
)

// VMState is where one VM (and its one-job runner) is.
//
//		pending ──► starting ──► busy ──► stopping ──► gone
//		   │            │                    ▲
//		   └────────────┴────────────────────┘ (stop at any point)
//
//	  - pending:  planned for a waiting job; capacity held; nothing exists yet.
//	  - starting: its runner exists (RunnerID) and the VM is being started or
//	    runs; the runner has not taken a job yet, so it may take any job its
//	    tags cover (the planner counts it as idle).
//	  - busy:     its runner took job PickedJobID.
//	  - stopping: being torn down (Reason says why): VM destroyed, network
//	    released, runner deleted, in that order, each step idempotent.
//	  - gone:     nothing of it is left on the host or in GitLab.
type VMState string

// VM states.
const (
	VMPending  VMState = "pending"
	VMWarm     VMState = "warm"
	VMStarting VMState = "starting"
	VMBusy     VMState = "busy"
	VMStopping VMState = "stopping"
	VMGone     VMState = "gone"
)

// VMStates lists every VM state.
var VMStates = []VMState{VMPending, VMWarm, VMStarting, VMBusy, VMStopping, VMGone}

var vmTransitions = map[VMState][]VMState{
	VMPending:  {VMStarting, VMWarm, VMStopping},
	VMWarm:     {VMStarting, VMStopping},
	VMStarting: {VMBusy, VMStopping},
	VMBusy:     {VMStopping},
	VMStopping: {VMGone},
}

// Live reports whether the VM holds (or may hold) resources.
func (s VMState) Live() bool { return s != VMGone }

// Idle reports whether the VM's runner may still take a job.
func (s VMState) Idle() bool { return s == VMPending || s == VMWarm || s == VMStarting }

// VM is one microVM with its runner.
type VM struct {
	ID        string // vm.IDPattern: "fr-" + 10 random [a-z0-9]
	HostID    string
	ForJob    int64    // the waiting job it was started (or last retargeted) for
	ProjectID int64    // ForJob's project (a project runner serves only it)
	Tags      []string // its runner's tags: ForJob's tags
	VCPUs     int
	MemoryMiB int

	State       VMState
	Reason      string // why it is stopping
	RunnerID    int64  // 0 until created
	TagsStale   bool   // retargeted after its runner was created: GitLab has old tags
	PickedJobID int64  // the job its runner took
	ExitCode    *int   // from the guest, once it powered off
	ExitReason  string // the driver's reason when the VM did not end cleanly

	CreatedAt time.Time
	UpdatedAt time.Time
	Timeline  VMTimeline
}

// TagSet is the VM runner's canonical tag set.
func (v *VM) TagSet() tags.Set { return tags.NewSet(v.Tags) }

// VMTimeline holds when each milestone of a VM was reached (zero = not yet).
type VMTimeline struct {
	Planned       time.Time
	Ready         time.Time // a pool's VM: its guest waits for a job (gitlab-runner started)
	Assigned      time.Time // a pool's VM got its job
	RunnerCreated time.Time
	StartRequest  time.Time // driver.Start called
	Started       time.Time // driver.Start returned
	Picked        time.Time // its runner took a job
	Exited        time.Time // the VMM ended
	StopRequested time.Time
	Destroyed     time.Time
	RunnerDeleted time.Time
	Gone          time.Time
}

// Stages derives the VM's stage durations.
func (t VMTimeline) Stages() []Stage {
	return stages(
		span{"runner_create", later(t.Planned, t.Assigned), t.RunnerCreated},
		span{"pool_refill", t.Planned, t.Ready},
		span{"vm_start", t.StartRequest, t.Started},
		span{"wait_for_pick", t.Started, t.Picked},
		span{"vm_run", t.Started, t.Exited},
		span{"cleanup", t.StopRequested, t.Gone},
	)
}

func later(a, b time.Time) time.Time {
	if b.After(a) {
		return b
	}
	return a
}

// NewVMID returns a fresh VM id ("fr-" + 10 random base-36 characters: 15
// characters in all, the longest a Linux interface name may be, since the
// tap is named after the VM).
func NewVMID() string {
	const alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
	b := make([]byte, 10)
	_, _ = rand.Read(b)
	for i := range b {
		b[i] = alphabet[int(b[i])%len(alphabet)]
	}
	return "fr-" + string(b)
}

// Warm reports whether the VM is a pool's VM that no job was assigned yet.
func (v *VM) Warm() bool { return v.ForJob == 0 && (v.State == VMPending || v.State == VMWarm) }

// PlanWarmVM is the record of a pool's VM: no job, no tags, no runner yet.
func PlanWarmVM(id, hostID string, vcpus, memoryMiB int, now time.Time) VM {
	return VM{ID: id, HostID: hostID, VCPUs: vcpus, MemoryMiB: memoryMiB, State: VMPending, CreatedAt: now,
		Timeline: VMTimeline{Planned: now}}
}

// WarmStarted records that a pool's VM booted without a runner (it may have
// been assigned a job meanwhile: its runner then goes over the channel).
func (v *VM) WarmStarted(now time.Time) error {
	v.Timeline.Started = now
	if v.State == VMStopping {
		return nil
	}
	return v.move(VMWarm, "")
}

// WarmReady records that a pool's VM's guest waits for a job.
func (v *VM) WarmReady(now time.Time) {
	if v.Timeline.Ready.IsZero() {
		v.Timeline.Ready = now
	}
}

// AssignTo gives a pool's unassigned VM a waiting job of its size: its
// runner is made with the job's tags and handed over the assignment channel.
func (v *VM) AssignTo(j Job, now time.Time) error {
	if !v.Warm() || v.VCPUs != j.VCPUs || v.MemoryMiB != j.MemoryMiB {
		return ErrStale
	}
	v.ForJob, v.ProjectID, v.Tags, v.Timeline.Assigned = j.ID, j.ProjectID, j.Tags, now
	return nil
}

// PlanVM is the record of a VM planned for a waiting job.
func PlanVM(id, hostID string, j Job, now time.Time) VM {
	return VM{ID: id, HostID: hostID, ForJob: j.ID, ProjectID: j.ProjectID, Tags: j.Tags, VCPUs: j.VCPUs, MemoryMiB: j.MemoryMiB,
		State: VMPending, CreatedAt: now, Timeline: VMTimeline{Planned: now}}
}

// Retarget points an idle VM at another waiting job of the same size; its
// runner gets that job's tags (TagsStale until GitLab has them).
func (v *VM) Retarget(j Job) error {
	if !v.State.Idle() || v.VCPUs != j.VCPUs || v.MemoryMiB != j.MemoryMiB || v.ProjectID != j.ProjectID {
		return ErrStale
	}
	v.ForJob, v.Tags = j.ID, j.Tags
	v.TagsStale = v.RunnerID != 0
	return nil
}

// TagsSynced records that GitLab has the runner's current tags.
func (v *VM) TagsSynced() { v.TagsStale = false }

// RunnerCreated records the VM's runner, created with tags createdWith (the
// VM may have been retargeted meanwhile: then GitLab's tags are stale). A
// VM stopped meanwhile keeps the runner id, so that stopping deletes it.
func (v *VM) RunnerCreated(runnerID int64, createdWith []string, now time.Time) error {
	v.RunnerID, v.Timeline.RunnerCreated = runnerID, now
	v.TagsStale = tags.Key(createdWith) != tags.Key(v.Tags)
	switch v.State {
	case VMStopping:
		return nil
	case VMPending:
		v.Timeline.StartRequest = now
		return v.move(VMStarting, "")
	case VMWarm:
		return v.move(VMStarting, "") // its runner goes over the assignment channel now
	}
	return ErrStale
}

// Started records that the driver started the VMM.
func (v *VM) Started(now time.Time) { v.Timeline.Started = now }

// Picked records the job the VM's runner took.
func (v *VM) Picked(jobID int64, now time.Time) error {
	switch {
	case v.State == VMBusy && v.PickedJobID == jobID:
		return nil
	case v.PickedJobID != 0 && v.PickedJobID != jobID:
		return fmt.Errorf("vm %s: runner %d took job %d, and now job %d: %w", v.ID, v.RunnerID, v.PickedJobID, jobID, ErrStale)
	case v.State == VMStopping && v.PickedJobID == 0:
		// Stopped as idle in the same instant its runner took a job: the
		// record must say which job this VM ran even as it goes.
		v.PickedJobID, v.Timeline.Picked = jobID, now
		return nil
	case v.State != VMStarting:
		return ErrStale
	}
	v.PickedJobID, v.Timeline.Picked = jobID, now
	return v.move(VMBusy, "")
}

// Exited records that the VMM ended (code from the guest, or a driver reason).
func (v *VM) Exited(code *int, reason string, now time.Time) {
	if v.Timeline.Exited.IsZero() {
		v.ExitCode, v.ExitReason, v.Timeline.Exited = code, reason, now
	}
}

// Stop starts tearing the VM down; the first reason wins.
func (v *VM) Stop(reason string, now time.Time) error {
	switch v.State {
	case VMStopping:
		return nil
	case VMGone:
		return ErrStale
	}
	v.Timeline.StopRequested = now
	return v.move(VMStopping, reason)
}

// Destroyed records that the VM and its network are gone from the host.
func (v *VM) Destroyed(now time.Time) {
	if v.Timeline.Destroyed.IsZero() {
		v.Timeline.Destroyed = now
	}
}

// RunnerDeleted records that the VM's runner is deleted in GitLab.
func (v *VM) RunnerDeleted(now time.Time) {
	if v.Timeline.RunnerDeleted.IsZero() && v.RunnerID != 0 {
		v.Timeline.RunnerDeleted = now
	}
}

// Gone ends a stopped VM.
func (v *VM) Gone(now time.Time) error {
	v.Timeline.Gone = now
	return v.move(VMGone, v.Reason)
}

func (v *VM) move(to VMState, reason string) error {
	ok := false
	for _, n := range vmTransitions[v.State] {
		ok = ok || n == to
	}
	if !ok {
		return &TransitionError{Object: "vm " + v.ID, From: string(v.State), To: string(to)}
	}
	v.State = to
	if reason != "" {
		v.Reason = reason
	}
	return nil
}

// ReasonKey is a reason's metric label: the part before the first colon.
func ReasonKey(reason string) string {
	k, _, _ := strings.Cut(reason, ":")
	k, _, _ = strings.Cut(k, " (")
	return k
}

// Runner is one GitLab runner FireRunner created.
type Runner struct {
	ID        int64 // GitLab runner id
	HostID    string
	Mode      string // "oneoff"
	VMID      string // the VM whose gitlab-runner uses it
	Tags      []string
	CreatedAt time.Time
	DeletedAt time.Time // zero while it exists
}

// Active reports whether the runner still exists in GitLab.
func (r *Runner) Active() bool { return r.DeletedAt.IsZero() }

// SystemID is the gitlab-runner system_id of VM id's gitlab-runner
// ("fr-abc…" → "s_frabc…": s_ and 12 letters or digits, gitlab-runner's
// format). GitLab names the runner manager of each VM by it, so the VM
// that ran a job on a pooled runner, shared by many VMs, can be told from
// the job's runner_manager.
func SystemID(vmID string) string {
	return "s_fr" + strings.TrimPrefix(vmID, "fr-")
}

// VMIDFromSystemID reverses SystemID; ok is false for a system_id that is
// not one of FireRunner's VMs.
func VMIDFromSystemID(systemID string) (string, bool) {
	rest, ok := strings.CutPrefix(systemID, "s_fr")
	if !ok || len(rest) != 10 {
		return "", false
	}
	for _, c := range rest {
		if (c < 'a' || c > 'z') && (c < '0' || c > '9') {
			return "", false
		}
	}
	return "fr-" + rest, true
}

// Pooled reports whether the VM's gitlab-runner uses a pool's shared runner
// (runners.mode pooled): a runner handed over with no job of its own. Such
// a VM takes whatever job GitLab gives it, its runner is never retagged,
// paused or deleted with it.
func (v *VM) Pooled() bool { return v.ForJob == 0 && v.RunnerID != 0 }
