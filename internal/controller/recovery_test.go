package controller

import (
	"context"
	"net/http"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	"github.com/firerunner/firerunner/internal/job"
	"github.com/firerunner/firerunner/internal/store"
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
	tags := map[int64][]string{1601: {tag1x1}, 1602: {tag1x1, "linux"}, 1603: {tag1x1}}
	for _, id := range []int64{1601, 1602, 1603} {
		h.gl.addJob(stubJob{ID: id, ProjectID: 5, Tags: tags[id]})
		h.event(id, 5, "pending", 0)
	}
	v1, v2, v3 := h.waitStarted(1601), h.waitStarted(1602), h.waitStarted(1603)
	// The linux VM's runner polls first and GitLab hands it job 1601.
	if got := h.gl.request(v2.RunnerID); got != 1601 {
		t.Fatalf("GitLab gave the linux runner job %d", got)
	}
	h.event(1601, 5, "running", v2.RunnerID)
	h.waitState(1601, job.Running)
	// 1602 has no runner that can take it: 1601's idle VM gets its tags.
	h.eventually("a plain runner retagged for the linux job", func() bool {
		return slices.Equal(h.gl.runnerTags(v1.RunnerID), tags[1602]) || slices.Equal(h.gl.runnerTags(v3.RunnerID), tags[1602])
	})
	retagged, plain := v1, v3
	if slices.Equal(h.gl.runnerTags(v3.RunnerID), tags[1602]) {
		retagged, plain = v3, v1
	}
	h.eventually("retarget recorded", func() bool { v := h.vm(retagged.ID); return v.ForJob == 1602 && !v.TagsStale })
	if got := h.gl.request(retagged.RunnerID); got != 1602 {
		t.Fatalf("retagged runner took job %d, want 1602", got)
	}
	h.event(1602, 5, "running", retagged.RunnerID)
	if got := h.gl.request(plain.RunnerID); got != 1603 {
		t.Fatalf("plain runner took job %d, want 1603", got)
	}
	h.event(1603, 5, "running", plain.RunnerID)
	ran := map[int64]job.VM{1601: v2, 1602: retagged, 1603: plain}
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
	if len(h.gl.deleted) != 3 {
		t.Fatalf("runners deleted: %v", h.gl.deleted)
	}
}

// TestIdleVMStoppedWhenItsJobRanElsewhere: a job taken by a runner that is
// not ours leaves its VM with nothing to run; the VM goes (after GitLab
// confirms its runner took nothing), the job's record names the other runner.
func TestIdleVMStoppedWhenItsJobRanElsewhere(t *testing.T) {
	h := newHarness(t, nil)
	for _, id := range []int64{1701, 1702} {
		h.gl.addJob(stubJob{ID: id, ProjectID: 5, Tags: []string{tag2x4}})
		h.event(id, 5, "pending", 0)
	}
	a, b := h.waitStarted(1701), h.waitStarted(1702)
	h.gl.pick(1701, 999)
	h.event(1701, 5, "running", 999)
	if j := h.waitState(1701, job.Running); j.VMID != "" || j.RunnerID != 999 {
		t.Fatalf("ran elsewhere: %+v", j)
	}
	if v := h.waitVMState(a.ID, job.VMGone); v.Reason != job.ReasonIdle || v.PickedJobID != 0 {
		t.Fatalf("idle vm: %+v", v)
	}
	if h.vm(b.ID).State != job.VMStarting {
		t.Fatal("the VM waiting for its own job was stopped")
	}
	h.gl.setStatus(1701, "success")
	h.event(1701, 5, "success", 999)
	h.waitState(1701, job.Done)
	h.take(1702, b)
	h.end(1702, b, "success")
	h.waitState(1702, job.Done)
	h.clean()
}

// TestVMExitBeforeFinishedWebhook: the VM powers off before GitLab's
// "finished" hook (GitLab sends hooks asynchronously, and may lose them):
// the record still gets GitLab's status of the job, read from the API.
func TestVMExitBeforeFinishedWebhook(t *testing.T) {
	h := newHarness(t, nil)
	h.gl.addJob(stubJob{ID: 1801, ProjectID: 5, Tags: []string{tag2x4}})
	h.event(1801, 5, "pending", 0)
	v := h.waitStarted(1801)
	h.take(1801, v)
	h.waitState(1801, job.Running)
	h.gl.setStatus(1801, "failed")
	if err := h.drv.Exit(v.ID, 0); err != nil {
		t.Fatal(err)
	}
	if j := h.waitState(1801, job.Failed); j.Reason != job.ReasonJobFailed || j.GitLabStatus != "failed" {
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
	for _, id := range []int64{1101, 1102, 1103, 1104, 1105, 1106, 1107} {
		h.gl.addJob(stubJob{ID: id, ProjectID: 5, Tags: []string{tag2x4}})
	}
	// A real flow first: 1101 runs, 1102's VM waits for it, 1103 waits for capacity.
	h.event(1101, 5, "pending", 0)
	run := h.waitStarted(1101)
	h.take(1101, run)
	h.waitVMState(run.ID, job.VMBusy)
	h.event(1102, 5, "pending", 0)
	idle := h.waitStarted(1102)
	h.event(1103, 5, "pending", 0)
	h.waitState(1103, job.Queued)
	h.event(1107, 5, "pending", 0)
	h.waitState(1107, job.Queued)
	h.crash()

	// Crash points the real flow cannot freeze, written as the crash left them.
	st, err := store.Open(ctx, h.dir)
	if err != nil {
		t.Fatal(err)
	}
	queue := func(id int64) job.Job {
		if _, _, err := st.Observe(ctx, store.Observation{JobID: id, ProjectID: 5, Status: "pending", Source: "webhook", At: time.Now(), Create: true}); err != nil {
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
	// 1104: VM planned; its runner was created in GitLab, then the crash
	// (not recorded: found by its description, deleted once 1104 has another).
	v1104 := plan(queue(1104))
	leaked1104 := h.gl.addRunner("firerunner test-host vm " + v1104.ID + " job 1104 project 5")
	// 1105: runner recorded, VMM never ran (token lost): a failed attempt.
	r1105 := h.gl.addRunner("firerunner test-host vm fr-x job 1105 project 5")
	v1105 := plan(queue(1105), func(v *job.VM) error { return v.RunnerCreated(r1105, v.Tags, time.Now()) })
	// 1106: crash in the middle of stopping (VM still on the host).
	r1106 := h.gl.addRunner("firerunner test-host vm fr-y job 1106 project 5")
	v1106 := plan(queue(1106), func(v *job.VM) error { return v.RunnerCreated(r1106, v.Tags, time.Now()) },
		func(v *job.VM) error { return v.Stop(job.ReasonJobEnded, time.Now()) })
	h.drv.Adopt(v1106.ID)
	h.gl.setStatus(1106, "canceled")
	// 1107: queued when FireRunner died, canceled in GitLab while it was down.
	h.gl.setStatus(1107, "canceled")
	// Leaks: a runner of this host for a VM never recorded, a VM no record
	// owns; and runners FireRunner must never touch.
	leak := h.gl.addRunner("firerunner test-host vm fr-zzzzzzzzzz job 99999 project 5")
	h.drv.Adopt("fr-orphan1")
	foreign := h.gl.addRunner("someone else's runner")
	otherHost := h.gl.addRunner("firerunner other-host vm fr-aaaaaaaaaa job 5 project 5")
	st.Close()

	// A new process on the same store, host and GitLab, on a bigger host.
	h.capa.VCPUs = 12
	h.start()
	if j := h.waitState(1107, job.Canceled); j.Reason != job.ReasonJobCanceled || len(h.vms(1107)) != 0 {
		t.Fatalf("1107 after restart: %q, vms %d", j.Reason, len(h.vms(1107)))
	}
	h.waitState(1106, job.Canceled)
	h.waitVMState(v1106.ID, job.VMGone)
	if v := h.waitVMState(v1105.ID, job.VMGone); job.ReasonKey(v.Reason) != job.ReasonRestartLost {
		t.Fatalf("1105's lost vm: %q", v.Reason)
	}
	n1103, n1104, n1105 := h.waitStarted(1103), h.waitStarted(1104), h.waitStarted(1105)
	if n1104.ID != v1104.ID || n1105.ID == v1105.ID || h.job(1105).Attempts != 1 {
		t.Fatalf("1104 must start its planned vm, 1105 get a new one after a failed attempt: %s/%s %s/%s attempts %d",
			n1104.ID, v1104.ID, n1105.ID, v1105.ID, h.job(1105).Attempts)
	}
	if v := h.vm(run.ID); v.State != job.VMBusy || !h.vmRunning(run.ID) || h.job(1101).State != job.Running {
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
	if ids[leak] || ids[leaked1104] || ids[r1105] || ids[r1106] || !ids[foreign] || !ids[otherHost] {
		t.Fatalf("runner reconcile wrong: %v (leaks %d %d %d %d, foreign %d, other host %d)", ids, leak, leaked1104, r1105, r1106, foreign, otherHost)
	}
	// Everything still running finishes and leaves nothing behind.
	for id, v := range map[int64]job.VM{1101: run, 1102: idle, 1103: n1103, 1104: n1104, 1105: n1105} {
		if id != 1101 {
			h.take(id, v)
		}
		h.end(id, v, "success")
		h.waitState(id, job.Done)
	}
	h.clean(foreign, otherHost)
	if act, _ := h.st.ListJobs(ctx, store.Filter{ActiveOnly: true}); len(act) != 0 {
		t.Fatalf("active jobs left: %d", len(act))
	}
}

// TestHooksDuringStartupAndDrain: GitLab gets 2xx for pending hooks while
// FireRunner starts and while it drains; those jobs are served.
func TestHooksDuringStartupAndDrain(t *testing.T) {
	h := newHarness(t, func(h *harness) {
		h.cfg.Limits.DrainTimeout = 200 * time.Millisecond
		h.gl.addJob(stubJob{ID: 1901, ProjectID: 5, Tags: []string{tag2x4}})
		h.beforeStart = func(h *harness) { h.event(1901, 5, "pending", 0) } // Start has not run yet
	})
	a := h.waitStarted(1901)
	h.take(1901, a)
	h.waitState(1901, job.Running)
	// Drain: the VM keeps running until the drain timeout; hooks keep working.
	done := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		done <- h.c.Shutdown(ctx)
	}()
	h.eventually("draining", func() bool { return h.c.Ready(context.Background()) != nil })
	h.gl.addJob(stubJob{ID: 1902, ProjectID: 5, Tags: []string{tag2x4}})
	if code := h.post(jobHook(1902, 5, "pending", 0), testSecret, "Job Hook"); code != http.StatusOK {
		t.Fatalf("pending hook during drain: HTTP %d", code)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	h.stopd = true
	if j := h.job(1901); j.State != job.Failed || job.ReasonKey(j.Reason) != job.ReasonShutdown {
		t.Fatalf("job killed by the drain: %s %q", j.State, j.Reason)
	}
	if list, _ := h.drv.List(context.Background()); len(list) != 0 || len(h.gl.runnerList()) != 0 || len(h.vms(1902)) != 0 {
		t.Fatal("drain leaked vms or runners, or started a VM")
	}
	if err := h.c.HandleJobEvent(context.Background(), webhook.JobEvent{JobID: 1903, ProjectID: 5, Status: "pending"}); err != nil {
		t.Fatalf("hook after drain refused: %v", err)
	}
	h.web.Close()
	h.st.Close()
	// Next start: the job that came during the drain is served.
	h.start()
	b := h.waitStarted(1902)
	h.take(1902, b)
	h.end(1902, b, "success")
	h.waitState(1902, job.Done)
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
	h.gl.mu.Lock()
	h.gl.onRunnerJobs = func(rid int64) {
		if rid != va.RunnerID || b.Load() != 0 {
			return
		}
		// GitLab has answered; a job with the VM's tags arrives and the
		// VM's runner, still polling, asks for one.
		b.Store(h.gl.newJob(5, tag2x4))
		took.Store(h.gl.request(rid))
	}
	h.gl.mu.Unlock()
	// a's VM turns surplus: a runner of another host took a.
	h.gl.pick(a, 999)
	h.event(a, 5, "running", 999)
	if v := h.waitVMState(va.ID, job.VMGone); v.Reason != job.ReasonIdle || v.PickedJobID != 0 {
		t.Fatalf("idle vm: %q picked %d", v.Reason, v.PickedJobID)
	}
	if b.Load() == 0 {
		t.Fatal("GitLab was never asked for the idle VM's jobs")
	}
	if took.Load() != 0 {
		t.Fatalf("the runner of a VM being stopped took job %d: it died with the VM", took.Load())
	}
	h.event(b.Load(), 5, "pending", 0)
	vb := h.waitStarted(b.Load())
	h.take(b.Load(), vb)
	h.end(b.Load(), vb, "success")
	h.waitState(b.Load(), job.Done)
	h.gl.setStatus(a, "success")
	h.event(a, 5, "success", 999)
	h.waitState(a, job.Done)
	h.clean()
}
