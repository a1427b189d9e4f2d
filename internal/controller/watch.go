package controller

import (
	"context"
	"errors"
	"time"

	"github.com/firerunner/firerunner/internal/job"
	"github.com/firerunner/firerunner/internal/vm"
)

// watch waits for a VMM to end in the background, records its exit and
// enqueues the VM. Watching again is a no-op.
func (c *Controller) watch(id string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, ok := c.watchers[id]; ok || c.baseCtx.Err() != nil {
		return
	}
	ctx, cancel := context.WithCancel(c.baseCtx)
	done := make(chan struct{})
	// Unwatching waits for the watcher: an exit it is recording lands in
	// the record before the VM is torn down (on PostgreSQL, a stop's
	// transactions could otherwise overtake it and the exit code be lost).
	c.watchers[id] = func() { cancel(); <-done }
	c.watchWG.Add(1)
	go func() {
		defer c.watchWG.Done()
		defer close(done)
		res, err := c.drv.Wait(ctx, id)
		if ctx.Err() != nil && err != nil {
			return // unwatched: the VM is being stopped
		}
		var code *int
		reason := res.Reason
		switch {
		case errors.Is(err, vm.ErrNotFound):
			reason = "vm not found on host"
		case err != nil:
			reason = err.Error()
		default:
			code = &res.ExitCode
		}
		// The exit is a fact: record it even when a stop of the VM races
		// with it and unwatches it (on PostgreSQL the stop may hold the
		// VM's row while this waits for it).
		rctx, rcancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
		defer rcancel()
		if _, err := c.store.UpdateVM(rctx, id, func(v *job.VM) error { v.Exited(code, reason, time.Now()); return nil }); err != nil {
			c.log.Error("recording vm exit failed", "vm_id", id, "err", err)
		}
		// The watcher entry stays until stopVM: the VM is accounted for.
		c.q.Add(vmKey(id))
	}()
}

func (c *Controller) watching(id string) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	_, ok := c.watchers[id]
	return ok
}

func (c *Controller) unwatch(id string) {
	c.mu.Lock()
	delete(c.paused, id)
	stop, ok := c.watchers[id]
	delete(c.watchers, id)
	c.mu.Unlock()
	if ok {
		stop() // outside c.mu: it waits for the watcher's last write
	}
}

// vmAlive reports whether the driver has a live VMM for id.
func (c *Controller) vmAlive(ctx context.Context, id string) (bool, error) {
	insts, err := c.drv.List(ctx)
	if err != nil {
		return false, err
	}
	for _, in := range insts {
		if in.ID == id {
			return in.PID != 0, nil
		}
	}
	return false, nil
}
