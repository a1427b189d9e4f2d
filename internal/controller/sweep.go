package controller

import (
	"context"
	"errors"
	"slices"
	"time"

	"github.com/firerunner/firerunner/internal/job"
	"github.com/firerunner/firerunner/internal/store"
	"github.com/firerunner/firerunner/internal/tags"
)

// pollWindow: projects that sent a Job Hook this recently are polled for
// pending jobs whose hook was lost (GitLab's own stuck-job limit is a day;
// a week covers weekly pipelines).
const pollWindow = 7 * 24 * time.Hour

func (c *Controller) sweepLoop() {
	defer c.running.Done()
	t := time.NewTicker(c.cfg.Reconcile.Interval)
	defer t.Stop()
	for {
		select {
		case <-c.stopLoop:
			return
		case <-t.C:
			if err := c.sweep(c.baseCtx); err != nil {
				c.log.Error("reconcile sweep failed", "err", err)
			}
		}
	}
}

// ReconcileOnce runs one sweep now (tests, and `serve` at start).
func (c *Controller) ReconcileOnce(ctx context.Context) {
	if err := c.sweep(ctx); err != nil {
		c.log.Error("reconcile sweep failed", "err", err)
	}
}

// sweep is the periodic resync:
//  1. every active job and live VM is enqueued (after a restart, that is
//     all it takes to resume), and the plan;
//  2. VMs and networks on the host without a live VM record are removed
//     (a VM record is written before anything of the VM exists);
//  3. this host's runners in GitLab without a live VM using them are deleted;
//  4. projects that ever sent a hook (and configured ones) are polled for
//     pending jobs FireRunner has not seen;
//  5. history older than state.retention is pruned (store.Prune);
//  6. the SQLite WAL is checkpointed.
//
// Each correction is logged and counted; errors do not stop later steps.
func (c *Controller) sweep(ctx context.Context) error {
	f := store.Filter{ActiveOnly: true}
	if c.fleet {
		f.ClaimableBy = c.host // other hosts reconcile theirs
	}
	active, err := c.store.ListJobs(ctx, f)
	if err != nil {
		return err
	}
	live, err := c.liveVMs(ctx)
	if err != nil {
		return err
	}
	for _, j := range active {
		c.q.Add(jobKey(j.ID))
	}
	for _, v := range live {
		c.q.Add(vmKey(v.ID))
		if v.PickedJobID != 0 {
			c.q.Add(jobKey(v.PickedJobID)) // in a fleet it may be another host's claim
		}
	}
	c.q.Add(planKey)
	c.sweepHost(ctx)
	c.sweepRunners(ctx)
	// In a fleet the backstop poll and pruning are the leader's: every
	// host polling would multiply GitLab's load by the fleet's size.
	if c.leads(ctx) {
		c.poll(ctx)
		c.logPruned(c.store.Prune(ctx, c.cfg.State.PruneBefore(time.Now())))
	}
	if err := c.store.Checkpoint(ctx); err != nil {
		c.log.Warn("reconcile: store checkpoint failed", "err", err)
	}
	return nil
}

// logPruned logs what state retention removed (store.Prune).
func (c *Controller) logPruned(p store.Pruned, err error) {
	if err != nil {
		c.log.Error("reconcile: pruning old records failed", "err", err)
	} else if p.Any() {
		c.log.Info("reconcile: pruned records older than state.retention", "retention", c.cfg.State.Retention.String(),
			"jobs", p.Jobs, "vms", p.VMs, "runners", p.Runners, "transitions", p.Transitions, "longest_tx", p.LongestTx.String())
	}
}

// liveVM re-reads one VM record: whether it exists and is not gone.
func (c *Controller) liveVM(ctx context.Context, id string) (job.VM, bool, error) {
	v, err := c.store.GetVM(ctx, id)
	if errors.Is(err, store.ErrNotFound) {
		return v, false, nil
	}
	return v, err == nil && v.State.Live(), err
}

func (c *Controller) sweepHost(ctx context.Context) {
	insts, err := c.drv.List(ctx)
	if err != nil {
		c.log.Error("reconcile: listing vms failed", "err", err)
	}
	for _, in := range insts {
		if _, live, err := c.liveVM(ctx, in.ID); live || err != nil {
			continue
		}
		if err := c.drv.Destroy(ctx, in.ID); err != nil {
			c.log.Error("reconcile: destroying orphan vm failed", "vm_id", in.ID, "err", err)
			continue
		}
		c.m.Reconcile.WithLabelValues("vm_destroyed").Inc()
		c.log.Warn("reconcile: destroyed vm no record owns", "vm_id", in.ID, "pid", in.PID)
	}
	if c.net == nil {
		return
	}
	ids, err := c.net.List(ctx)
	if err != nil {
		c.log.Error("reconcile: listing networks failed", "err", err)
		return
	}
	for _, id := range ids {
		if _, live, err := c.liveVM(ctx, id); live || err != nil {
			continue
		}
		if err := c.net.Release(ctx, id); err != nil {
			c.log.Error("reconcile: releasing orphan network failed", "vm_id", id, "err", err)
			continue
		}
		c.m.Reconcile.WithLabelValues("network_released").Inc()
		c.log.Warn("reconcile: released network no record owns", "vm_id", id)
	}
}

// sweepRunners deletes this host's runners that no live VM uses: created
// just before a crash, or whose deletion failed. A VM still pending may be
// creating the runner right now, so its runners are left for the next pass.
func (c *Controller) sweepRunners(ctx context.Context) {
	owned, err := c.prov.Owned(ctx)
	if err != nil {
		c.log.Error("reconcile: listing runners failed", "err", err)
		return
	}
	var live []job.VM
	for _, r := range owned {
		if r.Pool != "" {
			// A pool's shared runner: kept while its pool is configured
			// (it outlives every VM, and restarts); else deleted once no
			// live VM uses it (their tokens are rotated and the idle ones
			// stopped by their own reconcile; busy ones finish first).
			if c.poolRunnerWanted(r.Pool) {
				continue
			}
			if live == nil {
				if live, err = c.store.ListVMs(ctx, true, 0); err != nil {
					c.log.Error("reconcile: listing vms failed", "err", err)
					return
				}
			}
			if slices.ContainsFunc(live, func(v job.VM) bool { return v.RunnerID == r.RunnerID }) {
				continue
			}
			if err := c.prov.Delete(ctx, r.RunnerID); err != nil {
				c.log.Error("reconcile: deleting the runner of a removed pool failed", "runner_id", r.RunnerID, "size", r.Pool, "err", err)
				continue
			}
			if err := c.store.Tx(ctx, func(tx *store.Tx) error { return tx.RunnerDeleted(r.RunnerID) }); err != nil {
				c.log.Error("reconcile: recording runner deletion failed", "runner_id", r.RunnerID, "err", err)
			}
			c.m.Reconcile.WithLabelValues("pool_runner_deleted").Inc()
			c.log.Warn("reconcile: deleted the shared runner of a pool no longer configured for pooled runners", "runner_id", r.RunnerID, "size", r.Pool)
			continue
		}
		if r.Legacy {
			// Made by a release before host ids: ours only if our store knows its job.
			if _, err := c.store.GetJob(ctx, r.JobID); err != nil {
				continue
			}
		} else {
			v, live, err := c.liveVM(ctx, r.VMID)
			if err != nil || (live && (v.RunnerID == r.RunnerID || v.State == job.VMPending)) {
				continue
			}
		}
		if err := c.prov.Delete(ctx, r.RunnerID); err != nil {
			c.log.Error("reconcile: deleting leftover runner failed", "runner_id", r.RunnerID, "vm_id", r.VMID, "err", err)
			continue
		}
		if err := c.store.Tx(ctx, func(tx *store.Tx) error { return tx.RunnerDeleted(r.RunnerID) }); err != nil {
			c.log.Error("reconcile: recording runner deletion failed", "runner_id", r.RunnerID, "err", err)
		}
		c.m.Reconcile.WithLabelValues("runner_deleted").Inc()
		c.log.Warn("reconcile: deleted runner no live vm uses", "runner_id", r.RunnerID, "vm_id", r.VMID, "job_id", r.JobID)
	}
}

// poll lists the pending jobs of every project that sent a Job Hook in the
// last week (and of configured projects and groups), and records the ones
// FireRunner has not seen: their hooks were lost.
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
	seenHooks, err := c.store.Projects(ctx, time.Now().Add(-pollWindow))
	if err != nil {
		c.log.Error("poll: listing projects failed", "err", err)
	}
	projects = append(projects, seenHooks...)
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
			if _, ok, err := tags.Parse(gj.TagList, c.tagLim); !ok && err == nil {
				continue // the listing has the tags: not ours, no record needed
			}
			known, changed, err := c.store.Observe(ctx, store.Observation{JobID: gj.ID, ProjectID: gj.ProjectID, Name: gj.Name, Ref: gj.Ref,
				PipelineID: gj.PipelineID, Status: job.StatusPending, Source: "poll", At: time.Now(), Create: true})
			if err != nil {
				c.log.Error("poll: recording job failed", "job_id", gj.ID, "err", err)
				continue
			}
			if known && changed {
				c.m.Reconcile.WithLabelValues("job_found_by_poll").Inc()
				c.log.Info("poll: found a pending job FireRunner had not seen", "job_id", gj.ID, "project_id", gj.ProjectID)
				c.q.Add(jobKey(gj.ID))
			}
		}
	}
}
