package store

import (
	"context"
	"fmt"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/firerunner/firerunner/internal/job"
	"github.com/firerunner/firerunner/internal/tags"
)

// history builds records the way the controller writes them: job id ended
// (or not) with a VM for it that is gone (or not) and a runner deleted (or
// not), then dates every record of it at the given time.
type history struct {
	t *testing.T
	s *Store
}

func (h history) job(id int64, end job.State, vmLive bool, at time.Time) string {
	h.t.Helper()
	ctx, now := context.Background(), time.Now()
	observe(h.t, h.s, id, job.StatusPending, 0, true)
	size, _, _ := tags.Parse([]string{"firecracker-1cpu-1gb"}, tags.Limits{})
	must := func(err error) {
		h.t.Helper()
		if err != nil {
			h.t.Fatal(err)
		}
	}
	if end == job.Ignored {
		_, err := h.s.UpdateJob(ctx, id, func(j *job.Job) error { return j.Ignore(nil, job.ReasonNotOurs) })
		must(err)
		h.date(id, "", 0, at)
		return ""
	}
	_, err := h.s.UpdateJob(ctx, id, func(j *job.Job) error { return j.Accept([]string{"firecracker-1cpu-1gb"}, size, now) })
	must(err)
	j, _ := h.s.GetJob(ctx, id)
	v := job.PlanVM(job.NewVMID(), "h", j, now)
	runner := id + 1000
	must(h.s.Tx(ctx, func(tx *Tx) error {
		if err := tx.CreateVM(&v); err != nil {
			return err
		}
		if _, err := tx.UpdateVM(v.ID, func(x *job.VM) error { return x.RunnerCreated(runner, v.Tags, now) }); err != nil {
			return err
		}
		return tx.PutRunner(job.Runner{ID: runner, HostID: "h", Mode: "oneoff", VMID: v.ID, Tags: v.Tags})
	}))
	if end != job.Queued { // a queued job's VM never took it (a failed attempt)
		must(h.s.Tx(ctx, func(tx *Tx) error {
			if _, err := tx.UpdateVM(v.ID, func(x *job.VM) error { return x.Picked(id, now) }); err != nil {
				return err
			}
			_, err := tx.UpdateJob(id, func(j *job.Job) error { return j.Picked(v.ID, runner, now) })
			return err
		}))
	}
	if !vmLive {
		for _, step := range []func(x *job.VM) error{
			func(x *job.VM) error { return x.Stop(job.ReasonRanJob, now) },
			func(x *job.VM) error { x.Destroyed(now); x.RunnerDeleted(now); return x.Gone(now) },
		} {
			_, err := h.s.UpdateVM(ctx, v.ID, step)
			must(err)
		}
		must(h.s.Tx(ctx, func(tx *Tx) error { return tx.RunnerDeleted(runner) }))
	}
	if end.Terminal() {
		status := map[job.State]string{job.Done: job.StatusSuccess, job.Failed: job.StatusFailed, job.Canceled: job.StatusCanceled}[end]
		_, err := h.s.UpdateJob(ctx, id, func(j *job.Job) error { return j.Finish(status, nil) })
		must(err)
	}
	h.date(id, v.ID, runner, at)
	return v.ID
}

// date moves a job's, its VM's and its runner's records to time at.
func (h history) date(id int64, vmID string, runner int64, at time.Time) {
	h.t.Helper()
	for _, q := range []struct {
		sql string
		arg any
	}{
		{`UPDATE jobs SET updated_at = ?1, created_at = ?1 WHERE job_id = ?2`, id},
		{`UPDATE transitions SET at = ?1 WHERE job_id = ?2`, id},
		{`UPDATE vms SET updated_at = ?1, created_at = ?1 WHERE vm_id = ?2`, vmID},
		{`UPDATE vm_transitions SET at = ?1 WHERE vm_id = ?2`, vmID},
		{`UPDATE runners SET created_at = ?1, deleted_at = CASE WHEN deleted_at = 0 THEN 0 ELSE CAST(?1 AS BIGINT) END WHERE runner_id = ?2`, runner},
	} {
		if _, err := h.s.db.Exec(h.s.bind(q.sql), at.UnixNano(), q.arg); err != nil {
			h.t.Fatal(err)
		}
	}
}

func (h history) rows(table string) int {
	var n int
	if err := h.s.db.QueryRow(`SELECT COUNT(*) FROM ` + table).Scan(&n); err != nil {
		h.t.Fatal(err)
	}
	return n
}

// TestPrune: ended jobs older than the cutoff go with their transitions,
// their gone VMs (and those VMs' transitions) and their deleted runners;
// recent history, active jobs, live VMs and what an active job's timeline
// shows stay; the per-state job counts stay exact.
func TestPrune(t *testing.T) { eachBackend(t, testPrune) }

func testPrune(t *testing.T, b backend) {
	ctx := context.Background()
	s := b.open(t)
	h := history{t, s}
	old, recent := time.Now().Add(-20*24*time.Hour), time.Now().Add(-2*24*time.Hour)
	h.job(1, job.Done, false, old)
	h.job(2, job.Failed, false, old)
	h.job(3, job.Canceled, false, old)
	h.job(4, job.Ignored, false, old)
	h.job(5, job.Done, false, recent) // within retention
	h.job(6, job.Running, true, old)  // active, its VM live
	h.job(7, job.Done, true, old)     // ended, but its VM is still being torn down
	h.job(8, job.Queued, false, old)  // its VM gone, the job still waiting: its timeline keeps the VM

	cut := time.Now().Add(-14 * 24 * time.Hour)
	p, err := s.Prune(ctx, cut)
	if err != nil {
		t.Fatal(err)
	}
	// Runners deleted before the cutoff go whatever their VM: 1-3 and 8's.
	if p.Jobs != 4 || p.VMs != 3 || p.Runners != 4 || p.Transitions == 0 {
		t.Fatalf("pruned %+v, want 4 jobs (1-4), 3 VMs (of 1-3) and 4 runners (of 1-3, 8)", p)
	}
	var left []int64
	for id := int64(1); id <= 8; id++ {
		if _, err := s.GetJob(ctx, id); err == nil {
			left = append(left, id)
		}
	}
	if !slices.Equal(left, []int64{5, 6, 7, 8}) {
		t.Fatalf("jobs left %v, want 5 6 7 8", left)
	}
	for _, id := range left {
		tr, err := s.Transitions(ctx, id)
		if err != nil || len(tr) == 0 || tr[0].Object != "job" || tr[0].To != "new" {
			t.Errorf("job %d kept, but its timeline lost its start: %+v %v", id, tr, err)
		}
		if vms, _ := s.ListVMs(ctx, false, id); len(vms) != 1 {
			t.Errorf("job %d kept, but its VM went: %+v", id, vms)
		}
	}
	for table, want := range map[string]int{"transitions WHERE job_id <= 4": 0, "vms WHERE for_job <= 4": 0,
		"vm_transitions WHERE vm_id NOT IN (SELECT vm_id FROM vms)": 0, "runners WHERE runner_id <= 1004": 0, "runners": 3} {
		if n := h.rows(table); n != want {
			t.Errorf("%s: %d rows, want %d", table, n, want)
		}
	}
	checkCounts(t, s)
	// Idempotent; and with a later cutoff the rest of the ended history goes.
	if p, err := s.Prune(ctx, cut); err != nil || p.Any() {
		t.Fatalf("second prune %+v %v", p, err)
	}
	if p, err := s.Prune(ctx, time.Time{}); err != nil || p.Any() {
		t.Fatalf("prune with the zero time (retention 0: keep everything): %+v %v", p, err)
	}
	if p, err := s.Prune(ctx, time.Now().Add(time.Hour)); err != nil || p.Jobs != 1 {
		t.Fatalf("prune of everything ended: %+v %v, want job 5 only", p, err)
	}
	checkCounts(t, s)
}

// Prune works in batches and stops at its per-call bound; the next call
// goes on.
func TestPruneBatches(t *testing.T) { eachBackend(t, testPruneBatches) }

func testPruneBatches(t *testing.T, b backend) {
	defer func(b, m int) { pruneBatch, pruneMaxPerCall = b, m }(pruneBatch, pruneMaxPerCall)
	pruneBatch, pruneMaxPerCall = 3, 6
	ctx := context.Background()
	s := b.open(t)
	h := history{t, s}
	old := time.Now().Add(-30 * 24 * time.Hour)
	for id := int64(1); id <= 10; id++ {
		h.job(id, job.Ignored, false, old)
	}
	cut := time.Now().Add(-24 * time.Hour)
	for _, want := range []int64{6, 4, 0} {
		p, err := s.Prune(ctx, cut)
		if err != nil || p.Jobs != want {
			t.Fatalf("prune: %+v %v, want %d jobs", p, err, want)
		}
	}
	checkCounts(t, s)
}

// checkCounts: the trigger-kept job counts equal a real count.
func checkCounts(t *testing.T, s *Store) {
	t.Helper()
	got, _, err := s.Count(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	real := map[job.State]int{}
	rows, err := s.db.Query(`SELECT state, COUNT(*) FROM jobs GROUP BY state`)
	if _, err := scanRows(rows, err, func(r scanner) (int, error) {
		var st string
		var n int
		err := r.Scan(&st, &n)
		real[job.State(st)] = n
		return n, err
	}); err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(got) != fmt.Sprint(real) {
		t.Fatalf("job counts %v, real %v", got, real)
	}
}

// TestQueriesUseIndexes: every query of a job's path, of a /metrics scrape
// and of Prune is an index search, never a scan of a table that grows with
// the history (jobs, vms, runners, transitions). A scan is accepted only
// over a partial index of live records or the per-state counts.
func TestQueriesUseIndexes(t *testing.T) {
	s := open(t, t.TempDir())
	liveJobs, _ := listJobsSQL(Filter{ActiveOnly: true})
	byState, _ := listJobsSQL(Filter{State: job.Queued})
	newest, _ := listJobsSQL(Filter{Limit: 50})
	liveVMs, _ := listVMsSQL(true, 0)
	jobVMs, _ := listVMsSQL(false, 7)
	qs := map[string]string{
		"count jobs": countJobsSQL, "count vms": countVMsSQL, "active jobs": liveJobs, "queued jobs": byState,
		"newest jobs": newest, "live vms": liveVMs, "a job's vms": jobVMs, "transitions": transitionsSQL,
		"projects": projectsSQL, "prune jobs": pruneJobsSQL, "prune vms": pruneVMsSQL, "prune runners": pruneRunnersSQL,
	}
	for name, q := range queries {
		qs[name] = q
	}
	// Scans allowed: bounded partial indexes (live VMs, existing runners),
	// the per-state counts, the projects (one row per project, not per
	// job), and the newest-N listing (index order, stops at its LIMIT).
	ok := regexp.MustCompile(`^(SEARCH |SCAN job_counts|SCAN (vms|runners) USING (COVERING )?INDEX (vms_live|runners_active)\b|SCAN jobs USING INDEX jobs_created\b|USE TEMP B-TREE|SCAN json_each|SCAN projects\b|MERGE \(UNION ALL\)|LEFT$|RIGHT$|COMPOUND QUERY|LEFT-MOST SUBQUERY|UNION ALL|CORRELATED SCALAR SUBQUERY|SCALAR SUBQUERY|LIST SUBQUERY|CO-ROUTINE|SCAN \(subquery|MULTI-INDEX OR|INDEX \d|SCAN CONSTANT ROW|MATERIALIZE)`)
	for name, q := range qs {
		if !strings.HasPrefix(strings.TrimSpace(q), "SELECT") && !strings.HasPrefix(strings.TrimSpace(q), "UPDATE") && !strings.HasPrefix(strings.TrimSpace(q), "INSERT") {
			continue
		}
		n := strings.Count(q, "?")
		args := make([]any, n)
		for i := range args {
			args[i] = 1
		}
		rows, err := s.db.Query(`EXPLAIN QUERY PLAN `+q, args...)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		var plan []string
		for rows.Next() {
			var id, parent, notused int
			var detail string
			if err := rows.Scan(&id, &parent, &notused, &detail); err != nil {
				t.Fatal(err)
			}
			plan = append(plan, detail)
		}
		rows.Close()
		for _, step := range plan {
			if !ok.MatchString(step) {
				t.Errorf("%s scans: %q\nplan: %q\nquery: %s", name, step, plan, q)
			}
		}
	}
}
