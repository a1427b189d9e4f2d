package controller

import (
	"context"
	"slices"
	"sync"
	"testing"
	"time"

	fake "github.com/firerunner/firerunner/internal/testsupport/fakevm"
	"github.com/firerunner/firerunner/internal/vm"
)

// cloner is the fake driver with the snapshot-refill capability
// (vm.WarmCloner): it records which warm VM became its size's template
// and which were restored instead of booted.
type cloner struct {
	*fake.Driver
	mu                sync.Mutex
	templates, clones []string
	haveSnapshot      bool
}

func (c *cloner) SnapshotWarm(ctx context.Context, id string) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.haveSnapshot {
		c.haveSnapshot = true
		c.templates = append(c.templates, id)
	}
	return nil
}

func (c *cloner) StartClone(ctx context.Context, spec vm.Spec) (bool, error) {
	c.mu.Lock()
	ok := c.haveSnapshot
	if ok {
		c.clones = append(c.clones, spec.ID)
	}
	c.mu.Unlock()
	if !ok {
		return false, nil
	}
	return true, c.Driver.Start(ctx, spec)
}

func (c *cloner) seen() (templates, clones []string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return slices.Clone(c.templates), slices.Clone(c.clones)
}

// TestWarmPoolSnapshotRefill: with a driver that clones, the first warm VM
// to be ready becomes the size's template (it boots, then is snapshotted,
// and serves like any warm VM); the refill after a job took it is restored
// from the snapshot instead of booted.
func TestWarmPoolSnapshotRefill(t *testing.T) {
	var cl *cloner
	h := newHarness(t, func(h *harness) {
		withPool(1, 1, time.Hour)(h)
		cl = &cloner{Driver: h.drv}
		h.driver = cl
	})
	w := h.waitWarm(1)[0]
	h.eventually("the first ready warm VM is the template", func() bool {
		tpl, _ := cl.seen()
		return slices.Equal(tpl, []string{w.ID})
	})
	if _, clones := cl.seen(); len(clones) != 0 {
		t.Fatalf("clones %v before there was a snapshot", clones)
	}
	h.newJob(tag1x1)
	h.eventually("the template assigned", func() bool { _, ok := h.drv.Assignment(w.ID); return ok })
	var refill string
	h.eventually("the refill restored from the snapshot", func() bool {
		_, clones := cl.seen()
		if len(clones) == 1 {
			refill = clones[0]
		}
		return refill != ""
	})
	if ws := h.waitWarm(1); ws[0].ID != refill {
		t.Fatalf("warm VM %s, want the clone %s", ws[0].ID, refill)
	}
	if tpl, _ := cl.seen(); len(tpl) != 1 {
		t.Errorf("templates %v; want one per size", tpl)
	}
}
