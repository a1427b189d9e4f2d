package controller

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/firerunner/firerunner/internal/config"
	"github.com/firerunner/firerunner/internal/job"
	"github.com/firerunner/firerunner/internal/store"
)

func withPool(minIdle, maxIdle int, idle time.Duration) func(h *harness) {
	return func(h *harness) {
		h.cfg.Pools = []config.Pool{{Size: tag1x1, MinIdle: minIdle, MaxIdle: maxIdle, IdleTimeout: idle}}
	}
}

// warmVMs returns the pool's warm VMs that wait for a job.
func (h *harness) warmVMs() []job.VM {
	h.t.Helper()
	live, err := h.st.ListVMs(context.Background(), true, 0)
	if err != nil {
		h.t.Fatal(err)
	}
	var out []job.VM
	for _, v := range live {
		if v.State == job.VMWarm && v.ForJob == 0 && h.vmRunning(v.ID) {
			out = append(out, v)
		}
	}
	return out
}

func (h *harness) waitWarm(n int) []job.VM {
	h.t.Helper()
	var w []job.VM
	h.eventually("warm VMs ready", func() bool { w = h.warmVMs(); return len(w) == n })
	return w
}

// TestWarmPoolHit: a warm VM boots with no runner and no token; a job of its
// size takes it (runner made then, handed over the assignment channel), the
// pool refills, and the job runs to its end on that VM.
func TestWarmPoolHit(t *testing.T) {
	h := newHarness(t, withPool(1, 1, time.Hour))
	w := h.waitWarm(1)[0]
	if n := h.gl.createdCount(); n != 0 {
		t.Fatalf("a warm VM created %d runners before any job", n)
	}
	sp := h.drv.Specs()[0]
	if !sp.Guest.Warm || sp.Guest.RunnerToken != "" || sp.Guest.MachineID == "" {
		t.Fatalf("warm spec: %s machine-id %q", sp.Guest, sp.Guest.MachineID)
	}
	id := h.newJob(tag1x1, "linux")
	var v job.VM
	h.eventually("the warm VM assigned and its runner handed over", func() bool {
		v = h.vm(w.ID)
		_, ok := h.drv.Assignment(w.ID)
		return v.State == job.VMStarting && ok
	})
	a, _ := h.drv.Assignment(w.ID)
	rs := h.gl.runnerList()
	if v.ForJob != id || len(rs) != 1 || rs[0].ID != v.RunnerID || a.RunnerToken != rs[0].Token || strings.Join(rs[0].Tags, ",") != tag1x1+",linux" {
		t.Fatalf("assignment: vm %+v runners %+v", v, rs)
	}
	h.waitWarm(1) // refilled
	h.take(id, v)
	h.end(id, v, "success")
	if j := h.waitState(id, job.Done); j.VMID != w.ID {
		t.Fatalf("job ran on %s, want the warm VM %s", j.VMID, w.ID)
	}
	for _, sp := range h.drv.Specs() {
		if sp.Guest.RunnerToken != "" {
			t.Fatalf("a VM was booted cold with a token: %s", sp.ID)
		}
	}
	h.eventually("pool hit counted", func() bool {
		return strings.Contains(h.metricsText(), `firerunner_pool_jobs_total{result="hit",size="`+tag1x1+`"} 1`)
	})
	if !strings.Contains(h.metricsText(), `firerunner_pool_idle_vms{size="`+tag1x1+`"} 1`) {
		t.Fatalf("idle gauge:\n%s", grep(h.metricsText(), "pool"))
	}
}

// TestWarmPoolExhaustedAndCanceled: room for one VM. The warm VM takes the
// first job; the second waits (jobs come before refills) and boots cold when
// the first job's VM is gone, after that job was canceled on its warm VM.
func TestWarmPoolExhaustedAndCanceled(t *testing.T) {
	h := newHarness(t, func(h *harness) {
		withPool(1, 1, time.Hour)(h)
		h.capa.VCPUs = 1
	})
	w := h.waitWarm(1)[0]
	a := h.newJob(tag1x1)
	h.eventually("the first job on the warm VM", func() bool { v := h.vm(w.ID); return v.ForJob == a && v.State == job.VMStarting })
	b := h.newJob(tag1x1)
	h.waitState(b, job.Queued)
	h.take(a, h.vm(w.ID))
	h.gl.setStatus(a, "canceled")
	h.event(a)
	h.waitState(a, job.Canceled)
	h.waitVMState(w.ID, job.VMGone)
	cold := h.waitStarted(b)
	if !cold.Timeline.Assigned.IsZero() || h.drv.Specs()[len(h.drv.Specs())-1].Guest.RunnerToken == "" {
		t.Fatalf("the second job should boot cold: %+v", cold)
	}
	m := h.metricsText()
	if !strings.Contains(m, `firerunner_pool_jobs_total{result="hit",size="`+tag1x1+`"} 1`) ||
		!strings.Contains(m, `firerunner_pool_jobs_total{result="miss",size="`+tag1x1+`"} 1`) {
		t.Fatalf("hit and miss:\n%s", grep(m, "pool_jobs"))
	}
	h.take(b, cold)
	h.end(b, cold, "success")
	h.waitState(b, job.Done)
	h.waitWarm(1) // refilled once the room is free
}

// TestWarmPoolIdleTimeoutAndDrain: a warm VM older than the pool's idle
// timeout is recycled and replaced; draining stops warm VMs at once.
func TestWarmPoolIdleTimeoutAndDrain(t *testing.T) {
	h := newHarness(t, func(h *harness) {
		withPool(1, 1, 300*time.Millisecond)(h)
		h.cfg.Limits.DrainTimeout = time.Minute
	})
	first := h.waitWarm(1)[0]
	if v := h.waitVMState(first.ID, job.VMGone); v.Reason != job.ReasonPoolIdle {
		t.Fatalf("recycled with reason %q", v.Reason)
	}
	h.eventually("a replacement", func() bool { w := h.warmVMs(); return len(w) == 1 && w[0].ID != first.ID })
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	h.stopd = true
	began := time.Now()
	if err := h.c.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	if took := time.Since(began); took > 30*time.Second {
		t.Fatalf("drain waited %s for idle warm VMs", took)
	}
	if list, _ := h.drv.List(context.Background()); len(list) != 0 {
		t.Fatalf("warm VMs left after drain: %v", list)
	}
	h.web.Close()
	h.st.Close()
}

// TestWarmPoolRestart: after kill -9, a warm VM whose VMM survived is kept,
// one whose VMM is gone is removed and replaced; no runner was ever made.
func TestWarmPoolRestart(t *testing.T) {
	h := newHarness(t, withPool(2, 2, time.Hour))
	w := h.waitWarm(2)
	h.crash()
	_ = h.drv.Destroy(context.Background(), w[1].ID) // its VMM died with the host's hiccup
	h.start()
	h.eventually("pool back to two, the survivor kept", func() bool {
		ws := h.warmVMs()
		return len(ws) == 2 && (ws[0].ID == w[0].ID || ws[1].ID == w[0].ID)
	})
	if v := h.waitVMState(w[1].ID, job.VMGone); job.ReasonKey(v.Reason) != job.ReasonRestartLost {
		t.Fatalf("lost warm VM: %q", v.Reason)
	}
	if n := h.gl.createdCount(); n != 0 {
		t.Fatalf("%d runners created with no job", n)
	}
	if act, _ := h.st.ListJobs(context.Background(), store.Filter{ActiveOnly: true}); len(act) != 0 {
		t.Fatalf("jobs: %+v", act)
	}
}
