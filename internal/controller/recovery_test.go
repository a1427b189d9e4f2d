package controller

import (
	"context"
	"fmt"
	"net/http"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	"github.com/firerunner/firerunner/internal/job"
	"github.com/firerunner/firerunner/internal/store"
	"github.com/firerunner/firerunner/internal/testsupport/gitlabstandin"
	"github.com/firerunner/firerunner/internal/webhook"
)

// TestSubsetPipeline is the pipeline: jobs tagged [s], [s, linux],
// [s]. GitLab gives a runner any pending job whose tags are a subset of
// its own, so the runner made for the linux job takes the first plain job
// (on purpose here). The linux job must still get a runner: an idle plain
// VM of the same size is retargeted to its tags, so three runners serve
// three jobs, and every record says who ran what.
func TestSubsetPipeline(t *testing.T) {
	h := newHarness(t, nil)
	linux := []string{tag1x1, "linux"}
	j1, j2, j3 := h.newJob(tag1x1), h.newJob(linux...), h.newJob(tag1x1)
	v1, v2, v3 := h.waitStarted(j1), h.waitStarted(j2), h.waitStarted(j3)
	// The linux VM's runner polls first and GitLab hands it the first job.
	if got := h.gl.request(v2.RunnerID); got != j1 {
		t.Fatalf("GitLab gave the linux runner job %d, want %d", got, j1)
	}
	h.event(j1)
	h.waitState(j1, job.Running)
	// The linux job has no runner that can take it: a plain idle VM gets its tags.
	h.eventually("a plain runner retagged for the linux job", func() bool {
		return slices.Equal(h.gl.runnerTags(v1.RunnerID), linux) || slices.Equal(h.gl.runnerTags(v3.RunnerID), linux)
	})
	retagged, plain := v1, v3
	if slices.Equal(h.gl.runnerTags(v3.RunnerID), linux) {
		retagged, plain = v3, v1
	}
	h.eventually("retarget recorded", func() bool { v := h.vm(retagged.ID); return v.ForJob == j2 && !v.TagsStale })
	if got := h.gl.request(retagged.RunnerID); got != j2 {
		t.Fatalf("retagged runner took job %d, want %d", got, j2)
	}
	h.event(j2)
	if got := h.gl.request(plain.RunnerID); got != j3 {
		t.Fatalf("plain runner took job %d, want %d", got, j3)
	}
	h.event(j3)
	ran := map[int64]job.VM{j1: v2, j2: retagged, j3: plain}
	for id, v := range ran {
		h.end(id, v, "success")
	}
	for id, v := range ran {
		j := h.waitState(id, job.Done)
		if j.Reason != job.ReasonSucceeded || j.VMID != v.ID || j.RunnerID != v.RunnerID {
			t.Errorf("job %d: %s %q on vm %s runner %d, want vm %s runner %d", id, j.State, j.Reason, j.VMID, j.RunnerID, v.ID, v.RunnerID)
		}
	}
	h.clean()
	if n := h.gl.createdCount(); n != 3 {
		t.Fatalf("runners created: %d, want 3", n)
	}
	if n := h.gl.deletedCount(); n != 3 {
		t.Fatalf("runners deleted: %d, want 3", n)
	}
}

// TestIdleVMStoppedWhenItsJobRanElsewhere: a job taken by a runner that is
// not ours leaves its VM with nothing to run; the VM goes (after GitLab
// confirms its runner took nothing), the job's record names the other runner.
func TestIdleVMStoppedWhenItsJobRanElsewhere(t *testing.T) {
	h := newHarness(t, nil)
	j1, j2 := h.newJob(tag2x4), h.newJob(tag2x4)
	a, b := h.waitStarted(j1), h.waitStarted(j2)
	other := h.gl.other(j1)
	h.event(j1)
	if j := h.waitState(j1, job.Running); j.VMID != "" || j.RunnerID != other {
		t.Fatalf("ran elsewhere: %+v", j)
	}
	if v := h.waitVMState(a.ID, job.VMGone); v.Reason != job.ReasonIdle || v.PickedJobID != 0 {
		t.Fatalf("idle vm: %+v", v)
	}
	if h.vm(b.ID).State != job.VMStarting {
		t.Fatal("the VM waiting for its own job was stopped")
	}
	h.gl.setStatus(j1, "success")
	h.event(j1)
	h.waitState(j1, job.Done)
	h.take(j2, b)
	h.end(j2, b, "success")
	h.waitState(j2, job.Done)
	h.clean()
}

// TestVMExitBeforeFinishedWebhook: the VM powers off before GitLab's
// "finished" hook (GitLab sends hooks asynchronously, and may lose them):
// the record still gets GitLab's status of the job, read from the API.
func TestVMExitBeforeFinishedWebhook(t *testing.T) {
	h := newHarness(t, nil)
	id := h.newJob(tag2x4)
	v := h.waitStarted(id)
	h.take(id, v)
	h.waitState(id, job.Running)
	h.gl.setStatus(id, "failed")
	if err := h.drv.Exit(v.ID, 0); err != nil {
		t.Fatal(err)
	}
	if j := h.waitState(id, job.Failed); j.Reason != job.ReasonJobFailed || j.GitLabStatus != "failed" {
		t.Fatalf("record %+v", j)
	}
	h.clean()
}

// TestRestartResumesEverything leaves the host, GitLab and the store as
// kill -9 would at each point of the lifecycle, then starts a new
// controller on them: a restart only reconciles every active key.
func TestRestartResumesEverything(t *testing.T) {
	h := newHarness(t, func(h *harness) { h.capa.VCPUs = 4 })
	ctx := context.Background()
	// Seven jobs, 1 to 7 in GitLab's order.
	j := make(map[int]int64)
	for k := 1; k <= 7; k++ {
		j[k] = h.gl.newJob(h.pid, tag2x4)
	}
	// A real flow first: 1 runs, 2's VM waits for it, 3 waits for capacity.
	h.event(j[1])
	run := h.waitStarted(j[1])
	h.take(j[1], run)
	h.waitVMState(run.ID, job.VMBusy)
	h.event(j[2])
	idle := h.waitStarted(j[2])
	h.event(j[3])
	h.waitState(j[3], job.Queued)
	h.event(j[7])
	h.waitState(j[7], job.Queued)
	h.crash()

	// Crash points the real flow cannot freeze, written as the crash left them.
	st, err := store.Open(ctx, h.dir)
	if err != nil {
		t.Fatal(err)
	}
	queue := func(id int64) job.Job {
		if _, _, err := st.Observe(ctx, store.Observation{JobID: id, ProjectID: h.pid, Status: "pending", Source: "webhook", At: time.Now(), Create: true}); err != nil {
			t.Fatal(err)
		}
		j, err := st.UpdateJob(ctx, id, func(r *job.Job) error {
			return r.Accept([]string{tag2x4}, sizeOf(t, tag2x4), time.Now())
		})
		if err != nil {
			t.Fatal(err)
		}
		return j
	}
	plan := func(j job.Job, steps ...func(v *job.VM) error) job.VM {
		v := job.PlanVM(job.NewVMID(), testHost, j, time.Now())
		if err := st.Tx(ctx, func(tx *store.Tx) error { return tx.CreateVM(&v) }); err != nil {
			t.Fatal(err)
		}
		for _, s := range steps {
			var err error
			if v, err = st.UpdateVM(ctx, v.ID, s); err != nil {
				t.Fatal(err)
			}
		}
		return v
	}
	desc := func(vm string, k int) string {
		return fmt.Sprintf("firerunner test-host vm %s job %d project %d", vm, j[k], h.pid)
	}
	// 4: VM planned; its runner was created in GitLab, then the crash
	// (not recorded: found by its description, deleted once 4 has another).
	v4 := plan(queue(j[4]))
	leaked4 := h.gl.addRunner(desc(v4.ID, 4))
	// 5: runner recorded, VMM never ran (token lost): a failed attempt.
	r5 := h.gl.addRunner(desc("fr-x", 5))
	v5 := plan(queue(j[5]), func(v *job.VM) error { return v.RunnerCreated(r5, v.Tags, time.Now()) })
	// 6: crash in the middle of stopping (VM still on the host).
	r6 := h.gl.addRunner(desc("fr-y", 6))
	v6 := plan(queue(j[6]), func(v *job.VM) error { return v.RunnerCreated(r6, v.Tags, time.Now()) },
		func(v *job.VM) error { return v.Stop(job.ReasonJobEnded, time.Now()) })
	h.drv.Adopt(v6.ID)
	h.gl.setStatus(j[6], "canceled")
	// 7: queued when FireRunner died, canceled in GitLab while it was down.
	h.gl.setStatus(j[7], "canceled")
	// Leaks: a runner of this host for a VM never recorded, a VM no record
	// owns; and runners FireRunner must never touch.
	leak := h.gl.addRunner(fmt.Sprintf("firerunner test-host vm fr-zzzzzzzzzz job 99999 project %d", h.pid))
	h.drv.Adopt("fr-orphan1")
	foreign := h.gl.addRunner("someone else's runner")
	otherHost := h.gl.addRunner(fmt.Sprintf("firerunner other-host vm fr-aaaaaaaaaa job 5 project %d", h.pid))
	st.Close()

	// A new process on the same store, host and GitLab, on a bigger host.
	h.capa.VCPUs = 12
	h.start()
	if r := h.waitState(j[7], job.Canceled); r.Reason != job.ReasonJobCanceled || len(h.vms(j[7])) != 0 {
		t.Fatalf("7 after restart: %q, vms %d", r.Reason, len(h.vms(j[7])))
	}
	h.waitState(j[6], job.Canceled)
	h.waitVMState(v6.ID, job.VMGone)
	if v := h.waitVMState(v5.ID, job.VMGone); job.ReasonKey(v.Reason) != job.ReasonRestartLost {
		t.Fatalf("5's lost vm: %q", v.Reason)
	}
	n3, n4, n5 := h.waitStarted(j[3]), h.waitStarted(j[4]), h.waitStarted(j[5])
	if n4.ID != v4.ID || n5.ID == v5.ID || h.job(j[5]).Attempts != 1 {
		t.Fatalf("4 must start its planned vm, 5 get a new one after a failed attempt: %s/%s %s/%s attempts %d",
			n4.ID, v4.ID, n5.ID, v5.ID, h.job(j[5]).Attempts)
	}
	if v := h.vm(run.ID); v.State != job.VMBusy || !h.vmRunning(run.ID) || h.job(j[1]).State != job.Running {
		t.Fatalf("running job not resumed: %s", v.State)
	}
	if v := h.vm(idle.ID); v.State != job.VMStarting || !h.vmRunning(idle.ID) {
		t.Fatalf("idle vm not kept: %s", v.State)
	}
	h.c.ReconcileOnce(ctx)
	if h.vmRunning("fr-orphan1") {
		t.Fatal("orphan VM survived reconcile")
	}
	ids := map[int64]bool{}
	for _, r := range h.gl.runnerList() {
		ids[r.ID] = true
	}
	if ids[leak] || ids[leaked4] || ids[r5] || ids[r6] || !ids[foreign] || !ids[otherHost] {
		t.Fatalf("runner reconcile wrong: %v (leaks %d %d %d %d, foreign %d, other host %d)", ids, leak, leaked4, r5, r6, foreign, otherHost)
	}
	// Everything still running finishes and leaves nothing behind; each VM
	// takes the oldest job still pending (GitLab's order), its own.
	vms := map[int]job.VM{1: run, 2: idle, 3: n3, 4: n4, 5: n5}
	for k := 1; k <= 5; k++ {
		if k != 1 {
			h.take(j[k], vms[k])
		}
		h.end(j[k], vms[k], "success")
		h.waitState(j[k], job.Done)
	}
	h.clean(foreign, otherHost)
	if act, _ := h.st.ListJobs(ctx, store.Filter{ActiveOnly: true}); len(act) != 0 {
		t.Fatalf("active jobs left: %d", len(act))
	}
}

// TestHooksDuringStartupAndDrain: GitLab gets 2xx for pending hooks while
// FireRunner starts and while it drains; those jobs are served.
func TestHooksDuringStartupAndDrain(t *testing.T) {
	var j1 int64
	h := newHarness(t, func(h *harness) {
		h.cfg.Limits.DrainTimeout = 200 * time.Millisecond
		j1 = h.gl.newJob(h.pid, tag2x4)
		h.beforeStart = func(h *harness) { h.event(j1) } // Start has not run yet
	})
	a := h.waitStarted(j1)
	h.take(j1, a)
	h.waitState(j1, job.Running)
	// Drain: the VM keeps running until the drain timeout; hooks keep working.
	done := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		done <- h.c.Shutdown(ctx)
	}()
	h.eventually("draining", func() bool { return h.c.Ready(context.Background()) != nil })
	j2 := h.gl.newJob(h.pid, tag2x4)
	if code := h.post(h.gl.hook(j2), testSecret, "Job Hook"); code != http.StatusOK {
		t.Fatalf("pending hook during drain: HTTP %d", code)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	h.stopd = true
	if j := h.job(j1); j.State != job.Failed || job.ReasonKey(j.Reason) != job.ReasonShutdown {
		t.Fatalf("job killed by the drain: %s %q", j.State, j.Reason)
	}
	if list, _ := h.drv.List(context.Background()); len(list) != 0 || len(h.gl.runnerList()) != 0 || len(h.vms(j2)) != 0 {
		t.Fatal("drain leaked vms or runners, or started a VM")
	}
	if err := h.c.HandleJobEvent(context.Background(), webhook.JobEvent{JobID: 999999, ProjectID: h.pid, Status: "pending"}); err != nil {
		t.Fatalf("hook after drain refused: %v", err)
	}
	h.web.Close()
	h.st.Close()
	// Next start: the job that came during the drain is served.
	h.start()
	b := h.waitStarted(j2)
	h.take(j2, b)
	h.end(j2, b, "success")
	h.waitState(j2, job.Done)
}

// TestRestartAfterVMRanItsJobWhileDown: FireRunner dies while a VM waits for
// its job; meanwhile the VM's runner takes the job (its "running" hook is
// lost with FireRunner), the job succeeds and the guest powers off. After
// the restart the VMM is gone, but GitLab knows the VM's runner ran the
// job: that is no failed attempt, and the job's record names that VM and
// runner. (Found by the chaos harness: the attempt was charged and the
// record named no VM.)
func TestRestartAfterVMRanItsJobWhileDown(t *testing.T) {
	h := newHarness(t, nil)
	id := h.newJob(tag2x4)
	v := h.waitStarted(id)
	h.crash()
	h.gl.pick(id, v.RunnerID)
	h.gl.setStatus(id, "success")
	if err := h.drv.Exit(v.ID, 0); err != nil {
		t.Fatal(err)
	}
	h.start()
	j := h.waitState(id, job.Done)
	if j.VMID != v.ID || j.RunnerID != v.RunnerID || j.Attempts != 0 || j.Reason != job.ReasonSucceeded {
		t.Fatalf("record: vm %q runner %d attempts %d %q; want vm %s runner %d, no failed attempt", j.VMID, j.RunnerID, j.Attempts, j.Reason, v.ID, v.RunnerID)
	}
	if got := h.waitVMState(v.ID, job.VMGone); got.PickedJobID != id {
		t.Fatalf("vm record: picked %d, want %d", got.PickedJobID, id)
	}
	h.clean()
	if n := len(h.drv.Specs()); n != 1 {
		t.Fatalf("%d VM starts, want 1: the job ran", n)
	}
}

// TestIdleStopPausesTheRunnerFirst: an idle VM is stopped once GitLab says
// its runner took no job. Its runner keeps polling until the VM is gone, so
// a job arriving right after GitLab's answer could be handed to it and die
// with the VM (stuck "running" in GitLab). Paused first, the runner gets
// nothing; the new job gets a VM of its own. (Found by the chaos harness.)
func TestIdleStopPausesTheRunnerFirst(t *testing.T) {
	h := newHarness(t, nil)
	a := h.newJob(tag2x4)
	va := h.waitStarted(a)
	var b, took atomic.Int64
	jobsOfVA := fmt.Sprintf("/api/v4/runners/%d/jobs", va.RunnerID)
	h.gl.AfterRequest(func(r gitlabstandin.Request) {
		if r.Method != http.MethodGet || r.Path != jobsOfVA || !b.CompareAndSwap(0, -1) {
			return
		}
		// GitLab has answered; a job with the VM's tags arrives and the
		// VM's runner, still polling, asks for one.
		pl, err := h.gl.CreatePipeline(h.pid, gitlabstandin.JobSpec{Name: "late", Tags: []string{tag2x4}, Script: []string{"true"}})
		if err != nil {
			t.Error(err)
			return
		}
		b.Store(pl.JobIDs[0])
		took.Store(h.gl.request(va.RunnerID))
	})
	// a's VM turns surplus: a runner of another host took a.
	h.gl.other(a)
	h.event(a)
	if v := h.waitVMState(va.ID, job.VMGone); v.Reason != job.ReasonIdle || v.PickedJobID != 0 {
		t.Fatalf("idle vm: %q picked %d", v.Reason, v.PickedJobID)
	}
	h.gl.AfterRequest(nil)
	if b.Load() <= 0 {
		t.Fatal("GitLab was never asked for the idle VM's jobs")
	}
	if took.Load() != 0 {
		t.Fatalf("the runner of a VM being stopped took job %d: it died with the VM", took.Load())
	}
	h.event(b.Load())
	vb := h.waitStarted(b.Load())
	h.take(b.Load(), vb)
	h.end(b.Load(), vb, "success")
	h.waitState(b.Load(), job.Done)
	h.gl.setStatus(a, "success")
	h.event(a)
	h.waitState(a, job.Done)
	h.clean()
}

// TestDrainTimeoutPausesIdleRunners: at the drain timeout the VMs left are
// killed. An idle VM's runner may have taken its job in the last instant
// (its "running" hook not yet here): the runner is paused first, so it
// takes nothing more, and GitLab is asked what it took, so the job's record
// says the drain killed it on that VM rather than waiting for a VM that is
// gone.
func TestDrainTimeoutPausesIdleRunners(t *testing.T) {
	h := newHarness(t, func(h *harness) { h.cfg.Limits.DrainTimeout = 300 * time.Millisecond })
	a := h.newJob(tag2x4)
	va := h.waitStarted(a)
	var paused atomic.Bool
	runnerPath := fmt.Sprintf("/api/v4/runners/%d", va.RunnerID)
	h.gl.AfterRequest(func(r gitlabstandin.Request) {
		if r.Method == http.MethodPut && r.Path == runnerPath {
			if rr, ok := h.gl.Runner(va.RunnerID); ok && rr.Paused {
				paused.Store(true)
			}
		}
	})
	// The runner takes the job; its hook is never sent.
	if took := h.gl.request(va.RunnerID); took != a {
		t.Fatalf("runner took %d, want %d", took, a)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := h.c.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	h.stopd = true
	h.gl.AfterRequest(nil)
	if !paused.Load() {
		t.Fatal("the idle VM's runner was not paused before its VM was killed")
	}
	if j := h.job(a); j.State != job.Failed || job.ReasonKey(j.Reason) != job.ReasonShutdown || j.VMID != va.ID {
		t.Fatalf("job killed by the drain: %s %q on %q, want failed shutdown on %s", j.State, j.Reason, j.VMID, va.ID)
	}
	if list, _ := h.drv.List(context.Background()); len(list) != 0 || len(h.gl.runnerList()) != 0 {
		t.Fatal("drain leaked vms or runners")
	}
}
