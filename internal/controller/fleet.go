package controller

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/firerunner/firerunner/internal/gitlabapi"
	"github.com/firerunner/firerunner/internal/job"
	"github.com/firerunner/firerunner/internal/runners"
	"github.com/firerunner/firerunner/internal/store"
	"github.com/firerunner/firerunner/internal/version"
)

// A fleet is several hosts on one PostgreSQL store (state.backend
// postgres). Each host:
//   - claims a waiting job atomically when its plan gives the job a VM
//     (store.Tx.ClaimJob: a conditional UPDATE that exactly one host wins,
//     and only while its lease runs), so each host's own plan keeps its own
//     capacity and pools;
//   - heartbeats every state.heartbeat_interval, which renews its lease,
//     looks for unclaimed jobs it may have room for, and reaps hosts whose
//     lease ended (reapHost);
//   - supervises only its own VMs; job records are shared: a webhook is
//     stored by whichever host gets it (duplicates change nothing, so they
//     act once), and a pick or an end is recorded by whichever host learns
//     it, under the job's row lock.
//
// The backstop poll and pruning run on the holder of the "poll" lease.

// pollLease is the named lease whose holder runs the backstop poll.
const pollLease = "poll"

// ownedLister is implemented by runner providers that can list the
// runners another host created (runners.OneOff): the reaper deletes a dead
// host's runners its store records do not name (created just before the
// host died).
type ownedLister interface {
	OwnedBy(ctx context.Context, host string) ([]runners.Owned, error)
}

// liveVMs returns the live VMs this host plans and supervises: in a fleet
// only its own (the store holds every host's).
func (c *Controller) liveVMs(ctx context.Context) ([]job.VM, error) {
	live, err := c.store.ListVMs(ctx, true, 0)
	if err != nil || !c.fleet {
		return live, err
	}
	own := live[:0]
	for _, v := range live {
		if v.HostID == c.host {
			own = append(own, v)
		}
	}
	return own, nil
}

// claim makes this host the one that serves waiting job j, inside the
// transaction that plans its VM (no-op on a single host's store).
func (c *Controller) claim(tx *store.Tx, j job.Job) error {
	if !c.fleet {
		return nil
	}
	err := tx.ClaimJob(j.ID, c.host)
	switch {
	case err == nil:
		if j.HostID != c.host {
			c.m.Fleet.WithLabelValues(c.host, "claimed").Inc()
		}
	case errors.Is(err, store.ErrNotClaimed):
		c.m.Fleet.WithLabelValues(c.host, "claim_lost").Inc()
		c.log.Debug("job claimed by another host, or this host's lease is not valid", "job_id", j.ID)
	}
	return err
}

// leads reports whether this host runs the backstop poll and pruning: on a
// single host always; in a fleet, the holder of the poll lease (taken or
// renewed here for three sweep intervals, so a dead leader is replaced).
func (c *Controller) leads(ctx context.Context) bool {
	if !c.fleet {
		return true
	}
	ok, err := c.store.TryLease(ctx, pollLease, c.host, 3*c.cfg.Reconcile.Interval)
	if err != nil {
		c.log.Warn("fleet: taking the poll lease failed", "err", err)
	}
	return ok
}

// hostRow is what this host tells the fleet about itself.
func (c *Controller) hostRow() store.Host {
	var pools []string
	for _, p := range c.cfg.Pools {
		pools = append(pools, fmt.Sprintf("%s min %d max %d", p.Size, p.MinIdle, max(p.MaxIdle, p.MinIdle)))
	}
	sort.Strings(pools)
	return store.Host{ID: c.host, VCPUs: c.capacity.VCPUs, MemoryMiB: c.capacity.MemoryMiB, MaxVMs: c.capacity.MaxVMs,
		Pools: strings.Join(pools, ", "), Version: version.Version, StartedAt: c.startedAt}
}

// heartbeat renews this host's lease. A host that finds it was reaped
// (its lease ended, e.g. a long pause or a lost database, and another host
// reconciled its jobs) resyncs: its VMs were marked stopping (host_lost)
// by the reaper, and tearing them down is its own job.
func (c *Controller) heartbeat(ctx context.Context) error {
	by, err := c.store.Heartbeat(ctx, c.hostRow(), c.cfg.State.HostLease)
	if err != nil {
		c.m.Fleet.WithLabelValues(c.host, "heartbeat_failed").Inc()
		return err
	}
	c.m.HostInfo.WithLabelValues(c.host, c.store.Backend()).Set(1)
	if by != "" && by != c.host {
		c.m.Fleet.WithLabelValues(c.host, "was_reaped").Inc()
		c.log.Warn("fleet: this host's lease had ended and another host reconciled its jobs; its VMs are torn down now", "reaped_by", by)
		if live, err := c.liveVMs(ctx); err == nil {
			for _, v := range live {
				c.q.Add(vmKey(v.ID))
			}
		}
	}
	return nil
}

// fleetLoop heartbeats until Shutdown has drained (a draining host still
// runs VMs: its lease must not end while it does).
func (c *Controller) fleetLoop() {
	defer c.hbWG.Done()
	t := time.NewTicker(c.cfg.State.HeartbeatInterval)
	defer t.Stop()
	for {
		select {
		case <-c.hbStop:
			return
		case <-t.C:
			c.fleetTick(context.WithoutCancel(c.baseCtx))
		}
	}
}

func (c *Controller) fleetTick(ctx context.Context) {
	ctx, cancel := context.WithTimeout(ctx, c.cfg.State.HostLease)
	defer cancel()
	if err := c.heartbeat(ctx); err != nil {
		c.log.Error("fleet: heartbeat failed; this host claims no job until its lease is renewed", "err", err)
		return
	}
	if c.draining.Load() {
		return
	}
	// Unclaimed jobs: the host that stored them may be full; a host with
	// room plans them.
	if n, err := c.store.UnclaimedReady(ctx); err == nil && n > 0 {
		c.q.Add(planKey)
	}
	hosts, err := c.store.Hosts(ctx)
	if err != nil {
		c.log.Warn("fleet: listing hosts failed", "err", err)
		return
	}
	now := time.Now()
	for _, h := range hosts {
		if h.ID == c.host || h.Alive(now) {
			continue
		}
		ok, err := c.store.Reap(ctx, h.ID, c.host, c.cfg.State.HostLease)
		if err != nil {
			c.log.Warn("fleet: taking over a dead host failed", "dead_host", h.ID, "err", err)
			continue
		}
		if ok {
			c.reapHost(ctx, h)
		}
	}
}

// reapHost reconciles the jobs of host dead, whose lease ended (this host
// won store.Reap, so no other host does it at the same time):
//   - its runners are deleted in GitLab (only now: while a host's lease
//     runs, its runners are its own), those its VM records name and those
//     GitLab lists with its id in their description;
//   - its live VMs are marked stopping with reason host_lost (their VMMs
//     are on that host, which tears them down when it comes back);
//   - the jobs its VMs were running fail with reason host_lost;
//   - the waiting jobs it claimed are unclaimed, re-read from GitLab and
//     planned again by the hosts with room.
//
// Every step is idempotent: a reaper that dies half-way is replaced after
// one lease by another.
func (c *Controller) reapHost(ctx context.Context, dead store.Host) {
	log := c.log.With("dead_host", dead.ID, "last_seen", dead.LastSeen)
	log.Warn("fleet: a host's lease ended; reconciling its jobs")
	c.m.Fleet.WithLabelValues(c.host, "reaped_host").Inc()
	all, err := c.store.ListVMs(ctx, true, 0)
	if err != nil {
		log.Error("fleet: listing the dead host's VMs failed", "err", err)
		return
	}
	reason := fmt.Sprintf("%s: host %s stopped heartbeating (last seen %s)", job.ReasonHostLost, dead.ID, dead.LastSeen.UTC().Format(time.RFC3339))
	for _, v := range all {
		if v.HostID != dead.ID {
			continue
		}
		if v.RunnerID != 0 && v.PickedJobID == 0 && v.Timeline.RunnerDeleted.IsZero() && !v.Pooled() {
			// Its runner may have taken (and even finished) a job whose
			// hooks went to the dead host: ask GitLab before deleting the
			// runner, which makes GitLab forget who ran the job.
			jobs, err := c.gl.RunnerJobs(ctx, v.RunnerID)
			if err != nil && !gitlabapi.IsNotFound(err) {
				log.Error("fleet: asking GitLab what the dead host's runner took failed; retried at the next reap", "runner_id", v.RunnerID, "err", err)
				continue
			}
			if len(jobs) > 0 {
				if err := c.pickFromGitLab(ctx, v, jobs[0]); err != nil {
					log.Error("fleet: recording the dead host's VM's job failed; retried at the next reap", "vm_id", v.ID, "err", err)
					continue
				}
			}
		}
		if v.RunnerID != 0 && v.Timeline.RunnerDeleted.IsZero() {
			if err := c.prov.Delete(ctx, v.RunnerID); err != nil {
				log.Error("fleet: deleting the dead host's runner failed; retried at the next reap", "runner_id", v.RunnerID, "err", err)
				continue
			}
			c.m.Fleet.WithLabelValues(c.host, "runner_deleted").Inc()
		}
		now := time.Now()
		var failed *job.Job
		var picked int64
		err := c.store.Tx(ctx, func(tx *store.Tx) error {
			failed = nil
			v, err := tx.UpdateVM(v.ID, func(x *job.VM) error {
				if err := x.Stop(reason, now); err != nil {
					return err
				}
				x.RunnerDeleted(now)
				return nil
			})
			if err != nil {
				return err
			}
			picked = v.PickedJobID
			if v.RunnerID != 0 {
				if err := tx.RunnerDeleted(v.RunnerID); err != nil {
					return err
				}
			}
			if v.PickedJobID == 0 {
				return nil
			}
			j, err := tx.UpdateJob(v.PickedJobID, func(r *job.Job) error {
				if r.State != job.Running || r.VMID != v.ID || job.StatusFinal(r.GitLabStatus) {
					return nil // GitLab's end, if any, is recorded by the job's reconcile
				}
				return r.Fail(reason, nil)
			})
			if errors.Is(err, store.ErrNotFound) {
				return nil
			}
			if err == nil && j.State == job.Failed && j.Reason == reason {
				failed = &j
			}
			return err
		})
		if err != nil && !errors.Is(err, job.ErrStale) {
			log.Error("fleet: recording the dead host's VM as lost failed", "vm_id", v.ID, "err", err)
			continue
		}
		if failed != nil {
			c.m.Fleet.WithLabelValues(c.host, "job_host_lost").Inc()
			c.finished(*failed)
		} else if picked != 0 {
			c.q.Add(jobKey(picked)) // ended in GitLab meanwhile: its reconcile records how
		}
	}
	// Runners of the dead host no record names: created just before it died.
	if ol, ok := c.prov.(ownedLister); ok {
		owned, err := ol.OwnedBy(ctx, dead.ID)
		if err != nil {
			log.Error("fleet: listing the dead host's runners failed", "err", err)
		}
		for _, r := range owned {
			if r.Legacy {
				continue
			}
			if err := c.prov.Delete(ctx, r.RunnerID); err != nil {
				log.Error("fleet: deleting the dead host's runner failed", "runner_id", r.RunnerID, "err", err)
				continue
			}
			if err := c.store.Tx(ctx, func(tx *store.Tx) error { return tx.RunnerDeleted(r.RunnerID) }); err != nil {
				log.Error("fleet: recording a runner deletion failed", "runner_id", r.RunnerID, "err", err)
			}
			c.m.Fleet.WithLabelValues(c.host, "runner_deleted").Inc()
			log.Warn("fleet: deleted a runner of the dead host no VM record named", "runner_id", r.RunnerID, "vm_id", r.VMID)
		}
	}
	claimed, err := c.store.ClaimedJobs(ctx, dead.ID)
	if err != nil {
		log.Error("fleet: listing the dead host's jobs failed", "err", err)
		return
	}
	for _, j := range claimed {
		_, err := c.store.UpdateJob(ctx, j.ID, func(r *job.Job) error {
			if r.HostID == dead.ID {
				r.HostID = ""
			}
			return nil
		})
		if err != nil {
			log.Error("fleet: re-queueing the dead host's job failed", "job_id", j.ID, "err", err)
			continue
		}
		if j.State == job.Queued {
			c.m.Fleet.WithLabelValues(c.host, "job_requeued").Inc()
			log.Info("fleet: the dead host's waiting job is re-queued for the fleet", "job_id", j.ID)
		}
		// Its reconcile here re-reads it from GitLab (it may have been
		// taken, or ended), then the plans of the hosts with room take it.
		c.forgetChecked(j.ID)
		c.q.Add(jobKey(j.ID))
	}
	c.q.Add(planKey)
	if len(claimed) > 0 {
		_ = c.store.Poke(ctx) // the other hosts with room plan them too
	}
}

// pokeFleet tells the other hosts (store.Poke) about waiting jobs this
// host's plan left without a VM that no host claimed and whose back-off is
// over: a host with room plans them at once. Each job is told about once
// per host, so full hosts never bounce pokes between them; the
// heartbeat's scan is the safety net.
func (c *Controller) pokeFleet(ctx context.Context, waiting []int64, byID map[int64]job.Job, now time.Time) {
	fresh := false
	c.mu.Lock()
	for _, id := range waiting {
		j := byID[id]
		if j.HostID == "" && !now.Before(j.NotBefore) && !c.poked[id] {
			c.poked[id], fresh = true, true
		}
	}
	for id := range c.poked {
		if _, still := byID[id]; !still {
			delete(c.poked, id) // claimed, served or ended: forget it
		}
	}
	c.mu.Unlock()
	if fresh {
		if err := c.store.Poke(ctx); err != nil {
			c.log.Debug("fleet: poking the other hosts failed; their heartbeat finds the jobs", "err", err)
		}
	}
}

// fitsElsewhere reports whether a job too big for this host fits a live
// host of the fleet (which then claims it).
func (c *Controller) fitsElsewhere(ctx context.Context, j job.Job) bool {
	hosts, err := c.store.Hosts(ctx)
	if err != nil {
		return true // decide later rather than fail a job on a read error
	}
	now := time.Now()
	for _, h := range hosts {
		if h.ID != c.host && h.Alive(now) && h.VCPUs >= j.VCPUs && h.MemoryMiB >= j.MemoryMiB {
			return true
		}
	}
	return false
}

// leaveFleet ends the heartbeat after the drain. Drained clean, the host
// hands its still-waiting claims back to the fleet and ends its lease
// (nothing of it is left to reap); otherwise the lease runs out and
// another host reaps what is left.
func (c *Controller) leaveFleet(ctx context.Context, clean bool) {
	c.hbOnce.Do(func() { close(c.hbStop) })
	c.hbWG.Wait()
	if !clean {
		return
	}
	claimed, err := c.store.ClaimedJobs(ctx, c.host)
	if err == nil {
		for _, j := range claimed {
			if j.State != job.Queued {
				continue
			}
			if _, err := c.store.UpdateJob(ctx, j.ID, func(r *job.Job) error {
				if r.HostID == c.host && r.State == job.Queued {
					r.HostID = ""
				}
				return nil
			}); err != nil {
				c.log.Warn("fleet: handing a waiting job back failed", "job_id", j.ID, "err", err)
			}
		}
	}
	if err := c.store.LeaveFleet(ctx, c.host); err != nil {
		c.log.Warn("fleet: ending this host's lease failed; it runs out by itself", "err", err)
		return
	}
	c.log.Info("fleet: left the fleet after a clean drain; waiting jobs handed back")
}
