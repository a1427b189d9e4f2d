package store

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/firerunner/firerunner/internal/job"
)

func newJob(id int64) job.Job {
	return job.Job{ID: id, ProjectID: 7, ProjectPath: "g/p", Tags: []string{"firecracker-2cpu-4gb", "linux"},
		SizeTag: "firecracker-2cpu-4gb", VCPUs: 2, MemoryMiB: 4096, State: job.Queued, Source: "webhook",
		Timeline: job.Timeline{WebhookReceived: time.Now()}}
}

func TestCreateIdempotentAndTransitions(t *testing.T) {
	ctx := context.Background()
	dir := filepath.Join(t.TempDir(), "state")
	s, err := Open(ctx, dir)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	for _, p := range []struct {
		path string
		mode os.FileMode
	}{{dir, 0o700}, {filepath.Join(dir, FileName), 0o600}} {
		fi, err := os.Stat(p.path)
		if err != nil || fi.Mode().Perm() != p.mode {
			t.Fatalf("%s: mode %v err %v, want %v", p.path, fi.Mode().Perm(), err, p.mode)
		}
	}
	if _, created, err := s.Create(ctx, newJob(1)); err != nil || !created {
		t.Fatalf("create: %v %v", created, err)
	}
	dup := newJob(1)
	dup.ProjectPath = "other"
	got, created, err := s.Create(ctx, dup)
	if err != nil || created || got.ProjectPath != "g/p" {
		t.Fatalf("duplicate create: created=%v err=%v path=%q", created, err, got.ProjectPath)
	}
	if _, err := s.Update(ctx, 1, func(j *job.Job) error { j.State = job.Running; return nil }); !errors.As(err, new(*job.TransitionError)) {
		t.Fatalf("queued→running must be refused, got %v", err)
	}
	if _, err := s.Update(ctx, 1, func(j *job.Job) error {
		j.State, j.RunnerID, j.Timeline.RunnerCreated = job.RunnerCreated, 42, time.Now()
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if j, err := s.FindByRunner(ctx, 42); err != nil || j.ID != 1 {
		t.Fatalf("find by runner: %v %v", j.ID, err)
	}
	for _, st := range []job.State{job.VMStarting, job.Running, job.Cleaning, job.Failed} {
		st := st
		if _, err := s.Update(ctx, 1, func(j *job.Job) error {
			j.State = st
			if st == job.Cleaning {
				j.Reason = job.ReasonMaxDuration
				code := 3
				j.ExitCode = &code
			}
			return nil
		}); err != nil {
			t.Fatal(err)
		}
	}
	s.Close()

	// Reopen: state survives, migrations are not re-applied.
	s, err = Open(ctx, dir)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	j, err := s.Get(ctx, 1)
	if err != nil {
		t.Fatal(err)
	}
	if j.State != job.Failed || j.Reason != job.ReasonMaxDuration || j.ExitCode == nil || *j.ExitCode != 3 || j.Timeline.Finished.IsZero() || len(j.Tags) != 2 {
		t.Fatalf("reloaded job wrong: %+v", j)
	}
	tr, err := s.Transitions(ctx, 1)
	if err != nil || len(tr) != 6 || tr[0].To != job.Queued || tr[5].To != job.Failed {
		t.Fatalf("transitions: %+v %v", tr, err)
	}
	if v, _ := s.SchemaVersion(ctx); v != len(migrations)-1 {
		t.Fatalf("schema version %d", v)
	}
	act, _ := s.List(ctx, Filter{ActiveOnly: true})
	if len(act) != 0 {
		t.Fatalf("active jobs: %d", len(act))
	}
	if _, err := s.Get(ctx, 99); !errors.Is(err, ErrNotFound) {
		t.Fatalf("get unknown: %v", err)
	}
	ro, err := OpenReadOnly(ctx, dir)
	if err != nil {
		t.Fatal(err)
	}
	defer ro.Close()
	all, err := ro.List(ctx, Filter{Limit: 10})
	if err != nil || len(all) != 1 {
		t.Fatalf("read-only list: %d %v", len(all), err)
	}
	if _, _, err := ro.Create(ctx, newJob(2)); err == nil {
		t.Fatal("read-only store accepted a write")
	}
}

// TestDisplaced: a job whose VM ran another job is displaced until a VM of
// ours picks it; old records and jobs that ran on their own VM are not.
func TestDisplaced(t *testing.T) {
	ctx := context.Background()
	s, err := Open(ctx, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	// finish runs job id on its own VM, which picked job picked (0: none).
	finish := func(id, picked int64, end job.State) {
		t.Helper()
		if _, _, err := s.Create(ctx, newJob(id)); err != nil {
			t.Fatal(err)
		}
		if _, err := s.UpdatePath(ctx, id, []job.State{job.RunnerCreated, job.VMStarting, job.Running, job.Cleaning, end}, func(j *job.Job) error {
			j.RunnerID, j.VMID, j.PickedJobID = id+1000, job.VMIDFor(id), picked
			return nil
		}); err != nil {
			t.Fatal(err)
		}
	}
	since := time.Now()
	finish(1, 2, job.Done)   // ran 2: 1 is displaced...
	finish(2, 2, job.Done)   // ran its own job
	finish(3, 4, job.Failed) // ran 4: 3 is displaced...
	finish(5, 3, job.Done)   // ...until 5's VM picked 3 (now 5 is displaced)
	finish(6, 0, job.Failed) // picked nothing
	finish(7, 5, job.Done)   // 7's VM picked 5 (7 is displaced)
	got, err := s.Displaced(ctx, since)
	var ids []int64
	for _, j := range got {
		ids = append(ids, j.ID)
	}
	if err != nil || !slices.Equal(ids, []int64{1, 7}) {
		t.Fatalf("displaced = %v, %v; want [1 7]", ids, err)
	}
	if got, err := s.Displaced(ctx, time.Now().Add(time.Minute)); err != nil || len(got) != 0 {
		t.Fatalf("displaced since later = %+v, %v; want none", got, err)
	}
}
