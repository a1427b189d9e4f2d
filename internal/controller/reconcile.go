package controller

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/firerunner/firerunner/internal/gitlabapi"
	"github.com/firerunner/firerunner/internal/job"
	"github.com/firerunner/firerunner/internal/runners"
	"github.com/firerunner/firerunner/internal/scheduler"
	"github.com/firerunner/firerunner/internal/store"
)

func isNotFound(err error) bool { return gitlabapi.IsNotFound(err) }

// resume takes over the jobs an earlier process left in flight:
//   - queued: back into the FIFO (re-checked against GitLab when admitted);
//   - runner_created: the token was never persisted, so the runner is
//     deleted and the job re-queued;
//   - vm_starting with no live VMM and no job picked (crash between
//     recording the runner and the VMM running): VM leftovers and runner
//     removed, job re-queued (GitLab re-checked when admitted);
//   - vm_starting/running: if the VM is still on the host, supervise it
//     again (its capacity is reserved); otherwise clean up as failed;
//   - cleaning: finish the cleanup.
func (c *Controller) resume(ctx context.Context) error {
	active, err := c.store.List(ctx, store.Filter{ActiveOnly: true})
	if err != nil {
		return err
	}
	if len(active) == 0 {
		return nil
	}
	insts, err := c.drv.List(ctx)
	if err != nil {
		return fmt.Errorf("list vms: %w", err)
	}
	onHost, live := map[string]bool{}, map[string]bool{}
	for _, in := range insts {
		onHost[in.ID] = true
		live[in.ID] = in.PID != 0
	}
	for _, j := range active {
		if j.State == job.VMStarting && j.PickedJobID == 0 && !live[j.VMID] {
			// Crashed between recording the runner and the VMM running: the
			// job never ran here, so start it over (GitLab is re-checked on
			// admission) instead of failing a job GitLab still has pending.
			if err := c.requeueUnstarted(ctx, j); err == nil {
				continue
			}
		}
		if err := c.adopt(ctx, j, onHost); err != nil {
			return err
		}
	}
	return nil
}

// adopt gives an active job without a worker the handling resume describes.
func (c *Controller) adopt(ctx context.Context, j job.Job, onHost map[string]bool) error {
	log := c.jobLog(j)
	switch j.State {
	case job.Queued:
		c.markRecheck(j.ID)
		c.enqueue(ctx, j)
	case job.RunnerCreated:
		if err := c.prov.Release(ctx, runners.Lease{RunnerID: j.RunnerID}); err != nil {
			log.Error("resume: deleting runner without token failed; job failed", "err", err)
			c.cleanupAsync(j, job.Failed, job.ReasonRestartLost+": runner token lost at restart")
			return nil
		}
		j2, err := c.store.Update(ctx, j.ID, func(r *job.Job) error {
			r.State, r.Reason, r.RunnerID = job.Queued, job.ReasonRestartRequeued, 0
			r.Timeline.RunnerCreated, r.Timeline.RunnerDeleted = time.Time{}, time.Time{}
			return nil
		})
		if err != nil {
			return err
		}
		log.Info("resume: runner token was not persisted; runner deleted, job re-queued")
		c.markRecheck(j.ID)
		c.enqueue(ctx, j2)
	case job.VMStarting, job.Running:
		c.sched.Reserve(scheduler.Request{ID: j.ID, VCPUs: j.VCPUs, MemoryMiB: j.MemoryMiB})
		if onHost[j.VMID] {
			log.Info("resume: vm still on host; supervising it again", "state", j.State)
			c.spawn(j.ID, true)
		} else {
			log.Warn("resume: vm gone; cleaning up")
			c.cleanupAsync(j, job.Failed, job.ReasonRestartLost+": vm was not on the host after restart")
		}
	case job.Cleaning:
		c.sched.Reserve(scheduler.Request{ID: j.ID, VCPUs: j.VCPUs, MemoryMiB: j.MemoryMiB})
		c.spawn(j.ID, true)
	}
	return nil
}

// requeueUnstarted removes what a vm_starting job without a VMM left (VM
// dir, network, runner) and puts it back in the queue.
func (c *Controller) requeueUnstarted(ctx context.Context, j job.Job) error {
	log := c.jobLog(j)
	if err := c.drv.Destroy(ctx, j.VMID); err != nil {
		log.Error("resume: removing unstarted vm failed", "err", err)
		return err
	}
	if c.net != nil {
		if err := c.net.Release(ctx, j.VMID); err != nil {
			log.Error("resume: releasing unstarted vm network failed", "err", err)
			return err
		}
	}
	if err := c.prov.Release(ctx, runners.Lease{RunnerID: j.RunnerID}); err != nil {
		log.Error("resume: deleting runner of unstarted vm failed", "err", err)
		return err
	}
	j2, err := c.store.Update(ctx, j.ID, func(r *job.Job) error {
		r.State, r.Reason, r.RunnerID, r.VMID = job.Queued, job.ReasonRestartRequeued, 0, ""
		r.Timeline.RunnerCreated, r.Timeline.VMStartRequest = time.Time{}, time.Time{}
		return nil
	})
	if err != nil {
		return err
	}
	log.Info("resume: vm never started; runner deleted, job re-queued")
	c.markRecheck(j.ID)
	c.enqueue(ctx, j2)
	return nil
}

// cleanupAsync runs cleanup as a worker task so Shutdown waits for it.
func (c *Controller) cleanupAsync(j job.Job, outcome job.State, reason string) {
	c.sched.Reserve(scheduler.Request{ID: j.ID, VCPUs: j.VCPUs, MemoryMiB: j.MemoryMiB})
	c.mu.Lock()
	if _, ok := c.tasks[j.ID]; ok {
		c.mu.Unlock()
		return
	}
	t := newTask(j.ID, true)
	c.tasks[j.ID] = t
	c.workers.Add(1)
	c.mu.Unlock()
	go func() {
		defer c.workers.Done()
		defer func() {
			c.mu.Lock()
			delete(c.tasks, j.ID)
			c.mu.Unlock()
			c.sched.Release(j.ID)
		}()
		c.cleanup(j, outcome, reason)
	}()
}

func (c *Controller) markRecheck(id int64) {
	c.mu.Lock()
	if c.recheck == nil {
		c.recheck = map[int64]bool{}
	}
	c.recheck[id] = true
	c.mu.Unlock()
}

func (c *Controller) reconcileLoop() {
	defer c.loops.Done()
	tick := time.NewTicker(c.cfg.Reconcile.Interval)
	defer tick.Stop()
	for {
		select {
		case <-c.stopLoop:
			return
		case <-tick.C:
			c.ReconcileOnce(c.baseCtx)
		}
	}
}

// ReconcileOnce converges host and GitLab to the store, once:
//  1. VMs on the host no active job owns are destroyed;
//  2. network state no active job owns is released;
//  3. runners we created whose job is over (or unknown) are deleted;
//  4. jobs stuck in cleaning without a worker are cleaned up again;
//  5. queued jobs past limits.queue_timeout are failed;
//  6. configured projects/groups are polled for pending jobs whose webhook
//     was lost.
//
// Each step logs and counts what it changed; errors do not stop later steps.
func (c *Controller) ReconcileOnce(ctx context.Context) {
	c.reconcileMu.Lock()
	defer c.reconcileMu.Unlock()
	active, err := c.store.List(ctx, store.Filter{ActiveOnly: true})
	if err != nil {
		c.log.Error("reconcile: listing jobs failed", "err", err)
		return
	}
	ownedVM := map[string]bool{}
	byJob := map[int64]job.Job{}
	for _, j := range active {
		byJob[j.ID] = j
		if j.VMID != "" {
			ownedVM[j.VMID] = true
		}
	}
	// A VM id is persisted before Start, so anything not in ownedVM now
	// (re-read after listing, to not race a job that just started) is a leak.
	if insts, err := c.drv.List(ctx); err != nil {
		c.log.Error("reconcile: listing vms failed", "err", err)
	} else {
		for _, in := range insts {
			if ownedVM[in.ID] || c.ownsVMNow(ctx, in.ID) {
				continue
			}
			if err := c.drv.Destroy(ctx, in.ID); err != nil {
				c.log.Error("reconcile: destroying orphan vm failed", "vm_id", in.ID, "err", err)
				continue
			}
			c.m.Reconcile.WithLabelValues("vm_destroyed").Inc()
			c.log.Warn("reconcile: destroyed vm no job owns", "vm_id", in.ID, "pid", in.PID)
		}
	}
	if c.net != nil {
		if ids, err := c.net.List(ctx); err != nil {
			c.log.Error("reconcile: listing networks failed", "err", err)
		} else {
			for _, id := range ids {
				if ownedVM[id] || c.ownsVMNow(ctx, id) {
					continue
				}
				if err := c.net.Release(ctx, id); err != nil {
					c.log.Error("reconcile: releasing orphan network failed", "vm_id", id, "err", err)
					continue
				}
				c.m.Reconcile.WithLabelValues("network_released").Inc()
				c.log.Warn("reconcile: released network no job owns", "vm_id", id)
			}
		}
	}
	if owned, err := c.prov.Owned(ctx); err != nil {
		c.log.Error("reconcile: listing runners failed", "err", err)
	} else {
		for _, r := range owned {
			if c.runnerWanted(ctx, r, byJob) {
				continue
			}
			if err := c.prov.Delete(ctx, r.RunnerID); err != nil {
				c.log.Error("reconcile: deleting leftover runner failed", "runner_id", r.RunnerID, "job_id", r.JobID, "err", err)
				continue
			}
			c.m.Reconcile.WithLabelValues("runner_deleted").Inc()
			c.log.Warn("reconcile: deleted runner whose job is over or unknown", "runner_id", r.RunnerID, "job_id", r.JobID)
		}
	}
	for _, j := range active {
		switch {
		case j.State != job.Queued && c.task(j.ID) == nil && c.started.Load() && !c.draining.Load():
			// An active job whose worker is gone (e.g. a store write failed
			// mid-step): take it over like a restart would.
			if cur, err := c.store.Get(ctx, j.ID); err != nil || cur.State != j.State || c.task(j.ID) != nil {
				continue // moved on meanwhile
			}
			c.m.Reconcile.WithLabelValues("job_adopted").Inc()
			if err := c.adopt(ctx, j, map[string]bool{j.VMID: c.vmOnHost(ctx, j.VMID)}); err != nil {
				c.log.Error("reconcile: adopting job failed", "job_id", j.ID, "err", err)
			}
		case j.State == job.Queued && c.cfg.Limits.QueueTimeout > 0 && time.Since(j.CreatedAt) > c.cfg.Limits.QueueTimeout:
			if c.sched.Remove(j.ID) {
				c.finishWithoutResources(ctx, j.ID, job.Failed, fmt.Sprintf("%s: waited longer than %s for capacity", job.ReasonQueueTimeout, c.cfg.Limits.QueueTimeout))
			}
		}
	}
	if c.accepting.Load() || !c.started.Load() {
		c.poll(ctx)
	}
	if err := c.store.Checkpoint(ctx); err != nil {
		c.log.Warn("reconcile: store checkpoint failed", "err", err)
	}
}

func (c *Controller) vmOnHost(ctx context.Context, id string) bool {
	if id == "" {
		return false
	}
	insts, err := c.drv.List(ctx)
	if err != nil {
		return true // unknown: assume alive, Wait will tell
	}
	for _, in := range insts {
		if in.ID == id {
			return true
		}
	}
	return false
}

// ownsVMNow re-checks the store for one VM id (the job may have started
// after the active list was read).
func (c *Controller) ownsVMNow(ctx context.Context, vmID string) bool {
	id, ok := job.JobIDForVM(vmID)
	if !ok {
		return false
	}
	j, err := c.store.Get(ctx, id)
	return err == nil && j.State.Active() && j.VMID == vmID
}

// runnerWanted reports whether an active job holds (or is creating) runner r.
func (c *Controller) runnerWanted(ctx context.Context, r runners.Owned, byJob map[int64]job.Job) bool {
	j, ok := byJob[r.JobID]
	if !ok {
		// Re-read: the job may have been created after the list.
		var err error
		if j, err = c.store.Get(ctx, r.JobID); err != nil {
			return !errors.Is(err, store.ErrNotFound) // unknown job: delete; store error: keep
		}
	}
	if j.State.Terminal() {
		return false
	}
	// RunnerID 0: the job is creating its runner right now (or was, before a
	// crash; it gets a new runner when re-admitted and this one goes next pass).
	return j.RunnerID == 0 || j.RunnerID == r.RunnerID
}

// poll lists pending jobs of the configured projects and groups and takes
// in any that carry our tag and that the store does not know.
func (c *Controller) poll(ctx context.Context) {
	projects := append([]int64(nil), c.cfg.Reconcile.PollProjects...)
	for _, g := range c.cfg.Reconcile.PollGroups {
		ids, err := c.gl.ListGroupProjects(ctx, g)
		if err != nil {
			c.log.Error("poll: listing group projects failed", "group_id", g, "err", err)
			continue
		}
		projects = append(projects, ids...)
	}
	seen := map[int64]bool{}
	for _, p := range projects {
		if seen[p] {
			continue
		}
		seen[p] = true
		jobs, err := c.gl.ListPendingJobs(ctx, p)
		if err != nil {
			c.log.Error("poll: listing pending jobs failed", "project_id", p, "err", err)
			continue
		}
		for _, gj := range jobs {
			if _, err := c.store.Get(ctx, gj.ID); !errors.Is(err, store.ErrNotFound) {
				continue
			}
			if !c.accepting.Load() && c.started.Load() {
				return
			}
			log := c.log.With("job_id", gj.ID, "project_id", gj.ProjectID)
			if c.intake(ctx, log, gj, "", 0, "poll", time.Now()) {
				c.m.Reconcile.WithLabelValues("job_found_by_poll").Inc()
				log.Warn("poll: found a pending job whose webhook never arrived")
			}
		}
	}
}

// Shutdown stops intake, keeps state, lets running VMs finish for up to
// limits.drain_timeout, then tears down what is left and waits for cleanup
// (bounded by ctx). Queued jobs stay queued in the store for the next start.
func (c *Controller) Shutdown(ctx context.Context) error {
	c.accepting.Store(false)
	c.draining.Store(true)
	c.sched.Close()
	c.stopOnce.Do(func() { close(c.stopLoop) })
	c.loops.Wait()

	done := make(chan struct{})
	go func() { c.workers.Wait(); close(done) }()
	c.log.Info("draining: waiting for running vms", "drain_timeout", c.cfg.Limits.DrainTimeout.String(), "vms", c.sched.Stats().VMs)
	drain := time.NewTimer(c.cfg.Limits.DrainTimeout)
	defer drain.Stop()
	select {
	case <-done:
		c.cancel()
		c.log.Info("drained: all jobs finished")
		return nil
	case <-drain.C:
	case <-ctx.Done():
	}
	c.mu.Lock()
	for _, t := range c.tasks {
		t.requestStop(job.Failed, job.ReasonShutdown+": drain timeout reached")
	}
	c.mu.Unlock()
	c.log.Warn("drain timeout: tearing down remaining vms")
	select {
	case <-done:
		c.cancel()
		return nil
	case <-ctx.Done():
		c.cancel()
		return fmt.Errorf("shutdown: cleanup not finished: %w (reconcile finishes it on next start)", ctx.Err())
	}
}
