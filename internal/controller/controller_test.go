package controller

import (
	"context"
	"net/http"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/firerunner/firerunner/internal/job"
	"github.com/firerunner/firerunner/internal/scheduler"
	"github.com/firerunner/firerunner/internal/store"
	"github.com/firerunner/firerunner/internal/webhook"
)

const tag2x4 = "firecracker-2cpu-4gb"

func TestWebhookAuthThenFullLifecycle(t *testing.T) {
	h := newHarness(t, nil)
	h.gl.addJob(stubJob{ID: 101, ProjectID: 5, Tags: []string{tag2x4, "linux"}})
	body := jobHook(101, 5, "pending", 0)

	if code := h.post(body, "", "Job Hook"); code != http.StatusUnauthorized {
		t.Fatalf("missing token: HTTP %d, want 401", code)
	}
	if code := h.post(body, "wrong-secret", "Job Hook"); code != http.StatusUnauthorized {
		t.Fatalf("wrong token: HTTP %d, want 401", code)
	}
	if n := h.jobCount(); n != 0 || h.gl.callCount("get_job") != 0 {
		t.Fatalf("unauthenticated delivery had effects: %d jobs, %d get_job calls", n, h.gl.callCount("get_job"))
	}
	if code := h.post([]byte(`{"object_kind":`), testSecret, "Job Hook"); code != http.StatusBadRequest {
		t.Fatalf("malformed body: HTTP %d, want 400", code)
	}
	if code := h.post([]byte(`{"object_kind":"push"}`), testSecret, "Push Hook"); code/100 != 2 {
		t.Fatalf("other event: HTTP %d, want 2xx", code)
	}

	h.event(101, 5, "pending", 0)
	j := h.waitStarted(101)
	if j.VMID != job.VMIDFor(101) || j.RunnerID == 0 || j.Source != "webhook" || j.SizeTag != tag2x4 {
		t.Fatalf("job record: %+v", j)
	}
	// The runner GitLab got: the job's exact tags, locked, tagged-only.
	rs := h.gl.runnerList()
	if len(rs) != 1 {
		t.Fatalf("runners in GitLab: %d, want 1", len(rs))
	}
	r := rs[0]
	if r.ID != j.RunnerID || r.RunnerType != "project_type" || r.ProjectID != 5 || !r.Locked || r.RunUntagged ||
		!slices.Equal(r.Tags, []string{tag2x4, "linux"}) || r.MaximumTimeout != 3600 || !strings.HasPrefix(r.Description, "firerunner job 101 ") {
		t.Fatalf("runner created wrong: %+v", r)
	}
	// The VM got the size and the token, through the guest config only.
	specs := h.drv.Specs()
	if len(specs) != 1 {
		t.Fatalf("vm starts: %d", len(specs))
	}
	sp := specs[0]
	if sp.VCPUs != 2 || sp.MemoryMiB != 4096 || sp.Guest.RunnerToken != r.Token || sp.Guest.GitLabURL != "http://10.0.2.2:8929" ||
		sp.Guest.JobTimeoutSec != 3600 || sp.Image.Kernel == "" {
		t.Fatalf("vm spec wrong: %+v / %s", sp, sp.Guest)
	}

	h.event(101, 5, "running", j.RunnerID)
	h.waitState(101, job.Running)
	if err := h.drv.Exit(j.VMID, 0); err != nil {
		t.Fatal(err)
	}
	j = h.waitState(101, job.Done)
	if h.vmRunning(j.VMID) || len(h.gl.runnerList()) != 0 {
		t.Fatalf("leftovers after done: vm=%v runners=%v", h.vmRunning(j.VMID), h.gl.runnerList())
	}
	tl := j.Timeline
	for name, ts := range map[string]time.Time{"webhook": tl.WebhookReceived, "tags": tl.TagsFetched, "runner": tl.RunnerCreated,
		"vm_start_req": tl.VMStartRequest, "vm_started": tl.VMStarted, "picked": tl.JobPicked, "exited": tl.VMExited,
		"destroyed": tl.VMDestroyed, "runner_deleted": tl.RunnerDeleted, "finished": tl.Finished} {
		if ts.IsZero() {
			t.Errorf("timeline %s not recorded", name)
		}
	}
	if j.ExitCode == nil || *j.ExitCode != 0 || j.Reason != job.ReasonCompleted {
		t.Fatalf("outcome: exit=%v reason=%q", j.ExitCode, j.Reason)
	}
	tr, _ := h.st.Transitions(context.Background(), 101)
	var path []string
	for _, x := range tr {
		path = append(path, string(x.To))
	}
	if got := strings.Join(path, ">"); got != "queued>runner_created>vm_starting>running>cleaning>done" {
		t.Fatalf("transitions %s", got)
	}
	for _, want := range []string{`firerunner_webhook_rejects_total{reason="unauthorized"} 2`, `firerunner_webhook_rejects_total{reason="malformed"} 1`,
		`firerunner_jobs{state="done"} 1`, `firerunner_jobs_finished_total{outcome="done",reason="completed"} 1`,
		`firerunner_job_stage_duration_seconds_count{stage="webhook_to_vm_start_request"} 1`} {
		// The terminal state is committed just before the end-of-job metrics.
		h.eventually("metric "+want, func() bool { return strings.Contains(h.metricsText(), want) })
	}
	if !strings.Contains(h.logs.String(), "job finished") || !strings.Contains(h.logs.String(), "vm_id=fr-2t") {
		t.Errorf("no end-of-job log line with vm id")
	}
}

func TestTagGrammarDecidesWhatGetsAVM(t *testing.T) {
	h := newHarness(t, func(h *harness) { h.cfg.Capacity.MaxVCPUsPerVM = 8 })
	cases := []struct {
		id     int64
		tags   []string
		vm     bool
		reject string
	}{
		{201, []string{tag2x4}, true, ""},
		{202, []string{"FireCracker-1CPU-1GB", "docker"}, true, ""},
		{203, []string{"linux", "docker"}, false, ""},
		{204, nil, false, ""},
		{205, []string{tag2x4, "firecracker-4cpu-8gb"}, false, "ambiguous"},
		{206, []string{"firecracker-16cpu-4gb"}, false, "over_limit"},
		{207, []string{"firecracker-2cpus-4gb"}, false, "malformed"},
		{208, []string{"firecracker-0cpu-4gb"}, false, "zero_size"},
	}
	for _, c := range cases {
		h.gl.addJob(stubJob{ID: c.id, ProjectID: 5, Tags: c.tags})
		h.event(c.id, 5, "pending", 0)
	}
	for _, c := range cases {
		_, err := h.st.Get(context.Background(), c.id)
		if c.vm && err != nil {
			t.Errorf("job %d %v: not taken: %v", c.id, c.tags, err)
		}
		if !c.vm && err == nil {
			t.Errorf("job %d %v: taken, want ignored", c.id, c.tags)
		}
	}
	h.eventually("2 vms", func() bool { return len(h.drv.Specs()) == 2 })
	if sp := h.drv.Specs(); sp[0].VCPUs+sp[1].VCPUs != 3 {
		t.Fatalf("sizes: %+v %+v", sp[0], sp[1])
	}
	m := h.metricsText()
	for _, r := range []string{"ambiguous", "over_limit", "malformed", "zero_size"} {
		if !strings.Contains(m, `firerunner_tag_rejects_total{reason="`+r+`"} 1`) {
			t.Errorf("tag reject %s not counted", r)
		}
	}
}

func TestDuplicateDeliveriesGetOneVM(t *testing.T) {
	h := newHarness(t, nil)
	h.gl.addJob(stubJob{ID: 301, ProjectID: 5, Tags: []string{tag2x4}})
	var wg sync.WaitGroup
	for range 8 {
		wg.Add(1)
		go func() { defer wg.Done(); h.event(301, 5, "pending", 0) }()
	}
	wg.Wait()
	j := h.waitStarted(301)
	h.event(301, 5, "pending", 0) // a late redelivery
	if n := len(h.drv.Specs()); n != 1 {
		t.Fatalf("%d VMs for one job", n)
	}
	if n := h.gl.createdCount(); n != 1 {
		t.Fatalf("%d runners for one job", n)
	}
	// Redelivery after the job finished must not start it again either.
	_ = h.drv.Exit(j.VMID, 0)
	h.waitState(301, job.Done)
	h.event(301, 5, "pending", 0)
	if n := len(h.drv.Specs()); n != 1 {
		t.Fatalf("redelivery after done started a VM (%d)", n)
	}
}

func TestCancelTearsDownPromptly(t *testing.T) {
	h := newHarness(t, func(h *harness) { h.capa.VCPUs = 2 })
	h.gl.addJob(stubJob{ID: 401, ProjectID: 5, Tags: []string{tag2x4}})
	h.gl.addJob(stubJob{ID: 402, ProjectID: 5, Tags: []string{tag2x4}})
	h.event(401, 5, "pending", 0)
	j := h.waitStarted(401)
	h.event(402, 5, "pending", 0) // waits for capacity
	h.waitState(402, job.Queued)

	// Canceled while queued: no runner, no VM ever.
	h.event(402, 5, "canceled", 0)
	if j2 := h.waitState(402, job.Canceled); j2.RunnerID != 0 || j2.VMID != "" {
		t.Fatalf("queued cancel created resources: %+v", j2)
	}
	// Canceled while the VM runs it.
	h.event(401, 5, "running", j.RunnerID)
	h.waitState(401, job.Running)
	h.event(401, 5, "canceled", j.RunnerID)
	j = h.waitState(401, job.Canceled)
	if h.vmRunning(j.VMID) || len(h.gl.runnerList()) != 0 || j.Reason != job.ReasonJobCanceled {
		t.Fatalf("cancel left vm=%v runners=%d reason=%q", h.vmRunning(j.VMID), len(h.gl.runnerList()), j.Reason)
	}
	if n := len(h.drv.Specs()); n != 1 {
		t.Fatalf("vm starts %d, want 1", n)
	}
}

func TestCapacityWaitIsFIFO(t *testing.T) {
	h := newHarness(t, func(h *harness) { h.capa = scheduler2cpu() })
	for _, id := range []int64{501, 502, 503} {
		h.gl.addJob(stubJob{ID: id, ProjectID: 5, Tags: []string{tag2x4}})
		h.event(id, 5, "pending", 0)
	}
	a := h.waitStarted(501)
	if b, c := h.job(502), h.job(503); b.State != job.Queued || c.State != job.Queued || b.RunnerID != 0 {
		t.Fatalf("jobs not waiting: %s %s", b.State, c.State)
	}
	if !strings.Contains(h.metricsText(), "firerunner_queue_depth 2") {
		t.Fatalf("queue depth metric wrong")
	}
	_ = h.drv.Exit(a.VMID, 0)
	b := h.waitStarted(502)
	if h.job(503).State != job.Queued {
		t.Fatal("503 overtook the capacity limit")
	}
	_ = h.drv.Exit(b.VMID, 0)
	c := h.waitStarted(503)
	_ = h.drv.Exit(c.VMID, 0)
	h.waitState(503, job.Done)
	if h.job(501).State != job.Done || h.job(502).State != job.Done {
		t.Fatal("not all done")
	}
}

func TestAPI5xxIsRetriedThenSucceeds(t *testing.T) {
	h := newHarness(t, nil)
	h.gl.addJob(stubJob{ID: 601, ProjectID: 5, Tags: []string{tag2x4}})
	h.gl.failNext("get_job", 2, 502, `{"message":"502 Bad Gateway"}`)
	h.gl.failNext("create_runner", 2, 503, `{"message":"503 Service Unavailable"}`)
	h.gl.failNext("delete_runner", 1, 500, `{"message":"500 Internal Server Error"}`)
	h.event(601, 5, "pending", 0)
	j := h.waitStarted(601)
	_ = h.drv.Exit(j.VMID, 0)
	h.waitState(601, job.Done)
	if len(h.gl.runnerList()) != 0 {
		t.Fatal("runner not deleted after a 500 on delete")
	}
	if h.gl.callCount("get_job") != 3 || h.gl.callCount("create_runner") != 3 {
		t.Fatalf("calls: get_job %d create_runner %d", h.gl.callCount("get_job"), h.gl.callCount("create_runner"))
	}
	if m := h.metricsText(); !strings.Contains(m, `firerunner_gitlab_api_errors_total{op="create_runner",status="503"} 2`) {
		t.Fatalf("api errors not counted:\n%s", grep(m, "api_errors"))
	}
}

func TestAPI4xxIsPermanent(t *testing.T) {
	h := newHarness(t, nil)
	// 403 reading the job (token lacks read_api): no job, no redelivery loop.
	h.gl.addJob(stubJob{ID: 701, ProjectID: 5, Tags: []string{tag2x4}})
	h.gl.failNext("get_job", 1, 403, `{"message":"403 Forbidden"}`)
	h.event(701, 5, "pending", 0)
	if h.gl.callCount("get_job") != 1 || h.jobCount() != 0 {
		t.Fatalf("4xx on get_job retried or queued: calls=%d jobs=%d", h.gl.callCount("get_job"), h.jobCount())
	}
	// 403 creating the runner: job failed with a clear reason, nothing started.
	h.gl.addJob(stubJob{ID: 702, ProjectID: 5, Tags: []string{tag2x4}})
	h.gl.failNext("create_runner", 1, 403, `{"message":"403 Forbidden - insufficient scope create_runner"}`)
	h.event(702, 5, "pending", 0)
	j := h.waitState(702, job.Failed)
	if !strings.HasPrefix(j.Reason, job.ReasonRunnerCreate+":") || h.gl.callCount("create_runner") != 1 || len(h.drv.Specs()) != 0 {
		t.Fatalf("reason %q, create calls %d, vms %d", j.Reason, h.gl.callCount("create_runner"), len(h.drv.Specs()))
	}
	if !strings.Contains(h.logs.String(), "job_id=702") {
		t.Fatal("failure not logged with the job id")
	}
}

func TestRunnerLimitIsAClearFailure(t *testing.T) {
	h := newHarness(t, nil)
	h.gl.addJob(stubJob{ID: 801, ProjectID: 5, Tags: []string{tag2x4}})
	h.gl.failNext("create_runner", 1, 400, `{"message":{"runner_projects.base":["Maximum number of ci registered project runners (50) exceeded"]}}`)
	h.event(801, 5, "pending", 0)
	j := h.waitState(801, job.Failed)
	if !strings.HasPrefix(j.Reason, job.ReasonRunnerLimit+":") || !strings.Contains(j.Reason, "cap") {
		t.Fatalf("reason %q", j.Reason)
	}
	if !strings.Contains(h.metricsText(), "firerunner_runner_limit_errors_total 1") {
		t.Fatal("runner limit not counted")
	}
	if len(h.drv.Specs()) != 0 {
		t.Fatal("vm started without a runner")
	}
}

func TestReconcilePollFindsJobWhoseWebhookWasLost(t *testing.T) {
	h := newHarness(t, func(h *harness) {
		h.cfg.Reconcile.PollProjects = []int64{5}
		h.cfg.Reconcile.PollGroups = []int64{9}
	})
	h.gl.mu.Lock()
	h.gl.groups[9] = []int64{6, 5}
	h.gl.mu.Unlock()
	h.gl.addJob(stubJob{ID: 901, ProjectID: 5, Tags: []string{tag2x4}})                 // lost webhook
	h.gl.addJob(stubJob{ID: 902, ProjectID: 6, Tags: []string{"firecracker-1cpu-2gb"}}) // via group
	h.gl.addJob(stubJob{ID: 903, ProjectID: 6, Tags: []string{"linux"}})                // not ours
	h.gl.addJob(stubJob{ID: 904, ProjectID: 6, Tags: []string{tag2x4}, Status: "running"})
	h.c.ReconcileOnce(context.Background())
	a := h.waitStarted(901)
	h.waitStarted(902)
	if _, err := h.st.Get(context.Background(), 903); err != store.ErrNotFound {
		t.Fatal("untagged job taken by poll")
	}
	if _, err := h.st.Get(context.Background(), 904); err != store.ErrNotFound {
		t.Fatal("running job taken by poll")
	}
	if a.Source != "poll" {
		t.Fatalf("source %q", a.Source)
	}
	h.c.ReconcileOnce(context.Background()) // again: nothing new
	if n := len(h.drv.Specs()); n != 2 {
		t.Fatalf("%d vms", n)
	}
}

func TestStartTimeoutAndMaxDuration(t *testing.T) {
	h := newHarness(t, func(h *harness) {
		// Long enough for the test to act on a started VM before it fires.
		h.cfg.Limits.VMStartTimeout = time.Second
		h.cfg.Limits.JobMaxDuration = 3 * time.Second
	})
	// 1001: the runner never picks the job (still pending in GitLab).
	h.gl.addJob(stubJob{ID: 1001, ProjectID: 5, Tags: []string{tag2x4}})
	h.event(1001, 5, "pending", 0)
	a := h.waitState(1001, job.Failed)
	if !strings.HasPrefix(a.Reason, job.ReasonStartTimeout) || h.vmRunning(a.VMID) {
		t.Fatalf("start timeout: reason %q vm running %v", a.Reason, h.vmRunning(a.VMID))
	}
	// 1002: picked, then runs past the max duration.
	h.gl.addJob(stubJob{ID: 1002, ProjectID: 5, Tags: []string{tag2x4}})
	h.event(1002, 5, "pending", 0)
	b := h.waitStarted(1002)
	h.event(1002, 5, "running", b.RunnerID)
	b = h.waitState(1002, job.Failed)
	if !strings.HasPrefix(b.Reason, job.ReasonMaxDuration) || h.vmRunning(b.VMID) {
		t.Fatalf("max duration: reason %q", b.Reason)
	}
	// 1003: its runner picked it but the "running" webhook was lost: GitLab
	// (GET /runners/:id/jobs) says so at the start timeout; the VM is kept.
	// 1004: its job ran on another runner and its own runner took nothing:
	// the VM is idle and goes at the start timeout.
	h.gl.addJob(stubJob{ID: 1003, ProjectID: 5, Tags: []string{tag2x4}})
	h.gl.addJob(stubJob{ID: 1004, ProjectID: 5, Tags: []string{tag2x4}})
	h.event(1003, 5, "pending", 0)
	h.event(1004, 5, "pending", 0)
	c3, d4 := h.waitStarted(1003), h.waitStarted(1004)
	h.gl.pick(1003, c3.RunnerID)
	h.gl.pick(1004, 999)
	if j := h.waitState(1003, job.Running); j.PickedJobID != 1003 || j.Timeline.JobPicked.IsZero() || !h.vmRunning(c3.VMID) {
		t.Fatalf("lost running webhook: %+v, vm running %v", j, h.vmRunning(c3.VMID))
	}
	if j := h.waitState(1004, job.Failed); !strings.HasPrefix(j.Reason, job.ReasonStartTimeout) || h.vmRunning(d4.VMID) {
		t.Fatalf("idle VM: %s %q, vm running %v", j.State, j.Reason, h.vmRunning(d4.VMID))
	}
	h.waitState(1003, job.Failed) // max duration
	if len(h.gl.runnerList()) != 0 {
		t.Fatal("runners left after timeouts")
	}
}

// TestRestartMidJob leaves the host, GitLab and the store as kill -9 would at
// each point of the lifecycle, then starts a new controller on them.
func TestRestartMidJob(t *testing.T) {
	h := newHarness(t, func(h *harness) { h.capa.VCPUs = 4 })
	ctx := context.Background()
	for _, id := range []int64{1101, 1102, 1103, 1104, 1105, 1106} {
		h.gl.addJob(stubJob{ID: id, ProjectID: 5, Tags: []string{tag2x4}})
	}
	// A real flow first: 1101 runs (VM alive), 1102 has a VM, 1103 waits for capacity.
	h.event(1101, 5, "pending", 0)
	run := h.waitStarted(1101)
	h.event(1101, 5, "running", run.RunnerID)
	h.waitState(1101, job.Running)
	h.event(1102, 5, "pending", 0)
	h.waitStarted(1102)
	h.event(1103, 5, "pending", 0)
	h.waitState(1103, job.Queued)
	h.stopd = true // "kill -9": no graceful shutdown; the old process's state stays as is
	h.c.draining.Store(true)
	h.c.sched.Close()
	h.web.Close()

	// Crash points the real flow cannot freeze, written as the crash left them.
	now := time.Now()
	mk := func(id int64, st job.State, runnerID int64, vmID string) {
		j := job.Job{ID: id, ProjectID: 5, ProjectPath: "g/p", Tags: []string{tag2x4}, SizeTag: tag2x4, VCPUs: 2, MemoryMiB: 4096,
			State: job.Queued, Source: "webhook", Timeline: job.Timeline{WebhookReceived: now}}
		if _, _, err := h.st.Create(ctx, j); err != nil {
			t.Fatal(err)
		}
		steps := map[job.State][]job.State{job.RunnerCreated: {job.RunnerCreated}, job.VMStarting: {job.RunnerCreated, job.VMStarting},
			job.Cleaning: {job.RunnerCreated, job.VMStarting, job.Cleaning}}[st]
		for _, s := range steps {
			if _, err := h.st.Update(ctx, id, func(r *job.Job) error {
				r.State, r.RunnerID, r.VMID = s, runnerID, vmID
				if s == job.Cleaning {
					r.Outcome, r.Reason = job.Canceled, job.ReasonJobCanceled
				}
				return nil
			}); err != nil {
				t.Fatal(err)
			}
		}
	}
	// 1104: runner created, crash before the VM (token lost).
	mk(1104, job.RunnerCreated, h.gl.addRunner("firerunner job 1104 project 5"), "")
	// 1105: VM id persisted, crash before the VM started (not on host).
	mk(1105, job.VMStarting, h.gl.addRunner("firerunner job 1105 project 5"), job.VMIDFor(1105))
	// 1106: crash in the middle of cleaning (VM still there).
	h.drv.Adopt(job.VMIDFor(1106))
	mk(1106, job.Cleaning, h.gl.addRunner("firerunner job 1106 project 5"), job.VMIDFor(1106))
	// Leaks: a runner created right before a crash for a job never stored,
	// a VM no job owns, and a runner of a job long done.
	// 1107: queued when FireRunner died, canceled in GitLab while it was down.
	h.gl.addJob(stubJob{ID: 1107, ProjectID: 5, Tags: []string{tag2x4}})
	mk(1107, job.Queued, 0, "")
	h.gl.setStatus(1107, "canceled")
	leakRunner := h.gl.addRunner("firerunner job 99999 project 5")
	h.drv.Adopt("fr-orphan1")
	foreign := h.gl.addRunner("someone else's runner")
	h.st.Close()

	// New process on the same store, host and GitLab, on a bigger host.
	h.capa.VCPUs = 12
	h.start()
	h.eventually("restart converged", func() bool {
		return h.vmRunning(job.VMIDFor(1104)) && h.vmRunning(job.VMIDFor(1105)) && h.job(1106).State == job.Canceled &&
			h.vmRunning(job.VMIDFor(1103))
	})
	if j := h.job(1101); j.State != job.Running || !h.vmRunning(j.VMID) {
		t.Fatalf("running job not resumed: %s", j.State)
	}
	if j := h.waitState(1107, job.Canceled); !strings.HasPrefix(j.Reason, job.ReasonNotPending) || j.RunnerID != 0 {
		t.Fatalf("1107 after restart: %q runner %d", j.Reason, j.RunnerID)
	}
	if j := h.job(1105); j.RunnerID == 0 || j.State != job.VMStarting {
		t.Fatalf("1105 reason %q", j.Reason)
	}
	if h.vmRunning("fr-orphan1") || h.vmRunning(job.VMIDFor(1106)) {
		t.Fatal("orphan VMs survived reconcile")
	}
	ids := map[int64]bool{}
	for _, r := range h.gl.runnerList() {
		ids[r.ID] = true
	}
	if ids[leakRunner] || !ids[foreign] {
		t.Fatalf("runner reconcile wrong: leak present=%v foreign present=%v", ids[leakRunner], ids[foreign])
	}
	tr, _ := h.st.Transitions(ctx, 1104)
	var path []string
	for _, x := range tr {
		path = append(path, string(x.To))
	}
	if p := strings.Join(path, ">"); !strings.HasPrefix(p, "queued>runner_created>queued>runner_created>vm_starting") {
		t.Fatalf("1104 not re-queued after restart: %s", p)
	}

	// Everything still running finishes and leaves nothing behind.
	for _, id := range []int64{1101, 1102, 1103, 1104, 1105} {
		j := h.job(id)
		if err := h.drv.Exit(j.VMID, 0); err != nil {
			t.Fatalf("job %d: %v", id, err)
		}
		h.waitState(id, job.Done)
	}
	h.c.ReconcileOnce(ctx)
	if list, _ := h.drv.List(ctx); len(list) != 0 {
		t.Fatalf("vms left: %v", list)
	}
	if rs := h.gl.runnerList(); len(rs) != 1 || rs[0].ID != foreign {
		t.Fatalf("runners left: %+v", rs)
	}
	if act, _ := h.st.List(ctx, store.Filter{ActiveOnly: true}); len(act) != 0 {
		t.Fatalf("active jobs left: %d", len(act))
	}
}

// TestIdleRunnersCountedPerTagSet: runners are interchangeable within a tag
// set, so when a job ends FireRunner stops exactly the idle VMs that no
// unserved job can use, whichever job they were made for.
func TestIdleRunnersCountedPerTagSet(t *testing.T) {
	h := newHarness(t, nil)
	start := func(tags []string, ids ...int64) []job.Job {
		var out []job.Job
		for _, id := range ids {
			h.gl.addJob(stubJob{ID: id, ProjectID: 5, Tags: tags})
			h.event(id, 5, "pending", 0)
		}
		for _, id := range ids {
			out = append(out, h.waitStarted(id))
		}
		return out
	}
	running := func(want map[string]bool) {
		t.Helper()
		for id, w := range want {
			if got := h.vmRunning(id); got != w {
				t.Errorf("vm %s running=%v, want %v", id, got, w)
			}
		}
	}
	set1 := start([]string{tag2x4}, 1301, 1302, 1303, 1304)
	a, b, c, d := set1[0], set1[1], set1[2], set1[3]
	// A's runner picks B. A is then canceled while pending: B's VM is idle
	// and its job is served, so it goes; C's and D's wait for their own jobs.
	h.event(1302, 5, "running", a.RunnerID)
	h.waitState(1301, job.Running)
	h.event(1301, 5, "canceled", 0)
	if j := h.waitState(1302, job.Done); j.Reason != job.ReasonIdleRunner {
		t.Fatalf("B's idle VM: %s %q", j.State, j.Reason)
	}
	// C runs on a runner that is not ours: C's idle VM goes with C's outcome.
	h.event(1303, 5, "success", 999)
	if j := h.waitState(1303, job.Done); j.Reason != job.ReasonJobSucceeded {
		t.Fatalf("C's idle VM: %s %q", j.State, j.Reason)
	}
	running(map[string]bool{a.VMID: true, b.VMID: false, c.VMID: false, d.VMID: true})
	// B ends on A's VM: A's VM goes, D's keeps waiting for D.
	h.event(1302, 5, "success", a.RunnerID)
	h.waitState(1301, job.Done)
	running(map[string]bool{a.VMID: false, d.VMID: true})

	// Another tag set: E's runner picks F, so E's job has no idle VM of its
	// own, and F's idle VM must stay to serve it. G runs elsewhere: G's VM
	// is the one surplus.
	set2 := start([]string{tag2x4, "linux"}, 1401, 1402, 1403)
	e, f, g := set2[0], set2[1], set2[2]
	h.event(1402, 5, "running", e.RunnerID)
	h.waitState(1401, job.Running)
	h.event(1403, 5, "failed", 998)
	if j := h.waitState(1403, job.Failed); j.Reason != job.ReasonJobFailed {
		t.Fatalf("G's idle VM: %s %q", j.State, j.Reason)
	}
	running(map[string]bool{e.VMID: true, f.VMID: true, g.VMID: false, d.VMID: true})
	for _, j := range []job.Job{d, f} {
		if h.c.stopping(j.ID) || h.job(j.ID).State != job.VMStarting {
			t.Errorf("job %d's VM is being stopped though a job waits for it", j.ID)
		}
	}
}

// TestDisplacedJobKeepsARunner: with room for one VM, A's runner picks B
// (same tags) while B still waits for capacity. When B ends, A's own job is
// still pending with no VM: B's queued job must not just be dropped but
// bring the runner that serves A. A job that waited so and then was
// canceled frees that runner again.
func TestDisplacedJobKeepsARunner(t *testing.T) {
	h := newHarness(t, func(h *harness) { h.capa = scheduler2cpu() })
	for _, id := range []int64{1501, 1502} {
		h.gl.addJob(stubJob{ID: id, ProjectID: 5, Tags: []string{tag2x4}})
		h.event(id, 5, "pending", 0)
	}
	// runsOther: own's VM runs job other, which succeeds.
	runsOther := func(own, other int64) job.Job {
		vm := h.waitStarted(own)
		h.gl.pick(other, vm.RunnerID)
		h.event(other, 5, "running", vm.RunnerID)
		h.waitState(own, job.Running)
		h.gl.setStatus(other, "success")
		h.event(other, 5, "success", vm.RunnerID)
		return h.waitState(own, job.Done)
	}
	if j := runsOther(1501, 1502); j.PickedJobID != 1502 || j.Reason != job.ReasonJobSucceeded {
		t.Fatalf("A's record: picked %d, reason %q", j.PickedJobID, j.Reason)
	}
	// B's record, queued for a job that is over, now starts the VM that A's
	// job waits for, and its runner takes A.
	b := h.waitStarted(1502)
	h.gl.pick(1501, b.RunnerID)
	h.event(1501, 5, "running", b.RunnerID)
	h.gl.setStatus(1501, "failed")
	h.event(1501, 5, "failed", b.RunnerID)
	if j := h.waitState(1502, job.Failed); j.PickedJobID != 1501 || j.Reason != job.ReasonJobFailed {
		t.Fatalf("B's record: picked %d, reason %q", j.PickedJobID, j.Reason)
	}
	if list, _ := h.drv.List(context.Background()); len(list) != 0 || len(h.gl.runnerList()) != 0 {
		t.Fatalf("left behind: vms %v, runners %v", list, h.gl.runnerList())
	}

	// Again, but X (other tags) takes the capacity first, so D's record is
	// still queued when the displaced job C is canceled: nothing waits any
	// more, and D's record ends with D's own outcome, without a runner.
	for _, id := range []int64{1503, 1505, 1504} {
		tags := []string{tag2x4}
		if id == 1505 {
			tags = append(tags, "linux")
		}
		h.gl.addJob(stubJob{ID: id, ProjectID: 5, Tags: tags})
		h.event(id, 5, "pending", 0)
	}
	runsOther(1503, 1504)
	x := h.waitStarted(1505)
	if j := h.job(1504); j.State != job.Queued {
		t.Fatalf("D's record, kept for C: %s %q", j.State, j.Reason)
	}
	h.gl.setStatus(1503, "canceled")
	h.event(1503, 5, "canceled", 0)
	if j := h.waitState(1504, job.Done); j.Reason != job.ReasonJobSucceeded || j.RunnerID != 0 {
		t.Fatalf("D's record: %s %q runner %d", j.State, j.Reason, j.RunnerID)
	}
	h.event(1505, 5, "success", x.RunnerID)
	h.waitState(1505, job.Done)
	if list, _ := h.drv.List(context.Background()); len(list) != 0 || len(h.gl.runnerList()) != 0 {
		t.Fatalf("left behind: vms %v, runners %v", list, h.gl.runnerList())
	}
	if n := h.gl.createdCount(); n != 4 {
		t.Fatalf("runners created: %d, want 4 (A, B's for A, C, X)", n)
	}
}

// TestVMExitBeforeFinishedWebhook: the VM powers off before GitLab's
// "finished" webhook arrives (GitLab sends hooks asynchronously); the
// record still gets the outcome of the job the VM ran, read from GitLab.
func TestVMExitBeforeFinishedWebhook(t *testing.T) {
	h := newHarness(t, nil)
	h.gl.addJob(stubJob{ID: 301, ProjectID: 5, Tags: []string{tag2x4}})
	h.event(301, 5, "pending", 0)
	j := h.waitStarted(301)
	h.event(301, 5, "running", j.RunnerID)
	h.waitState(301, job.Running)
	h.gl.setStatus(301, "failed")
	if err := h.drv.Exit(j.VMID, 0); err != nil {
		t.Fatal(err)
	}
	j = h.waitState(301, job.Failed)
	if j.Reason != job.ReasonJobFailed || h.vmRunning(j.VMID) || len(h.gl.runnerList()) != 0 {
		t.Fatalf("record %+v, vm running %v, runners %v", j, h.vmRunning(j.VMID), h.gl.runnerList())
	}
}

func TestRunnerSwapAndShutdown(t *testing.T) {
	h := newHarness(t, func(h *harness) { h.cfg.Limits.DrainTimeout = 100 * time.Millisecond })
	for _, id := range []int64{1201, 1202, 1203} {
		h.gl.addJob(stubJob{ID: id, ProjectID: 5, Tags: []string{tag2x4}})
		h.event(id, 5, "pending", 0)
	}
	a := h.waitStarted(1201)
	b := h.waitStarted(1202)
	// A's runner picks job B (same tags); B's job ends successfully on A's VM.
	h.event(1202, 5, "running", a.RunnerID)
	if got := h.waitState(1201, job.Running); got.PickedJobID != 1202 {
		t.Fatalf("picked job %d", got.PickedJobID)
	}
	h.event(1202, 5, "success", a.RunnerID)
	h.waitState(1201, job.Done)
	if h.vmRunning(a.VMID) || !h.vmRunning(b.VMID) {
		t.Fatal("the wrong VM was torn down")
	}
	if !strings.Contains(h.metricsText(), `firerunner_runners{tags="`+tag2x4+`"} 2`) {
		t.Fatalf("runners per tag set wrong:\n%s", grep(h.metricsText(), "firerunner_runners"))
	}
	// SIGTERM: intake stops, running VMs get the drain timeout, then go.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	h.stopd = true
	if err := h.c.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	if err := h.c.HandleJobEvent(context.Background(), webhookEvent(1299, 5, "pending")); err == nil {
		t.Fatal("intake still open after shutdown")
	}
	for _, id := range []int64{1202, 1203} {
		if j := h.job(id); j.State != job.Failed || !strings.HasPrefix(j.Reason, job.ReasonShutdown) {
			t.Fatalf("job %d after drain: %s %q", id, j.State, j.Reason)
		}
	}
	if list, _ := h.drv.List(ctx); len(list) != 0 || len(h.gl.runnerList()) != 0 {
		t.Fatal("shutdown leaked vms or runners")
	}
	h.web.Close()
	h.st.Close()
}

func scheduler2cpu() scheduler.Capacity { return scheduler.Capacity{VCPUs: 2, MemoryMiB: 64 * 1024} }

func grep(text, sub string) string {
	var out []string
	for _, l := range strings.Split(text, "\n") {
		if strings.Contains(l, sub) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

func webhookEvent(jobID, projectID int64, status string) webhook.JobEvent {
	return webhook.JobEvent{JobID: jobID, ProjectID: projectID, Status: status, ReceivedAt: time.Now()}
}

// TestReconcileAdoptsWorkerlessJobs: a job left mid-cleanup without a worker
// (a failed store write, say) is finished by the next reconcile pass.
func TestReconcileAdoptsWorkerlessJobs(t *testing.T) {
	h := newHarness(t, nil)
	ctx := context.Background()
	rid := h.gl.addRunner("firerunner job 1301 project 5")
	vmID := job.VMIDFor(1301)
	h.drv.Adopt(vmID)
	if _, _, err := h.st.Create(ctx, job.Job{ID: 1301, ProjectID: 5, Tags: []string{tag2x4}, SizeTag: tag2x4, VCPUs: 2, MemoryMiB: 4096, State: job.Queued}); err != nil {
		t.Fatal(err)
	}
	if _, err := h.st.UpdatePath(ctx, 1301, []job.State{job.RunnerCreated, job.VMStarting, job.Cleaning}, func(r *job.Job) error {
		r.RunnerID, r.VMID, r.Outcome, r.Reason = rid, vmID, job.Failed, job.ReasonVMExit+": test"
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	h.c.ReconcileOnce(ctx)
	j := h.waitState(1301, job.Failed)
	if h.vmRunning(vmID) || len(h.gl.runnerList()) != 0 || j.Reason != job.ReasonVMExit+": test" {
		t.Fatalf("not cleaned: vm=%v runners=%d reason=%q", h.vmRunning(vmID), len(h.gl.runnerList()), j.Reason)
	}
}
