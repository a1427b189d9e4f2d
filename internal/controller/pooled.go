package controller

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/firerunner/firerunner/internal/gitlabapi"
	"github.com/firerunner/firerunner/internal/guestconfig"
	"github.com/firerunner/firerunner/internal/job"
	"github.com/firerunner/firerunner/internal/runners"
	"github.com/firerunner/firerunner/internal/store"
	"github.com/firerunner/firerunner/internal/vm"
)

// Pooled runner mode (runners.mode pooled).
//
// Each pool has one GitLab runner, shared by all of its VMs: a warm VM gets
// it (URL and token, over the assignment channel) as soon as its guest is
// ready, and its gitlab-runner, a runner manager of its own named by the
// VM's system_id (job.SystemID), asks GitLab for jobs itself. A job whose
// tags are exactly the pool's size tag is then picked with no FireRunner
// action; its "running" hook (or the backstop poll) is only the signal to
// record which VM took it (the job API's runner_manager.system_id names the
// VM) and to refill the pool. Other jobs get one-off runners as before.
//
// Stopping a VM that polls on a shared runner cannot pause the runner (that
// would stop all of its VMs), so FireRunner never kills one while it may
// be taking a job:
//   - idle_timeout: the VM's gitlab-runner ends by itself (run-single's
//     --wait-timeout, counted from the hand-over, is the pool's idle time
//     left), so a job it took in the last instant runs to its end; only if
//     it is still there well after that (a stuck guest) is it stopped once
//     GitLab confirms its manager took nothing.
//   - drain, a pool removed, a restart: the runner's token is rotated first
//     (POST /runners/:id/reset_authentication_token), which makes every
//     gitlab-runner holding the old token unable to take another job; then
//     GitLab says which of them took one (those run on), and the rest stop.

// pooledTag is the size tag of v's size when that size has a shared runner
// in this process's configuration ("" otherwise).
func (c *Controller) pooledTag(vcpus, memMiB int) string {
	return c.pooledSize[[2]int{vcpus, memMiB}]
}

// fitsPool reports whether a job is taken by its size's shared runner: its
// tags are exactly that pool's size tag (GitLab gives a runner the jobs
// whose tags are a subset of its own; a job with more tags needs a one-off
// runner with them). Spelling must match exactly, as GitLab compares it.
func (c *Controller) fitsPool(j job.Job) bool {
	tag := c.pooledTag(j.VCPUs, j.MemoryMiB)
	if tag == "" || len(j.Tags) == 0 {
		return false
	}
	for _, t := range j.Tags {
		if strings.TrimSpace(t) != tag {
			return false
		}
	}
	return true
}

// handToPool gives a ready warm VM of a pooled size its pool's shared
// runner: recorded first (the VM turns starting with the pool's runner and
// no job), then sent over the assignment channel.
func (c *Controller) handToPool(ctx context.Context, v job.VM, tag string, idle time.Duration) error {
	lease, err := c.poolProv.PoolLease(ctx, tag)
	if err != nil {
		if errors.Is(err, runners.ErrLimit) {
			c.m.RunnerLimitHits.Inc()
		}
		c.vmLog(v).Error("cannot get the pool's shared runner; the warm vm waits", "size", tag, "err", err)
		return err // back-off; meanwhile a one-off job of its size may still take the VM
	}
	c.noteRotated(lease.RunnerID, false)
	now := time.Now()
	err = c.store.Tx(ctx, func(tx *store.Tx) error {
		var err error
		if v, err = tx.UpdateVM(v.ID, func(x *job.VM) error {
			if x.State != job.VMWarm || x.ForJob != 0 {
				return job.ErrStale // a one-off job was assigned to it meanwhile
			}
			x.Tags = []string{tag}
			return x.RunnerCreated(lease.RunnerID, x.Tags, now)
		}); err != nil {
			return err
		}
		return tx.PutRunner(job.Runner{ID: lease.RunnerID, HostID: c.host, Mode: c.prov.Name(), Tags: []string{tag}})
	})
	if err != nil {
		return err
	}
	left := max(idle-time.Since(v.Timeline.Started), time.Second)
	// The guest's own job timer starts at the hand-over: the VM may wait
	// its idle time left for a job, then run it for up to job_max_duration
	// from the pick (JobMaxSec: the agent restarts its timer when its job
	// gate sees the job handed out, so it ends the job and reports it to
	// GitLab before the host, counting from the pick it observed, kills the
	// VM).
	a := guestconfig.Assignment{GitLabURL: c.cfg.GuestGitLabURL(), RunnerToken: lease.Token,
		JobTimeoutSec: int((left + c.cfg.Limits.JobMaxDuration + time.Minute) / time.Second),
		JobMaxSec:     int(c.cfg.Limits.JobMaxDuration / time.Second)}
	actx, cancel := context.WithTimeout(ctx, 30*time.Second)
	err = c.drv.(vm.Assigner).Assign(actx, v.ID, a)
	cancel()
	if err != nil {
		c.vmLog(v).Error("handing the pool's runner to the warm vm failed", "err", err)
		return c.stopFor(ctx, v.ID, job.ReasonVMStart+": assignment: "+err.Error())
	}
	c.setHanded(v.ID)
	c.m.PoolHandovers.WithLabelValues(tag).Inc()
	c.vmLog(v).Info("pool's shared runner handed to the warm vm; it polls GitLab itself", "runner", lease, "system_id", job.SystemID(v.ID))
	c.q.Add(planKey) // one more VM that can take a job of its size
	c.q.AddAfter(vmKey(v.ID), time.Until(v.Timeline.Started.Add(idle)))
	return nil
}

// supervisePoller acts on a VM polling GitLab on its pool's shared runner
// (state starting, no pick recorded yet).
func (c *Controller) supervisePoller(ctx context.Context, v job.VM) error {
	log := c.vmLog(v)
	tag := ""
	if len(v.Tags) > 0 {
		tag = v.Tags[0]
	}
	idle, pooled := c.poolOf(v)
	configured := pooled && c.poolProv != nil && c.pooledTag(v.VCPUs, v.MemoryMiB) == tag
	if !c.isHanded(v.ID) || !configured || c.draining.Load() {
		// Handed by an earlier process (its token is gone with it), or its
		// pool is no longer configured, or FireRunner drains: the token
		// the VM holds is rotated, then GitLab says whether it took a job.
		reason := job.ReasonTokenRotated + ": its shared runner's token was rotated at restart and it had taken no job"
		switch {
		case c.draining.Load():
			reason = job.ReasonShutdown + ": draining; its shared runner's token was rotated and it had taken no job"
		case !configured:
			reason = job.ReasonTokenRotated + ": its pool is no longer configured for pooled runners; it had taken no job"
		}
		if err := c.killToken(ctx, v.RunnerID, tag, configured, c.draining.Load()); err != nil {
			return err
		}
		return c.stopPollerIfIdle(ctx, v, reason)
	}
	deadline := v.Timeline.Started.Add(idle)
	// Its gitlab-runner ends by itself at the idle deadline (run-single's
	// wait timeout); give it that, plus a job request's round trip, before
	// the host steps in.
	grace := deadline.Add(c.cfg.Limits.VMStartTimeout + c.pollerGrace)
	if time.Now().Before(grace) {
		c.q.AddAfter(vmKey(v.ID), time.Until(grace))
		return nil
	}
	log.Warn("pool's vm still there after its gitlab-runner's wait timeout; stopping it if GitLab says it took no job", "idle_timeout", idle)
	return c.stopPollerIfIdle(ctx, v, job.ReasonPoolIdle+": its gitlab-runner did not end after the pool's idle timeout")
}

// stopPollerIfIdle asks GitLab whether v's runner manager took a job: if so
// that is recorded (v turns busy), else v stops with reason.
func (c *Controller) stopPollerIfIdle(ctx context.Context, v job.VM, reason string) error {
	jobs, err := c.gl.ManagerJobs(ctx, v.RunnerID, job.SystemID(v.ID))
	if err != nil && !gitlabapi.IsNotFound(err) {
		if time.Since(startedAt(v)) < c.cfg.Limits.VMStartTimeout+time.Minute || !c.draining.Load() {
			return err // retry with back-off: stopping it blind could kill a job
		}
		c.vmLog(v).Warn("cannot list the vm's jobs; stopping it all the same (draining)", "err", err)
	}
	if len(jobs) > 0 {
		if err := c.pickFromGitLab(ctx, v, jobs[0]); err != nil {
			return err
		}
		return job.ErrStale // reconcile again as busy
	}
	c.vmLog(v).Info("pool's vm took no job; stopping it", "reason", reason)
	return c.stopFor(ctx, v.ID, reason)
}

// killToken makes sure the token VMs of an earlier process (or of a pool no
// longer configured) hold for runner id is dead: once per runner per
// process; for a configured pool the first lease of this process rotated
// it. When draining, once more after the drain began, so that no VM of
// the pool can take a job between GitLab's answer and its end.
func (c *Controller) killToken(ctx context.Context, runnerID int64, tag string, configured, drain bool) error {
	c.mu.Lock()
	done := c.rotated[runnerID]
	if drain {
		done = c.drainRotated[runnerID]
	}
	c.mu.Unlock()
	if done {
		return nil
	}
	if configured && !drain {
		lease, err := c.poolProv.PoolLease(ctx, tag)
		if err != nil {
			return err
		}
		if lease.RunnerID == runnerID {
			c.noteRotated(runnerID, false)
			return nil
		}
	}
	var err error
	if c.poolProv != nil {
		err = c.poolProv.Rotate(ctx, runnerID)
	} else {
		_, err = c.gl.ResetRunnerToken(ctx, runnerID)
	}
	if err != nil && !gitlabapi.IsNotFound(err) {
		return fmt.Errorf("rotate the token of runner %d: %w", runnerID, err)
	}
	c.m.TokenRotations.Inc()
	c.log.Info("shared runner's token rotated: no VM holding the old one can take another job", "runner_id", runnerID, "size", tag, "draining", drain)
	c.noteRotated(runnerID, drain)
	return nil
}

// enqueuePollers makes every VM polling on a shared runner reconcile now
// (drain: they stop at once unless they took a job).
func (c *Controller) enqueuePollers(ctx context.Context) {
	live, err := c.store.ListVMs(ctx, true, 0)
	if err != nil {
		return
	}
	for _, v := range live {
		if v.Pooled() && v.State == job.VMStarting {
			c.q.Add(vmKey(v.ID))
		}
	}
}

func (c *Controller) noteRotated(runnerID int64, drain bool) {
	c.mu.Lock()
	c.rotated[runnerID] = true
	if drain {
		c.drainRotated[runnerID] = true
	}
	c.mu.Unlock()
}

func (c *Controller) setHanded(id string) {
	c.mu.Lock()
	c.handed[id] = true
	c.mu.Unlock()
}

func (c *Controller) isHanded(id string) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.handed[id]
}

// poolPicker finds the VM that took job id on a shared runner: the job
// API's runner_manager names its system_id (job.SystemID). ok is false
// when GitLab names no VM of this host.
func (c *Controller) poolPicker(ctx context.Context, id, runnerID int64) (job.VM, bool, error) {
	j, err := c.store.GetJob(ctx, id)
	if err != nil {
		return job.VM{}, false, err
	}
	gj, err := c.gl.GetJob(ctx, j.ProjectID, id)
	if err != nil {
		return job.VM{}, false, err
	}
	if gj.RunnerSystemID == "" {
		if gj.RunnerID == runnerID {
			// GitLab has not got the manager yet (or is older than 16): ask again later.
			return job.VM{}, false, fmt.Errorf("job %d: GitLab names no runner manager of shared runner %d yet", id, runnerID)
		}
		return job.VM{}, false, nil
	}
	vmID, ok := job.VMIDFromSystemID(gj.RunnerSystemID)
	if !ok {
		return job.VM{}, false, nil
	}
	v, err := c.store.GetVM(ctx, vmID)
	if errors.Is(err, store.ErrNotFound) {
		return v, false, nil
	}
	if err != nil {
		return v, false, err
	}
	return v, v.HostID == c.host && v.RunnerID == gj.RunnerID && v.State != job.VMGone, nil
}

// runnerJobs lists the jobs v's runner took: for a VM on a shared runner,
// only those of its own runner manager.
func (c *Controller) runnerJobs(ctx context.Context, v job.VM) ([]gitlabapi.Job, error) {
	if v.Pooled() {
		return c.gl.ManagerJobs(ctx, v.RunnerID, job.SystemID(v.ID))
	}
	return c.gl.RunnerJobs(ctx, v.RunnerID)
}

// poolRunnerWanted reports whether a pool runner of size tag is still
// wanted: pooled mode with that pool configured.
func (c *Controller) poolRunnerWanted(tag string) bool {
	return c.poolProv != nil && c.poolProv.Pooled(tag)
}
