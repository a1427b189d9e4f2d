package demo

import (
	"context"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/firerunner/firerunner/internal/config"
	"github.com/firerunner/firerunner/internal/job"
	"github.com/firerunner/firerunner/internal/testenv"
	"github.com/firerunner/firerunner/internal/testsupport/gitlabstandin"
	"github.com/firerunner/firerunner/internal/vm"
)

const small = "firecracker-1cpu-1gb"

// warmReady returns the pool's warm VMs whose guest agent reported that
// gitlab-runner is started and waits for its config.
func (r *reconcileRig) warmReady() []job.VM {
	live, _ := r.d.Store.ListVMs(context.Background(), true, 0)
	var out []job.VM
	for _, v := range live {
		if v.State == job.VMWarm && v.ForJob == 0 && !v.Timeline.Ready.IsZero() {
			out = append(out, v)
		}
	}
	return out
}

// firstRequest is how long after the job's pending webhook the runner that
// took it made its first job request (zero when unknown).
func (r *reconcileRig) firstRequest(id int64) time.Duration {
	js, _ := r.gl.Job(id)
	rn, ok := r.gl.Runner(js.RunnerID)
	var hook time.Time
	for _, d := range r.gl.Deliveries() {
		if d.JobID == id && d.BuildStatus == "pending" {
			hook = d.Time
			break
		}
	}
	if !ok || hook.IsZero() || rn.FirstRequestAt.IsZero() {
		return 0
	}
	return rn.FirstRequestAt.Sub(hook)
}

// TestWarmPoolEndToEnd: issue 9's acceptance with real VMs and the real
// gitlab-runner: a warm hit (the job's runner reaches an already booted VM
// over the assignment channel); the pool exhausted → cold fallback; the
// idle timeout recycles a warm VM; a job canceled on a warm VM; every VM
// keeps its own identity; nothing is left.
func TestWarmPoolEndToEnd(t *testing.T) {
	testenv.RequireRoot(t)
	testenv.QEMU(t)
	dir := testenv.ImageDir(t)
	requireRunnerImage(t, dir)
	r := newReconcileRig(t, dir, func(cfg *config.Config) {
		cfg.Pools = []config.Pool{{Size: small, MinIdle: 1, MaxIdle: 1, IdleTimeout: 25 * time.Second}}
	})
	ctx := context.Background()
	script := []string{`echo "ran on $(hostname)"`, `echo "MID=$(cat /etc/machine-id)"`}

	t.Run("WarmHit", func(t *testing.T) {
		r.t = t
		var w job.VM
		r.waitFor("a warm VM ready", 3*time.Minute, func() bool {
			ws := r.warmReady()
			if len(ws) == 1 {
				w = ws[0]
			}
			return len(ws) == 1
		})
		if n := len(r.gl.Runners()); n != 0 {
			t.Fatalf("%d runners exist before any job", n)
		}
		id := r.pipeline(gitlabstandin.JobSpec{Name: "warm", Tags: []string{small}, Script: script})[0]
		js, rec := r.waitDone(id)
		if js.Status != "success" || rec.State != job.Done || rec.VMID != w.ID {
			t.Fatalf("job %d: GitLab %s, FireRunner %s (%s) on %s, want the warm VM %s\n%s", id, js.Status, rec.State, rec.Reason, rec.VMID, w.ID, CleanTrace(js.Trace))
		}
		if !strings.Contains(CleanTrace(js.Trace), "ran on "+w.ID) {
			t.Fatalf("trace:\n%s", CleanTrace(js.Trace))
		}
		t.Logf("warm hit: webhook → runner's first job request %s", r.firstRequest(id).Round(time.Millisecond))
		r.waitFor("the pool refilled", 3*time.Minute, func() bool { return len(r.warmReady()) == 1 })
	})

	t.Run("ExhaustedColdFallbackAndIdentity", func(t *testing.T) {
		r.t = t
		ids := r.pipeline(gitlabstandin.JobSpec{Name: "a", Tags: []string{small}, Script: script},
			gitlabstandin.JobSpec{Name: "b", Tags: []string{small}, Script: script})
		var warm, cold int
		ids2 := map[string]bool{}
		for _, id := range ids {
			js, rec := r.waitDone(id)
			if js.Status != "success" || rec.State != job.Done {
				t.Fatalf("job %d: GitLab %s, FireRunner %s (%s)", id, js.Status, rec.State, rec.Reason)
			}
			v, _ := r.d.Store.GetVM(ctx, rec.VMID)
			if v.Timeline.Assigned.IsZero() {
				cold++
			} else {
				warm++
			}
			tr := CleanTrace(js.Trace)
			m := regexp.MustCompile(`(?m)^MID=([0-9a-f]{32})$`).FindStringSubmatch(tr)
			if m == nil {
				t.Fatalf("no machine-id in trace:\n%s", tr)
			}
			ids2[m[1]] = true
		}
		if warm != 1 || cold != 1 {
			t.Errorf("warm %d, cold %d: want one of each (pool of one)", warm, cold)
		}
		if len(ids2) != 2 {
			t.Errorf("two VMs share a machine-id: %v", ids2)
		}
	})

	t.Run("CanceledOnWarmVM", func(t *testing.T) {
		r.t = t
		r.waitFor("a warm VM ready", 3*time.Minute, func() bool { return len(r.warmReady()) == 1 })
		id := r.pipeline(gitlabstandin.JobSpec{Name: "cancel", Tags: []string{small}, Script: []string{"echo started", "sleep 600"}})[0]
		r.waitFor("the job running", 2*time.Minute, func() bool {
			js, _ := r.gl.Job(id)
			return js.Status == "running" && strings.Contains(js.Trace, "started")
		})
		rec := r.record(id)
		if err := r.gl.Cancel(id); err != nil {
			t.Fatal(err)
		}
		if _, rec2 := r.waitDone(id); rec2.State != job.Canceled {
			t.Fatalf("record %s (%s)", rec2.State, rec2.Reason)
		}
		r.waitFor("its VM gone", time.Minute, func() bool { v, _ := r.d.Store.GetVM(ctx, rec.VMID); return v.State == job.VMGone })
	})

	t.Run("IdleTimeoutRecycles", func(t *testing.T) {
		r.t = t
		var w job.VM
		r.waitFor("a warm VM ready", 3*time.Minute, func() bool {
			ws := r.warmReady()
			if len(ws) == 1 {
				w = ws[0]
			}
			return len(ws) == 1
		})
		r.waitFor("the warm VM recycled", 2*time.Minute, func() bool {
			v, _ := r.d.Store.GetVM(ctx, w.ID)
			return v.State == job.VMGone
		})
		if v, _ := r.d.Store.GetVM(ctx, w.ID); v.Reason != job.ReasonPoolIdle {
			t.Fatalf("recycled with reason %q", v.Reason)
		}
		r.waitFor("a new warm VM", 3*time.Minute, func() bool {
			ws := r.warmReady()
			return len(ws) == 1 && ws[0].ID != w.ID
		})
	})

	r.t = t
	r.stop()
	if n := len(r.gl.Runners()); n != 0 {
		t.Errorf("%d runners left", n)
	}
	if ps := vm.FindProcs(r.o.WorkDir); len(ps) > 0 {
		t.Errorf("VMM processes left: %v", ps)
	}
	if findToken(r.logs.String()) {
		t.Errorf("a runner token appears in the logs")
	}
	if slices.ContainsFunc(strings.Split(r.logs.String(), "\n"), func(l string) bool { return strings.Contains(l, "assignment{") && strings.Contains(l, "glrt") }) {
		t.Errorf("an assignment with its token was logged")
	}
}
