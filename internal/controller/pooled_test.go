package controller

import (
	"context"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/firerunner/firerunner/internal/config"
	"github.com/firerunner/firerunner/internal/job"
	"github.com/firerunner/firerunner/internal/testsupport/gitlabstandin"
)

// withPooled: runners.mode pooled (instance runners: the stand-in's token
// is an administrator's) with one pool of tag1x1.
func withPooled(minIdle, maxIdle int, idle time.Duration) func(h *harness) {
	return func(h *harness) {
		h.cfg.Runners.Mode = "pooled"
		h.cfg.Runners.Scope = "instance"
		h.cfg.Pools = []config.Pool{{Size: tag1x1, MinIdle: minIdle, MaxIdle: maxIdle, IdleTimeout: idle}}
	}
}

// pollers returns the live VMs polling GitLab on a shared runner, with the
// token each got over the assignment channel.
func (h *harness) pollers() map[string]string {
	h.t.Helper()
	live, err := h.st.ListVMs(context.Background(), true, 0)
	if err != nil {
		h.t.Fatal(err)
	}
	out := map[string]string{}
	for _, v := range live {
		if v.Pooled() && v.State == job.VMStarting && h.vmRunning(v.ID) {
			if a, ok := h.drv.Assignment(v.ID); ok {
				out[v.ID] = a.RunnerToken
			}
		}
	}
	return out
}

// waitPollers waits for at least n VMs polling on the pool's runner (the
// pool keeps min_idle of them beside those about to take a job).
func (h *harness) waitPollers(n int) map[string]string {
	h.t.Helper()
	var p map[string]string
	h.eventually(fmt.Sprintf("%d VMs polling on the pool's runner", n), func() bool { p = h.pollers(); return len(p) >= n })
	return p
}

// poolRunners returns the pool runners in GitLab (by description).
func (h *harness) poolRunners() []gitlabstandin.RunnerState {
	var out []gitlabstandin.RunnerState
	for _, r := range h.gl.runnerList() {
		if strings.Contains(r.Description, " pool ") {
			out = append(out, r)
		}
	}
	return out
}

// pollAs makes VM vmID's gitlab-runner ask GitLab for a job with token, as
// a runner manager named by the VM's system_id; it returns the job handed
// out (0: none).
func (h *harness) pollAs(vmID, token string) int64 {
	h.t.Helper()
	id, _, err := h.gl.requestAs(token, job.SystemID(vmID))
	if err != nil {
		h.t.Fatalf("vm %s polling: %v", vmID, err)
	}
	return id
}

// TestPooledRunnerServesManyJobs: in pooled mode the pool's VMs get one
// shared runner as soon as they are ready (no job needed), take jobs of the
// pool's size tag from GitLab themselves, one job per VM, and each job's
// record names the VM whose system_id GitLab reports; the pool refills with
// no new runner. A job with more tags than the pool's falls back to a
// one-off runner.
func TestPooledRunnerServesManyJobs(t *testing.T) {
	h := newHarness(t, withPooled(2, 3, time.Hour))
	p := h.waitPollers(2)
	rs := h.poolRunners()
	if len(rs) != 1 || h.gl.createdCount() != 1 || strings.Join(rs[0].Tags, ",") != tag1x1 || rs[0].RunUntagged {
		t.Fatalf("pool runners %+v, created %d", rs, h.gl.createdCount())
	}
	for id, tok := range p {
		if tok != rs[0].Token {
			t.Fatalf("vm %s got another token than the pool runner's", id)
		}
	}
	for _, sp := range h.drv.Specs() {
		if sp.Guest.SystemID != job.SystemID(sp.ID) || sp.Guest.RunnerToken != "" {
			t.Fatalf("spec %s: system id %q", sp.ID, sp.Guest.SystemID)
		}
	}

	ran := map[string]int64{}
	for range 5 {
		id := h.newJob(tag1x1)
		h.waitState(id, job.Queued)
		p := h.waitPollers(2)
		var vmID string
		for v, tok := range p {
			if got := h.pollAs(v, tok); got != 0 {
				if got != id {
					t.Fatalf("vm %s got job %d, want %d", v, got, id)
				}
				vmID = v
				break
			}
		}
		if vmID == "" {
			t.Fatalf("no poller got job %d", id)
		}
		h.event(id) // running
		j := h.waitState(id, job.Running)
		if j.VMID != vmID || j.RunnerID != rs[0].ID {
			t.Fatalf("job %d recorded on vm %s runner %d, GitLab says vm %s runner %d", id, j.VMID, j.RunnerID, vmID, rs[0].ID)
		}
		if gs := h.gl.job(id).RunnerManagerSystemID; gs != job.SystemID(j.VMID) {
			t.Fatalf("GitLab's runner manager %s, record's vm %s", gs, j.VMID)
		}
		if prev, dup := ran[vmID]; dup {
			t.Fatalf("vm %s ran jobs %d and %d", vmID, prev, id)
		}
		ran[vmID] = id
		h.gl.finish(id, "success")
		_ = h.drv.Exit(vmID, 0)
		h.event(id)
		h.waitState(id, job.Done)
		if v := h.waitVMState(vmID, job.VMGone); v.Reason != job.ReasonRanJob || v.PickedJobID != id {
			t.Fatalf("vm %s gone: %q picked %d", vmID, v.Reason, v.PickedJobID)
		}
	}
	if n := h.gl.createdCount(); n != 1 {
		t.Fatalf("%d runners created for 5 pooled jobs, want the pool's 1", n)
	}
	if r, _ := h.gl.Runner(rs[0].ID); !r.DeletedAt.IsZero() || len(r.Managers) < 5 {
		t.Fatalf("the pool runner after its VMs: %+v", r)
	}

	// More tags than the pool's: a one-off runner with them, a cold VM.
	other := h.newJob(tag1x1, "linux")
	v := h.waitStarted(other)
	if v.Pooled() || v.ForJob != other || h.gl.createdCount() != 2 {
		t.Fatalf("fallback vm %+v, created %d", v, h.gl.createdCount())
	}
	h.take(other, v)
	h.end(other, v, "success")
	h.waitState(other, job.Done)
	h.eventually("the one-off runner deleted, the pool's kept", func() bool {
		return h.gl.deleted(v.RunnerID) && !h.gl.deleted(rs[0].ID)
	})
	m := h.metricsText()
	if !strings.Contains(m, `firerunner_pool_polling_vms{size="`+tag1x1+`"} `) || !strings.Contains(m, `firerunner_pool_handovers_total{size="`+tag1x1+`"}`) {
		t.Fatalf("metrics:\n%s", grep(m, "pool"))
	}
}

// TestPooledRestartRotatesToken: the shared runner's token is never stored;
// after kill -9 FireRunner rotates it instead of creating a runner (the old
// token is refused from then on), a VM of the old process that took a job
// meanwhile (its hook lost) is recorded busy with it, and one that took
// none is stopped; the pool refills with the new token.
func TestPooledRestartRotatesToken(t *testing.T) {
	h := newHarness(t, withPooled(2, 2, time.Hour))
	p := h.waitPollers(2)
	rs := h.poolRunners()
	var busyVM, idleVM, oldTok string
	id := h.gl.newJob(h.pid, tag1x1) // no hook: FireRunner learns of it only from GitLab
	for v, tok := range p {
		oldTok = tok
		if busyVM == "" {
			if got := h.pollAs(v, tok); got != id {
				t.Fatalf("vm %s got %d, want %d", v, got, id)
			}
			busyVM = v
		} else {
			idleVM = v
		}
	}
	h.crash()
	h.start()
	h.eventually("the busy vm recorded with its job, the idle one stopped", func() bool {
		b, i := h.vm(busyVM), h.vm(idleVM)
		return b.State == job.VMBusy && b.PickedJobID == id && i.State == job.VMGone
	})
	if v := h.vm(idleVM); job.ReasonKey(v.Reason) != job.ReasonTokenRotated {
		t.Fatalf("idle vm of the old process stopped with %q", v.Reason)
	}
	if j := h.job(id); j.VMID != busyVM || j.State != job.Running {
		t.Fatalf("job %+v", j)
	}
	r, _ := h.gl.Runner(rs[0].ID)
	if h.gl.createdCount() != 1 || r.TokenResets != 1 || r.Token == oldTok {
		t.Fatalf("after restart: created %d, resets %d", h.gl.createdCount(), r.TokenResets)
	}
	code, _, err := h.gl.call(http.MethodPost, "/api/v4/jobs/request", map[string]any{"token": oldTok})
	if err != nil || code != http.StatusForbidden {
		t.Fatalf("the old token still works: HTTP %d %v", code, err)
	}
	np := h.waitPollers(2)
	for v, tok := range np {
		if v == idleVM || tok != r.Token {
			t.Fatalf("poller %s after restart has a stale token", v)
		}
	}
	h.gl.finish(id, "success")
	_ = h.drv.Exit(busyVM, 0)
	h.event(id)
	h.waitState(id, job.Done)
	h.waitVMState(busyVM, job.VMGone)
	if n := h.gl.createdCount(); n != 1 {
		t.Fatalf("%d runners created", n)
	}
}

// TestPooledRunnerDeletedOnlyWhenPoolRemoved: restarts (graceful or not)
// keep the pool's runner; draining stops its idle VMs at once (the token
// rotated first) without deleting it; a start whose config no longer has
// the pool deletes it.
func TestPooledRunnerDeletedOnlyWhenPoolRemoved(t *testing.T) {
	h := newHarness(t, func(h *harness) {
		withPooled(2, 2, time.Hour)(h)
		h.cfg.Limits.DrainTimeout = time.Minute
	})
	p := h.waitPollers(2)
	rid := h.poolRunners()[0].ID
	began := time.Now()
	h.stop()
	if took := time.Since(began); took > 30*time.Second {
		t.Fatalf("drain waited %s for idle pollers", took)
	}
	for v, tok := range p {
		if h.vmRunning(v) {
			t.Fatalf("poller %s left after drain", v)
		}
		code, _, _ := h.gl.call(http.MethodPost, "/api/v4/jobs/request", map[string]any{"token": tok})
		if code != http.StatusForbidden {
			t.Fatalf("drained VMs' token still works: HTTP %d", code)
		}
	}
	if h.gl.deleted(rid) {
		t.Fatal("the pool's runner was deleted at an ordinary shutdown")
	}
	h.start()
	h.waitPollers(2)
	h.crash()
	h.start()
	h.waitPollers(2)
	if h.gl.deleted(rid) || h.gl.createdCount() != 1 || len(h.poolRunners()) != 1 {
		t.Fatalf("restarts: deleted %v, created %d", h.gl.deleted(rid), h.gl.createdCount())
	}
	h.stop()
	h.cfg.Pools = nil
	h.start()
	h.eventually("the removed pool's runner deleted", func() bool { return h.gl.deleted(rid) })
	h.clean()
}

// TestPooledStopRace: a VM on a shared runner cannot have its runner paused
// before it is stopped. When its gitlab-runner outlives the pool's idle
// timeout, FireRunner asks GitLab about that VM's runner manager first: one
// that took a job meanwhile (its hook not yet arrived) runs it to its end;
// one that took none is stopped.
func TestPooledStopRace(t *testing.T) {
	h := newHarness(t, func(h *harness) {
		withPooled(2, 2, 2*time.Second)(h)
		h.cfg.Limits.VMStartTimeout = 200 * time.Millisecond
		h.pollerGrace = time.Millisecond
	})
	p := h.waitPollers(2)
	id := h.gl.newJob(h.pid, tag1x1) // no hook
	var took, idle string
	for v, tok := range p {
		if took == "" {
			if got := h.pollAs(v, tok); got != id {
				t.Fatalf("vm %s got %d", v, got)
			}
			took = v
		} else {
			idle = v
		}
	}
	h.eventually("the idle one stopped, the one with a job kept", func() bool {
		return h.vm(idle).State == job.VMGone && h.vm(took).State == job.VMBusy
	})
	if v := h.vm(idle); job.ReasonKey(v.Reason) != job.ReasonPoolIdle {
		t.Fatalf("idle poller stopped with %q", v.Reason)
	}
	if !h.vmRunning(took) || h.job(id).VMID != took {
		t.Fatalf("the VM that took job %d was stopped or not recorded: %+v", id, h.job(id))
	}
	if r, _ := h.gl.Runner(h.poolRunners()[0].ID); r.Paused {
		t.Fatal("the shared runner was paused")
	}
	h.gl.finish(id, "success")
	_ = h.drv.Exit(took, 0)
	h.event(id)
	if j := h.waitState(id, job.Done); j.VMID != took {
		t.Fatalf("job ran on %s", j.VMID)
	}
}
