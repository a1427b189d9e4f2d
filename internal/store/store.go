// Package store is FireRunner's durable state: jobs, their state transitions
// and timelines, in SQLite (modernc.org/sqlite, pure Go, WAL) with migrations.
//
// No secret is stored: runner tokens live only in memory and on the VM's 0600
// config drive. The database file is still created 0600 and its directory
// 0700, because job names, refs and project paths may be private.
package store

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/firerunner/firerunner/internal/job"

	_ "modernc.org/sqlite" // registers the "sqlite" database/sql driver
)

// FileName is the database file inside the state directory.
const FileName = "firerunner.db"

// ErrNotFound is returned for an unknown job id.
var ErrNotFound = errors.New("job not found")

// ErrReadOnly is returned by writes to a store opened with OpenReadOnly.
var ErrReadOnly = errors.New("store is open read-only")

// Store is the SQLite-backed job store. It is safe for concurrent use.
type Store struct {
	db       *sql.DB
	readOnly bool
	// Prepared once: re-parsing SQL was the largest CPU cost per job.
	getStmt, insertStmt, updateStmt, transStmt *sql.Stmt
	// ckpt is a second connection that checkpoints the WAL in the
	// background, concurrently with the writer (WAL allows it).
	ckpt      *sql.DB
	stopCkpt  chan struct{}
	ckptDone  chan struct{}
	closeOnce sync.Once
}

// checkpointEvery is how often the background checkpointer runs.
const checkpointEvery = time.Second

// migrations are applied in order; never edit one that has shipped, append.
var migrations = []string{
	1: `
CREATE TABLE jobs (
	job_id            INTEGER PRIMARY KEY,            -- GitLab build id: unique => one VM per job
	project_id        INTEGER NOT NULL,
	project_path      TEXT    NOT NULL DEFAULT '',
	pipeline_id       INTEGER NOT NULL DEFAULT 0,
	name              TEXT    NOT NULL DEFAULT '',
	ref               TEXT    NOT NULL DEFAULT '',
	tags              TEXT    NOT NULL DEFAULT '[]',  -- JSON array
	size_tag          TEXT    NOT NULL DEFAULT '',
	vcpus             INTEGER NOT NULL DEFAULT 0,
	memory_mib        INTEGER NOT NULL DEFAULT 0,
	source            TEXT    NOT NULL DEFAULT '',
	state             TEXT    NOT NULL,
	outcome           TEXT    NOT NULL DEFAULT '',
	reason            TEXT    NOT NULL DEFAULT '',
	runner_id         INTEGER NOT NULL DEFAULT 0,
	vm_id             TEXT    NOT NULL DEFAULT '',
	picked_job_id     INTEGER NOT NULL DEFAULT 0,
	exit_code         INTEGER,
	created_at        INTEGER NOT NULL,               -- unix nanoseconds
	updated_at        INTEGER NOT NULL,
	t_webhook         INTEGER NOT NULL DEFAULT 0,     -- timeline, unix ns, 0 = not reached
	t_tags            INTEGER NOT NULL DEFAULT 0,
	t_runner_created  INTEGER NOT NULL DEFAULT 0,
	t_vm_start_req    INTEGER NOT NULL DEFAULT 0,
	t_vm_started      INTEGER NOT NULL DEFAULT 0,
	t_job_picked      INTEGER NOT NULL DEFAULT 0,
	t_vm_exited       INTEGER NOT NULL DEFAULT 0,
	t_vm_destroyed    INTEGER NOT NULL DEFAULT 0,
	t_runner_deleted  INTEGER NOT NULL DEFAULT 0,
	t_finished        INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX jobs_state ON jobs(state);
CREATE INDEX jobs_runner ON jobs(runner_id) WHERE runner_id != 0;
CREATE TABLE transitions (
	id         INTEGER PRIMARY KEY AUTOINCREMENT,
	job_id     INTEGER NOT NULL REFERENCES jobs(job_id),
	from_state TEXT    NOT NULL,
	to_state   TEXT    NOT NULL,
	reason     TEXT    NOT NULL DEFAULT '',
	at         INTEGER NOT NULL
);
CREATE INDEX transitions_job ON transitions(job_id, id);
`,
	// Displaced: finding jobs no VM of ours picked.
	2: `
CREATE INDEX jobs_picked ON jobs(picked_job_id);
CREATE INDEX jobs_swapped ON jobs(updated_at) WHERE picked_job_id NOT IN (0, job_id);
`,
}

// Open opens (creating if needed) the store in stateDir and migrates it.
func Open(ctx context.Context, stateDir string) (*Store, error) {
	if err := os.MkdirAll(stateDir, 0o700); err != nil {
		return nil, fmt.Errorf("state dir: %w", err)
	}
	if err := os.Chmod(stateDir, 0o700); err != nil {
		return nil, fmt.Errorf("state dir: %w", err)
	}
	path := filepath.Join(stateDir, FileName)
	// Create the file 0600 ourselves: SQLite would use the umask (often 0644).
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open store: %w", err)
	}
	f.Close()
	if err := os.Chmod(path, 0o600); err != nil {
		return nil, err
	}
	db, err := sql.Open("sqlite", dsn(path, false))
	if err != nil {
		return nil, err
	}
	// One connection: SQLite serialises writers anyway, and a single
	// connection makes every Update's read-modify-write atomic without
	// SQLITE_BUSY retries inside the process.
	db.SetMaxOpenConns(1)
	s := &Store{db: db}
	if err := s.migrate(ctx); err != nil {
		db.Close()
		return nil, err
	}
	if err := s.prepare(ctx); err != nil {
		db.Close()
		return nil, err
	}
	ck, err := sql.Open("sqlite", dsn(path, false))
	if err != nil {
		db.Close()
		return nil, err
	}
	ck.SetMaxOpenConns(1)
	s.ckpt, s.stopCkpt, s.ckptDone = ck, make(chan struct{}), make(chan struct{})
	go s.checkpointer()
	return s, nil
}

func (s *Store) checkpointer() {
	defer close(s.ckptDone)
	t := time.NewTicker(checkpointEvery)
	defer t.Stop()
	for {
		select {
		case <-s.stopCkpt:
			return
		case <-t.C:
			_ = s.Checkpoint(context.Background())
		}
	}
}

func (s *Store) prepare(ctx context.Context) error {
	for _, p := range []struct {
		dst **sql.Stmt
		sql string
	}{
		{&s.getStmt, `SELECT ` + columns + ` FROM jobs WHERE job_id = ?`},
		{&s.insertStmt, `INSERT INTO jobs(` + columns + `) VALUES(` + placeholders + `) ON CONFLICT(job_id) DO NOTHING`},
		{&s.updateStmt, `UPDATE jobs SET ` + setClause + ` WHERE job_id = ?`},
		{&s.transStmt, `INSERT INTO transitions(job_id, from_state, to_state, reason, at) VALUES(?,?,?,?,?)`},
	} {
		st, err := s.db.PrepareContext(ctx, p.sql)
		if err != nil {
			return fmt.Errorf("prepare: %w", err)
		}
		*p.dst = st
	}
	return nil
}

// OpenReadOnly opens an existing store for inspection (firerunner status)
// while a daemon may be writing to it.
func OpenReadOnly(ctx context.Context, stateDir string) (*Store, error) {
	path := filepath.Join(stateDir, FileName)
	if _, err := os.Stat(path); err != nil {
		return nil, fmt.Errorf("open store: %w", err)
	}
	db, err := sql.Open("sqlite", dsn(path, true))
	if err != nil {
		return nil, err
	}
	if err := db.PingContext(ctx); err != nil {
		db.Close()
		return nil, err
	}
	s := &Store{db: db, readOnly: true}
	if s.getStmt, err = db.PrepareContext(ctx, `SELECT `+columns+` FROM jobs WHERE job_id = ?`); err != nil {
		db.Close()
		return nil, fmt.Errorf("open store: %w", err)
	}
	return s, nil
}

func dsn(path string, ro bool) string {
	q := url.Values{}
	q.Add("_pragma", "busy_timeout(5000)")
	if ro {
		q.Add("mode", "ro")
	} else {
		q.Add("_pragma", "journal_mode(WAL)")
		// NORMAL in WAL mode is durable against process crashes (kill -9);
		// only an OS crash can lose the last transactions, which
		// reconciliation then repairs from GitLab and the host.
		q.Add("_pragma", "synchronous(NORMAL)")
		q.Add("_pragma", "foreign_keys(1)")
		// Checkpoints fsync; the default (every 1000 pages, ~30 jobs) put them
		// on the job latency path. A background checkpointer on its own
		// connection does them instead; this high bound is only a safety net.
		q.Add("_pragma", "wal_autocheckpoint(50000)")
	}
	return "file:" + path + "?" + q.Encode()
}

// Close closes the database (idempotent).
func (s *Store) Close() error {
	s.closeOnce.Do(func() {
		if s.ckpt != nil {
			close(s.stopCkpt)
			<-s.ckptDone
			s.ckpt.Close()
		}
	})
	return s.db.Close()
}

// Ping checks the database answers (readiness).
func (s *Store) Ping(ctx context.Context) error { return s.db.PingContext(ctx) }

func (s *Store) migrate(ctx context.Context) error {
	if _, err := s.db.ExecContext(ctx, `CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at INTEGER NOT NULL)`); err != nil {
		return fmt.Errorf("migrate: %w", err)
	}
	var cur int
	if err := s.db.QueryRowContext(ctx, `SELECT COALESCE(MAX(version),0) FROM schema_migrations`).Scan(&cur); err != nil {
		return fmt.Errorf("migrate: %w", err)
	}
	if cur > len(migrations)-1 {
		return fmt.Errorf("store schema version %d is newer than this firerunner (%d); refusing to touch it", cur, len(migrations)-1)
	}
	for v := cur + 1; v < len(migrations); v++ {
		tx, err := s.db.BeginTx(ctx, nil)
		if err != nil {
			return err
		}
		if _, err := tx.ExecContext(ctx, migrations[v]); err != nil {
			tx.Rollback()
			return fmt.Errorf("migration %d: %w", v, err)
		}
		if _, err := tx.ExecContext(ctx, `INSERT INTO schema_migrations(version, applied_at) VALUES(?, ?)`, v, time.Now().UnixNano()); err != nil {
			tx.Rollback()
			return err
		}
		if err := tx.Commit(); err != nil {
			return fmt.Errorf("migration %d: %w", v, err)
		}
	}
	return nil
}

// SchemaVersion returns the applied migration number.
func (s *Store) SchemaVersion(ctx context.Context) (int, error) {
	var v int
	err := s.db.QueryRowContext(ctx, `SELECT COALESCE(MAX(version),0) FROM schema_migrations`).Scan(&v)
	return v, err
}

var cols = []string{"job_id", "project_id", "project_path", "pipeline_id", "name", "ref", "tags", "size_tag", "vcpus", "memory_mib", "source",
	"state", "outcome", "reason", "runner_id", "vm_id", "picked_job_id", "exit_code", "created_at", "updated_at",
	"t_webhook", "t_tags", "t_runner_created", "t_vm_start_req", "t_vm_started", "t_job_picked", "t_vm_exited", "t_vm_destroyed", "t_runner_deleted", "t_finished"}

var (
	columns      = strings.Join(cols, ", ")
	placeholders = strings.TrimSuffix(strings.Repeat("?, ", len(cols)), ", ")
	setClause    = strings.Join(cols[1:], " = ?, ") + " = ?"
)

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

func args(j *job.Job) []any {
	tags, _ := json.Marshal(j.Tags)
	if j.Tags == nil {
		tags = []byte("[]")
	}
	var exit any
	if j.ExitCode != nil {
		exit = *j.ExitCode
	}
	t := j.Timeline
	return []any{j.ID, j.ProjectID, j.ProjectPath, j.PipelineID, j.Name, j.Ref, string(tags), j.SizeTag, j.VCPUs, j.MemoryMiB, j.Source,
		string(j.State), string(j.Outcome), j.Reason, j.RunnerID, j.VMID, j.PickedJobID, exit, ns(j.CreatedAt), ns(j.UpdatedAt),
		ns(t.WebhookReceived), ns(t.TagsFetched), ns(t.RunnerCreated), ns(t.VMStartRequest), ns(t.VMStarted), ns(t.JobPicked),
		ns(t.VMExited), ns(t.VMDestroyed), ns(t.RunnerDeleted), ns(t.Finished)}
}

type scanner interface{ Scan(dest ...any) error }

func scan(r scanner) (job.Job, error) {
	var j job.Job
	var tags, state, outcome string
	var exit sql.NullInt64
	var created, updated int64
	var tl [10]int64
	err := r.Scan(&j.ID, &j.ProjectID, &j.ProjectPath, &j.PipelineID, &j.Name, &j.Ref, &tags, &j.SizeTag, &j.VCPUs, &j.MemoryMiB, &j.Source,
		&state, &outcome, &j.Reason, &j.RunnerID, &j.VMID, &j.PickedJobID, &exit, &created, &updated,
		&tl[0], &tl[1], &tl[2], &tl[3], &tl[4], &tl[5], &tl[6], &tl[7], &tl[8], &tl[9])
	if err != nil {
		return j, err
	}
	if err := json.Unmarshal([]byte(tags), &j.Tags); err != nil {
		return j, fmt.Errorf("job %d: bad tags column: %w", j.ID, err)
	}
	j.State, j.Outcome = job.State(state), job.State(outcome)
	if exit.Valid {
		e := int(exit.Int64)
		j.ExitCode = &e
	}
	j.CreatedAt, j.UpdatedAt = tm(created), tm(updated)
	j.Timeline = job.Timeline{
		WebhookReceived: tm(tl[0]), TagsFetched: tm(tl[1]), RunnerCreated: tm(tl[2]), VMStartRequest: tm(tl[3]),
		VMStarted: tm(tl[4]), JobPicked: tm(tl[5]), VMExited: tm(tl[6]), VMDestroyed: tm(tl[7]), RunnerDeleted: tm(tl[8]), Finished: tm(tl[9]),
	}
	return j, nil
}

// Create inserts a new job in state j.State (normally queued). It returns
// created=false, and the existing record, when the job id is already known:
// this is what makes duplicate webhook deliveries harmless.
func (s *Store) Create(ctx context.Context, j job.Job) (job.Job, bool, error) {
	if s.readOnly {
		return j, false, ErrReadOnly
	}
	if !j.State.Valid() {
		return j, false, fmt.Errorf("job %d: invalid state %q", j.ID, j.State)
	}
	now := time.Now()
	if j.CreatedAt.IsZero() {
		j.CreatedAt = now
	}
	j.UpdatedAt = now
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return j, false, err
	}
	defer tx.Rollback()
	res, err := tx.StmtContext(ctx, s.insertStmt).ExecContext(ctx, args(&j)...)
	if err != nil {
		return j, false, fmt.Errorf("create job %d: %w", j.ID, err)
	}
	if n, _ := res.RowsAffected(); n == 0 {
		existing, err := scan(tx.StmtContext(ctx, s.getStmt).QueryRowContext(ctx, j.ID))
		return existing, false, err
	}
	if _, err := tx.StmtContext(ctx, s.transStmt).ExecContext(ctx, j.ID, "", string(j.State), j.Source, now.UnixNano()); err != nil {
		return j, false, err
	}
	return j, true, tx.Commit()
}

// Get returns one job.
func (s *Store) Get(ctx context.Context, id int64) (job.Job, error) {
	j, err := scan(s.getStmt.QueryRowContext(ctx, id))
	if errors.Is(err, sql.ErrNoRows) {
		return j, ErrNotFound
	}
	return j, err
}

// Update loads job id, applies fn and saves it in one transaction. When fn
// changes the state, the move is checked against the state machine
// (job.CanTransition) and logged in the transitions table with j.Reason.
// fn returning an error aborts without changes.
func (s *Store) Update(ctx context.Context, id int64, fn func(j *job.Job) error) (job.Job, error) {
	return s.UpdatePath(ctx, id, nil, fn)
}

// UpdatePath is Update that also walks the job through path (each step
// checked and logged) in the same transaction, after fn: for consecutive
// steps the controller takes at once (runner_created → vm_starting), one
// commit instead of several.
func (s *Store) UpdatePath(ctx context.Context, id int64, path []job.State, fn func(j *job.Job) error) (job.Job, error) {
	if s.readOnly {
		return job.Job{}, ErrReadOnly
	}
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return job.Job{}, err
	}
	defer tx.Rollback()
	j, err := scan(tx.StmtContext(ctx, s.getStmt).QueryRowContext(ctx, id))
	if errors.Is(err, sql.ErrNoRows) {
		return j, ErrNotFound
	}
	if err != nil {
		return j, err
	}
	from := j.State
	if fn != nil {
		if err := fn(&j); err != nil {
			return j, err
		}
	}
	j.ID = id
	now := time.Now()
	j.UpdatedAt = now
	steps := path
	if len(steps) == 0 && j.State != from {
		steps = []job.State{j.State}
	}
	trans := tx.StmtContext(ctx, s.transStmt)
	for _, to := range steps {
		if !job.CanTransition(from, to) {
			return j, &job.TransitionError{JobID: id, From: from, To: to}
		}
		if _, err := trans.ExecContext(ctx, id, string(from), string(to), j.Reason, now.UnixNano()); err != nil {
			return j, err
		}
		from = to
	}
	j.State = from
	if j.State.Terminal() && j.Timeline.Finished.IsZero() {
		j.Timeline.Finished = now
	}
	a := args(&j)
	if _, err := tx.StmtContext(ctx, s.updateStmt).ExecContext(ctx, append(a[1:], id)...); err != nil {
		return j, fmt.Errorf("update job %d: %w", id, err)
	}
	return j, tx.Commit()
}

// Filter selects jobs for List.
type Filter struct {
	ActiveOnly bool // only non-terminal states
	Limit      int  // 0 = no limit; newest first when set
}

// List returns jobs, oldest first (or the newest Limit, still oldest first).
func (s *Store) List(ctx context.Context, f Filter) ([]job.Job, error) {
	q := `SELECT ` + columns + ` FROM jobs`
	var a []any
	if f.ActiveOnly {
		q += ` WHERE state NOT IN (?, ?, ?)`
		a = append(a, string(job.Done), string(job.Failed), string(job.Canceled))
	}
	if f.Limit > 0 {
		q = `SELECT * FROM (` + q + ` ORDER BY created_at DESC, job_id DESC LIMIT ?) ORDER BY created_at, job_id`
		a = append(a, f.Limit)
	} else {
		q += ` ORDER BY created_at, job_id`
	}
	rows, err := s.db.QueryContext(ctx, q, a...)
	return scanAll(rows, err)
}

// scanAll reads every row of a job query.
func scanAll(rows *sql.Rows, err error) ([]job.Job, error) {
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []job.Job
	for rows.Next() {
		j, err := scan(rows)
		if err != nil {
			return nil, err
		}
		out = append(out, j)
	}
	return out, rows.Err()
}

// Displaced returns the jobs whose VM ran another job (a runner made for
// job A may take job B with the same tags), that ended since the given time
// and that no VM of ours has picked since: GitLab may still hold them
// pending, waiting for a runner with their tags.
func (s *Store) Displaced(ctx context.Context, since time.Time) ([]job.Job, error) {
	// "+state": plan by the partial index of swapped jobs, not by state
	// (almost every row is terminal).
	rows, err := s.db.QueryContext(ctx, `SELECT `+columns+` FROM jobs j
		WHERE +state IN (?, ?, ?) AND updated_at >= ? AND picked_job_id NOT IN (0, job_id)
		AND NOT EXISTS (SELECT 1 FROM jobs k WHERE k.picked_job_id = j.job_id)
		ORDER BY created_at, job_id`,
		string(job.Done), string(job.Failed), string(job.Canceled), ns(since))
	return scanAll(rows, err)
}

// FindByRunner returns the active job holding runner id (ErrNotFound if none).
func (s *Store) FindByRunner(ctx context.Context, runnerID int64) (job.Job, error) {
	j, err := scan(s.db.QueryRowContext(ctx, `SELECT `+columns+` FROM jobs WHERE runner_id = ? ORDER BY created_at DESC LIMIT 1`, runnerID))
	if errors.Is(err, sql.ErrNoRows) {
		return j, ErrNotFound
	}
	return j, err
}

// CountByState returns how many jobs are in each state (metrics).
func (s *Store) CountByState(ctx context.Context) (map[job.State]int, error) {
	rows, err := s.db.QueryContext(ctx, `SELECT state, COUNT(*) FROM jobs GROUP BY state`)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	out := map[job.State]int{}
	for rows.Next() {
		var st string
		var n int
		if err := rows.Scan(&st, &n); err != nil {
			return nil, err
		}
		out[job.State(st)] = n
	}
	return out, rows.Err()
}

// Transition is one logged state change.
type Transition struct {
	JobID    int64
	From, To job.State
	Reason   string
	At       time.Time
}

// Transitions returns the state changes of one job in order.
func (s *Store) Transitions(ctx context.Context, jobID int64) ([]Transition, error) {
	rows, err := s.db.QueryContext(ctx, `SELECT job_id, from_state, to_state, reason, at FROM transitions WHERE job_id = ? ORDER BY id`, jobID)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []Transition
	for rows.Next() {
		var t Transition
		var from, to string
		var at int64
		if err := rows.Scan(&t.JobID, &from, &to, &t.Reason, &at); err != nil {
			return nil, err
		}
		t.From, t.To, t.At = job.State(from), job.State(to), time.Unix(0, at)
		out = append(out, t)
	}
	return out, rows.Err()
}

// Checkpoint copies the WAL into the database file, on the checkpointer's
// own connection so writers are not blocked (PASSIVE never waits).
func (s *Store) Checkpoint(ctx context.Context) error {
	if s.readOnly || s.ckpt == nil {
		return nil
	}
	_, err := s.ckpt.ExecContext(ctx, `PRAGMA wal_checkpoint(PASSIVE)`)
	return err
}
