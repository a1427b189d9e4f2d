package demo

import (
	"context"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/firerunner/firerunner/internal/config"
	"github.com/firerunner/firerunner/internal/job"
	"github.com/firerunner/firerunner/internal/testenv"
	"github.com/firerunner/firerunner/internal/testsupport/gitlabstandin"
	"github.com/firerunner/firerunner/internal/vm"
)

// pooledConfig is runners.mode pooled with one pool of small VMs (instance
// runners: the stand-in's token is an administrator's), or, with no pool,
// the same host after its pool was removed from the config.
func pooledConfig(withPool bool) func(*config.Config) {
	return func(cfg *config.Config) {
		cfg.Runners.Mode = "pooled"
		cfg.Runners.Scope = "instance"
		cfg.Pools = nil
		if withPool {
			cfg.Pools = []config.Pool{{Size: small, MinIdle: 2, MaxIdle: 3, IdleTimeout: 10 * time.Minute}}
		}
	}
}

// pollers returns the live VMs polling GitLab on a pool's shared runner.
func (r *reconcileRig) pollers() []job.VM {
	live, _ := r.d.Store.ListVMs(context.Background(), true, 0)
	var out []job.VM
	for _, v := range live {
		if v.Pooled() && v.State == job.VMStarting {
			out = append(out, v)
		}
	}
	return out
}

// created counts the runners FireRunner created (201s to POST /user/runners).
func (r *reconcileRig) created() int {
	n := 0
	for _, q := range r.gl.Requests() {
		if q.Method == http.MethodPost && q.Path == "/api/v4/user/runners" && q.Status == http.StatusCreated {
			n++
		}
	}
	return n
}

// TestPooledEndToEnd: issue 9's pooled-mode acceptance with real QEMU VMs
// and the real gitlab-runner. Ten jobs of one size run on exactly one
// runner, created once and shared by the pool's VMs, each VM's
// gitlab-runner a runner manager of its own: ten VMs, one job each, and
// each job's record names the VM whose system_id GitLab reports as the
// job's runner manager. Restarts keep the runner (its token is rotated,
// and the VMs handed the new one take jobs); a start whose config no
// longer has the pool deletes it.
func TestPooledEndToEnd(t *testing.T) {
	testenv.RequireRoot(t)
	testenv.QEMU(t)
	dir := testenv.ImageDir(t)
	requireRunnerImage(t, dir)
	began := time.Now()
	r := newReconcileRig(t, dir, pooledConfig(true))
	ctx := context.Background()

	// Pollers first: two VMs on the pool's runner, both asking GitLab for
	// jobs before any job exists (each is a runner manager in GitLab).
	r.waitFor("two VMs polling on the pool's runner", 4*time.Minute, func() bool {
		rs := r.gl.Runners()
		return len(r.pollers()) >= 2 && len(rs) == 1 && len(rs[0].Managers) >= 2
	})
	rid := r.gl.Runners()[0].ID
	if n := r.created(); n != 1 {
		t.Fatalf("%d runners created before any job, want the pool's one", n)
	}

	const n = 10
	specs := make([]gitlabstandin.JobSpec, n)
	for i := range specs {
		specs[i] = gitlabstandin.JobSpec{Name: fmt.Sprintf("job-%d", i), Tags: []string{small},
			Script: []string{`echo "ran on $(hostname) as $(cat /run/firerunner/.runner_system_id)"`}}
	}
	ids := r.pipeline(specs...)
	vms := map[string]int64{}
	for _, id := range ids {
		js, rec := r.waitDone(id)
		tr := CleanTrace(js.Trace)
		if js.Status != "success" || rec.State != job.Done {
			t.Fatalf("job %d: GitLab %s, FireRunner %s (%s)\n%s", id, js.Status, rec.State, rec.Reason, tr)
		}
		if js.RunnerID != rid || rec.RunnerID != rid {
			t.Fatalf("job %d ran on runner %d (record: %d), want the pool's %d", id, js.RunnerID, rec.RunnerID, rid)
		}
		if js.RunnerManagerSystemID != job.SystemID(rec.VMID) {
			t.Fatalf("job %d: GitLab's runner manager %q, FireRunner's record names vm %s", id, js.RunnerManagerSystemID, rec.VMID)
		}
		if !strings.Contains(tr, "ran on "+rec.VMID+" as "+js.RunnerManagerSystemID) {
			t.Fatalf("job %d trace does not show its VM %s:\n%s", id, rec.VMID, tr)
		}
		if other, dup := vms[rec.VMID]; dup {
			t.Fatalf("vm %s ran jobs %d and %d", rec.VMID, other, id)
		}
		vms[rec.VMID] = id
	}
	for vmID, id := range vms {
		r.waitFor("vm "+vmID+" gone", time.Minute, func() bool { v, _ := r.d.Store.GetVM(ctx, vmID); return v.State == job.VMGone })
		if v, _ := r.d.Store.GetVM(ctx, vmID); v.PickedJobID != id || v.Reason != job.ReasonRanJob {
			t.Fatalf("vm %s: picked %d (%s), want job %d", vmID, v.PickedJobID, v.Reason, id)
		}
	}
	if c := r.created(); c != 1 || len(vms) != n {
		t.Fatalf("%d jobs: %d runners created, %d VMs; want 1 runner and %d VMs", n, c, len(vms), n)
	}
	t.Logf("%d pooled jobs on %d VMs with 1 runner in %s", n, len(vms), time.Since(began).Round(time.Second))

	// An ordinary restart keeps the runner: its token is rotated, the
	// pool's new VMs get the new one and take jobs with it.
	r.stop()
	if rn, _ := r.gl.Runner(rid); !rn.DeletedAt.IsZero() {
		t.Fatal("the pool's runner was deleted at an ordinary shutdown")
	}
	r.start()
	id := r.pipeline(gitlabstandin.JobSpec{Name: "after-restart", Tags: []string{small}, Script: []string{"hostname"}})[0]
	if js, rec := r.waitDone(id); js.Status != "success" || js.RunnerID != rid || js.RunnerManagerSystemID != job.SystemID(rec.VMID) {
		t.Fatalf("after restart: GitLab %s on runner %d manager %q, record vm %s", js.Status, js.RunnerID, js.RunnerManagerSystemID, rec.VMID)
	}
	if rn, _ := r.gl.Runner(rid); r.created() != 1 || rn.TokenResets < 1 || !rn.DeletedAt.IsZero() {
		t.Fatalf("after restart: %d created, %d token resets, deleted %v", r.created(), rn.TokenResets, !rn.DeletedAt.IsZero())
	}

	// A job past job_max_duration on a pooled VM: the VM polled before
	// its job came, so the agent counts the limit from the pick (its job
	// gate sees it), ends the job and reports it to GitLab itself, before
	// the host's kill.
	r.stop()
	r.mod = func(cfg *config.Config) {
		pooledConfig(true)(cfg)
		cfg.Limits.JobMaxDuration = 40 * time.Second
	}
	r.start()
	id = r.pipeline(gitlabstandin.JobSpec{Name: "endless", Tags: []string{small}, Script: []string{"echo started", "sleep 600"}})[0]
	if js, rec := r.waitDone(id); js.Status != "failed" || js.FailureReason != "job_execution_timeout" || rec.State != job.Failed ||
		!strings.Contains(CleanTrace(js.Trace), "FireRunner: the job reached FireRunner's time limit") {
		t.Fatalf("a pooled job past job_max_duration: GitLab %s (%s), record %s (%s); want failed (job_execution_timeout) reported by the guest\n%s",
			js.Status, js.FailureReason, rec.State, rec.Reason, CleanTrace(js.Trace))
	} else if v, _ := r.d.Store.GetVM(ctx, rec.VMID); strings.HasPrefix(v.Reason, job.ReasonMaxDuration) {
		t.Fatalf("the pooled VM was killed by the host's limit (%q), not ended by its guest", v.Reason)
	}

	// The pool removed from the config: its runner is deleted at start.
	r.stop()
	r.mod = pooledConfig(false)
	r.start()
	r.waitFor("the removed pool's runner deleted", time.Minute, func() bool { rn, _ := r.gl.Runner(rid); return !rn.DeletedAt.IsZero() })
	r.clean()
	r.stop()
	if ps := vm.FindProcs(r.o.WorkDir); len(ps) > 0 {
		t.Errorf("VMM processes left: %v", ps)
	}
	if findToken(r.logs.String()) {
		t.Errorf("a runner token appears in the logs")
	}
	t.Logf("whole test %s", time.Since(began).Round(time.Second))
}
