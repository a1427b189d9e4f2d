// Package job is THE job lifecycle: the states a FireRunner job goes through,
// the allowed transitions between them, and the record the store persists.
package job

import (
	"fmt"
	"strconv"
	"time"
)

// State is where a job is in its lifecycle.
//
//		                 ┌──────────────── cancel / fail / restart ───────────────┐
//		                 │                                                        ▼
//		queued ──► runner_created ──► vm_starting ──► running ──► cleaning ──► done | failed | canceled
//		  │  ▲            │                 │                        ▲
//		  │  └────────────┘ restart         └────────────────────────┘ (any mid-flight state → cleaning)
//		  └──► done | failed | canceled   (nothing was created yet: no cleanup needed)
//
//	  - queued:         accepted (webhook or poll), waiting for host capacity.
//	    It ends without a runner when its job ends first: canceled, or run
//	    (done or failed) by a runner with the same tags made for another job.
//	  - runner_created: capacity reserved; a GitLab runner exists (runner_id set).
//	  - vm_starting:    vm_id set and the driver asked to start the VM; the runner
//	    in it has not been seen picking a job yet (start timeout applies).
//	  - running:        the VM's runner picked a job (job event "running" with our
//	    runner id, or the job is no longer pending); max job duration applies.
//	  - cleaning:       the outcome is decided (Outcome, Reason); the VM is being
//	    destroyed and the runner deleted. Every step is idempotent, so a restart
//	    simply repeats cleaning.
//	  - done, failed, canceled: terminal; nothing of the job is left on the host
//	    or in GitLab.
//
// runner_created → queued and vm_starting → queued exist for restarts only:
// the runner token is never persisted, so after a crash before the VMM ran
// (runner_created, or vm_starting with no live VMM and no job picked), the
// runner and any VM leftovers are deleted and the job goes back to the queue
// to get a fresh runner.
type State string

// The states, in lifecycle order.
const (
	Queued        State = "queued"
	RunnerCreated State = "runner_created"
	VMStarting    State = "vm_starting"
	Running       State = "running"
	Cleaning      State = "cleaning"
	Done          State = "done"
	Failed        State = "failed"
	Canceled      State = "canceled"
)

// States lists every state in lifecycle order (metrics export all of them).
var States = []State{Queued, RunnerCreated, VMStarting, Running, Cleaning, Done, Failed, Canceled}

// transitions is the whole state machine: from → allowed next states.
var transitions = map[State][]State{
	Queued:        {RunnerCreated, Cleaning, Done, Failed, Canceled},
	RunnerCreated: {VMStarting, Cleaning, Queued},
	VMStarting:    {Running, Cleaning, Queued},
	Running:       {Cleaning},
	Cleaning:      {Done, Failed, Canceled},
}

// Terminal reports whether s is an end state.
func (s State) Terminal() bool { return s == Done || s == Failed || s == Canceled }

// Active reports whether the job still holds (or may hold) resources.
func (s State) Active() bool { return !s.Terminal() }

// Valid reports whether s is a known state.
func (s State) Valid() bool {
	for _, k := range States {
		if s == k {
			return true
		}
	}
	return false
}

// CanTransition reports whether from → to is allowed.
func CanTransition(from, to State) bool {
	for _, n := range transitions[from] {
		if n == to {
			return true
		}
	}
	return false
}

// TransitionError is returned for a move the state machine forbids.
type TransitionError struct {
	JobID    int64
	From, To State
}

func (e *TransitionError) Error() string {
	return fmt.Sprintf("job %d: transition %s → %s is not allowed", e.JobID, e.From, e.To)
}

// Reasons recorded when a job fails or is canceled; the record's Reason starts
// with one of these, optionally followed by ": detail". Metrics use the prefix.
const (
	ReasonCompleted       = "completed"        // VM ended after the job (done)
	ReasonJobCanceled     = "job_canceled"     // GitLab said canceled
	ReasonJobFailed       = "job_failed"       // GitLab said failed (the job, not FireRunner)
	ReasonJobSucceeded    = "job_succeeded"    // GitLab said success; VM torn down
	ReasonNotPending      = "not_pending"      // job no longer pending when we got to it
	ReasonRunnerLimit     = "runner_limit"     // GitLab's runner creation cap reached
	ReasonRunnerCreate    = "runner_create"    // other runner creation error
	ReasonVMStart         = "vm_start"         // driver failed to start the VM
	ReasonStartTimeout    = "start_timeout"    // runner did not pick a job in time
	ReasonMaxDuration     = "max_duration"     // job ran past limits.job_max_duration
	ReasonVMExit          = "vm_exit"          // VM ended with non-zero exit / error
	ReasonNetwork         = "network"          // tap/address setup failed
	ReasonTooBig          = "too_big"          // size exceeds total host capacity
	ReasonQueueTimeout    = "queue_timeout"    // waited too long for capacity
	ReasonRestartLost     = "restart_vm_lost"  // after restart, the VM was gone
	ReasonShutdown        = "shutdown"         // drain timeout hit at SIGTERM
	ReasonRestartRequeued = "restart_requeued" // runner_created → queued after restart
	ReasonIdleRunner      = "idle_runner"      // its job ran on another of our VMs; nothing left for its runner
)

// Job is one GitLab CI job FireRunner serves, as persisted by the store.
type Job struct {
	ID          int64 // GitLab job (build) id; unique: one record, one VM
	ProjectID   int64
	ProjectPath string
	PipelineID  int64
	Name        string
	Ref         string
	Tags        []string // the job's tag_list (the runner gets exactly these)
	SizeTag     string   // the firecracker-NcpU-Mgb tag that chose the size
	VCPUs       int
	MemoryMiB   int
	Source      string // "webhook" or "poll"

	State   State
	Outcome State  // while cleaning: the terminal state to end in
	Reason  string // why the job failed/was canceled (see Reason* constants)

	RunnerID    int64  // GitLab runner created for this job (0 = none)
	VMID        string // host VM id (empty = none)
	PickedJobID int64  // job the VM's runner actually picked (may differ!)
	ExitCode    *int   // guest workload exit code when known

	CreatedAt time.Time
	UpdatedAt time.Time
	Timeline  Timeline
}

// Timeline holds the wall-clock time of each milestone (zero = not reached).
type Timeline struct {
	WebhookReceived time.Time // webhook (or poll) saw the job pending
	TagsFetched     time.Time // tag_list read from the API
	RunnerCreated   time.Time
	VMStartRequest  time.Time // driver.Start called
	VMStarted       time.Time // driver.Start returned (persisted with the next write: cleaning)
	JobPicked       time.Time // runner picked a job
	VMExited        time.Time // persisted with the cleaning transition
	VMDestroyed     time.Time
	RunnerDeleted   time.Time
	Finished        time.Time // terminal state reached
}

// Stage is one measured interval of the timeline (metrics histogram label).
type Stage struct {
	Name       string
	From, To   time.Time
	Duration   time.Duration
	Incomplete bool
}

// Stages derives the stage durations from the timeline, skipping stages
// whose end points were not reached.
func (t Timeline) Stages() []Stage {
	type span struct {
		name     string
		from, to time.Time
	}
	spans := []span{
		{"fetch_tags", t.WebhookReceived, t.TagsFetched},
		{"queue_and_runner", t.TagsFetched, t.RunnerCreated},
		{"vm_start", t.VMStartRequest, t.VMStarted},
		{"webhook_to_vm_start_request", t.WebhookReceived, t.VMStartRequest},
		{"wait_for_pick", t.VMStarted, t.JobPicked},
		{"vm_run", t.VMStarted, t.VMExited},
		{"cleanup", t.VMExited, t.Finished},
		{"total", t.WebhookReceived, t.Finished},
	}
	var out []Stage
	for _, s := range spans {
		if s.from.IsZero() || s.to.IsZero() {
			continue
		}
		out = append(out, Stage{Name: s.name, From: s.from, To: s.to, Duration: s.to.Sub(s.from)})
	}
	return out
}

// VMIDFor derives the host VM id from the job id: deterministic, so a crash
// between choosing the id and persisting it cannot leave an orphan the
// store does not know about (vm.IDPattern: "fr-" + up to 12 [a-z0-9]).
func VMIDFor(jobID int64) string {
	s := strconv.FormatUint(uint64(jobID), 36)
	if len(s) > 12 {
		s = s[len(s)-12:]
	}
	return "fr-" + s
}

// JobIDForVM inverts VMIDFor (ok=false for ids FireRunner did not derive).
func JobIDForVM(vmID string) (int64, bool) {
	if len(vmID) < 4 || vmID[:3] != "fr-" {
		return 0, false
	}
	n, err := strconv.ParseUint(vmID[3:], 36, 63)
	if err != nil || VMIDFor(int64(n)) != vmID { // round trip: lowercase, canonical
		return 0, false
	}
	return int64(n), true
}
