package store

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/firerunner/firerunner/internal/job"
)

var jobCols = []string{"job_id", "project_id", "project_path", "pipeline_id", "name", "ref", "tags", "size_tag", "vcpus", "memory_mib", "source",
	"state", "reason", "attempts", "not_before", "gitlab_status", "gitlab_runner", "observed_at", "vm_id", "runner_id", "exit_code",
	"created_at", "updated_at", "t_webhook", "t_tags", "t_vm_start_req", "t_job_picked", "t_finished", "host_id"}

var vmCols = []string{"vm_id", "host_id", "for_job", "project_id", "tags", "vcpus", "memory_mib", "state", "reason", "runner_id", "tags_stale",
	"picked_job_id", "exit_code", "exit_reason", "created_at", "updated_at", "t_planned", "t_runner_created", "t_start_req",
	"t_started", "t_picked", "t_exited", "t_stop_req", "t_destroyed", "t_runner_deleted", "t_gone", "t_assigned", "t_ready"}

var runnerCols = []string{"runner_id", "host_id", "mode", "vm_id", "tags", "created_at", "deleted_at"}

func insertSQL(table string, cols []string, conflict string) string {
	return `INSERT INTO ` + table + `(` + strings.Join(cols, ", ") + `) VALUES(` +
		strings.TrimSuffix(strings.Repeat("?, ", len(cols)), ", ") + `) ` + conflict
}

func updateSQL(table string, cols []string) string {
	return `UPDATE ` + table + ` SET ` + strings.Join(cols[1:], " = ?, ") + ` = ? WHERE ` + cols[0] + ` = ?`
}

func selectSQL(table string, cols []string, where string) string {
	return `SELECT ` + strings.Join(cols, ", ") + ` FROM ` + table + ` ` + where
}

// queries are prepared once per store (SELECTs only for a read-only one).
// vmByRunner's "runner_id != 0" lets SQLite use the partial index
// vms_runner (TestQueriesUseIndexes).
var queries = map[string]string{
	"getJob":     selectSQL("jobs", jobCols, `WHERE job_id = ?`),
	"lockJob":    selectSQL("jobs", jobCols, `WHERE job_id = ?`), // + FOR UPDATE on PostgreSQL
	"lockVM":     selectSQL("vms", vmCols, `WHERE vm_id = ?`),    // + FOR UPDATE on PostgreSQL
	"insertJob":  insertSQL("jobs", jobCols, `ON CONFLICT(job_id) DO NOTHING`),
	"updateJob":  updateSQL("jobs", jobCols),
	"jobTrans":   `INSERT INTO transitions(job_id, from_state, to_state, reason, at) VALUES(?,?,?,?,?)`,
	"getVM":      selectSQL("vms", vmCols, `WHERE vm_id = ?`),
	"insertVM":   insertSQL("vms", vmCols, ``),
	"updateVM":   updateSQL("vms", vmCols),
	"vmTrans":    `INSERT INTO vm_transitions(vm_id, from_state, to_state, reason, at) VALUES(?,?,?,?,?)`,
	"vmByRunner": selectSQL("vms", vmCols, `WHERE runner_id = ? AND runner_id != 0 ORDER BY created_at DESC LIMIT 1`),
	"putRunner":  insertSQL("runners", runnerCols, `ON CONFLICT(runner_id) DO UPDATE SET vm_id = excluded.vm_id, tags = excluded.tags, deleted_at = excluded.deleted_at`),
	"project":    `INSERT INTO projects(project_id, path, last_hook_at) VALUES(?,?,?) ON CONFLICT(project_id) DO UPDATE SET path = CASE WHEN excluded.path != '' THEN excluded.path ELSE projects.path END, last_hook_at = excluded.last_hook_at WHERE excluded.last_hook_at > projects.last_hook_at + 60000000000`,
}

func ns(t time.Time) int64 {
	if t.IsZero() {
		return 0
	}
	return t.UnixNano()
}

func tm(n int64) time.Time {
	if n == 0 {
		return time.Time{}
	}
	return time.Unix(0, n)
}

func jsonTags(t []string) string {
	if t == nil {
		return "[]"
	}
	b, _ := json.Marshal(t)
	return string(b)
}

func intPtr(p *int) any {
	if p == nil {
		return nil
	}
	return *p
}

func ptrInt(n sql.NullInt64) *int {
	if !n.Valid {
		return nil
	}
	v := int(n.Int64)
	return &v
}

type scanner interface{ Scan(dest ...any) error }

func jobArgs(j *job.Job) []any {
	t := j.Timeline
	return []any{j.ID, j.ProjectID, j.ProjectPath, j.PipelineID, j.Name, j.Ref, jsonTags(j.Tags), j.SizeTag, j.VCPUs, j.MemoryMiB, j.Source,
		string(j.State), j.Reason, j.Attempts, ns(j.NotBefore), j.GitLabStatus, j.GitLabRunner, ns(j.ObservedAt), j.VMID, j.RunnerID,
		intPtr(j.ExitCode), ns(j.CreatedAt), ns(j.UpdatedAt),
		ns(t.WebhookReceived), ns(t.TagsFetched), ns(t.VMStartRequest), ns(t.JobPicked), ns(t.Finished), j.HostID}
}

func scanJob(r scanner) (job.Job, error) {
	var j job.Job
	var tags, state string
	var exit sql.NullInt64
	var nb, obs, created, updated int64
	var tl [5]int64
	err := r.Scan(&j.ID, &j.ProjectID, &j.ProjectPath, &j.PipelineID, &j.Name, &j.Ref, &tags, &j.SizeTag, &j.VCPUs, &j.MemoryMiB, &j.Source,
		&state, &j.Reason, &j.Attempts, &nb, &j.GitLabStatus, &j.GitLabRunner, &obs, &j.VMID, &j.RunnerID, &exit, &created, &updated,
		&tl[0], &tl[1], &tl[2], &tl[3], &tl[4], &j.HostID)
	if errors.Is(err, sql.ErrNoRows) {
		return j, ErrNotFound
	}
	if err != nil {
		return j, err
	}
	if err := json.Unmarshal([]byte(tags), &j.Tags); err != nil {
		return j, fmt.Errorf("job %d: bad tags column: %w", j.ID, err)
	}
	j.State, j.ExitCode = job.State(state), ptrInt(exit)
	j.NotBefore, j.ObservedAt, j.CreatedAt, j.UpdatedAt = tm(nb), tm(obs), tm(created), tm(updated)
	j.Timeline = job.Timeline{WebhookReceived: tm(tl[0]), TagsFetched: tm(tl[1]), VMStartRequest: tm(tl[2]), JobPicked: tm(tl[3]), Finished: tm(tl[4])}
	return j, nil
}

func vmArgs(v *job.VM) []any {
	t := v.Timeline
	return []any{v.ID, v.HostID, v.ForJob, v.ProjectID, jsonTags(v.Tags), v.VCPUs, v.MemoryMiB, string(v.State), v.Reason, v.RunnerID, v.TagsStale,
		v.PickedJobID, intPtr(v.ExitCode), v.ExitReason, ns(v.CreatedAt), ns(v.UpdatedAt),
		ns(t.Planned), ns(t.RunnerCreated), ns(t.StartRequest), ns(t.Started), ns(t.Picked), ns(t.Exited), ns(t.StopRequested),
		ns(t.Destroyed), ns(t.RunnerDeleted), ns(t.Gone), ns(t.Assigned), ns(t.Ready)}
}

func scanVM(r scanner) (job.VM, error) {
	var v job.VM
	var tags, state string
	var exit sql.NullInt64
	var created, updated int64
	var tl [12]int64
	err := r.Scan(&v.ID, &v.HostID, &v.ForJob, &v.ProjectID, &tags, &v.VCPUs, &v.MemoryMiB, &state, &v.Reason, &v.RunnerID, &v.TagsStale,
		&v.PickedJobID, &exit, &v.ExitReason, &created, &updated,
		&tl[0], &tl[1], &tl[2], &tl[3], &tl[4], &tl[5], &tl[6], &tl[7], &tl[8], &tl[9], &tl[10], &tl[11])
	if errors.Is(err, sql.ErrNoRows) {
		return v, ErrNotFound
	}
	if err != nil {
		return v, err
	}
	if err := json.Unmarshal([]byte(tags), &v.Tags); err != nil {
		return v, fmt.Errorf("vm %s: bad tags column: %w", v.ID, err)
	}
	v.State, v.ExitCode, v.CreatedAt, v.UpdatedAt = job.VMState(state), ptrInt(exit), tm(created), tm(updated)
	v.Timeline = job.VMTimeline{Planned: tm(tl[0]), RunnerCreated: tm(tl[1]), StartRequest: tm(tl[2]), Started: tm(tl[3]), Picked: tm(tl[4]),
		Exited: tm(tl[5]), StopRequested: tm(tl[6]), Destroyed: tm(tl[7]), RunnerDeleted: tm(tl[8]), Gone: tm(tl[9]), Assigned: tm(tl[10]), Ready: tm(tl[11])}
	return v, nil
}

func scanRunner(r scanner) (job.Runner, error) {
	var x job.Runner
	var tags string
	var created, deleted int64
	if err := r.Scan(&x.ID, &x.HostID, &x.Mode, &x.VMID, &tags, &created, &deleted); err != nil {
		return x, err
	}
	if err := json.Unmarshal([]byte(tags), &x.Tags); err != nil {
		return x, fmt.Errorf("runner %d: bad tags column: %w", x.ID, err)
	}
	x.CreatedAt, x.DeletedAt = tm(created), tm(deleted)
	return x, nil
}

func scanRows[T any](rows *sql.Rows, err error, scan func(scanner) (T, error)) ([]T, error) {
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []T
	for rows.Next() {
		x, err := scan(rows)
		if err != nil {
			return nil, err
		}
		out = append(out, x)
	}
	return out, rows.Err()
}

// Tx is one transaction: every change made through it commits together or
// not at all. The store has one connection, so a Tx also serialises writers.
type Tx struct {
	s   *Store
	ctx context.Context
	tx  *sql.Tx
	now time.Time
}

// stmt is a named query: a prepared statement on SQLite, the rebound text
// on PostgreSQL (pgx prepares and caches it per connection).
type stmt interface {
	ExecContext(ctx context.Context, args ...any) (sql.Result, error)
	QueryRowContext(ctx context.Context, args ...any) *sql.Row
}

// runner is what runs SQL text: the pool or one transaction.
type runner interface {
	ExecContext(ctx context.Context, query string, args ...any) (sql.Result, error)
	QueryRowContext(ctx context.Context, query string, args ...any) *sql.Row
	QueryContext(ctx context.Context, query string, args ...any) (*sql.Rows, error)
}

type textStmt struct {
	r runner
	q string
}

func (x textStmt) ExecContext(ctx context.Context, args ...any) (sql.Result, error) {
	return x.r.ExecContext(ctx, x.q, args...)
}
func (x textStmt) QueryRowContext(ctx context.Context, args ...any) *sql.Row {
	return x.r.QueryRowContext(ctx, x.q, args...)
}

func (s *Store) stmt(name string) stmt {
	if s.pg {
		return textStmt{s.db, s.namedSQL(name)}
	}
	return s.stmts[name]
}

func (t *Tx) stmt(name string) stmt {
	if t.s.pg {
		return textStmt{t.tx, t.s.namedSQL(name)}
	}
	return t.tx.StmtContext(t.ctx, t.s.stmts[name])
}

// query runs SQL text written with ? placeholders on either backend.
func (s *Store) query(ctx context.Context, q string, args ...any) (*sql.Rows, error) {
	return s.db.QueryContext(ctx, s.bind(q), args...)
}

// exec runs SQL text written with ? placeholders inside the transaction.
func (t *Tx) exec(q string, args ...any) (sql.Result, error) {
	return t.tx.ExecContext(t.ctx, t.s.bind(q), args...)
}

func (t *Tx) query(q string, args ...any) (*sql.Rows, error) {
	return t.tx.QueryContext(t.ctx, t.s.bind(q), args...)
}

// Tx runs fn in one transaction. On PostgreSQL, a transaction that lost a
// deadlock or a serialization conflict to another host is run again from
// the start (fn must only write through tx, which all callers do).
func (s *Store) Tx(ctx context.Context, fn func(tx *Tx) error) error {
	if s.readOnly {
		return ErrReadOnly
	}
	for attempt := 1; ; attempt++ {
		err := s.tx1(ctx, fn)
		if !s.pg || attempt >= 8 || !retryable(err) {
			return err
		}
	}
}

func (s *Store) tx1(ctx context.Context, fn func(tx *Tx) error) error {
	sqlTx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	defer sqlTx.Rollback()
	if err := fn(&Tx{s: s, ctx: ctx, tx: sqlTx, now: time.Now()}); err != nil {
		return err
	}
	return sqlTx.Commit()
}

// Job reads one job inside the transaction; on PostgreSQL it locks the row
// until the transaction ends, so the read-modify-write of UpdateJob is
// atomic across connections and hosts (SQLite has one writer anyway).
func (t *Tx) Job(id int64) (job.Job, error) {
	return scanJob(t.stmt("lockJob").QueryRowContext(t.ctx, id))
}

// VM reads one VM inside the transaction (locking it, as Job).
func (t *Tx) VM(id string) (job.VM, error) {
	return scanVM(t.stmt("lockVM").QueryRowContext(t.ctx, id))
}

// CreateJob inserts j unless its id is known; created=false then.
func (t *Tx) CreateJob(j *job.Job) (bool, error) {
	if !j.State.Valid() {
		return false, fmt.Errorf("job %d: invalid state %q", j.ID, j.State)
	}
	if j.CreatedAt.IsZero() {
		j.CreatedAt = t.now
	}
	j.UpdatedAt = t.now
	res, err := t.stmt("insertJob").ExecContext(t.ctx, jobArgs(j)...)
	if err != nil {
		return false, fmt.Errorf("create job %d: %w", j.ID, err)
	}
	if n, _ := res.RowsAffected(); n == 0 {
		return false, nil
	}
	_, err = t.stmt("jobTrans").ExecContext(t.ctx, j.ID, "", string(j.State), j.Source, ns(t.now))
	return true, err
}

// UpdateJob reads job id, applies fn and writes it back; a state change is
// logged as a transition with the job's reason. fn's error aborts.
func (t *Tx) UpdateJob(id int64, fn func(j *job.Job) error) (job.Job, error) {
	j, err := t.Job(id)
	if err != nil {
		return j, err
	}
	from, reason, attempts := j.State, j.Reason, j.Attempts
	if err := fn(&j); err != nil {
		return j, err
	}
	j.ID, j.UpdatedAt = id, t.now
	if j.State != from || j.Attempts != attempts || (j.Reason != reason && j.Reason != "") {
		if j.State != from && !job.CanTransition(from, j.State) {
			return j, &job.TransitionError{Object: fmt.Sprintf("job %d", id), From: string(from), To: string(j.State)}
		}
		if _, err := t.stmt("jobTrans").ExecContext(t.ctx, id, string(from), string(j.State), j.Reason, ns(t.now)); err != nil {
			return j, err
		}
	}
	if j.State.Terminal() && j.Timeline.Finished.IsZero() {
		j.Timeline.Finished = t.now
	}
	a := jobArgs(&j)
	if _, err := t.stmt("updateJob").ExecContext(t.ctx, append(a[1:], id)...); err != nil {
		return j, fmt.Errorf("update job %d: %w", id, err)
	}
	return j, nil
}

// CreateVM inserts a planned VM.
func (t *Tx) CreateVM(v *job.VM) error {
	v.UpdatedAt = t.now
	if v.CreatedAt.IsZero() {
		v.CreatedAt = t.now
	}
	if _, err := t.stmt("insertVM").ExecContext(t.ctx, vmArgs(v)...); err != nil {
		return fmt.Errorf("create vm %s: %w", v.ID, err)
	}
	_, err := t.stmt("vmTrans").ExecContext(t.ctx, v.ID, "", string(v.State), fmt.Sprintf("for job %d", v.ForJob), ns(t.now))
	return err
}

// UpdateVM reads VM id, applies fn and writes it back, logging a state change.
func (t *Tx) UpdateVM(id string, fn func(v *job.VM) error) (job.VM, error) {
	v, err := t.VM(id)
	if err != nil {
		return v, err
	}
	from := v.State
	if err := fn(&v); err != nil {
		return v, err
	}
	v.ID, v.UpdatedAt = id, t.now
	if v.State != from {
		if _, err := t.stmt("vmTrans").ExecContext(t.ctx, id, string(from), string(v.State), v.Reason, ns(t.now)); err != nil {
			return v, err
		}
	}
	a := vmArgs(&v)
	if _, err := t.stmt("updateVM").ExecContext(t.ctx, append(a[1:], id)...); err != nil {
		return v, fmt.Errorf("update vm %s: %w", id, err)
	}
	return v, nil
}

// PutRunner inserts or updates a runner record.
func (t *Tx) PutRunner(r job.Runner) error {
	if r.CreatedAt.IsZero() {
		r.CreatedAt = t.now
	}
	_, err := t.stmt("putRunner").ExecContext(t.ctx, r.ID, r.HostID, r.Mode, r.VMID, jsonTags(r.Tags), ns(r.CreatedAt), ns(r.DeletedAt))
	return err
}

// RunnerDeleted marks a runner deleted in GitLab.
func (t *Tx) RunnerDeleted(id int64) error {
	_, err := t.exec(`UPDATE runners SET deleted_at = ? WHERE runner_id = ? AND deleted_at = 0`, ns(t.now), id)
	return err
}

// Observation is what a webhook or the API said about a job.
type Observation struct {
	JobID, ProjectID, PipelineID int64
	ProjectPath, Name, Ref       string
	Status                       string
	RunnerID                     int64
	Source                       string    // webhook | poll | picked
	At                           time.Time // when it was received
	// Create makes a new record (state new) for an unknown job; without it
	// an unknown job is left alone.
	Create bool
}

// Observe records an observation: a new job record (state new) when the job
// is unknown and o.Create, or GitLab's newer status on a known one. It
// reports whether the job is known now and whether anything changed. A
// webhook's project is remembered for the backstop poll.
func (s *Store) Observe(ctx context.Context, o Observation) (known, changed bool, err error) {
	err = s.Tx(ctx, func(tx *Tx) error {
		if o.Source == "webhook" && o.ProjectID != 0 {
			if _, err := tx.stmt("project").ExecContext(ctx, o.ProjectID, o.ProjectPath, ns(o.At)); err != nil {
				return err
			}
		}
		j, err := tx.Job(o.JobID)
		if errors.Is(err, ErrNotFound) {
			if !o.Create {
				return nil
			}
			n := job.Job{ID: o.JobID, ProjectID: o.ProjectID, ProjectPath: o.ProjectPath, PipelineID: o.PipelineID, Name: o.Name,
				Ref: o.Ref, Source: o.Source, State: job.New, Timeline: job.Timeline{WebhookReceived: o.At}}
			n.Observe(o.Status, o.RunnerID, o.At)
			known, err = true, nil
			changed, err = tx.CreateJob(&n)
			return err
		}
		if err != nil {
			return err
		}
		known = true
		if !j.Observe(o.Status, o.RunnerID, o.At) {
			return nil
		}
		changed = true
		if j.ProjectPath == "" {
			j.ProjectPath = o.ProjectPath
		}
		_, err = tx.UpdateJob(o.JobID, func(r *job.Job) error { *r = j; return nil })
		return err
	})
	return known, changed, err
}

// GetJob returns one job.
func (s *Store) GetJob(ctx context.Context, id int64) (job.Job, error) {
	return scanJob(s.stmt("getJob").QueryRowContext(ctx, id))
}

// UpdateJob is Tx.UpdateJob in a transaction of its own.
func (s *Store) UpdateJob(ctx context.Context, id int64, fn func(j *job.Job) error) (j job.Job, err error) {
	err = s.Tx(ctx, func(tx *Tx) error { j, err = tx.UpdateJob(id, fn); return err })
	return j, err
}

// GetVM returns one VM.
func (s *Store) GetVM(ctx context.Context, id string) (job.VM, error) {
	return scanVM(s.stmt("getVM").QueryRowContext(ctx, id))
}

// UpdateVM is Tx.UpdateVM in a transaction of its own.
func (s *Store) UpdateVM(ctx context.Context, id string, fn func(v *job.VM) error) (v job.VM, err error) {
	err = s.Tx(ctx, func(tx *Tx) error { v, err = tx.UpdateVM(id, fn); return err })
	return v, err
}

// VMByRunner returns the VM whose runner is runnerID (ErrNotFound if none).
func (s *Store) VMByRunner(ctx context.Context, runnerID int64) (job.VM, error) {
	return scanVM(s.stmt("vmByRunner").QueryRowContext(ctx, runnerID))
}

// Filter selects jobs for ListJobs.
type Filter struct {
	ActiveOnly bool      // only non-terminal states
	State      job.State // only this state ("" = any)
	Limit      int       // 0 = no limit; newest first when set
	// ClaimableBy, in a fleet, keeps only the jobs this host claimed or
	// that no host claimed yet.
	ClaimableBy string
}

// ListJobs returns jobs, oldest first (or the newest Limit, still oldest first).
func (s *Store) ListJobs(ctx context.Context, f Filter) ([]job.Job, error) {
	q, a := listJobsSQL(f)
	if s.pg && f.Limit > 0 {
		// PostgreSQL 15 wants its subqueries named.
		q = strings.Replace(q, `) ORDER BY created_at, job_id`, `) AS recent ORDER BY created_at, job_id`, 1)
	}
	rows, err := s.query(ctx, q, a...)
	return scanRows(rows, err, scanJob)
}

func listJobsSQL(f Filter) (string, []any) {
	q := selectSQL("jobs", jobCols, "")
	var a []any
	switch {
	case f.State != "":
		q += ` WHERE state = ?`
		a = append(a, string(f.State))
	case f.ActiveOnly:
		q += ` WHERE state IN (?, ?, ?)`
		a = append(a, string(job.New), string(job.Queued), string(job.Running))
	}
	if f.ClaimableBy != "" {
		if f.State == "" && !f.ActiveOnly {
			q += ` WHERE host_id IN ('', ?)`
		} else {
			q += ` AND host_id IN ('', ?)`
		}
		a = append(a, f.ClaimableBy)
	}
	if f.Limit > 0 {
		q = `SELECT * FROM (` + q + ` ORDER BY created_at DESC, job_id DESC LIMIT ?) ORDER BY created_at, job_id`
		a = append(a, f.Limit)
	} else {
		q += ` ORDER BY created_at, job_id`
	}
	return q, a
}

// ListVMs returns VMs, oldest first: the live ones, or those of one job
// (started for it, or that ran it) when jobID is not 0.
func (s *Store) ListVMs(ctx context.Context, liveOnly bool, jobID int64) ([]job.VM, error) {
	q, a := listVMsSQL(liveOnly, jobID)
	rows, err := s.query(ctx, q, a...)
	return scanRows(rows, err, scanVM)
}

func listVMsSQL(liveOnly bool, jobID int64) (string, []any) {
	q := selectSQL("vms", vmCols, "")
	var a []any
	switch {
	case jobID != 0:
		q += ` WHERE for_job = ? OR (picked_job_id = ? AND picked_job_id != 0)` // both indexed (vms_picked is partial)
		a = append(a, jobID, jobID)
	case liveOnly:
		q += liveVMsSQL
	}
	return q + ` ORDER BY created_at, vm_id`, a
}

// ListRunners returns the runner records, all or only those that exist.
func (s *Store) ListRunners(ctx context.Context, activeOnly bool) ([]job.Runner, error) {
	q := selectSQL("runners", runnerCols, "")
	if activeOnly {
		q += ` WHERE deleted_at = 0`
	}
	rows, err := s.query(ctx, q+` ORDER BY created_at`)
	return scanRows(rows, err, scanRunner)
}

// Projects returns the projects that sent a Job Hook since the given time.
func (s *Store) Projects(ctx context.Context, since time.Time) ([]int64, error) {
	rows, err := s.query(ctx, projectsSQL, ns(since))
	return scanRows(rows, err, func(r scanner) (int64, error) {
		var id int64
		return id, r.Scan(&id)
	})
}

// Queries run at every /metrics scrape and on every job's path; each must
// be an index search however many ended jobs the store holds
// (TestQueriesUseIndexes checks their plans).
const (
	countJobsSQL = `SELECT state, n FROM job_counts WHERE n != 0`
	countVMsSQL  = `SELECT state, COUNT(*) FROM vms WHERE state != 'gone' GROUP BY state`
	liveVMsSQL   = ` WHERE state != 'gone'`
	projectsSQL  = `SELECT project_id FROM projects WHERE last_hook_at >= ? ORDER BY project_id`
)

// Count returns how many jobs are in each state and VMs in each VM state.
// The job counts are kept by triggers (migration 4), so this costs the
// same with a million ended jobs as with none.
func (s *Store) Count(ctx context.Context) (jobs map[job.State]int, vms map[job.VMState]int, err error) {
	jobs, vms = map[job.State]int{}, map[job.VMState]int{}
	for _, q := range []struct {
		sql string
		put func(string, int)
	}{
		{countJobsSQL, func(s string, n int) { jobs[job.State(s)] = n }},
		{countVMsSQL, func(s string, n int) { vms[job.VMState(s)] = n }},
	} {
		rows, err := s.query(ctx, q.sql)
		if err != nil {
			return nil, nil, err
		}
		for rows.Next() {
			var st string
			var n int
			if err := rows.Scan(&st, &n); err != nil {
				rows.Close()
				return nil, nil, err
			}
			q.put(st, n)
		}
		rows.Close()
	}
	return jobs, vms, nil
}

// Transition is one logged state change of a job or a VM.
type Transition struct {
	Object   string // "job" or "vm"
	ID       string
	From, To string
	Reason   string
	At       time.Time
}

const transitionsSQL = `
		SELECT 'job', CAST(job_id AS TEXT), from_state, to_state, reason, at, id FROM transitions WHERE job_id = ?
		UNION ALL
		SELECT 'vm', vm_id, from_state, to_state, reason, at, id FROM vm_transitions
			WHERE vm_id IN (SELECT vm_id FROM vms WHERE for_job = ? OR (picked_job_id = ? AND picked_job_id != 0))
		ORDER BY 6, 1, 7`

// Transitions returns the state changes of one job and of every VM started
// for it or that ran it, in time order: the job's timeline.
func (s *Store) Transitions(ctx context.Context, jobID int64) ([]Transition, error) {
	rows, err := s.query(ctx, transitionsSQL, jobID, jobID, jobID)
	return scanRows(rows, err, func(r scanner) (Transition, error) {
		var t Transition
		var at, id int64
		err := r.Scan(&t.Object, &t.ID, &t.From, &t.To, &t.Reason, &at, &id)
		t.At = time.Unix(0, at)
		return t, err
	})
}
