package demo

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/firerunner/firerunner/internal/job"
	"github.com/firerunner/firerunner/internal/testenv"
	"github.com/firerunner/firerunner/internal/testsupport/gitlabstandin"
	"github.com/firerunner/firerunner/internal/vm"
)

var memTotal = regexp.MustCompile(`MemTotal:\s+([0-9]+) kB`)

// TestEndToEnd runs a pipeline through a real FireRunner, real microVMs (QEMU)
// and the official gitlab-runner inside them, against the GitLab stand-in:
// two sizes, an untagged job, a failing job and a canceled one.
func TestEndToEnd(t *testing.T) {
	testenv.RequireRoot(t)
	testenv.QEMU(t)
	dir := testenv.ImageDir(t)
	requireRunnerImage(t, dir)
	work := t.TempDir()
	logs := &testenv.Buffer{}
	script := []string{`echo "NPROC=$(nproc)"`, `grep MemTotal /proc/meminfo`, `cat README.md`, `echo "HEAD=$(git rev-parse HEAD)"`}
	// small's artifact (uploaded through the VM's job gate) is downloaded
	// by large in the next stage, in another VM.
	jobs := []gitlabstandin.JobSpec{
		{Name: "small", Stage: "build", Tags: []string{"firecracker-1cpu-1gb"}, Artifacts: []string{"out/"},
			Script: append(slices.Clone(script), `mkdir -p out && echo "artifact of job $CI_JOB_ID" > out/a.txt`)},
		{Name: "large", Tags: []string{"firecracker-2cpu-2gb"}, Script: append(slices.Clone(script), `echo "GOT=$(cat out/a.txt)"`)},
		{Name: "untagged", Script: []string{"echo must not run in a FireRunner VM"}},
		{Name: "fails", Tags: []string{"firecracker-1cpu-1gb"}, Script: []string{"echo about to fail", "exit 3"}},
		{Name: "canceled", Tags: []string{"firecracker-1cpu-1gb"}, Script: []string{"echo started", "sleep 600"}},
	}
	var out bytes.Buffer
	rep, err := Run(context.Background(), Options{
		ImageDir: dir, Jobs: jobs, CancelWhenRunning: []string{"canceled"},
		WorkDir: work, Out: &out, LogOut: logs,
	})
	os.Stdout.Write(out.Bytes()) // the timeline, for the CI log
	if err != nil {
		t.Fatalf("demo run: %v", err)
	}

	get := func(name string) JobResult {
		t.Helper()
		r, ok := rep.Job(name)
		if !ok {
			t.Fatalf("no result for job %s", name)
		}
		return r
	}
	// Sizes: the VM matches its tag (nproc and MemTotal from inside the VM).
	for _, c := range []struct {
		name       string
		vcpus, mib int
	}{{"small", 1, 1024}, {"large", 2, 2048}} {
		r := get(c.name)
		if r.GitLab.Status != "success" {
			t.Errorf("%s: GitLab status %s, want success\n%s", c.name, r.GitLab.Status, CleanTrace(r.GitLab.Trace))
			continue
		}
		tr := CleanTrace(r.GitLab.Trace)
		if !strings.Contains(tr, "NPROC="+strconv.Itoa(c.vcpus)+"\n") {
			t.Errorf("%s: trace lacks NPROC=%d:\n%s", c.name, c.vcpus, tr)
		}
		if mm := memTotal.FindStringSubmatch(tr); mm == nil {
			t.Errorf("%s: no MemTotal in trace", c.name)
		} else if kb, _ := strconv.Atoi(mm[1]); kb > c.mib*1024 || kb < c.mib*1024*85/100 {
			t.Errorf("%s: MemTotal %d kB does not match a %d MiB VM", c.name, kb, c.mib)
		}
		if !strings.Contains(tr, "HEAD="+r.GitLab.SHA) || !strings.Contains(tr, "A repository served by the GitLab stand-in") {
			t.Errorf("%s: the VM did not clone the pipeline's commit %s:\n%s", c.name, r.GitLab.SHA, tr)
		}
		if r.Record == nil || r.Record.VCPUs != c.vcpus || r.Record.MemoryMiB != c.mib || r.Record.State != job.Done {
			t.Errorf("%s: FireRunner record %+v", c.name, r.Record)
		}
		if r.Runner.ID == 0 || r.Runner.DeletedAt.IsZero() || !sameTags(r.Runner.Tags, r.Spec.Tags) || r.Runner.RunUntagged || !r.Runner.Locked {
			t.Errorf("%s: runner %+v: want deleted, tags %v, run_untagged=false, locked", c.name, r.Runner, r.Spec.Tags)
		}
		if r.Guest == nil {
			t.Errorf("%s: no guest timeline", c.name)
		} else if _, ok := r.Guest.At(vm.MilestoneAgentStart); !ok {
			t.Errorf("%s: guest agent never started:\n%s", c.name, r.Guest)
		}
	}
	if s, l := get("small"), get("large"); !strings.Contains(CleanTrace(l.GitLab.Trace), fmt.Sprintf("GOT=artifact of job %d", s.GitLab.ID)) {
		t.Errorf("large did not get small's artifact:\n%s", CleanTrace(l.GitLab.Trace))
	}
	// The job without a FireRunner tag got nothing.
	if r := get("untagged"); r.Record != nil || r.GitLab.Status != "pending" || r.GitLab.RunnerID != 0 {
		t.Errorf("untagged: record %+v, status %s, runner %d; want no record, still pending", r.Record, r.GitLab.Status, r.GitLab.RunnerID)
	}
	// The failing job failed with its exit code, and its VM is gone.
	if r := get("fails"); r.GitLab.Status != "failed" || r.GitLab.ExitCode != 3 || r.Record == nil ||
		!r.Record.State.Terminal() || !strings.HasPrefix(r.Record.Reason, job.ReasonJobFailed) || r.VM == nil || r.VM.Timeline.Destroyed.IsZero() {
		t.Errorf("fails: GitLab %s exit %d, record %+v", r.GitLab.Status, r.GitLab.ExitCode, r.Record)
	}
	// The canceled job: canceled in GitLab, and FireRunner tore its VM down
	// because of the cancel (not because `sleep 600` ended).
	if r := get("canceled"); r.GitLab.Status != "canceled" || r.Record == nil || r.Record.State != job.Canceled ||
		!strings.HasPrefix(r.Record.Reason, job.ReasonJobCanceled) || r.VM == nil || r.VM.Timeline.Destroyed.IsZero() || r.CanceledAt.IsZero() {
		t.Errorf("canceled: GitLab %s, record %+v", r.GitLab.Status, r.Record)
	}
	if rep.RunnersCreated != 4 {
		t.Errorf("runners created: %d, want 4 (one per tagged job)", rep.RunnersCreated)
	}
	if len(rep.Leftovers) > 0 {
		t.Errorf("left behind: %v", rep.Leftovers)
	}
	if ps := vm.FindProcs(work); len(ps) > 0 {
		t.Errorf("VMM processes still running: %v", ps)
	}
	if tok := regexp.MustCompile(`glrt-[A-Za-z0-9_-]{12,}`).FindString(logs.String()); tok != "" {
		t.Errorf("a runner token appears in FireRunner's logs")
	}
}

func sameTags(a, b []string) bool {
	if len(a) != len(b) {
		return false
	}
	for _, x := range a {
		found := false
		for _, y := range b {
			found = found || x == y
		}
		if !found {
			return false
		}
	}
	return true
}

// TestJobPastMaxDurationEndsInGitLab: a job that runs past
// limits.job_max_duration is ended in its VM by the agent, which reports
// it to GitLab as failed (job_execution_timeout) with a line in its trace,
// instead of the host killing the VM and leaving the job "running" in
// GitLab with nothing behind it.
func TestJobPastMaxDurationEndsInGitLab(t *testing.T) {
	testenv.RequireRoot(t)
	testenv.QEMU(t)
	dir := testenv.ImageDir(t)
	requireRunnerImage(t, dir)
	var out bytes.Buffer
	work := t.TempDir()
	rep, err := Run(context.Background(), Options{
		ImageDir: dir, WorkDir: work, Out: &out, LogOut: &testenv.Buffer{}, JobMaxDuration: time.Minute,
		Jobs: []gitlabstandin.JobSpec{{Name: "endless", Tags: []string{"firecracker-1cpu-1gb"}, Script: []string{"echo started", "sleep 600"}}},
	})
	os.Stdout.Write(out.Bytes())
	if err != nil {
		t.Fatalf("demo run: %v", err)
	}
	r, ok := rep.Job("endless")
	if !ok {
		t.Fatal("no result for job endless")
	}
	tr := CleanTrace(r.GitLab.Trace)
	if r.GitLab.Status != "failed" || r.GitLab.FailureReason != "job_execution_timeout" ||
		!strings.Contains(tr, "started") || !strings.Contains(tr, "FireRunner: the job reached FireRunner's time limit") {
		t.Errorf("GitLab: %s (%s), want failed (job_execution_timeout) with FireRunner's line in the trace:\n%s",
			r.GitLab.Status, r.GitLab.FailureReason, tr)
	}
	if r.Record == nil || r.Record.State != job.Failed || r.VM == nil || r.VM.Timeline.Destroyed.IsZero() {
		t.Errorf("FireRunner: record %+v, vm %+v; want failed, its VM destroyed", r.Record, r.VM)
	} else if strings.HasPrefix(r.VM.Reason, job.ReasonMaxDuration) {
		// The guest's report ends the job in GitLab, and FireRunner then
		// stops the VM as after any job (ran_job), before its own limit.
		t.Errorf("the VM was stopped by the host's limit (%q), not after the guest reported the job's end", r.VM.Reason)
	}
	if len(rep.Leftovers) > 0 {
		t.Errorf("left behind: %v", rep.Leftovers)
	}
	if t.Failed() && r.VM != nil {
		if b, err := os.ReadFile(filepath.Join(work, "console", r.VM.ID+".log")); err == nil {
			t.Logf("console of %s:\n%s", r.VM.ID, b)
		}
	}
}
