package controller

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/firerunner/firerunner/internal/job"
	"github.com/firerunner/firerunner/internal/planner"
	"github.com/firerunner/firerunner/internal/store"
)

// reconcilePlan compares the waiting jobs with the live VMs and carries out
// the planner's decision: plan new VMs (records first, then their own
// reconcile starts them), retarget surplus idle ones, mark the rest
// surplus (their reconcile confirms with GitLab and stops them), and fail
// jobs larger than the host. One plan at a time (it is one queue key), so
// two events can never start two VMs for one job.
func (c *Controller) reconcilePlan(ctx context.Context) error {
	// Which jobs were re-read since start, taken before the list: a job is
	// marked only after its status is stored, so the list below has it.
	c.mu.Lock()
	verified := make(map[int64]bool, len(c.checked))
	for id := range c.checked {
		verified[id] = true
	}
	c.mu.Unlock()
	f := store.Filter{State: job.Queued}
	if c.fleet {
		f.ClaimableBy = c.host // its own claims and the unclaimed ones
	}
	queued, err := c.store.ListJobs(ctx, f)
	if err != nil {
		return err
	}
	live, err := c.liveVMs(ctx)
	if err != nil {
		return err
	}
	now := time.Now()
	in := planner.Input{Capacity: c.capacity, NoStarts: c.draining.Load()}
	byID := map[int64]job.Job{}
	for _, j := range queued {
		if j.VCPUs == 0 {
			continue // not sized: picked by our runner without a size tag
		}
		byID[j.ID] = j
		// A job not re-read since a restart, or that an event says was
		// taken or ended (not yet confirmed with GitLab), keeps an idle VM
		// that can take it, but gets no new one.
		// In a fleet, an unclaimed job's record is as fresh as the fleet:
		// the host that stored it read it from GitLab (or re-queued it after
		// reading it), and any host's webhooks keep it current.
		fresh := verified[j.ID] || (c.fleet && j.HostID == "")
		ready := !now.Before(j.NotBefore) && fresh && job.StatusRank(j.GitLabStatus) < 2
		in.Jobs = append(in.Jobs, planner.Job{ID: j.ID, Pool: c.pool(j.ProjectID), Tags: j.TagSet(), VCPUs: j.VCPUs, MemoryMiB: j.MemoryMiB,
			Ready: ready, Pooled: c.fitsPool(j)})
	}
	for _, v := range live {
		warm := v.Warm() && v.Timeline.Exited.IsZero()
		shared := v.Pooled() && v.State == job.VMStarting && v.Timeline.Exited.IsZero()
		in.VMs = append(in.VMs, planner.VM{ID: v.ID, ForJob: v.ForJob, Pool: c.pool(v.ProjectID), Tags: v.TagSet(), VCPUs: v.VCPUs,
			MemoryMiB: v.MemoryMiB, Idle: (!warm && v.ForJob != 0 && v.State.Idle() && v.Timeline.Exited.IsZero()) || shared, Warm: warm,
			Booted: warm && v.State == job.VMWarm && !v.Timeline.Ready.IsZero(), Shared: shared})
	}
	for size, pl := range c.pools {
		in.Pools = append(in.Pools, planner.Pool{VCPUs: size[0], MemoryMiB: size[1], MinIdle: pl.MinIdle, MaxIdle: pl.MaxIdle})
	}
	p := planner.Decide(in)

	surplus := map[string]bool{}
	for _, id := range p.Stop {
		surplus[id] = true
	}
	c.mu.Lock()
	old := c.surplus
	c.surplus, c.waiting = surplus, len(p.Waiting)
	c.mu.Unlock()
	if c.fleet {
		c.pokeFleet(ctx, p.Waiting, byID, now)
	}
	for id := range surplus {
		if !old[id] {
			c.q.Add(vmKey(id))
		}
	}
	var errs []error
	for _, id := range p.TooBig {
		j := byID[id]
		if c.fleet && c.fitsElsewhere(ctx, j) {
			continue // a larger host of the fleet takes it
		}
		errs = append(errs, c.giveUp(ctx, j, fmt.Sprintf("%s: %d vCPUs / %d MiB is more than the host's %d vCPUs / %d MiB",
			job.ReasonTooBig, j.VCPUs, j.MemoryMiB, c.capacity.VCPUs, c.capacity.MemoryMiB)))
	}
	for _, rt := range p.Retarget {
		j := byID[rt.JobID]
		err := c.store.Tx(ctx, func(tx *store.Tx) error {
			if err := c.claim(tx, j); err != nil {
				return err
			}
			_, err := tx.UpdateVM(rt.VMID, func(v *job.VM) error { return v.Retarget(j) })
			return err
		})
		if errors.Is(err, store.ErrNotClaimed) {
			continue
		}
		if err != nil && !errors.Is(err, job.ErrStale) {
			errs = append(errs, err)
			continue
		}
		c.m.Reconcile.WithLabelValues("vm_retargeted").Inc()
		c.log.Info("idle vm retargeted to a waiting job its runner could not take", "vm_id", rt.VMID, "job_id", rt.JobID, "tags", rt.Tags.Key())
		c.q.Add(vmKey(rt.VMID))
	}
	for _, a := range p.Assign {
		j := byID[a.JobID]
		if err := c.store.Tx(ctx, func(tx *store.Tx) error {
			if err := c.claim(tx, j); err != nil {
				return err
			}
			_, err := tx.UpdateVM(a.VMID, func(v *job.VM) error { return v.AssignTo(j, now) })
			return err
		}); err != nil {
			if !errors.Is(err, job.ErrStale) && !errors.Is(err, store.ErrNotClaimed) {
				errs = append(errs, err)
			}
			c.log.Debug("warm vm not assigned: it moved on", "vm_id", a.VMID, "job_id", j.ID, "err", err)
			continue
		}
		c.m.PoolJobs.WithLabelValues(j.SizeTag, "hit").Inc()
		c.log.Info("warm vm assigned to a waiting job", "vm_id", a.VMID, "job_id", j.ID, "size", j.SizeTag)
		c.q.Add(vmKey(a.VMID))
	}
	for _, s := range p.Start {
		j := byID[s.JobID]
		v := job.PlanVM(job.NewVMID(), c.host, j, now)
		if err := c.store.Tx(ctx, func(tx *store.Tx) error {
			if err := c.claim(tx, j); err != nil {
				return err
			}
			return tx.CreateVM(&v)
		}); err != nil {
			if !errors.Is(err, store.ErrNotClaimed) {
				errs = append(errs, err)
			}
			continue
		}
		if _, pooled := c.pools[[2]int{j.VCPUs, j.MemoryMiB}]; pooled {
			c.m.PoolJobs.WithLabelValues(j.SizeTag, "miss").Inc()
		}
		c.q.Add(vmKey(v.ID))
	}
	for _, r := range p.Refill {
		v := job.PlanWarmVM(job.NewVMID(), c.host, r.VCPUs, r.MemoryMiB, now)
		if err := c.store.Tx(ctx, func(tx *store.Tx) error {
			if c.fleet {
				if ok, err := tx.HostAlive(c.host); err != nil || !ok {
					return errors.Join(err, store.ErrNotClaimed)
				}
			}
			return tx.CreateVM(&v)
		}); err != nil {
			if !errors.Is(err, store.ErrNotClaimed) {
				errs = append(errs, err)
			}
			continue
		}
		c.q.Add(vmKey(v.ID))
	}
	if len(p.Start)+len(p.Retarget)+len(p.Assign)+len(p.Refill)+len(p.Stop)+len(p.TooBig) > 0 {
		c.log.Debug("plan", "decision", p.String())
	}
	return errors.Join(errs...)
}

// pool is the set of jobs one runner may serve besides tags: a project
// runner only its project's jobs; group and instance runners any job here.
func (c *Controller) pool(projectID int64) string {
	if c.cfg.Runners.Scope == "project" {
		return strconv.FormatInt(projectID, 10)
	}
	return ""
}
