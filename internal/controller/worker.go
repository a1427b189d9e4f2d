package controller

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"time"

	"github.com/firerunner/firerunner/internal/guestconfig"
	"github.com/firerunner/firerunner/internal/job"
	"github.com/firerunner/firerunner/internal/runners"
	"github.com/firerunner/firerunner/internal/vm"
)

// runJob drives one admitted job through its lifecycle (see internal/job):
// runner → VM → supervise → cleanup. Each step persists before it acts.
func (c *Controller) runJob(t *task) {
	defer c.workers.Done()
	defer func() {
		c.mu.Lock()
		delete(c.tasks, t.jobID)
		c.mu.Unlock()
		c.sched.Release(t.jobID)
	}()
	ctx := c.baseCtx
	j, err := c.store.Get(ctx, t.jobID)
	if err != nil {
		c.log.Error("admitted job not in store", "job_id", t.jobID, "err", err)
		return
	}
	switch j.State {
	case job.Queued:
		var ok bool
		if j, ok = c.startJob(ctx, t, j); !ok {
			return
		}
	case job.VMStarting, job.Running:
		// Resumed after a restart: the VM is alive (checked by resume).
	case job.Cleaning:
		c.cleanup(j, j.Outcome, j.Reason)
		return
	default:
		return
	}
	outcome, reason, j := c.supervise(t, j)
	c.cleanup(j, outcome, reason)
}

// startJob creates the runner and starts the VM. ok=false means the job
// was finished (or left queued for shutdown) and the worker should return.
func (c *Controller) startJob(ctx context.Context, t *task, j job.Job) (job.Job, bool) {
	log := c.jobLog(j)
	if c.draining.Load() {
		return j, false // stays queued in the store; resumed on next start
	}
	if t.resumed {
		// Queued before a restart: the job may have been run or canceled since.
		gj, err := c.gl.GetJob(ctx, j.ProjectID, j.ID)
		if err == nil && gj.Status != "pending" {
			c.finishWithoutResources(ctx, j.ID, job.Canceled, fmt.Sprintf("%s: job is %s in GitLab", job.ReasonNotPending, gj.Status))
			return j, false
		}
		if c.gone(err) {
			c.finishWithoutResources(ctx, j.ID, job.Canceled, job.ReasonNotPending+": job not found")
			return j, false
		}
	}
	select {
	case <-t.stop:
		c.finishWithoutResources(ctx, j.ID, t.outcome, t.reason)
		return j, false
	default:
	}

	lease, err := c.prov.Acquire(ctx, runners.Request{JobID: j.ID, ProjectID: j.ProjectID, Tags: j.Tags, JobName: j.Name})
	if err != nil {
		reason := job.ReasonRunnerCreate + ": " + err.Error()
		if errors.Is(err, runners.ErrLimit) {
			reason = job.ReasonRunnerLimit + ": " + err.Error()
			c.m.RunnerLimitHits.Inc()
		}
		log.Error("runner creation failed; job failed", "reason", reason)
		c.finishWithoutResources(ctx, j.ID, job.Failed, reason)
		return j, false
	}
	// Runner id and VM id are persisted together, before the VM starts, so a
	// crash can never leave a VM or runner the store does not know (runners
	// created just before a crash are found by their description).
	vmID := job.VMIDFor(j.ID)
	id := j.ID
	j, err = c.store.UpdatePath(ctx, id, []job.State{job.RunnerCreated, job.VMStarting}, func(r *job.Job) error {
		now := time.Now()
		r.RunnerID, r.Timeline.RunnerCreated = lease.RunnerID, now
		r.VMID, r.Timeline.VMStartRequest = vmID, now
		return nil
	})
	if err != nil {
		// Could not record the runner: delete it now (reconcile would too).
		log.Error("recording runner and vm id failed", "err", err, "runner_id", lease.RunnerID)
		_ = c.prov.Release(context.WithoutCancel(ctx), lease)
		c.finishWithoutResources(ctx, id, job.Failed, job.ReasonRunnerCreate+": "+err.Error())
		return j, false
	}
	log = c.jobLog(j)
	log.Info("runner created", "runner", lease)
	spec := vm.Spec{
		ID: vmID, VCPUs: j.VCPUs, MemoryMiB: j.MemoryMiB, Image: c.img,
		Guest: guestconfig.Config{
			Hostname:       vmID,
			GitLabURL:      c.cfg.GuestGitLabURL(),
			RunnerToken:    lease.Token,
			JobTimeoutSec:  int(c.cfg.Limits.JobMaxDuration / time.Second),
			WaitTimeoutSec: int(c.cfg.Limits.VMStartTimeout / time.Second),
			UnixTimeNano:   time.Now().UnixNano(),
			EntropySeed:    newEntropy(),
		},
		Timeout: c.cfg.Limits.VMStartTimeout + c.cfg.Limits.JobMaxDuration + time.Minute,
	}
	if c.net != nil {
		att, gnet, err := c.net.Attach(ctx, vmID)
		if err != nil {
			log.Error("network setup failed", "err", err)
			c.cleanup(j, job.Failed, job.ReasonNetwork+": "+err.Error())
			return j, false
		}
		spec.Network, spec.Guest.Network = att, gnet
	}
	startCtx, cancel := context.WithTimeout(ctx, c.cfg.Limits.VMStartTimeout)
	err = c.drv.Start(startCtx, spec)
	cancel()
	if err != nil {
		log.Error("vm start failed", "err", err)
		c.cleanup(j, job.Failed, job.ReasonVMStart+": "+err.Error())
		return j, false
	}
	// Kept in memory and persisted with the next write (cleaning): one
	// transaction less per job; after a crash VMStartRequest stands in.
	j.Timeline.VMStarted = time.Now()
	log.Info("vm started", "vcpus", j.VCPUs, "memory_mib", j.MemoryMiB)
	return j, true
}

// gone reports whether err says the job no longer exists in GitLab.
func (c *Controller) gone(err error) bool {
	return err != nil && isNotFound(err)
}

// supervise waits for the VM to end, the job to end in GitLab, a deadline,
// or shutdown, and returns the outcome to clean up with.
func (c *Controller) supervise(t *task, j job.Job) (job.State, string, job.Job) {
	log := c.jobLog(j)
	waitCtx, cancelWait := context.WithCancel(c.baseCtx)
	defer cancelWait()
	type waited struct {
		res vm.Result
		err error
	}
	waitCh := make(chan waited, 1)
	go func() {
		r, err := c.drv.Wait(waitCtx, j.VMID)
		waitCh <- waited{r, err}
	}()

	started := j.Timeline.VMStarted
	if started.IsZero() {
		started = j.Timeline.VMStartRequest
	}
	if started.IsZero() {
		started = time.Now()
	}
	maxTimer := time.NewTimer(time.Until(started.Add(c.cfg.Limits.JobMaxDuration)))
	defer maxTimer.Stop()
	var startC <-chan time.Time
	if j.State == job.VMStarting && j.PickedJobID == 0 {
		st := time.NewTimer(time.Until(started.Add(c.cfg.Limits.VMStartTimeout)))
		defer st.Stop()
		startC = st.C
	}
	picked := t.picked
	for {
		select {
		case w := <-waitCh:
			// Persisted by cleanup's first write (merge), not here.
			j.Timeline.VMExited = time.Now()
			if w.err == nil {
				code := w.res.ExitCode
				j.ExitCode = &code
			}
			switch {
			case w.err != nil:
				if errors.Is(w.err, vm.ErrNotFound) {
					return job.Failed, job.ReasonRestartLost + ": vm not found on host", j
				}
				return job.Failed, job.ReasonVMExit + ": " + w.err.Error(), j
			case w.res.ExitCode == 0 && w.res.Reason == "":
				log.Info("vm powered off", "exit_code", 0)
				outcome, reason := c.pickedOutcome(j)
				return outcome, reason, j
			default:
				log.Warn("vm ended with an error", "exit_code", w.res.ExitCode, "vm_reason", w.res.Reason, "console_log", w.res.ConsoleLog)
				return job.Failed, fmt.Sprintf("%s: exit code %d %s", job.ReasonVMExit, w.res.ExitCode, w.res.Reason), j
			}
		case <-t.stop:
			return t.outcome, t.reason, j
		case <-picked:
			picked, startC = nil, nil
		case <-startC:
			startC = nil
			if cur, err := c.store.Get(c.baseCtx, j.ID); err == nil && cur.PickedJobID != 0 {
				continue
			}
			// The "running" webhook may have been lost: ask GitLab.
			if picked, ok := c.runnerPick(j); ok {
				if picked == 0 {
					log.Warn("runner did not pick a job before the start timeout; killing vm", "timeout", c.cfg.Limits.VMStartTimeout)
					return job.Failed, fmt.Sprintf("%s: no job picked within %s", job.ReasonStartTimeout, c.cfg.Limits.VMStartTimeout), j
				}
				log.Info("start timeout reached, but GitLab shows the runner picked a job (its webhook was lost); VM kept", "picked_job_id", picked)
				if u, err := c.store.Update(c.baseCtx, j.ID, func(r *job.Job) error {
					if r.PickedJobID == 0 {
						r.PickedJobID, r.Timeline.JobPicked = picked, time.Now()
					}
					if r.State == job.VMStarting {
						r.State = job.Running
					}
					return nil
				}); err == nil {
					j = u
				}
				continue
			}
			gj, err := c.gl.GetJob(c.baseCtx, j.ProjectID, j.ID)
			if err == nil && gj.Status != "pending" {
				log.Info("start timeout reached but the job left pending (webhook lost, or another of our runners took it); VM kept", "status", gj.Status)
				if u, err := c.store.Update(c.baseCtx, j.ID, func(r *job.Job) error {
					if r.State == job.VMStarting {
						r.State = job.Running
					}
					return nil
				}); err == nil {
					j.State = u.State
				}
				continue
			}
			log.Warn("runner did not pick the job before the start timeout; killing vm", "timeout", c.cfg.Limits.VMStartTimeout)
			return job.Failed, fmt.Sprintf("%s: no job picked within %s", job.ReasonStartTimeout, c.cfg.Limits.VMStartTimeout), j
		case <-maxTimer.C:
			log.Warn("job exceeded its maximum duration; killing vm", "max", c.cfg.Limits.JobMaxDuration)
			return job.Failed, fmt.Sprintf("%s: ran longer than %s", job.ReasonMaxDuration, c.cfg.Limits.JobMaxDuration), j
		}
	}
}

// runnerPick asks GitLab which job the VM's runner picked (0: none).
// ok=false when GitLab could not say (then the job's own status decides).
func (c *Controller) runnerPick(j job.Job) (picked int64, ok bool) {
	if j.RunnerID == 0 {
		return 0, false
	}
	ctx, cancel := context.WithTimeout(c.baseCtx, 30*time.Second)
	defer cancel()
	jobs, err := c.gl.RunnerJobs(ctx, j.RunnerID)
	if err != nil {
		c.jobLog(j).Warn("listing the runner's jobs failed", "err", err)
		return 0, false
	}
	if len(jobs) == 0 {
		return 0, true
	}
	return jobs[0].ID, true
}

// pickedOutcome is the outcome of a VM that powered off by itself: the
// GitLab status of the job its runner ran, since the VM often exits before
// the "finished" webhook arrives. "completed" when that status is unknown.
func (c *Controller) pickedOutcome(j job.Job) (job.State, string) {
	picked := j.PickedJobID
	if cur, err := c.store.Get(c.baseCtx, j.ID); err == nil && cur.PickedJobID != 0 {
		picked = cur.PickedJobID
	}
	if picked == 0 {
		return job.Done, job.ReasonCompleted
	}
	ctx, cancel := context.WithTimeout(c.baseCtx, 10*time.Second)
	defer cancel()
	gj, err := c.gl.GetJob(ctx, j.ProjectID, picked)
	if err != nil {
		// E.g. a group or instance runner ran a job of another project.
		c.jobLog(j).Info("status of the job the VM ran is unknown", "picked_job_id", picked, "err", err)
		return job.Done, job.ReasonCompleted
	}
	switch gj.Status {
	case "success", "failed", "canceled":
		return outcomeOf(gj.Status)
	}
	return job.Done, job.ReasonCompleted
}

// cleanup moves the job to cleaning with its outcome, destroys the VM,
// releases the network, deletes the runner, and ends the job. Every step is
// idempotent; if one fails the job stays in cleaning and reconcile retries.
func (c *Controller) cleanup(j job.Job, outcome job.State, reason string) {
	ctx := context.WithoutCancel(c.baseCtx) // cleanup must finish even at shutdown
	if !outcome.Terminal() {
		outcome = job.Failed
	}
	mem := j
	j, err := c.store.Update(ctx, j.ID, func(r *job.Job) error {
		if r.State.Terminal() {
			return nil
		}
		// Facts the worker only held in memory so far.
		if r.Timeline.VMStarted.IsZero() {
			r.Timeline.VMStarted = mem.Timeline.VMStarted
		}
		if r.Timeline.VMExited.IsZero() {
			r.Timeline.VMExited = mem.Timeline.VMExited
		}
		if r.ExitCode == nil {
			r.ExitCode = mem.ExitCode
		}
		if r.State != job.Cleaning {
			r.State, r.Outcome, r.Reason = job.Cleaning, outcome, reason
		}
		return nil
	})
	if err != nil {
		c.log.Error("entering cleaning failed; reconcile will retry", "job_id", mem.ID, "vm_id", mem.VMID, "err", err)
		return
	}
	if j.State.Terminal() {
		return
	}
	log := c.jobLog(j)
	var errs []string
	if j.VMID != "" {
		dctx, cancel := context.WithTimeout(ctx, time.Minute)
		err := c.drv.Destroy(dctx, j.VMID)
		cancel()
		if err != nil {
			errs = append(errs, "destroy vm: "+err.Error())
		} else if j.Timeline.VMDestroyed.IsZero() {
			j.Timeline.VMDestroyed = time.Now()
		}
		if c.net != nil {
			if err := c.net.Release(ctx, j.VMID); err != nil {
				errs = append(errs, "release network: "+err.Error())
			}
		}
	}
	// The runner goes only after the VM is gone, so no live runner token
	// outlives its runner's VM... and no VM runs with a deleted runner.
	if j.RunnerID != 0 && len(errs) == 0 {
		rctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
		err := c.prov.Release(rctx, runners.Lease{RunnerID: j.RunnerID})
		cancel()
		if err != nil {
			errs = append(errs, "delete runner: "+err.Error())
		} else if j.Timeline.RunnerDeleted.IsZero() {
			j.Timeline.RunnerDeleted = time.Now()
		}
	}
	tl := j.Timeline
	if len(errs) > 0 {
		_, _ = c.store.Update(ctx, j.ID, func(r *job.Job) error { r.Timeline = tl; return nil })
		log.Error("cleanup incomplete; reconcile will retry", "errors", strings.Join(errs, "; "))
		return
	}
	j, err = c.store.Update(ctx, j.ID, func(r *job.Job) error {
		r.Timeline = tl
		r.State = r.Outcome
		if !r.State.Terminal() {
			r.State = job.Failed
		}
		return nil
	})
	if err != nil {
		log.Error("finishing job failed", "err", err)
		return
	}
	c.finished(j)
}

// finished records metrics and the job's end-of-life log line with its timeline.
func (c *Controller) finished(j job.Job) {
	reasonKey, _, _ := strings.Cut(j.Reason, ":")
	c.m.JobsFinished.WithLabelValues(string(j.State), reasonKey).Inc()
	attrs := []any{"state", j.State, "reason", j.Reason, "runner_id", j.RunnerID}
	if j.ExitCode != nil {
		attrs = append(attrs, "exit_code", *j.ExitCode)
	}
	var stages []any
	for _, s := range j.Timeline.Stages() {
		c.m.StageDuration.WithLabelValues(s.Name).Observe(s.Duration.Seconds())
		stages = append(stages, slog.Duration(s.Name, s.Duration))
	}
	attrs = append(attrs, slog.Group("stages", stages...))
	lvl := slog.LevelInfo
	if j.State == job.Failed {
		lvl = slog.LevelWarn
	}
	c.jobLog(j).Log(context.Background(), lvl, "job finished", attrs...)
}
