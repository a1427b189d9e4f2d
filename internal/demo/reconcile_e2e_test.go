package demo

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/firerunner/firerunner/internal/config"
	"github.com/firerunner/firerunner/internal/daemon"
	"github.com/firerunner/firerunner/internal/job"
	"github.com/firerunner/firerunner/internal/store"
	"github.com/firerunner/firerunner/internal/testenv"
	"github.com/firerunner/firerunner/internal/testsupport/gitlabstandin"
)

// reconcileRig is the stand-in and a real FireRunner (QEMU driver, real
// gitlab-runner in every VM) that a test can stop and start again on the
// same state.
type reconcileRig struct {
	t        testing.TB
	o        Options
	gl       *gitlabstandin.Server
	proj     gitlabstandin.Project
	d        *daemon.Daemon
	apiTok   string
	secret   string
	logs     *testenv.Buffer
	maxRetry int
	mod      func(*config.Config) // config changes of a test
}

func newReconcileRig(t testing.TB, imageDir string, mods ...func(*config.Config)) *reconcileRig {
	t.Helper()
	r := &reconcileRig{t: t, o: Options{ImageDir: imageDir, WorkDir: t.TempDir(), VCPUs: 3, MemoryMiB: 3072},
		apiTok: "glpat-" + randHex(10), secret: randHex(16), logs: &testenv.Buffer{}, maxRetry: 1}
	if len(mods) > 0 {
		r.mod = mods[0]
	}
	log := slog.New(slog.NewJSONHandler(r.logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	gl, err := gitlabstandin.New(gitlabstandin.Options{Addr: "127.0.0.1:0", ExternalHost: "10.0.2.2",
		Dir: filepath.Join(r.o.WorkDir, "gitlab"), HardCancel: true, Logger: log.With("component", "gitlab-standin")})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { gl.Close() })
	r.gl = gl
	gl.AddToken(r.apiTok, gitlabstandin.ScopeAPI)
	if r.proj, err = gl.AddProject(gitlabstandin.ProjectSpec{Path: "demo/app", Files: Files}); err != nil {
		t.Fatal(err)
	}
	r.start()
	t.Cleanup(func() {
		if r.d != nil {
			r.stop()
		}
		// For debugging: FireRunner's log and the VMs' console logs.
		if keep := os.Getenv("FIRERUNNER_E2E_KEEP"); keep != "" {
			_ = os.WriteFile(filepath.Join(keep, "firerunner.log"), []byte(r.logs.String()), 0o600)
			_ = exec.Command("cp", "-r", filepath.Join(r.o.WorkDir, "console"), keep).Run()
		}
	})
	return r
}

func (r *reconcileRig) start() {
	r.t.Helper()
	_, port, _ := net.SplitHostPort(r.gl.Addr())
	cfg, err := Config(r.o, "http://127.0.0.1:"+port, r.gl.URL(), r.apiTok, r.secret)
	if err != nil {
		r.t.Fatal(err)
	}
	cfg.GitLab.MaxRetries = r.maxRetry // so that an outage fails whole attempts
	cfg.Limits.RetryBackoff = 2 * time.Second
	cfg.Limits.StartAttempts = 8 // 2+4+8+16 s of back-off outlast a 20 s outage
	cfg.Limits.DrainTimeout = 3 * time.Second
	cfg.Reconcile.Interval = 2 * time.Second
	if r.mod != nil {
		r.mod(&cfg) // after validation: tests may shorten what production must not
	}
	log := slog.New(slog.NewJSONHandler(r.logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	if r.d, err = daemon.Start(context.Background(), cfg, log); err != nil {
		r.t.Fatal(err)
	}
	r.gl.SetWebhook("http://"+r.d.Addr()+"/webhook", r.secret)
}

func (r *reconcileRig) stop() {
	r.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	err := r.d.Shutdown(ctx)
	r.d = nil
	if err != nil {
		r.t.Errorf("shutdown: %v", err)
	}
}

func (r *reconcileRig) pipeline(jobs ...gitlabstandin.JobSpec) []int64 {
	r.t.Helper()
	pl, err := r.gl.CreatePipeline(r.proj.ID, jobs...)
	if err != nil {
		r.t.Fatal(err)
	}
	return pl.JobIDs
}

func (r *reconcileRig) waitFor(what string, limit time.Duration, cond func() bool) {
	r.t.Helper()
	deadline := time.Now().Add(limit)
	for !cond() {
		if time.Now().After(deadline) {
			r.t.Fatalf("timed out after %s waiting for %s\nFireRunner log tail:\n%s", limit, what, tail(r.logs.String(), 40))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func (r *reconcileRig) record(id int64) job.Job {
	j, err := r.d.Store.GetJob(context.Background(), id)
	if err != nil {
		return job.Job{ID: id}
	}
	return j
}

// waitDone waits until GitLab and FireRunner both have the job ended.
func (r *reconcileRig) waitDone(id int64) (gitlabstandin.JobState, job.Job) {
	r.t.Helper()
	var js gitlabstandin.JobState
	var rec job.Job
	deadline := time.Now().Add(4 * time.Minute)
	for {
		js, _ = r.gl.Job(id)
		rec = r.record(id)
		if job.StatusFinal(js.Status) && rec.State.Terminal() {
			return js, rec
		}
		if time.Now().After(deadline) {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	// What tells why: both sides' view, and the console of the VM that
	// ran it (FireRunner's record, or the runner manager GitLab names).
	vmID := rec.VMID
	if vmID == "" && strings.HasPrefix(js.RunnerManagerSystemID, "s_fr") {
		vmID = "fr-" + strings.TrimPrefix(js.RunnerManagerSystemID, "s_fr")
	}
	r.t.Logf("job %d: GitLab %s (runner %d, manager %q), FireRunner %s (%s), vm %q\ntrace:\n%s",
		id, js.Status, js.RunnerID, js.RunnerManagerSystemID, rec.State, rec.Reason, vmID, CleanTrace(js.Trace))
	if vmID != "" {
		for _, f := range []string{filepath.Join(r.o.WorkDir, "console", vmID+".log"), filepath.Join(r.o.WorkDir, "state", "vms", vmID, "console.log")} {
			if b, err := os.ReadFile(f); err == nil {
				r.t.Logf("%s:\n%s", f, tail(string(b), 80))
			}
		}
	}
	r.t.Fatalf("timed out after 4m0s waiting for job %d to end in GitLab and FireRunner\nFireRunner log tail:\n%s", id, tail(r.logs.String(), 40))
	return js, rec
}

// clean waits until no VM, VM record, runner record or GitLab runner is left.
func (r *reconcileRig) clean() {
	r.t.Helper()
	ctx := context.Background()
	r.waitFor("nothing left", time.Minute, func() bool {
		insts, _ := r.d.Driver.List(ctx)
		live, _ := r.d.Store.ListVMs(ctx, true, 0)
		rs, _ := r.d.Store.ListRunners(ctx, true)
		act, _ := r.d.Store.ListJobs(ctx, store.Filter{ActiveOnly: true})
		return len(insts) == 0 && len(live) == 0 && len(rs) == 0 && len(act) == 0 && len(r.gl.Runners()) == 0
	})
}

func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// TestReconcileEndToEnd is issue 8's acceptance, in real microVMs with the
// official gitlab-runner, against the stand-in:
//   - the subset pipeline ([s], [s, linux], [s]) with the linux job's runner
//     taking the first plain job on purpose: all three succeed, and GitLab,
//     FireRunner's records and the runners agree, with three runners;
//   - POST /user/runners failing with 503 for 20 s: the job is served;
//   - a cancel racing the VM's start: the VM is gone within 2 s;
//   - a pending hook during the drain gets 2xx and is served after restart.
func TestReconcileEndToEnd(t *testing.T) {
	testenv.RequireRoot(t)
	testenv.QEMU(t)
	dir := testenv.ImageDir(t)
	requireRunnerImage(t, dir)
	r := newReconcileRig(t, dir)
	ctx := context.Background()
	s := "firecracker-1cpu-1gb"
	script := func(name string) []string { return []string{fmt.Sprintf(`echo "%s ran on $(hostname)"`, name)} }

	t.Run("SubsetPipeline", func(t *testing.T) {
		r.t = t
		// Only the linux job's runner may take jobs at first: GitLab hands
		// it the oldest pending job its tags cover, the first plain job.
		r.gl.HoldRunners(func(rs gitlabstandin.RunnerState) bool { return !slices.Contains(rs.Tags, "linux") })
		ids := r.pipeline(
			gitlabstandin.JobSpec{Name: "plain-1", Tags: []string{s}, Script: script("plain-1")},
			gitlabstandin.JobSpec{Name: "linux", Tags: []string{s, "linux"}, Script: script("linux")},
			gitlabstandin.JobSpec{Name: "plain-2", Tags: []string{s}, Script: script("plain-2")},
		)
		var swapped gitlabstandin.JobState
		r.waitFor("the linux job's runner to take the first plain job", 4*time.Minute, func() bool {
			swapped, _ = r.gl.Job(ids[0])
			return swapped.RunnerID != 0
		})
		if rn, _ := r.gl.Runner(swapped.RunnerID); !slices.Contains(rn.Tags, "linux") {
			t.Fatalf("job %d taken by runner %d with tags %v: the swap did not happen", ids[0], rn.ID, rn.Tags)
		}
		r.gl.HoldRunners(nil)
		for i, id := range ids {
			js, rec := r.waitDone(id)
			if js.Status != "success" || rec.State != job.Done || rec.Reason != job.ReasonSucceeded {
				t.Errorf("job %d (%s): GitLab %s, FireRunner %s (%s)\n%s", id, js.Name, js.Status, rec.State, rec.Reason, CleanTrace(js.Trace))
				continue
			}
			// The record names the runner GitLab says ran it, and its VM.
			if rec.RunnerID != js.RunnerID || rec.VMID == "" {
				t.Errorf("job %d: record says runner %d vm %q, GitLab says runner %d", id, rec.RunnerID, rec.VMID, js.RunnerID)
			}
			v, err := r.d.Store.GetVM(ctx, rec.VMID)
			if err != nil || v.PickedJobID != id || v.RunnerID != js.RunnerID {
				t.Errorf("job %d: vm record %+v %v", id, v, err)
			}
			if !strings.Contains(CleanTrace(js.Trace), js.Name+" ran on "+rec.VMID) {
				t.Errorf("job %d: trace does not show it ran on %s:\n%s", id, rec.VMID, CleanTrace(js.Trace))
			}
			if i == 0 && !slices.Contains(v.Tags, "linux") {
				t.Errorf("the first plain job did not run on the linux VM: %v", v.Tags)
			}
		}
		r.clean()
		all, _ := r.d.Store.ListRunners(ctx, false)
		if len(all) != 3 {
			t.Errorf("runners created: %d, want 3 (an idle plain runner is retargeted to the linux job)", len(all))
		}
		if !strings.Contains(r.logs.String(), "idle vm retargeted to a waiting job") {
			t.Errorf("no retarget logged")
		}
	})

	t.Run("RunnerCreationOutage", func(t *testing.T) {
		r.t = t
		r.gl.FailFor("POST", "/api/v4/user/runners", 503, 20*time.Second)
		began := time.Now()
		id := r.pipeline(gitlabstandin.JobSpec{Name: "outage", Tags: []string{s}, Script: script("outage")})[0]
		js, rec := r.waitDone(id)
		if js.Status != "success" || rec.State != job.Done {
			t.Fatalf("job %d after a 20 s runner-creation outage: GitLab %s, FireRunner %s (%s)", id, js.Status, rec.State, rec.Reason)
		}
		if rec.Attempts < 1 {
			t.Errorf("attempts %d: the outage failed no attempt", rec.Attempts)
		}
		t.Logf("served %s after the outage began, after %d failed attempts", time.Since(began).Round(time.Second), rec.Attempts)
		r.clean()
	})

	t.Run("CancelRacingStart", func(t *testing.T) {
		r.t = t
		r.gl.HoldRunners(func(gitlabstandin.RunnerState) bool { return true })
		defer r.gl.HoldRunners(nil)
		id := r.pipeline(gitlabstandin.JobSpec{Name: "cancel-me", Tags: []string{s}, Script: script("cancel-me")})[0]
		var v job.VM
		r.waitFor("its VM to be starting", 2*time.Minute, func() bool {
			vs, _ := r.d.Store.ListVMs(ctx, true, id)
			if len(vs) == 1 && vs[0].State == job.VMStarting {
				v = vs[0]
				return true
			}
			return false
		})
		canceled := time.Now()
		if err := r.gl.Cancel(id); err != nil {
			t.Fatal(err)
		}
		r.waitFor("the VM to be gone", 30*time.Second, func() bool {
			x, err := r.d.Store.GetVM(ctx, v.ID)
			return err == nil && x.State == job.VMGone
		})
		took := time.Since(canceled)
		t.Logf("vm %s gone %s after the cancel", v.ID, took.Round(time.Millisecond))
		if took > 2*time.Second {
			t.Errorf("teardown took %s, want within 2 s", took)
		}
		if _, rec := r.waitDone(id); rec.State != job.Canceled {
			t.Errorf("record %s (%s), want canceled", rec.State, rec.Reason)
		}
		r.clean()
	})

	t.Run("HookDuringDrain", func(t *testing.T) {
		r.t = t
		// A job whose VM keeps the drain busy: its runner is held.
		r.gl.HoldRunners(func(gitlabstandin.RunnerState) bool { return true })
		first := r.pipeline(gitlabstandin.JobSpec{Name: "drain-1", Tags: []string{s}, Script: script("drain-1")})[0]
		r.waitFor("its VM to be starting", 2*time.Minute, func() bool {
			vs, _ := r.d.Store.ListVMs(ctx, true, first)
			return len(vs) == 1 && vs[0].State == job.VMStarting
		})
		d := r.d
		done := make(chan error, 1)
		go func() {
			sctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			done <- d.Shutdown(sctx)
		}()
		r.waitFor("draining", 10*time.Second, func() bool { return d.Controller.Ready(ctx) != nil })
		second := r.pipeline(gitlabstandin.JobSpec{Name: "drain-2", Tags: []string{s}, Script: script("drain-2")})[0]
		r.waitFor("the pending hook delivered", 10*time.Second, func() bool {
			for _, dl := range r.gl.Deliveries() {
				if dl.JobID == second && dl.BuildStatus == "pending" && dl.StatusCode != 0 {
					return true
				}
			}
			return false
		})
		for _, dl := range r.gl.Deliveries() {
			if dl.JobID == second && dl.BuildStatus == "pending" && dl.StatusCode/100 != 2 {
				t.Fatalf("pending hook during drain: HTTP %d", dl.StatusCode)
			}
		}
		if err := <-done; err != nil {
			t.Fatal(err)
		}
		r.d = nil
		r.gl.HoldRunners(nil)
		r.start()
		for _, id := range []int64{first, second} {
			if js, rec := r.waitDone(id); js.Status != "success" || rec.State != job.Done {
				t.Errorf("job %d after the restart: GitLab %s, FireRunner %s (%s)", id, js.Status, rec.State, rec.Reason)
			}
		}
		r.clean()
	})
	if tok := findToken(r.logs.String()); tok {
		t.Errorf("a runner token appears in FireRunner's logs")
	}
}

func findToken(s string) bool { return regexp.MustCompile(`glrt-[A-Za-z0-9_-]{12,}`).MatchString(s) }
