package job

import (
	"errors"
	"testing"
	"time"

	"github.com/firerunner/firerunner/internal/tags"
)

func TestJobOperations(t *testing.T) {
	now := time.Now()
	size := tags.Size{VCPUs: 1, MemoryGiB: 1}
	j := Job{ID: 7, State: New}
	if !j.Observe(StatusPending, 0, now) || j.Observe(StatusPending, 0, now) {
		t.Fatal("observe pending twice")
	}
	if !j.Observe(StatusRunning, 5, now) || j.Observe(StatusPending, 0, now) || j.GitLabStatus != StatusRunning || j.GitLabRunner != 5 {
		t.Fatalf("observations must never go backwards: %+v", j)
	}
	if err := j.Accept([]string{"firecracker-1cpu-1gb"}, size, now); err != nil || j.State != Queued || j.MemoryMiB != 1024 {
		t.Fatalf("accept: %v %+v", err, j)
	}
	if err := j.Retry(ReasonVMStart+": x", now.Add(time.Second)); err != nil || j.Attempts != 1 || j.Reason != "vm_start: x (attempt 1)" {
		t.Fatalf("retry: %v %+v", err, j)
	}
	if err := j.Wait(ReasonRunnerLimit+": cap", now.Add(time.Minute)); err != nil || j.State != Queued || j.Attempts != 1 ||
		j.Reason != "runner_limit: cap" || !j.NotBefore.Equal(now.Add(time.Minute)) {
		t.Fatalf("wait (no attempt charged): %v %+v", err, j)
	}
	if err := j.Picked("fr-a", 5, now); err != nil || j.State != Running || j.Reason != "" {
		t.Fatalf("picked: %v %+v", err, j)
	}
	if err := j.Picked("fr-a", 5, now); err != nil {
		t.Fatalf("picked again by the same VM must be a no-op: %v", err)
	}
	if err := j.Picked("fr-b", 6, now); !errors.Is(err, ErrStale) {
		t.Fatalf("picked by another runner: %v", err)
	}
	if err := j.Retry("x", now); !errors.Is(err, ErrStale) {
		t.Fatalf("retry of a running job: %v", err)
	}
	if err := j.Wait("x", now); !errors.Is(err, ErrStale) {
		t.Fatalf("wait of a running job: %v", err)
	}
	code := 0
	if err := j.Finish(StatusSkipped, &code); err != nil || j.State != Canceled || j.Reason != ReasonJobCanceled || *j.ExitCode != 0 {
		t.Fatalf("finish: %v %+v", err, j)
	}
	if err := j.Finish(StatusSuccess, nil); !errors.Is(err, ErrStale) {
		t.Fatalf("finish twice: %v", err)
	}
	n := Job{ID: 8, State: New}
	if err := n.Ignore([]string{"linux"}, ReasonNotOurs); err != nil || !n.State.Terminal() {
		t.Fatalf("ignore: %v", err)
	}
	q := Job{ID: 9, State: Queued}
	if err := q.Fail("x", nil); !errors.Is(err, ErrStale) {
		t.Fatalf("fail of a queued job: %v", err)
	}
	if err := q.GiveUp(ReasonTooBig); err != nil || q.State != Failed {
		t.Fatalf("give up: %v", err)
	}
	var te *TransitionError
	if err := (&Job{ID: 1, State: Done}).move(Queued, ""); !errors.As(err, &te) {
		t.Fatalf("done → queued: %v", err)
	}
}

func TestVMOperations(t *testing.T) {
	now := time.Now()
	j := Job{ID: 1, ProjectID: 3, Tags: []string{"firecracker-1cpu-1gb"}, VCPUs: 1, MemoryMiB: 1024}
	v := PlanVM(NewVMID(), "h", j, now)
	if len(v.ID) != 13 || v.State != VMPending || !v.State.Idle() {
		t.Fatalf("plan: %+v", v)
	}
	other := Job{ID: 2, ProjectID: 3, Tags: []string{"firecracker-1cpu-1gb", "linux"}, VCPUs: 1, MemoryMiB: 1024}
	if err := v.Retarget(other); err != nil || v.ForJob != 2 || v.TagsStale {
		t.Fatalf("retarget before the runner exists: %v %+v", err, v)
	}
	if err := v.RunnerCreated(10, j.Tags, now); err != nil || v.State != VMStarting || !v.TagsStale {
		t.Fatalf("runner created with the old tags must mark them stale: %v %+v", err, v)
	}
	if err := v.Retarget(Job{ID: 3, ProjectID: 4, VCPUs: 1, MemoryMiB: 1024}); !errors.Is(err, ErrStale) {
		t.Fatal("retargeted to another project's job")
	}
	if err := v.Picked(1, now); err != nil || v.State != VMBusy {
		t.Fatalf("picked: %v", err)
	}
	if err := v.Picked(2, now); !errors.Is(err, ErrStale) {
		t.Fatalf("one runner, one job: %v", err)
	}
	if err := v.Retarget(other); !errors.Is(err, ErrStale) {
		t.Fatal("a busy VM was retargeted")
	}
	if err := v.Stop(ReasonRanJob, now); err != nil || v.Stop(ReasonIdle, now) != nil || v.Reason != ReasonRanJob {
		t.Fatalf("stop: first reason wins: %+v", v)
	}
	if err := v.Gone(now); err != nil || v.State.Live() {
		t.Fatalf("gone: %v", err)
	}
	if err := v.Stop(ReasonIdle, now); !errors.Is(err, ErrStale) {
		t.Fatalf("stop after gone: %v", err)
	}
	// Stopped while its runner was being created: keeps the id, stays stopping.
	w := PlanVM(NewVMID(), "h", j, now)
	_ = w.Stop(ReasonJobEnded, now)
	if err := w.RunnerCreated(11, j.Tags, now); err != nil || w.State != VMStopping || w.RunnerID != 11 {
		t.Fatalf("runner created after stop: %v %+v", err, w)
	}
	if ReasonKey("vm_start: boom: x (attempt 2)") != "vm_start" || ReasonKey("attempts (attempt 3)") != "attempts" {
		t.Fatal("reason key")
	}
}

func TestSystemIDRoundTrip(t *testing.T) {
	for range 100 {
		id := NewVMID()
		sid := SystemID(id)
		back, ok := VMIDFromSystemID(sid)
		if !ok || back != id || len(sid) != 14 {
			t.Fatalf("%s → %s → %s %v", id, sid, back, ok)
		}
	}
	for _, bad := range []string{"", "s_c2d22f638c25", "r_fr0123456789", "s_frABCDEFGHIJ", "s_fr012345678"} {
		if _, ok := VMIDFromSystemID(bad); ok {
			t.Errorf("%q taken for one of our VMs", bad)
		}
	}
}
