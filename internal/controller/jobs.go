package controller

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/firerunner/firerunner/internal/gitlabapi"
	"github.com/firerunner/firerunner/internal/job"
	"github.com/firerunner/firerunner/internal/store"
	"github.com/firerunner/firerunner/internal/tags"
)

// vmLostGrace is how long a job whose VM is gone may stay running in GitLab
// before FireRunner records it failed (GitLab marks a job whose runner
// vanished as failed only much later, on its own stuck-job timeout).
const vmLostGrace = 2 * time.Minute

// reconcileJob takes the next step for one job. Desired: every job GitLab
// holds pending has a VM of ours that can take it (the plan), and the
// record says what GitLab says. The steps:
//   - new: read its tags; FireRunner's → queued, else ignored;
//   - queued: follow GitLab (picked → running, ended → terminal); keep it
//     planned, with back-off after failed attempts; give up only on a limit;
//   - running: wait for GitLab's end; fail it only if its VM is lost.
func (c *Controller) reconcileJob(ctx context.Context, id int64) error {
	j, err := c.store.GetJob(ctx, id)
	if errors.Is(err, store.ErrNotFound) {
		return nil
	}
	if err != nil {
		return err
	}
	switch j.State {
	case job.New:
		return c.admitJob(ctx, j)
	case job.Queued:
		return c.reconcileQueued(ctx, j)
	case job.Running:
		return c.reconcileRunning(ctx, j)
	}
	c.forgetChecked(id)
	return nil
}

func (c *Controller) jobLog(j job.Job) *slog.Logger {
	return c.log.With("job_id", j.ID, "project_id", j.ProjectID, "project", j.ProjectPath)
}

// admitJob reads a new job's tags (the Job Hook does not carry them) and
// decides whether it is FireRunner's.
func (c *Controller) admitJob(ctx context.Context, j job.Job) error {
	log := c.jobLog(j)
	gj, err := c.gl.GetJob(ctx, j.ProjectID, j.ID)
	if err != nil {
		if !gitlabapi.IsNotFound(err) && !gitlabapi.IsPermanent(err) {
			return err // transient: back-off and retry
		}
		log.Error("cannot read the job's tags; ignored", "err", err)
		c.m.TagRejects.WithLabelValues(job.ReasonUnreadable).Inc()
		reason := job.ReasonUnreadable + ": " + err.Error()
		_, err = c.store.UpdateJob(ctx, j.ID, func(r *job.Job) error { return r.Ignore(nil, reason) })
		return err
	}
	size, ok, terr := tags.Parse(gj.TagList, c.tagLim)
	// A job a runner of ours took is ours to record, whatever its tags: a
	// job whose tags are a subset of our runner's needs no size tag.
	oursRan := false
	if rid := max(gj.RunnerID, j.GitLabRunner); rid != 0 {
		v, err := c.store.VMByRunner(ctx, rid)
		oursRan = err == nil && (v.HostID == c.host || c.fleet)
	}
	j, err = c.store.UpdateJob(ctx, j.ID, func(r *job.Job) error {
		r.Observe(gj.Status, gj.RunnerID, time.Now())
		if r.ProjectPath == "" && gj.Name != "" {
			r.Name, r.Ref = gj.Name, gj.Ref
		}
		if r.PipelineID == 0 {
			r.PipelineID = gj.PipelineID
		}
		switch {
		case terr != nil && !oursRan:
			var te *tags.Error
			reason := "invalid"
			if errors.As(terr, &te) {
				reason = te.Reason
			}
			c.m.TagRejects.WithLabelValues(reason).Inc()
			log.Warn("impossible firecracker size tag: no VM, job left for other runners", "tags", gj.TagList, "err", terr)
			return r.Ignore(gj.TagList, job.ReasonBadTag+": "+terr.Error())
		case !ok && !oursRan:
			log.Debug("job has no firecracker size tag; not ours", "tags", gj.TagList)
			return r.Ignore(gj.TagList, job.ReasonNotOurs)
		}
		return r.Accept(gj.TagList, size, time.Now())
	})
	if err != nil {
		return err
	}
	c.markChecked(j.ID) // after the status is stored: see verified
	if j.State != job.Queued {
		return nil
	}
	log.Info("job queued", "size", j.SizeTag, "source", j.Source, "gitlab_status", j.GitLabStatus)
	return c.reconcileQueued(ctx, j)
}

// reconcileQueued follows a waiting job: GitLab's word first, then limits,
// then back-off, then the plan.
func (c *Controller) reconcileQueued(ctx context.Context, j job.Job) error {
	if job.StatusRank(j.GitLabStatus) >= 2 && (j.GitLabRunner != 0 || !job.StatusFinal(j.GitLabStatus)) {
		// Taken (and maybe already over: hooks come late and in any
		// order): first record who took it.
		if err := c.recordPick(ctx, j.ID, j.GitLabRunner, false); err != nil {
			return err
		}
		if !job.StatusFinal(j.GitLabStatus) {
			return nil
		}
		var err error
		if j, err = c.store.GetJob(ctx, j.ID); err != nil {
			return err
		}
	}
	if job.StatusFinal(j.GitLabStatus) {
		return c.finishJob(ctx, j, j.GitLabStatus, false)
	}
	if c.fleet && j.HostID != "" && j.HostID != c.host {
		return nil // another host claimed it: it plans, times out and retries it
	}
	if c.checkDue(j) {
		gj, err := c.gl.GetJob(ctx, j.ProjectID, j.ID)
		switch {
		case gitlabapi.IsNotFound(err):
			return c.giveUp(ctx, j, job.ReasonUnreadable+": job not found in GitLab")
		case err != nil:
			// Plan it on what is known rather than leave it without a VM.
			c.jobLog(j).Warn("reading the job's status failed", "err", err)
			c.markChecked(j.ID)
		default:
			u, changed, err := c.observe(ctx, j.ID, gj.Status, gj.RunnerID)
			if err != nil {
				return err
			}
			c.markChecked(j.ID) // after the status is stored: see verified
			if changed {
				return c.reconcileQueued(ctx, u)
			}
		}
	}
	if qt := c.cfg.Limits.QueueTimeout; qt > 0 && time.Since(j.CreatedAt) > qt {
		return c.giveUp(ctx, j, fmt.Sprintf("%s: waited longer than %s for a VM", job.ReasonQueueTimeout, qt))
	}
	if d := time.Until(j.NotBefore); d > 0 {
		c.q.AddAfter(jobKey(j.ID), d) // back-off ends: plan it again
	}
	c.q.Add(planKey)
	return nil
}

// reconcileRunning waits for GitLab's end of a picked job.
func (c *Controller) reconcileRunning(ctx context.Context, j job.Job) error {
	if job.StatusFinal(j.GitLabStatus) {
		return c.finishJob(ctx, j, j.GitLabStatus, false)
	}
	var v job.VM
	vmOver := false
	if j.VMID != "" {
		var err error
		if v, err = c.store.GetVM(ctx, j.VMID); err != nil && !errors.Is(err, store.ErrNotFound) {
			return err
		}
		vmOver = err != nil || v.State == job.VMStopping || v.State == job.VMGone || !v.Timeline.Exited.IsZero()
	}
	if !vmOver && !c.checkDue(j) {
		return nil
	}
	// The VM that ran it ended (GitLab's "finished" hook may lag behind the
	// guest's power-off), or a periodic check: ask GitLab.
	gj, err := c.gl.GetJob(ctx, j.ProjectID, j.ID)
	if err == nil {
		u, changed, err := c.observe(ctx, j.ID, gj.Status, gj.RunnerID)
		if err != nil {
			return err
		}
		c.markChecked(j.ID)
		if changed && job.StatusFinal(u.GitLabStatus) {
			return c.finishJob(ctx, u, u.GitLabStatus, true)
		}
	}
	if !vmOver {
		return nil
	}
	over := v.Timeline.Exited
	if over.IsZero() {
		over = v.Timeline.StopRequested
	}
	if time.Since(over) > vmLostGrace || gitlabapi.IsNotFound(err) || job.ReasonKey(v.Reason) == job.ReasonHostLost {
		reason := job.ReasonVMLost + ": its VM ended and GitLab never reported the job's end"
		if v.Reason != "" && v.Reason != job.ReasonRanJob {
			reason = v.Reason
		}
		return c.failRunning(ctx, j.ID, reason)
	}
	c.q.AddAfter(jobKey(j.ID), 3*time.Second)
	return nil
}

// observe records GitLab's status of a job read through the API.
func (c *Controller) observe(ctx context.Context, id int64, status string, runnerID int64) (job.Job, bool, error) {
	changed := false
	j, err := c.store.UpdateJob(ctx, id, func(r *job.Job) error {
		changed = r.Observe(status, runnerID, time.Now())
		return nil
	})
	return j, changed, err
}

// recordPick records that runner took job id: with our VM when the runner
// is one of ours (the VM turns busy in the same transaction), else as run
// elsewhere. A job we have no record of gets one (it runs on our VM).
//
// A webhook saying another runner took the job is confirmed with GitLab
// first (confirmed=false): recorded as taken elsewhere, the job would get no
// VM, so a forged event could strand it.
func (c *Controller) recordPick(ctx context.Context, id, runnerID int64, confirmed bool) error {
	var v job.VM
	ours := false
	if runnerID != 0 {
		var err error
		v, err = c.store.VMByRunner(ctx, runnerID)
		if err != nil && !errors.Is(err, store.ErrNotFound) {
			return err
		}
		// In a fleet, a VM of any host is ours: its record is in the shared
		// store, and its host supervises it.
		ours = err == nil && (v.HostID == c.host || c.fleet) && v.State != job.VMGone
		if err == nil && v.Pooled() {
			// A pool's shared runner: many VMs use it. The job API's
			// runner_manager (a VM's system_id) says which one took it.
			if v, ours, err = c.poolPicker(ctx, id, runnerID); err != nil {
				return err
			}
			confirmed = true // that was GitLab's word
		}
	}
	if !ours && !confirmed {
		j, err := c.store.GetJob(ctx, id)
		if err != nil {
			return err
		}
		gj, err := c.gl.GetJob(ctx, j.ProjectID, id)
		if err != nil {
			return err
		}
		if job.StatusRank(gj.Status) < 2 {
			c.m.Reconcile.WithLabelValues("pick_event_unconfirmed").Inc()
			c.jobLog(j).Warn("a webhook said another runner took the job, but GitLab says it waits; the event is ignored",
				"event_runner_id", runnerID, "gitlab_status", gj.Status)
			_, err := c.store.UpdateJob(ctx, id, func(r *job.Job) error { r.Confirm(gj.Status, gj.RunnerID, time.Now()); return nil })
			if err == nil {
				c.q.Add(jobKey(id))
			}
			return err
		}
		c.markChecked(id)
		if gj.RunnerID != runnerID && gj.RunnerID != 0 {
			return c.recordPick(ctx, id, gj.RunnerID, true)
		}
	}
	now := time.Now()
	var j job.Job
	err := c.store.Tx(ctx, func(tx *store.Tx) error {
		vmID := ""
		if ours {
			if _, err := tx.UpdateVM(v.ID, func(x *job.VM) error { return x.Picked(id, now) }); err != nil {
				return err
			}
			vmID = v.ID
		}
		var err error
		j, err = tx.UpdateJob(id, func(r *job.Job) error {
			if r.State.Terminal() {
				// Ended before its pick was recorded: still name who ran it.
				if r.VMID == "" && r.RunnerID == 0 {
					r.VMID, r.RunnerID = vmID, runnerID
				}
				return nil
			}
			return r.Picked(vmID, runnerID, now)
		})
		return err
	})
	if errors.Is(err, store.ErrNotFound) && ours {
		// Unknown job: make its record; its reconcile reads it and comes back here.
		_, _, err = c.store.Observe(ctx, store.Observation{JobID: id, ProjectID: v.ProjectID, Status: job.StatusRunning,
			RunnerID: runnerID, Source: "picked", At: now, Create: true})
		c.q.Add(jobKey(id))
		return err
	}
	if err != nil {
		return err
	}
	if ours && j.State == job.Running {
		if v.ForJob != id && v.ForJob != 0 {
			c.jobLog(j).Info("a runner made for another job took this one (GitLab matches tag subsets)", "vm_id", v.ID, "runner_id", runnerID, "made_for_job_id", v.ForJob)
		}
		c.jobLog(j).Info("job picked", "vm_id", v.ID, "runner_id", runnerID)
		if v.Pooled() && len(v.Tags) > 0 {
			c.m.PoolJobs.WithLabelValues(v.Tags[0], "hit").Inc() // taken by a pool's VM polling on its shared runner
		}
	} else if !ours {
		c.jobLog(j).Info("job taken by a runner that is not one of this host's VMs", "runner_id", runnerID)
	}
	if ours && v.HostID == c.host {
		c.q.Add(vmKey(v.ID))
	}
	c.q.Add(planKey)
	return nil
}

// finishJob ends a job with GitLab's final status; the VM that ran it is
// torn down by its own reconcile. A final status heard only from a webhook
// is confirmed with GitLab first: whoever sniffed the webhook secret must
// not be able to kill running jobs, or strand waiting ones, with a forged
// "canceled" or "success".
func (c *Controller) finishJob(ctx context.Context, j job.Job, status string, confirmed bool) error {
	if !confirmed {
		gj, err := c.gl.GetJob(ctx, j.ProjectID, j.ID)
		switch {
		case gitlabapi.IsNotFound(err):
			status = job.StatusCanceled // the job (or its project) was deleted
		case err != nil:
			return err
		case !job.StatusFinal(gj.Status):
			c.m.Reconcile.WithLabelValues("final_event_unconfirmed").Inc()
			c.jobLog(j).Warn("a webhook said the job ended, but GitLab says it has not; the event is ignored",
				"event_status", status, "gitlab_status", gj.Status)
			_, err := c.store.UpdateJob(ctx, j.ID, func(r *job.Job) error { r.Confirm(gj.Status, gj.RunnerID, time.Now()); return nil })
			if err == nil {
				c.q.Add(jobKey(j.ID))
			}
			return err
		default:
			status = gj.Status
		}
		c.markChecked(j.ID)
	}
	var exit *int
	if j.VMID != "" {
		if v, err := c.store.GetVM(ctx, j.VMID); err == nil {
			exit = v.ExitCode
		}
	}
	j, err := c.store.UpdateJob(ctx, j.ID, func(r *job.Job) error { return r.Finish(status, exit) })
	if err != nil {
		return err
	}
	c.finished(j)
	if j.VMID != "" {
		c.q.Add(vmKey(j.VMID))
	}
	c.q.Add(planKey)
	return nil
}

// giveUp fails a waiting job: FireRunner cannot serve it.
func (c *Controller) giveUp(ctx context.Context, j job.Job, reason string) error {
	j, err := c.store.UpdateJob(ctx, j.ID, func(r *job.Job) error { return r.GiveUp(reason) })
	if err != nil {
		return err
	}
	c.jobLog(j).Error("giving up on job; GitLab keeps it pending for other runners", "reason", reason, "attempts", j.Attempts)
	c.finished(j)
	c.q.Add(planKey)
	return nil
}

// failRunning fails a running job whose VM FireRunner stopped or lost.
func (c *Controller) failRunning(ctx context.Context, id int64, reason string) error {
	j, err := c.store.UpdateJob(ctx, id, func(r *job.Job) error { return r.Fail(reason, nil) })
	if err != nil {
		return err
	}
	c.finished(j)
	return nil
}

// finished counts a terminal job and writes its one "job finished" line:
// GitLab's outcome, the VM and runner that ran it, its stage durations.
func (c *Controller) finished(j job.Job) {
	c.forgetChecked(j.ID)
	c.m.JobsFinished.WithLabelValues(string(j.State), job.ReasonKey(j.Reason)).Inc()
	attrs := []any{"state", j.State, "reason", j.Reason, "vm_id", j.VMID, "runner_id", j.RunnerID, "attempts", j.Attempts}
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
	if j.State == job.Failed && j.GitLabStatus != job.StatusFailed {
		lvl = slog.LevelWarn
	}
	c.jobLog(j).Log(context.Background(), lvl, "job finished", attrs...)
}

// checkDue reports whether a job's status should be read from GitLab now:
// once after a restart (the job may have ended while FireRunner was down),
// then at most once per reconcile interval, not while webhooks keep it fresh.
func (c *Controller) checkDue(j job.Job) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	last, ok := c.checked[j.ID]
	if !ok {
		return true
	}
	if j.ObservedAt.After(last) {
		last = j.ObservedAt
	}
	return time.Since(last) >= c.cfg.Reconcile.Interval
}

func (c *Controller) markChecked(id int64) {
	c.mu.Lock()
	c.checked[id] = time.Now()
	c.mu.Unlock()
}

func (c *Controller) forgetChecked(id int64) {
	c.mu.Lock()
	delete(c.checked, id)
	c.mu.Unlock()
}
