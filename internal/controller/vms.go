package controller

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"time"

	"github.com/firerunner/firerunner/internal/gitlabapi"
	"github.com/firerunner/firerunner/internal/job"
	"github.com/firerunner/firerunner/internal/runners"
	"github.com/firerunner/firerunner/internal/store"
)

// reconcileVM takes the next step for one VM:
//   - pending: create its runner, attach its network, start it;
//   - starting/busy: its VMM is watched; act on its exit, a finished job,
//     the start timeout, the maximum duration, or the plan finding it idle;
//   - stopping: destroy the VM, release its network, delete its runner.
func (c *Controller) reconcileVM(ctx context.Context, id string) error {
	v, err := c.store.GetVM(ctx, id)
	if errors.Is(err, store.ErrNotFound) {
		return nil
	}
	if err != nil {
		return err
	}
	if c.fleet && v.HostID != c.host {
		return nil // another host's VM: its VMM is not here
	}
	switch v.State {
	case job.VMPending:
		if v.ForJob == 0 {
			return c.startWarm(ctx, v)
		}
		return c.startVM(ctx, v)
	case job.VMWarm:
		return c.superviseWarm(ctx, v)
	case job.VMStarting, job.VMBusy:
		return c.superviseVM(ctx, v)
	case job.VMStopping:
		return c.stopVM(ctx, v)
	}
	c.unwatch(id)
	return nil
}

func (c *Controller) vmLog(v job.VM) *slog.Logger {
	return c.log.With("vm_id", v.ID, "for_job_id", v.ForJob, "runner_id", v.RunnerID)
}

// startVM creates the runner and starts the VM. The runner's token lives
// only in this function's memory and on the VM's 0600 config drive: after
// a crash here the VM is stopped (its token is lost) and its job planned
// again.
func (c *Controller) startVM(ctx context.Context, v job.VM) error {
	if c.draining.Load() || c.isSurplus(v.ID) {
		return c.stopFor(ctx, v.ID, c.idleReason())
	}
	lease, v, done, err := c.createRunner(ctx, v)
	if done || err != nil {
		return err
	}
	log := c.vmLog(v)
	log.Info("runner created", "runner", lease)
	if v.State == job.VMStopping {
		return c.stopVM(ctx, v) // stopped while its runner was being created
	}
	spec := c.spec(v, 0)
	spec.Guest.GitLabURL, spec.Guest.RunnerToken = c.cfg.GuestGitLabURL(), lease.Token
	if c.net != nil {
		att, gnet, err := c.net.Attach(ctx, v.ID)
		if err != nil {
			log.Error("network setup failed", "err", err)
			return c.failAttempt(ctx, v, job.ReasonNetwork+": "+err.Error(), false)
		}
		spec.Network, spec.Guest.Network = att, gnet
	}
	startCtx, cancel := context.WithTimeout(ctx, c.cfg.Limits.VMStartTimeout)
	err = c.drv.Start(startCtx, spec)
	cancel()
	if err != nil {
		log.Error("vm start failed", "err", err)
		return c.failAttempt(ctx, v, job.ReasonVMStart+": "+err.Error(), false)
	}
	c.watch(v.ID)
	if v, err = c.store.UpdateVM(ctx, v.ID, func(x *job.VM) error { x.Started(time.Now()); return nil }); err != nil {
		return err
	}
	log.Info("vm started", "vcpus", v.VCPUs, "memory_mib", v.MemoryMiB, "tags", v.Tags)
	if v.State == job.VMStopping {
		return c.stopVM(ctx, v)
	}
	c.q.AddAfter(vmKey(v.ID), c.cfg.Limits.VMStartTimeout)
	return nil
}

// superviseVM acts on a VM whose runner exists.
func (c *Controller) superviseVM(ctx context.Context, v job.VM) error {
	log := c.vmLog(v)
	if v.Timeline.Exited.IsZero() && !c.watching(v.ID) {
		// After a restart: adopt the VMM if it still runs.
		alive, err := c.vmAlive(ctx, v.ID)
		if err != nil {
			return err
		}
		if !alive {
			log.Warn("vm gone after restart; its runner's token is lost")
			if v.State == job.VMStarting {
				// Its runner may have taken (and run) a job while FireRunner
				// was down, the "running" hook lost with it: GitLab knows.
				if picked, err := c.pickedWhileDown(ctx, v); picked || err != nil {
					return err
				}
				if v.Pooled() {
					return c.stopFor(ctx, v.ID, job.ReasonRestartLost+": vm was not running after restart")
				}
				return c.failAttempt(ctx, v, job.ReasonRestartLost+": vm was not running after restart", false)
			}
			return c.stopFor(ctx, v.ID, job.ReasonRestartLost+": vm was not running after restart")
		}
		log.Info("vm still running after restart; watching it again", "state", v.State)
		c.watch(v.ID)
	}
	if !v.Timeline.Exited.IsZero() {
		return c.vmExited(ctx, v)
	}
	if v.State == job.VMBusy {
		return c.superviseBusy(ctx, v)
	}
	if v.Pooled() {
		return c.supervisePoller(ctx, v)
	}
	if v.TagsStale {
		if err := c.prov.Retag(ctx, v.RunnerID, v.Tags); err != nil {
			return err
		}
		if _, err := c.store.UpdateVM(ctx, v.ID, func(x *job.VM) error { x.TagsSynced(); return nil }); err != nil {
			return err
		}
		log.Info("runner retargeted to another waiting job", "tags", v.Tags)
		c.m.Reconcile.WithLabelValues("runner_retagged").Inc()
	}
	started := startedAt(v)
	timedOut := time.Since(started) >= c.cfg.Limits.VMStartTimeout
	paused := c.isPaused(v.ID) // decided to stop it already
	if !timedOut && !paused && !c.isSurplus(v.ID) && !c.draining.Load() {
		c.q.AddAfter(vmKey(v.ID), time.Until(started.Add(c.cfg.Limits.VMStartTimeout)))
		return nil
	}
	// About to stop an idle VM: its runner may have taken a job whose
	// "running" hook is late (or was lost). GitLab knows. The runner is
	// paused first, so that it takes no job between GitLab's answer and
	// the VM's end (that job would die with the VM); a job it took runs on.
	if stop := timedOut || !c.draining.Load(); stop && !paused {
		if err := c.gl.PauseRunner(ctx, v.RunnerID); err != nil && !gitlabapi.IsNotFound(err) {
			if time.Since(started) < c.cfg.Limits.VMStartTimeout+time.Minute {
				return err // retry with back-off
			}
			log.Warn("cannot pause the runner; stopping the VM all the same", "err", err)
		}
		c.setPaused(v.ID)
		paused = true
	}
	jobs, err := c.gl.RunnerJobs(ctx, v.RunnerID)
	if err != nil {
		if time.Since(started) < c.cfg.Limits.VMStartTimeout+time.Minute {
			return err // retry with back-off before deciding without GitLab
		}
		log.Warn("cannot list the runner's jobs; treating the VM as idle", "err", err)
	}
	if len(jobs) > 0 {
		return c.pickFromGitLab(ctx, v, jobs[0])
	}
	switch {
	case c.draining.Load() && !timedOut && !paused:
		// Draining: an idle VM may still take its job until the drain
		// timeout; Shutdown stops what is left.
		c.q.AddAfter(vmKey(v.ID), time.Second)
		return nil
	case timedOut:
		log.Warn("runner took no job before the start timeout; stopping vm", "timeout", c.cfg.Limits.VMStartTimeout)
		return c.failAttempt(ctx, v, fmt.Sprintf("%s: no job taken within %s", job.ReasonStartTimeout, c.cfg.Limits.VMStartTimeout), false)
	}
	log.Info("no waiting job can use this vm's runner; stopping it")
	return c.stopFor(ctx, v.ID, c.idleReason())
}

// pickedWhileDown asks GitLab whether the runner of v, a VM found gone
// after a restart before any pick was recorded, took a job; if so that is
// recorded (v turns busy, job.ErrStale makes its reconcile run again) and
// no attempt failed. Without an answer from GitLab it retries with back-off
// for a while, then decides without it.
func (c *Controller) pickedWhileDown(ctx context.Context, v job.VM) (bool, error) {
	if v.RunnerID == 0 {
		return false, nil
	}
	jobs, err := c.runnerJobs(ctx, v)
	if err != nil {
		if !gitlabapi.IsNotFound(err) && time.Since(v.Timeline.StartRequest) < c.cfg.Limits.VMStartTimeout+time.Minute {
			return false, err
		}
		c.vmLog(v).Warn("cannot list the runner's jobs; treating the VM as lost", "err", err)
		return false, nil
	}
	if len(jobs) == 0 {
		return false, nil
	}
	if err := c.pickFromGitLab(ctx, v, jobs[0]); err != nil {
		return true, err
	}
	return true, job.ErrStale
}

// pickFromGitLab records the job GitLab says v's runner took, when its
// "running" hook has not been seen (late, or lost).
func (c *Controller) pickFromGitLab(ctx context.Context, v job.VM, gj gitlabapi.Job) error {
	status := gj.Status
	if job.StatusRank(status) < 2 {
		status = job.StatusRunning
	}
	_, _, err := c.store.Observe(ctx, store.Observation{JobID: gj.ID, ProjectID: gj.ProjectID, Status: status,
		RunnerID: v.RunnerID, Source: "picked", At: time.Now(), Create: true})
	if err != nil {
		return err
	}
	c.vmLog(v).Info("GitLab says the runner took a job whose running hook had not arrived", "picked_job_id", gj.ID)
	return c.recordPick(ctx, gj.ID, v.RunnerID, true)
}

// createRunner creates the runner of the job v is for and records it with
// v (state starting) in one transaction; the token stays in the returned
// lease only. done is true when the attempt failed and was handled (the VM
// stopped, the job retried or given up).
func (c *Controller) createRunner(ctx context.Context, v job.VM) (lease runners.Lease, _ job.VM, done bool, err error) {
	fj, err := c.store.GetJob(ctx, v.ForJob)
	if err != nil {
		return lease, v, false, err
	}
	createdWith := v.Tags
	lease, err = c.prov.Acquire(ctx, runners.Request{VMID: v.ID, JobID: v.ForJob, ProjectID: v.ProjectID, Tags: createdWith, JobName: fj.Name})
	if err != nil {
		if errors.Is(err, runners.ErrLimit) {
			c.m.RunnerLimitHits.Inc()
			return lease, v, true, c.failAttempt(ctx, v, job.ReasonRunnerLimit+": "+err.Error(), false)
		}
		return lease, v, true, c.failAttempt(ctx, v, job.ReasonRunnerCreate+": "+err.Error(), gitlabapi.IsPermanent(err))
	}
	now := time.Now()
	err = c.store.Tx(ctx, func(tx *store.Tx) error {
		var err error
		if v, err = tx.UpdateVM(v.ID, func(x *job.VM) error { return x.RunnerCreated(lease.RunnerID, createdWith, now) }); err != nil {
			return err
		}
		if err := tx.PutRunner(job.Runner{ID: lease.RunnerID, HostID: c.host, Mode: c.prov.Name(), VMID: v.ID, Tags: createdWith}); err != nil {
			return err
		}
		_, err = tx.UpdateJob(v.ForJob, func(r *job.Job) error {
			if r.State == job.Queued {
				r.Timeline.VMStartRequest = now
			}
			return nil
		})
		return err
	})
	if err != nil {
		// Not recorded: delete it now (the sweep would find it by its description too).
		_ = c.prov.Release(context.WithoutCancel(ctx), runners.Lease{RunnerID: lease.RunnerID})
		return lease, v, false, err
	}
	return lease, v, false, nil
}

// startedAt is when a VM's runner could start taking jobs: the VM's start,
// or, for a pool's VM, when its runner was handed over.
func startedAt(v job.VM) time.Time {
	t := v.Timeline.Started
	if t.IsZero() {
		t = v.Timeline.StartRequest
	}
	if v.Timeline.RunnerCreated.After(t) {
		t = v.Timeline.RunnerCreated
	}
	return t
}

// guestReportGrace is how long past job_max_duration the host waits before
// it kills a busy VM. The guest's agent has the same limit (counted from
// its own start, a boot later) and, when it ends gitlab-runner there,
// reports the job failed (job_execution_timeout) to GitLab itself; the
// host's kill is the backstop for a guest that cannot, after which the job
// stays "running" in GitLab until GitLab's stuck-job cleanup.
func guestReportGrace(max time.Duration) time.Duration {
	return min(30*time.Second, max/2)
}

// superviseBusy stops a VM whose job ended in GitLab, or that ran too long.
func (c *Controller) superviseBusy(ctx context.Context, v job.VM) error {
	pj, err := c.store.GetJob(ctx, v.PickedJobID)
	if err != nil && !errors.Is(err, store.ErrNotFound) {
		return err
	}
	if err == nil && pj.State.Terminal() {
		return c.stopFor(ctx, v.ID, job.ReasonRanJob)
	}
	base := startedAt(v)
	if v.Pooled() && !v.Timeline.Picked.IsZero() {
		base = v.Timeline.Picked // it may have polled a long while before its job came
	}
	deadline := base.Add(c.cfg.Limits.JobMaxDuration + guestReportGrace(c.cfg.Limits.JobMaxDuration))
	if time.Now().Before(deadline) {
		c.q.AddAfter(vmKey(v.ID), time.Until(deadline))
		return nil
	}
	reason := fmt.Sprintf("%s: ran longer than %s", job.ReasonMaxDuration, c.cfg.Limits.JobMaxDuration)
	c.vmLog(v).Warn("job exceeded its maximum duration; killing vm", "picked_job_id", v.PickedJobID, "max", c.cfg.Limits.JobMaxDuration)
	return c.stopFor(ctx, v.ID, reason)
}

// vmExited acts on a VMM that ended by itself.
func (c *Controller) vmExited(ctx context.Context, v job.VM) error {
	code := -1
	if v.ExitCode != nil {
		code = *v.ExitCode
	}
	clean := code == 0 && v.ExitReason == ""
	if v.State == job.VMStarting {
		// No pick recorded: the "running" hook may be late or lost while
		// the job already ran. GitLab knows whether the runner took one.
		if v.RunnerID != 0 {
			jobs, err := c.runnerJobs(ctx, v)
			if err != nil && time.Since(v.Timeline.Exited) < time.Minute {
				return err
			}
			if len(jobs) > 0 {
				if err := c.pickFromGitLab(ctx, v, jobs[0]); err != nil {
					return err
				}
				return job.ErrStale // reconcile again as busy
			}
		}
		if v.Pooled() {
			// A pool's VM whose gitlab-runner took no job before its wait
			// timeout (the pool's idle time) ended by itself: recycled.
			reason := fmt.Sprintf("%s: its gitlab-runner took no job (exit code %d %s)", job.ReasonPoolIdle, code, v.ExitReason)
			if !clean {
				reason = fmt.Sprintf("%s: pool's vm ended before taking a job (exit code %d %s)", job.ReasonVMExit, code, v.ExitReason)
			}
			return c.stopFor(ctx, v.ID, reason)
		}
		// It ended before its runner took anything: the attempt failed.
		return c.failAttempt(ctx, v, fmt.Sprintf("%s: vm ended before taking a job (exit code %d %s)", job.ReasonVMExit, code, v.ExitReason), false)
	}
	if clean {
		c.vmLog(v).Info("vm powered off after its job", "picked_job_id", v.PickedJobID)
		return c.stopFor(ctx, v.ID, job.ReasonRanJob)
	}
	c.vmLog(v).Warn("vm ended with an error", "exit_code", code, "vm_reason", v.ExitReason, "picked_job_id", v.PickedJobID)
	return c.stopFor(ctx, v.ID, fmt.Sprintf("%s: exit code %d %s", job.ReasonVMExit, code, v.ExitReason))
}

// capRetry is how long a job waits after GitLab's runner-creation cap
// refused its runner: 15 × limits.retry_backoff (30 s by default), at
// most 5 minutes. The cap counts only runners that still exist, so it frees
// as other jobs of the project or group end and their runners are deleted.
func (c *Controller) capRetry() time.Duration {
	return min(5*time.Minute, max(15*c.cfg.Limits.RetryBackoff, 100*time.Millisecond))
}

// failAttempt stops a VM that never got its runner to take a job, and
// charges the failed attempt to the job it was made for: back-off and a
// new plan while attempts remain and the error may pass, else give up.
// GitLab's runner-creation cap (runner_limit) charges nothing: the job
// stays pending in GitLab, so it stays queued here (records match GitLab's)
// and is tried again after capRetry, until it is served, canceled, or
// limits.queue_timeout gives up on it.
func (c *Controller) failAttempt(ctx context.Context, v job.VM, reason string, permanent bool) error {
	if v.ForJob == 0 {
		return c.stopFor(ctx, v.ID, reason) // a pool's VM: no job of its own to charge
	}
	label := job.ReasonKey(reason) // this attempt's own reason, before a give-up wraps it in "attempts: …"
	capped := label == job.ReasonRunnerLimit
	now := time.Now()
	var j job.Job
	err := c.store.Tx(ctx, func(tx *store.Tx) error {
		var err error
		if v, err = tx.UpdateVM(v.ID, func(x *job.VM) error { return x.Stop(reason, now) }); err != nil {
			return err
		}
		j, err = tx.UpdateJob(v.ForJob, func(r *job.Job) error {
			if r.State != job.Queued {
				return nil // served by another VM meanwhile, or over
			}
			if c.fleet {
				r.HostID = "" // the retry may go to any host with room (or under the cap first)
			}
			if capped {
				return r.Wait(reason, now.Add(c.capRetry()))
			}
			if permanent || r.Attempts+1 >= c.cfg.Limits.StartAttempts {
				if !permanent {
					reason = fmt.Sprintf("%s: %d attempts failed, the last: %s", job.ReasonAttempts, r.Attempts+1, reason)
				}
				r.Attempts++
				return r.GiveUp(reason)
			}
			return r.Retry(reason, now.Add(c.backoff(r.Attempts+1)))
		})
		return err
	})
	if err != nil {
		return err
	}
	c.m.Attempts.WithLabelValues(label).Inc()
	switch j.State {
	case job.Failed:
		c.jobLog(j).Error("giving up on job; GitLab keeps it pending for other runners", "reason", j.Reason, "attempts", j.Attempts)
		c.finished(j)
	case job.Queued:
		if capped {
			c.jobLog(j).Warn("GitLab's runner-creation cap refused the job's runner; it stays queued (pending in GitLab) and is tried again",
				"reason", reason, "retry_in", time.Until(j.NotBefore).Round(time.Second))
			break
		}
		c.jobLog(j).Warn("attempt failed; job queued again", "reason", reason, "attempt", j.Attempts, "retry_in", time.Until(j.NotBefore).Round(time.Millisecond))
		c.q.Add(jobKey(j.ID))
	}
	c.q.Add(planKey)
	return c.stopVM(ctx, v)
}

// stopFor persists that a VM stops (first reason wins). A busy VM that
// FireRunner kills before GitLab ended its job (shutdown, max duration)
// takes the job down with it; after other ends (the VM crashed, say) the
// job's reconcile asks GitLab how it ended.
func (c *Controller) stopFor(ctx context.Context, id, reason string) error {
	now := time.Now()
	var v job.VM
	var failed *job.Job
	err := c.store.Tx(ctx, func(tx *store.Tx) error {
		var err error
		if v, err = tx.UpdateVM(id, func(x *job.VM) error { return x.Stop(reason, now) }); err != nil {
			return err
		}
		if k := job.ReasonKey(reason); v.PickedJobID == 0 || v.Reason != reason || (k != job.ReasonShutdown && k != job.ReasonMaxDuration) {
			return nil
		}
		j, err := tx.UpdateJob(v.PickedJobID, func(r *job.Job) error {
			if r.State != job.Running || r.VMID != v.ID {
				return nil
			}
			return r.Fail(reason, v.ExitCode)
		})
		if err == nil && j.State == job.Failed && j.Reason == reason {
			failed = &j
		}
		if errors.Is(err, store.ErrNotFound) {
			err = nil
		}
		return err
	})
	if errors.Is(err, job.ErrStale) {
		return nil // already gone
	}
	if err != nil {
		return err
	}
	if failed != nil {
		c.finished(*failed)
	}
	c.q.Add(vmKey(id))
	return nil
}

// stopVM tears a stopping VM down: VM and network first, then the runner,
// so no VM ever runs with a deleted runner and no runner outlives its VM.
// Each step is idempotent and recorded; a failed one is retried.
func (c *Controller) stopVM(ctx context.Context, v job.VM) error {
	ctx = context.WithoutCancel(ctx) // cleanup finishes even at shutdown
	c.unwatch(v.ID)
	log := c.vmLog(v)
	if v.Timeline.Destroyed.IsZero() {
		dctx, cancel := context.WithTimeout(ctx, time.Minute)
		err := c.drv.Destroy(dctx, v.ID)
		cancel()
		if err != nil {
			return fmt.Errorf("destroy vm %s: %w", v.ID, err)
		}
		if c.net != nil {
			if err := c.net.Release(ctx, v.ID); err != nil {
				return fmt.Errorf("release network of vm %s: %w", v.ID, err)
			}
		}
		var err2 error
		if v, err2 = c.store.UpdateVM(ctx, v.ID, func(x *job.VM) error { x.Destroyed(time.Now()); return nil }); err2 != nil {
			return err2
		}
	}
	if v.RunnerID != 0 && v.Timeline.RunnerDeleted.IsZero() && !v.Pooled() {
		rctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
		err := c.prov.Release(rctx, runners.Lease{RunnerID: v.RunnerID})
		cancel()
		if err != nil {
			return fmt.Errorf("delete runner %d of vm %s: %w", v.RunnerID, v.ID, err)
		}
	}
	now := time.Now()
	err := c.store.Tx(ctx, func(tx *store.Tx) error {
		var err error
		if v, err = tx.UpdateVM(v.ID, func(x *job.VM) error {
			if !x.Pooled() {
				x.RunnerDeleted(now) // a pool's shared runner outlives its VMs
			}
			return x.Gone(now)
		}); err != nil {
			return err
		}
		if v.RunnerID != 0 && !v.Pooled() {
			return tx.RunnerDeleted(v.RunnerID)
		}
		return nil
	})
	if err != nil {
		return err
	}
	c.vmGone(v)
	c.q.Add(planKey) // capacity freed
	if v.ForJob != 0 {
		c.q.Add(jobKey(v.ForJob))
	}
	if v.PickedJobID != 0 {
		c.q.Add(jobKey(v.PickedJobID))
	}
	log.Debug("vm cleaned up")
	return nil
}

// vmGone counts a finished VM and writes its one "vm gone" line.
func (c *Controller) vmGone(v job.VM) {
	c.m.VMsFinished.WithLabelValues(job.ReasonKey(v.Reason)).Inc()
	var stages []any
	for _, s := range v.Timeline.Stages() {
		c.m.StageDuration.WithLabelValues(s.Name).Observe(s.Duration.Seconds())
		stages = append(stages, slog.Duration(s.Name, s.Duration))
	}
	attrs := []any{"reason", v.Reason, "picked_job_id", v.PickedJobID, "tags", strings.Join(v.Tags, ",")}
	if v.ExitCode != nil {
		attrs = append(attrs, "exit_code", *v.ExitCode)
	}
	c.vmLog(v).Info("vm gone", append(attrs, slog.Group("stages", stages...))...)
}

// idleReason is the stop reason for a VM no waiting job can use.
func (c *Controller) idleReason() string {
	if c.draining.Load() {
		return job.ReasonShutdown + ": no new VMs while draining"
	}
	return job.ReasonIdle
}

// setPaused records that VM id's runner was paused: the VM is stopped once
// GitLab confirms its runner took nothing (forgotten with the VM's watch).
func (c *Controller) setPaused(id string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.paused[id] = true
}

func (c *Controller) isPaused(id string) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.paused[id]
}

func (c *Controller) isSurplus(id string) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.surplus[id]
}

// entropy returns a seed for the guest RNG.
func entropy() []byte {
	b := make([]byte, 32)
	_, _ = rand.Read(b)
	return b
}
