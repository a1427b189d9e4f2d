package controller

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"time"

	"github.com/firerunner/firerunner/internal/guestconfig"
	"github.com/firerunner/firerunner/internal/job"
	"github.com/firerunner/firerunner/internal/vm"
)

// spec is a VM's spec without a runner: the caller adds the token (cold
// start) or leaves the VM warm. wait is gitlab-runner's wait for its first
// job beyond the start timeout (a warm VM's idle time).
func (c *Controller) spec(v job.VM, wait time.Duration) vm.Spec {
	s := vm.Spec{
		ID: v.ID, VCPUs: v.VCPUs, MemoryMiB: v.MemoryMiB, Image: c.img,
		Guest: guestconfig.Config{
			Hostname:       v.ID,
			MachineID:      machineID(),
			SystemID:       job.SystemID(v.ID),
			JobTimeoutSec:  int(c.cfg.Limits.JobMaxDuration / time.Second),
			WaitTimeoutSec: int((c.cfg.Limits.VMStartTimeout + wait) / time.Second),
			UnixTimeNano:   time.Now().UnixNano(),
			EntropySeed:    entropy(),
		},
		Timeout: c.cfg.Limits.VMStartTimeout + wait + c.cfg.Limits.JobMaxDuration + time.Minute,
	}
	dockerSpec(&s, c.cfg)
	return s
}

// poolOf returns the pool of a VM's size.
func (c *Controller) poolOf(v job.VM) (idle time.Duration, ok bool) {
	p, ok := c.pools[[2]int{v.VCPUs, v.MemoryMiB}]
	return p.PoolIdleTimeout(), ok
}

// startWarm boots a pool's VM without a runner: the agent starts
// gitlab-runner, which blocks on its config until a job is assigned.
func (c *Controller) startWarm(ctx context.Context, v job.VM) error {
	idle, ok := c.poolOf(v)
	if c.draining.Load() || c.isSurplus(v.ID) || !ok {
		return c.stopFor(ctx, v.ID, c.idleReason())
	}
	spec := c.spec(v, idle)
	spec.Guest.Warm = true
	if c.net != nil {
		att, gnet, err := c.net.Attach(ctx, v.ID)
		if err != nil {
			c.vmLog(v).Error("network setup of a warm vm failed", "err", err)
			return c.stopFor(ctx, v.ID, job.ReasonNetwork+": "+err.Error())
		}
		spec.Network, spec.Guest.Network = att, gnet
	}
	startCtx, cancel := context.WithTimeout(ctx, c.cfg.Limits.VMStartTimeout)
	err := c.bootWarm(startCtx, spec)
	cancel()
	if err != nil {
		c.vmLog(v).Error("warm vm start failed", "err", err)
		return c.stopFor(ctx, v.ID, job.ReasonVMStart+": "+err.Error())
	}
	c.watch(v.ID)
	v, err = c.store.UpdateVM(ctx, v.ID, func(x *job.VM) error { return x.WarmStarted(time.Now()) })
	if err != nil {
		return err
	}
	c.vmLog(v).Info("warm vm started", "vcpus", v.VCPUs, "memory_mib", v.MemoryMiB)
	c.q.Add(vmKey(v.ID)) // assigned meanwhile, or wait for its idle timeout
	return nil
}

// bootWarm restores a warm VM from its size's snapshot where the driver can
// (vm.WarmCloner), else boots it.
func (c *Controller) bootWarm(ctx context.Context, spec vm.Spec) error {
	if cl, ok := c.drv.(vm.WarmCloner); ok {
		if restored, err := cl.StartClone(ctx, spec); restored || err != nil {
			return err
		}
	}
	return c.drv.Start(ctx, spec)
}

// snapshotWarm makes a ready warm VM its size's template for snapshot
// refills where the driver has them; a failure only means the pool keeps
// booting cold.
func (c *Controller) snapshotWarm(ctx context.Context, v job.VM) {
	cl, ok := c.drv.(vm.WarmCloner)
	if !ok {
		return
	}
	sctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	if err := cl.SnapshotWarm(sctx, v.ID); err != nil {
		c.vmLog(v).Warn("snapshot for pool refills failed; the pool boots its VMs cold", "err", err)
	}
}

// superviseWarm acts on a booted pool VM: hand it its job's runner when the
// plan assigned one, recycle it after the pool's idle timeout, stop it when
// the plan has no use for it.
func (c *Controller) superviseWarm(ctx context.Context, v job.VM) error {
	if !v.Timeline.Exited.IsZero() {
		if v.ForJob != 0 {
			return c.failAttempt(ctx, v, fmt.Sprintf("%s: warm vm ended before its job arrived (%s)", job.ReasonVMExit, v.ExitReason), false)
		}
		return c.stopFor(ctx, v.ID, fmt.Sprintf("%s: warm vm ended (%s)", job.ReasonVMExit, v.ExitReason))
	}
	if !c.watching(v.ID) {
		alive, err := c.vmAlive(ctx, v.ID)
		if err != nil {
			return err
		}
		if !alive {
			return c.stopFor(ctx, v.ID, job.ReasonRestartLost+": warm vm was not running after restart")
		}
		c.watch(v.ID)
	}
	if v.ForJob != 0 {
		return c.assignWarm(ctx, v)
	}
	if v.Timeline.Ready.IsZero() {
		if !c.guestReady(v.ID) {
			c.q.AddAfter(vmKey(v.ID), 100*time.Millisecond) // the guest boots: look again soon
		} else {
			var err error
			if v, err = c.store.UpdateVM(ctx, v.ID, func(x *job.VM) error { x.WarmReady(time.Now()); return nil }); err != nil {
				return err
			}
			c.snapshotWarm(ctx, v) // before it can be assigned: its guest still waits
			c.q.Add(planKey)       // one more warm VM to assign
		}
	}
	idle, ok := c.poolOf(v)
	switch {
	case c.draining.Load() || c.isSurplus(v.ID) || !ok:
		return c.stopFor(ctx, v.ID, c.idleReason())
	case time.Since(v.Timeline.Started) >= idle:
		c.vmLog(v).Info("warm vm idle too long; recycling it", "idle_timeout", idle)
		return c.stopFor(ctx, v.ID, job.ReasonPoolIdle)
	}
	if tag := c.pooledTag(v.VCPUs, v.MemoryMiB); tag != "" && !v.Timeline.Ready.IsZero() {
		return c.handToPool(ctx, v, tag, idle)
	}
	if !v.Timeline.Ready.IsZero() {
		c.q.AddAfter(vmKey(v.ID), time.Until(v.Timeline.Started.Add(idle)))
	}
	return nil
}

// guestReady reports whether a warm VM's guest said gitlab-runner waits for
// its config (the console marker). A VM the driver has no timeline for was
// started by an earlier process, long enough ago to count as ready.
func (c *Controller) guestReady(id string) bool {
	src, ok := c.drv.(vm.TimelineSource)
	if !ok {
		return true
	}
	tl, ok := src.Timeline(id)
	if !ok {
		return true
	}
	_, ready := tl.At(vm.MilestoneWarm)
	return ready
}

// assignWarm creates the runner of the job assigned to a warm VM and hands
// it over the assignment channel: the token lives in this function's memory
// and in the guest only.
func (c *Controller) assignWarm(ctx context.Context, v job.VM) error {
	lease, v, done, err := c.createRunner(ctx, v)
	if done || err != nil {
		return err
	}
	if v.State == job.VMStopping {
		return c.stopVM(ctx, v)
	}
	actx, cancel := context.WithTimeout(ctx, 30*time.Second)
	err = c.drv.(vm.Assigner).Assign(actx, v.ID, guestconfig.Assignment{GitLabURL: c.cfg.GuestGitLabURL(), RunnerToken: lease.Token,
		JobTimeoutSec: int(c.cfg.Limits.JobMaxDuration / time.Second)})
	cancel()
	if err != nil {
		c.vmLog(v).Error("handing the runner to the warm vm failed", "err", err)
		return c.failAttempt(ctx, v, job.ReasonVMStart+": assignment: "+err.Error(), false)
	}
	c.vmLog(v).Info("runner handed to the warm vm", "runner", lease)
	c.q.AddAfter(vmKey(v.ID), c.cfg.Limits.VMStartTimeout)
	return nil
}

// machineID is a fresh /etc/machine-id: 128 random bits in hex.
func machineID() string {
	b := make([]byte, 16)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}
