package store

import (
	"context"
	"database/sql"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/firerunner/firerunner/internal/job"
	"github.com/firerunner/firerunner/internal/tags"
	"github.com/firerunner/firerunner/internal/testsupport/pgtest"
)

func open(t *testing.T, dir string) *Store {
	t.Helper()
	s, err := Open(context.Background(), dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func TestMain(m *testing.M) { os.Exit(pgtest.Main(m)) }

// backend is one database a test runs on: the store's suite runs on
// SQLite and on PostgreSQL (a fresh database in the test binary's
// throwaway cluster).
type backend struct {
	name string
	dir  string // sqlite: the state directory
	dsn  string // postgres
}

// open opens (or opens again) the test's database.
func (b backend) open(t *testing.T) *Store {
	t.Helper()
	if b.name == "sqlite" {
		return open(t, b.dir)
	}
	s, err := OpenPostgres(context.Background(), b.dsn)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func (b backend) openReadOnly(t *testing.T) (*Store, error) {
	if b.name == "sqlite" {
		return OpenReadOnly(context.Background(), b.dir)
	}
	return OpenPostgresReadOnly(context.Background(), b.dsn)
}

// eachBackend runs fn once per backend, as subtests.
func eachBackend(t *testing.T, fn func(t *testing.T, b backend)) {
	t.Run("sqlite", func(t *testing.T) { fn(t, backend{name: "sqlite", dir: filepath.Join(t.TempDir(), "state")}) })
	t.Run("postgres", func(t *testing.T) { fn(t, backend{name: "postgres", dsn: pgtest.NewDatabase(t)}) })
}

func observe(t *testing.T, s *Store, id int64, status string, runner int64, create bool) (bool, bool) {
	t.Helper()
	known, changed, err := s.Observe(context.Background(), Observation{JobID: id, ProjectID: 7, ProjectPath: "g/p", Status: status,
		RunnerID: runner, Source: "webhook", At: time.Now(), Create: create})
	if err != nil {
		t.Fatal(err)
	}
	return known, changed
}

func TestJobLifecycleAndTransitions(t *testing.T) { eachBackend(t, testJobLifecycleAndTransitions) }

func testJobLifecycleAndTransitions(t *testing.T, b backend) {
	ctx := context.Background()
	dir := b.dir
	s := b.open(t)
	for _, p := range []struct {
		path string
		mode os.FileMode
	}{{dir, 0o700}, {filepath.Join(dir, FileName), 0o600}} {
		if b.name != "sqlite" {
			break
		}
		fi, err := os.Stat(p.path)
		if err != nil || fi.Mode().Perm() != p.mode {
			t.Fatalf("%s: mode %v err %v, want %v", p.path, fi.Mode().Perm(), err, p.mode)
		}
	}
	if known, changed := observe(t, s, 1, job.StatusPending, 0, true); !known || !changed {
		t.Fatalf("first pending: known %v changed %v", known, changed)
	}
	if _, changed := observe(t, s, 1, job.StatusPending, 0, true); changed {
		t.Fatal("duplicate pending changed the record")
	}
	if known, _ := observe(t, s, 2, job.StatusRunning, 5, false); known {
		t.Fatal("an event for an unknown job without Create made a record")
	}
	observe(t, s, 1, job.StatusSuccess, 9, true)
	observe(t, s, 1, job.StatusRunning, 9, true) // late, older event
	j, err := s.GetJob(ctx, 1)
	if err != nil || j.State != job.New || j.GitLabStatus != job.StatusSuccess || j.GitLabRunner != 9 {
		t.Fatalf("observations: %+v %v", j, err)
	}
	size, _, _ := tags.Parse([]string{"firecracker-2cpu-4gb"}, tags.Limits{})
	if _, err := s.UpdateJob(ctx, 1, func(j *job.Job) error { return j.Accept([]string{"firecracker-2cpu-4gb"}, size, time.Now()) }); err != nil {
		t.Fatal(err)
	}
	if _, err := s.UpdateJob(ctx, 1, func(j *job.Job) error { return j.Retry(job.ReasonVMStart+": boom", time.Now()) }); err != nil {
		t.Fatal(err)
	}
	if _, err := s.UpdateJob(ctx, 1, func(j *job.Job) error { j.State = job.New; return nil }); !errors.As(err, new(*job.TransitionError)) {
		t.Fatalf("queued → new must be refused, got %v", err)
	}
	if _, err := s.UpdateJob(ctx, 1, func(j *job.Job) error { return j.Finish(job.StatusFailed, nil) }); err != nil {
		t.Fatal(err)
	}
	s.Close()

	s = b.open(t)
	j, err = s.GetJob(ctx, 1)
	if err != nil || j.State != job.Failed || j.Reason != job.ReasonJobFailed || j.Attempts != 1 || j.VCPUs != 2 || j.Timeline.Finished.IsZero() {
		t.Fatalf("reloaded job wrong: %+v %v", j, err)
	}
	tr, err := s.Transitions(ctx, 1)
	if err != nil || len(tr) != 4 || tr[0].To != "new" || tr[1].To != "queued" || tr[2].Reason != "vm_start: boom (attempt 1)" || tr[3].To != "failed" {
		t.Fatalf("transitions: %+v %v", tr, err)
	}
	if v, _ := s.SchemaVersion(ctx); v != len(migrations)-1 || v != len(pgMigrations)-1 {
		t.Fatalf("schema version %d", v)
	}
	if _, err := s.GetJob(ctx, 99); !errors.Is(err, ErrNotFound) {
		t.Fatalf("get unknown: %v", err)
	}
	if ps, err := s.Projects(ctx, time.Now().Add(-time.Hour)); err != nil || len(ps) != 1 || ps[0] != 7 {
		t.Fatalf("projects: %v %v", ps, err)
	}
	ro, err := b.openReadOnly(t)
	if err != nil {
		t.Fatal(err)
	}
	defer ro.Close()
	if all, err := ro.ListJobs(ctx, Filter{Limit: 10}); err != nil || len(all) != 1 {
		t.Fatalf("read-only list: %d %v", len(all), err)
	}
	if _, _, err := ro.Observe(ctx, Observation{JobID: 3, Status: "pending", Create: true}); !errors.Is(err, ErrReadOnly) {
		t.Fatalf("read-only store accepted a write: %v", err)
	}
}

// TestVMAndRunnerRecords: a VM and its runner commit together; the VM's
// transitions show in the timeline of the job it ran.
func TestVMAndRunnerRecords(t *testing.T) { eachBackend(t, testVMAndRunnerRecords) }

func testVMAndRunnerRecords(t *testing.T, b backend) {
	ctx := context.Background()
	s := b.open(t)
	observe(t, s, 1, job.StatusPending, 0, true)
	observe(t, s, 2, job.StatusPending, 0, true)
	size, _, _ := tags.Parse([]string{"firecracker-1cpu-1gb"}, tags.Limits{})
	for _, id := range []int64{1, 2} {
		if _, err := s.UpdateJob(ctx, id, func(j *job.Job) error { return j.Accept([]string{"firecracker-1cpu-1gb"}, size, time.Now()) }); err != nil {
			t.Fatal(err)
		}
	}
	j1, _ := s.GetJob(ctx, 1)
	v := job.PlanVM(job.NewVMID(), "h1", j1, time.Now())
	if err := s.Tx(ctx, func(tx *Tx) error { return tx.CreateVM(&v) }); err != nil {
		t.Fatal(err)
	}
	if err := s.Tx(ctx, func(tx *Tx) error {
		if _, err := tx.UpdateVM(v.ID, func(x *job.VM) error { return x.RunnerCreated(77, v.Tags, time.Now()) }); err != nil {
			return err
		}
		return tx.PutRunner(job.Runner{ID: 77, HostID: "h1", Mode: "oneoff", VMID: v.ID, Tags: v.Tags})
	}); err != nil {
		t.Fatal(err)
	}
	// The runner made for job 1 takes job 2.
	if err := s.Tx(ctx, func(tx *Tx) error {
		if _, err := tx.UpdateVM(v.ID, func(x *job.VM) error { return x.Picked(2, time.Now()) }); err != nil {
			return err
		}
		_, err := tx.UpdateJob(2, func(j *job.Job) error { return j.Picked(v.ID, 77, time.Now()) })
		return err
	}); err != nil {
		t.Fatal(err)
	}
	if got, err := s.VMByRunner(ctx, 77); err != nil || got.State != job.VMBusy || got.PickedJobID != 2 {
		t.Fatalf("vm by runner: %+v %v", got, err)
	}
	if _, err := s.UpdateVM(ctx, v.ID, func(x *job.VM) error { return x.Picked(1, time.Now()) }); !errors.Is(err, job.ErrStale) {
		t.Fatalf("a runner taking a second job must be refused, got %v", err)
	}
	// A failing write inside a Tx leaves nothing behind.
	boom := errors.New("boom")
	if err := s.Tx(ctx, func(tx *Tx) error {
		if err := tx.RunnerDeleted(77); err != nil {
			return err
		}
		return boom
	}); !errors.Is(err, boom) {
		t.Fatal(err)
	}
	if rs, _ := s.ListRunners(ctx, true); len(rs) != 1 {
		t.Fatalf("rolled-back delete took effect: %+v", rs)
	}
	for _, step := range []func(x *job.VM) error{
		func(x *job.VM) error { return x.Stop(job.ReasonRanJob, time.Now()) },
		func(x *job.VM) error { x.Destroyed(time.Now()); x.RunnerDeleted(time.Now()); return x.Gone(time.Now()) },
	} {
		if _, err := s.UpdateVM(ctx, v.ID, step); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.Tx(ctx, func(tx *Tx) error { return tx.RunnerDeleted(77) }); err != nil {
		t.Fatal(err)
	}
	if live, _ := s.ListVMs(ctx, true, 0); len(live) != 0 {
		t.Fatalf("live vms: %+v", live)
	}
	if rs, _ := s.ListRunners(ctx, true); len(rs) != 0 {
		t.Fatalf("active runners: %+v", rs)
	}
	tr, _ := s.Transitions(ctx, 2)
	var vmSteps []string
	for _, x := range tr {
		if x.Object == "vm" {
			vmSteps = append(vmSteps, x.To)
		}
	}
	if len(vmSteps) != 5 || vmSteps[4] != "gone" {
		t.Fatalf("job 2's timeline lacks the VM that ran it: %+v", tr)
	}
	jobs, vms, err := s.Count(ctx)
	if err != nil || jobs[job.Queued] != 1 || jobs[job.Running] != 1 || len(vms) != 0 {
		t.Fatalf("counts %v %v %v", jobs, vms, err)
	}
}

// TestMigrationFromV2: a store written by the previous release, with jobs in
// flight, opens with those jobs queued again and its history kept.
func TestMigrationFromV2(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	db, err := sql.Open("sqlite", dsn(filepath.Join(dir, FileName), false))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := db.Exec(`CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_at INTEGER NOT NULL)`); err != nil {
		t.Fatal(err)
	}
	for v := 1; v <= 2; v++ {
		if _, err := db.Exec(migrations[v]); err != nil {
			t.Fatal(err)
		}
		if _, err := db.Exec(`INSERT INTO schema_migrations VALUES (?, 0)`, v); err != nil {
			t.Fatal(err)
		}
	}
	for _, r := range []struct {
		id    int
		state string
	}{{1, "running"}, {2, "done"}, {3, "runner_created"}} {
		if _, err := db.Exec(`INSERT INTO jobs(job_id, project_id, state, created_at, updated_at, tags) VALUES (?, 5, ?, 1, 1, '["firecracker-1cpu-1gb"]')`, r.id, r.state); err != nil {
			t.Fatal(err)
		}
	}
	db.Close()
	s := open(t, dir)
	for id, want := range map[int64]job.State{1: job.Queued, 2: job.Done, 3: job.Queued} {
		if j, err := s.GetJob(ctx, id); err != nil || j.State != want {
			t.Fatalf("job %d after migration: %s %v, want %s", id, j.State, err, want)
		}
	}
}

// TestMigrationsPaired: every schema version exists in both dialects, so a
// migration added for one backend only fails here, not on a fleet's start.
func TestMigrationsPaired(t *testing.T) {
	if len(migrations) != len(pgMigrations) {
		t.Fatalf("SQLite has %d migrations, PostgreSQL %d: write each new one in both dialects", len(migrations)-1, len(pgMigrations)-1)
	}
	for v := 5; v < len(migrations); v++ {
		if migrations[v] == "" || pgMigrations[v] == "" {
			t.Errorf("migration %d is empty in a dialect", v)
		}
	}
}
