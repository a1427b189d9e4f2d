// Package job is every state change FireRunner makes: the records of GitLab
// jobs, of the VMs that run them and of the runners inside those VMs, their
// states, and the named operations that are the single writers of each move.
//
// Three records, linked but separate, because GitLab hands a runner any
// pending job whose tags are a subset of its own: the VM started for job A
// may run job B.
//
//   - Job: one GitLab job FireRunner serves, as GitLab sees it: waiting
//     (queued), picked (running, with the VM and runner that took it), or
//     ended with GitLab's status (done, failed, canceled) or with the reason
//     FireRunner gave up on it.
//   - VM: one microVM on this host and its one-job runner, from planned to
//     gone.
//   - Runner: one GitLab runner FireRunner created, from created to deleted.
//
// Every operation checks its precondition and changes the record in memory;
// the store persists it (and logs the transition) in one transaction before
// the controller acts on the new state.
package job

import (
	"errors"
	"fmt"
	"time"

	"github.com/firerunner/firerunner/internal/tags"
)

// State is where a job is, as GitLab would say it.
//
//		new ──► queued ──► running ──► done | failed | canceled
//		 │        │ ▲ retry   (picked)
//		 │        │ └─┘
//		 │        └──► done | failed | canceled   (ended while waiting; or failed: FireRunner gave up)
//		 └──► ignored   (not FireRunner's: no size tag, a bad one, or unreadable)
//
//	  - new:     an event named the job; its tags are not read yet.
//	  - queued:  FireRunner's, pending in GitLab; a VM of ours is (being) made
//	    ready to take it. Failed attempts (runner creation, VM start, start
//	    timeout, …) come back here with back-off, up to a limit.
//	  - running: a runner picked it: one of ours (VMID, RunnerID set) or
//	    another one (VMID empty, RunnerID the other runner, 0 if unknown).
//	  - done, failed, canceled: GitLab's final status (success is done); or
//	    failed with FireRunner's reason when it gave up (Reason says why).
//	  - ignored: not FireRunner's; kept so duplicate events stay cheap.
type State string

// Job states.
const (
	New      State = "new"
	Queued   State = "queued"
	Running  State = "running"
	Done     State = "done"
	Failed   State = "failed"
	Canceled State = "canceled"
	Ignored  State = "ignored"
)

// States lists every job state (metrics export all of them).
var States = []State{New, Queued, Running, Done, Failed, Canceled, Ignored}

var transitions = map[State][]State{
	New:     {Queued, Running, Done, Failed, Canceled, Ignored},
	Queued:  {Queued, Running, Done, Failed, Canceled},
	Running: {Done, Failed, Canceled},
}

// Terminal reports whether s is an end state.
func (s State) Terminal() bool { return s == Done || s == Failed || s == Canceled || s == Ignored }

// Active reports whether the job may still need FireRunner.
func (s State) Active() bool { return !s.Terminal() }

// Valid reports whether s is a known state.
func (s State) Valid() bool { return s == New || s == Queued || s == Running || s.Terminal() }

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
	Object   string // "job 12" or "vm fr-x"
	From, To string
}

func (e *TransitionError) Error() string {
	return fmt.Sprintf("%s: transition %s → %s is not allowed", e.Object, e.From, e.To)
}

// ErrStale is returned by an operation whose precondition no longer holds
// (another event moved the record first); the caller re-reads and decides
// again instead of acting.
var ErrStale = errors.New("record moved on")

// Reasons. A job's or VM's Reason starts with one of these, optionally
// followed by ": detail"; metrics use the prefix.
const (
	ReasonSucceeded    = "job_succeeded"   // GitLab: success
	ReasonJobFailed    = "job_failed"      // GitLab: failed (the job, not FireRunner)
	ReasonJobCanceled  = "job_canceled"    // GitLab: canceled or skipped
	ReasonNotOurs      = "not_ours"        // no firecracker size tag
	ReasonBadTag       = "bad_tag"         // a firecracker- tag the grammar rejects
	ReasonUnreadable   = "unreadable"      // GitLab refused to show the job (404/403)
	ReasonRunnerLimit  = "runner_limit"    // GitLab's runner creation cap
	ReasonRunnerCreate = "runner_create"   // other runner creation error
	ReasonVMStart      = "vm_start"        // the driver failed to start the VM
	ReasonNetwork      = "network"         // tap/address setup failed
	ReasonStartTimeout = "start_timeout"   // the VM's runner took no job in time
	ReasonVMExit       = "vm_exit"         // the VM ended before or while running a job
	ReasonMaxDuration  = "max_duration"    // ran longer than limits.job_max_duration
	ReasonTooBig       = "too_big"         // larger than the host's total capacity
	ReasonQueueTimeout = "queue_timeout"   // waited longer than limits.queue_timeout
	ReasonAttempts     = "attempts"        // every start attempt failed
	ReasonShutdown     = "shutdown"        // FireRunner stopped while the VM ran
	ReasonRestartLost  = "restart_vm_lost" // the VM was gone after a restart
	ReasonIdle         = "idle_runner"     // no waiting job can use the VM's runner
	ReasonRanJob       = "ran_job"         // the VM ran its job and is torn down
	ReasonJobEnded     = "job_ended"       // the job the VM was made for ended before the VM took any
	ReasonVMLost       = "vm_lost"         // the VM that ran the job is gone and GitLab never ended the job
	ReasonPoolIdle     = "idle_timeout"    // a pool's warm VM waited longer than its pool's idle_timeout
	ReasonTokenRotated = "token_rotated"   // a VM on a pool's shared runner whose token was rotated (restart, pool removed) took no job
	ReasonHostLost     = "host_lost"       // the fleet host the VM ran on stopped heartbeating; another host reconciled its jobs
)

// GitLab job statuses FireRunner distinguishes.
const (
	StatusPending  = "pending"
	StatusRunning  = "running"
	StatusSuccess  = "success"
	StatusFailed   = "failed"
	StatusCanceled = "canceled"
	StatusSkipped  = "skipped"
)

// StatusRank orders GitLab statuses so that a late, older event never
// overwrites a newer one (0 = unknown).
func StatusRank(s string) int {
	switch s {
	case "created", "waiting_for_resource", "preparing", "scheduled", "manual", StatusPending:
		return 1
	case StatusRunning:
		return 2
	case StatusSuccess, StatusFailed, StatusCanceled, StatusSkipped:
		return 3
	}
	return 0
}

// StatusFinal reports whether a GitLab job status is final.
func StatusFinal(s string) bool { return StatusRank(s) == 3 }

// Job is one GitLab job, as FireRunner persists it.
type Job struct {
	ID          int64 // GitLab job (build) id
	ProjectID   int64
	ProjectPath string
	PipelineID  int64
	Name        string
	Ref         string
	Tags        []string // the job's tag_list as GitLab gave it
	SizeTag     string   // the size tag that chose the VM size
	VCPUs       int
	MemoryMiB   int
	Source      string // how FireRunner learned of it: webhook, poll, picked
	// HostID is the host that claimed the waiting job (a fleet on one
	// PostgreSQL store): only it plans VMs for the job. Empty: unclaimed,
	// and always on a single host's store.
	HostID string

	State  State
	Reason string // for failed/canceled/ignored; the last retry reason while queued

	Attempts  int       // failed attempts to get it a VM
	NotBefore time.Time // queued: no new VM before this (back-off)

	// GitLab's last word on the job (webhook or API), never moved backwards.
	GitLabStatus string
	GitLabRunner int64 // the runner GitLab says took it (0: none or unknown)
	ObservedAt   time.Time

	VMID     string // the VM of ours that ran it
	RunnerID int64  // the runner that ran it (ours or not)
	ExitCode *int   // exit code of the VM that ran it, when known

	CreatedAt time.Time
	UpdatedAt time.Time
	Timeline  Timeline
}

// TagSet is the job's canonical tag set.
func (j *Job) TagSet() tags.Set { return tags.NewSet(j.Tags) }

// Timeline holds when each milestone of a job was reached (zero = not yet).
type Timeline struct {
	WebhookReceived time.Time // first event (or poll) that named the job
	TagsFetched     time.Time // tag_list read from the API
	VMStartRequest  time.Time // a VM for it was asked to start (latest attempt)
	JobPicked       time.Time // a runner took it
	Finished        time.Time // terminal state reached
}

// Stage is one measured interval (metrics histogram label).
type Stage struct {
	Name     string
	Duration time.Duration
}

// span is one named interval of a timeline.
type span struct {
	name     string
	from, to time.Time
}

// stages measures the spans whose both ends were reached.
func stages(spans ...span) []Stage {
	var out []Stage
	for _, s := range spans {
		if !s.from.IsZero() && !s.to.IsZero() {
			out = append(out, Stage{Name: s.name, Duration: s.to.Sub(s.from)})
		}
	}
	return out
}

// Stages derives the job's stage durations.
func (t Timeline) Stages() []Stage {
	return stages(
		span{"fetch_tags", t.WebhookReceived, t.TagsFetched},
		span{"webhook_to_vm_start_request", t.WebhookReceived, t.VMStartRequest},
		span{"webhook_to_pick", t.WebhookReceived, t.JobPicked},
		span{"run", t.JobPicked, t.Finished},
		span{"total", t.WebhookReceived, t.Finished},
	)
}

// Observe records what GitLab said about the job (webhook or API) if it is
// not older than what is known. It is input, not a state change: the
// reconciler acts on it.
func (j *Job) Observe(status string, runnerID int64, at time.Time) bool {
	if StatusRank(status) == 0 || StatusRank(status) < StatusRank(j.GitLabStatus) {
		return false
	}
	if status == j.GitLabStatus && (runnerID == 0 || runnerID == j.GitLabRunner) {
		return false
	}
	j.GitLabStatus, j.ObservedAt = status, at
	if runnerID != 0 {
		j.GitLabRunner = runnerID
	}
	return true
}

// Confirm records GitLab's status read from the API, which outranks any
// webhook: it may move the status back when a final status came from a
// forged (or mistaken) event.
func (j *Job) Confirm(status string, runnerID int64, at time.Time) {
	j.GitLabStatus, j.ObservedAt = status, at
	if runnerID != 0 {
		j.GitLabRunner = runnerID
	}
}

// Accept makes a new job FireRunner's, with the size its tags chose.
func (j *Job) Accept(tagList []string, size tags.Size, now time.Time) error {
	if err := j.move(Queued, ""); err != nil {
		return err
	}
	j.Tags, j.SizeTag, j.VCPUs, j.MemoryMiB = tagList, size.Tag(), size.VCPUs, size.MemoryMiB()
	j.Timeline.TagsFetched = now
	return nil
}

// Ignore ends a new job that is not FireRunner's.
func (j *Job) Ignore(tagList []string, reason string) error {
	j.Tags = tagList
	return j.move(Ignored, reason)
}

// Retry records a failed attempt to get the job a VM and backs it off; it
// stays queued.
func (j *Job) Retry(reason string, notBefore time.Time) error {
	if j.State != Queued {
		return ErrStale
	}
	j.Attempts++
	j.NotBefore = notBefore
	return j.move(Queued, fmt.Sprintf("%s (attempt %d)", reason, j.Attempts))
}

// Wait queues a job again without charging an attempt: what stopped this
// one is outside the job and FireRunner (GitLab's runner-creation cap) and
// passes by itself; GitLab keeps the job pending meanwhile.
func (j *Job) Wait(reason string, notBefore time.Time) error {
	if j.State != Queued {
		return ErrStale
	}
	j.NotBefore = notBefore
	return j.move(Queued, reason)
}

// GiveUp fails a job that is still waiting: FireRunner cannot serve it.
// GitLab keeps it pending for other runners (or its own stuck-job timeout).
func (j *Job) GiveUp(reason string) error {
	if j.State != Queued && j.State != New {
		return ErrStale
	}
	return j.move(Failed, reason)
}

// Picked records that a runner took the job: ours when vmID is set.
func (j *Job) Picked(vmID string, runnerID int64, now time.Time) error {
	if j.State == Running && j.VMID == vmID && j.RunnerID == runnerID {
		return nil
	}
	if j.State != Queued && j.State != New {
		return ErrStale
	}
	j.VMID, j.RunnerID, j.Timeline.JobPicked = vmID, runnerID, now
	return j.move(Running, "")
}

// Finish ends the job with GitLab's final status.
func (j *Job) Finish(status string, exitCode *int) error {
	if j.State.Terminal() {
		return ErrStale
	}
	st, reason := OutcomeOf(status)
	if exitCode != nil {
		j.ExitCode = exitCode
	}
	return j.move(st, reason)
}

// Fail ends a running job whose VM FireRunner had to stop (max duration,
// shutdown) or lost, before GitLab reported its end.
func (j *Job) Fail(reason string, exitCode *int) error {
	if j.State != Running {
		return ErrStale
	}
	if exitCode != nil {
		j.ExitCode = exitCode
	}
	return j.move(Failed, reason)
}

func (j *Job) move(to State, reason string) error {
	if !CanTransition(j.State, to) {
		return &TransitionError{Object: fmt.Sprintf("job %d", j.ID), From: string(j.State), To: string(to)}
	}
	j.State = to
	if reason != "" || to != Queued {
		j.Reason = reason
	}
	return nil
}

// OutcomeOf maps a final GitLab status to a job state and reason.
func OutcomeOf(status string) (State, string) {
	switch status {
	case StatusFailed:
		return Failed, ReasonJobFailed
	case StatusCanceled, StatusSkipped:
		return Canceled, ReasonJobCanceled
	}
	return Done, ReasonSucceeded
}
