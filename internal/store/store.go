// Package store is FireRunner's durable state: jobs, VMs and runners, their
// transitions and timelines, with migrations, in one of two backends behind
// the same Store: SQLite (modernc.org/sqlite, pure Go, WAL; one host, the
// default) or PostgreSQL (pgx; a fleet of hosts sharing one queue, see
// postgres.go and fleet.go).
//
// No secret is stored: runner tokens live only in memory and on the VM's 0600
// config drive. The database file is still created 0600 and its directory
// 0700, because job names, refs and project paths may be private.
package store

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	_ "modernc.org/sqlite" // registers the "sqlite" database/sql driver
)

// FileName is the database file inside the state directory.
const FileName = "firerunner.db"

// ErrNotFound is returned for an unknown job or VM id.
var ErrNotFound = errors.New("not found")

// ErrReadOnly is returned by writes to a store opened with OpenReadOnly.
var ErrReadOnly = errors.New("store is open read-only")

// Store is the job store, on SQLite or PostgreSQL. It is safe for
// concurrent use.
type Store struct {
	db       *sql.DB
	readOnly bool
	// pg is set for PostgreSQL: placeholders are rebound ($n), reads inside
	// a Tx lock their row (FOR UPDATE) because several connections and
	// hosts write at once, and statements are not prepared through
	// database/sql (pgx caches them per connection itself).
	pg    bool
	pool  *pgxpool.Pool
	bound sync.Map // query text → PostgreSQL text
	// Prepared once: re-parsing SQL was the largest CPU cost per job.
	stmts map[string]*sql.Stmt
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
	// One reconcile per job: VMs and runners become their own records; a
	// job record describes the GitLab job. Jobs in flight under the old
	// model go back to queued (their VMs and runners have no records now,
	// so the sweep removes them) and are re-checked with GitLab.
	3: `
ALTER TABLE jobs ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN not_before INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN gitlab_status TEXT NOT NULL DEFAULT '';
ALTER TABLE jobs ADD COLUMN gitlab_runner INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN observed_at INTEGER NOT NULL DEFAULT 0;
UPDATE jobs SET state = 'queued', reason = 'upgrade' WHERE state IN ('runner_created', 'vm_starting', 'running', 'cleaning');
DROP INDEX jobs_picked;
DROP INDEX jobs_swapped;
DROP INDEX jobs_runner;
CREATE TABLE vms (
	vm_id             TEXT    PRIMARY KEY,
	host_id           TEXT    NOT NULL,
	for_job           INTEGER NOT NULL,
	project_id        INTEGER NOT NULL DEFAULT 0,
	tags              TEXT    NOT NULL DEFAULT '[]',
	vcpus             INTEGER NOT NULL,
	memory_mib        INTEGER NOT NULL,
	state             TEXT    NOT NULL,
	reason            TEXT    NOT NULL DEFAULT '',
	runner_id         INTEGER NOT NULL DEFAULT 0,
	tags_stale        INTEGER NOT NULL DEFAULT 0,
	picked_job_id     INTEGER NOT NULL DEFAULT 0,
	exit_code         INTEGER,
	exit_reason       TEXT    NOT NULL DEFAULT '',
	created_at        INTEGER NOT NULL,
	updated_at        INTEGER NOT NULL,
	t_planned         INTEGER NOT NULL DEFAULT 0,
	t_runner_created  INTEGER NOT NULL DEFAULT 0,
	t_start_req       INTEGER NOT NULL DEFAULT 0,
	t_started         INTEGER NOT NULL DEFAULT 0,
	t_picked          INTEGER NOT NULL DEFAULT 0,
	t_exited          INTEGER NOT NULL DEFAULT 0,
	t_stop_req        INTEGER NOT NULL DEFAULT 0,
	t_destroyed       INTEGER NOT NULL DEFAULT 0,
	t_runner_deleted  INTEGER NOT NULL DEFAULT 0,
	t_gone            INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX vms_live ON vms(state) WHERE state != 'gone';
CREATE INDEX vms_runner ON vms(runner_id) WHERE runner_id != 0;
CREATE INDEX vms_for_job ON vms(for_job);
CREATE INDEX vms_picked ON vms(picked_job_id) WHERE picked_job_id != 0;
CREATE TABLE vm_transitions (
	id         INTEGER PRIMARY KEY AUTOINCREMENT,
	vm_id      TEXT    NOT NULL,
	from_state TEXT    NOT NULL,
	to_state   TEXT    NOT NULL,
	reason     TEXT    NOT NULL DEFAULT '',
	at         INTEGER NOT NULL
);
CREATE INDEX vm_transitions_vm ON vm_transitions(vm_id, id);
CREATE TABLE runners (
	runner_id  INTEGER PRIMARY KEY,               -- GitLab runner id
	host_id    TEXT    NOT NULL,
	mode       TEXT    NOT NULL,
	vm_id      TEXT    NOT NULL DEFAULT '',
	tags       TEXT    NOT NULL DEFAULT '[]',
	created_at INTEGER NOT NULL,
	deleted_at INTEGER NOT NULL DEFAULT 0         -- 0 while it exists in GitLab
);
CREATE INDEX runners_active ON runners(vm_id) WHERE deleted_at = 0;
CREATE TABLE projects (
	project_id   INTEGER PRIMARY KEY,
	path         TEXT    NOT NULL DEFAULT '',
	last_hook_at INTEGER NOT NULL                 -- unix ns of the last Job Hook from it
);
`,
	// Warm pools: when a pool's VM got its job.
	4: `
ALTER TABLE vms ADD COLUMN t_assigned INTEGER NOT NULL DEFAULT 0;
ALTER TABLE vms ADD COLUMN t_ready INTEGER NOT NULL DEFAULT 0;
`,
	// State retention (Prune) and metrics that stay cheap however long the
	// history: partial indexes of what Prune looks for, the newest-first
	// listing of firerunner status, and per-state job counts kept by
	// triggers, so the jobs gauge reads a handful of rows instead of
	// counting the whole table at every scrape.
	5: `
CREATE INDEX jobs_ended ON jobs(updated_at) WHERE state IN ('done', 'failed', 'canceled', 'ignored');
CREATE INDEX jobs_created ON jobs(created_at, job_id);
CREATE INDEX vms_gone ON vms(updated_at) WHERE state = 'gone';
CREATE INDEX runners_deleted ON runners(deleted_at) WHERE deleted_at != 0;
CREATE TABLE job_counts (
	state TEXT    PRIMARY KEY,
	n     INTEGER NOT NULL
) WITHOUT ROWID;
INSERT INTO job_counts(state, n) SELECT state, COUNT(*) FROM jobs GROUP BY state;
CREATE TRIGGER job_counts_insert AFTER INSERT ON jobs BEGIN
	INSERT INTO job_counts(state, n) VALUES (NEW.state, 1) ON CONFLICT(state) DO UPDATE SET n = n + 1;
END;
CREATE TRIGGER job_counts_delete AFTER DELETE ON jobs BEGIN
	UPDATE job_counts SET n = n - 1 WHERE state = OLD.state;
END;
CREATE TRIGGER job_counts_update AFTER UPDATE OF state ON jobs WHEN OLD.state != NEW.state BEGIN
	UPDATE job_counts SET n = n - 1 WHERE state = OLD.state;
	INSERT INTO job_counts(state, n) VALUES (NEW.state, 1) ON CONFLICT(state) DO UPDATE SET n = n + 1;
END;
`,
	// A fleet of hosts on one store (PostgreSQL; harmless on SQLite): the
	// host that claimed a waiting job, the hosts' heartbeats and leases,
	// and named leases (the backstop poll's leader).
	6: `
ALTER TABLE jobs ADD COLUMN host_id TEXT NOT NULL DEFAULT '';
CREATE INDEX jobs_claimed ON jobs(host_id) WHERE state IN ('new', 'queued', 'running');
CREATE TABLE hosts (
	host_id             TEXT    PRIMARY KEY,
	capacity_vcpus      INTEGER NOT NULL DEFAULT 0,
	capacity_memory_mib INTEGER NOT NULL DEFAULT 0,
	max_vms             INTEGER NOT NULL DEFAULT 0,
	pools               TEXT    NOT NULL DEFAULT '',
	version             TEXT    NOT NULL DEFAULT '',
	started_at          INTEGER NOT NULL DEFAULT 0,
	last_seen           INTEGER NOT NULL DEFAULT 0,
	lease_until         INTEGER NOT NULL DEFAULT 0,   -- unix ns; expired: another host reconciles its jobs
	reaped_by           TEXT    NOT NULL DEFAULT '',  -- the host that reconciled it after its lease expired
	reaped_at           INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE leases (
	name    TEXT    PRIMARY KEY,
	host_id TEXT    NOT NULL,
	until   INTEGER NOT NULL
);
`,
}

// DirMode is the state directory's mode: Open sets it, and install.sh
// creates the directory with it, so a re-run of the installer after the
// daemon started finds nothing to change.
const DirMode = 0o700

// Open opens (creating if needed) the store in stateDir and migrates it.
func Open(ctx context.Context, stateDir string) (*Store, error) {
	if err := os.MkdirAll(stateDir, DirMode); err != nil {
		return nil, fmt.Errorf("state dir: %w", err)
	}
	if err := os.Chmod(stateDir, DirMode); err != nil {
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
	if err := s.prepare(ctx, db); err != nil {
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

func (s *Store) prepare(ctx context.Context, db *sql.DB) error {
	s.stmts = map[string]*sql.Stmt{}
	if s.pg {
		return nil
	}
	for name, q := range queries {
		if s.readOnly && !strings.HasPrefix(q, "SELECT") {
			continue
		}
		st, err := db.PrepareContext(ctx, q)
		if err != nil {
			return fmt.Errorf("prepare %s: %w", name, err)
		}
		s.stmts[name] = st
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
	if err := s.prepare(ctx, db); err != nil {
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
	err := s.db.Close()
	if s.pool != nil {
		s.pool.Close()
	}
	return err
}

// Ping checks the database answers (readiness).
func (s *Store) Ping(ctx context.Context) error { return s.db.PingContext(ctx) }

// Backend names the store's database: "sqlite" or "postgres".
func (s *Store) Backend() string {
	if s.pg {
		return "postgres"
	}
	return "sqlite"
}

func (s *Store) migrate(ctx context.Context) error {
	// One connection for the whole migration: on PostgreSQL it holds the
	// advisory lock that keeps two hosts starting together from both
	// migrating.
	conn, err := s.db.Conn(ctx)
	if err != nil {
		return fmt.Errorf("migrate: %w", err)
	}
	defer conn.Close()
	ms := migrations
	if s.pg {
		ms = pgMigrations
		if _, err := conn.ExecContext(ctx, `SELECT pg_advisory_lock($1)`, migrateLockKey); err != nil {
			return fmt.Errorf("migrate: %w", err)
		}
		defer conn.ExecContext(context.WithoutCancel(ctx), `SELECT pg_advisory_unlock($1)`, migrateLockKey)
	}
	if _, err := conn.ExecContext(ctx, `CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at BIGINT NOT NULL)`); err != nil {
		return fmt.Errorf("migrate: %w", err)
	}
	var cur int
	if err := conn.QueryRowContext(ctx, `SELECT COALESCE(MAX(version),0) FROM schema_migrations`).Scan(&cur); err != nil {
		return fmt.Errorf("migrate: %w", err)
	}
	if cur > len(ms)-1 {
		return fmt.Errorf("store schema version %d is newer than this firerunner (%d); refusing to touch it", cur, len(ms)-1)
	}
	for v := cur + 1; v < len(ms); v++ {
		tx, err := conn.BeginTx(ctx, nil)
		if err != nil {
			return err
		}
		if ms[v] != "" { // PostgreSQL's 1-4 predate it: its 5 is the whole schema
			if _, err := tx.ExecContext(ctx, ms[v]); err != nil {
				tx.Rollback()
				return fmt.Errorf("migration %d: %w", v, err)
			}
		}
		if _, err := tx.ExecContext(ctx, s.bind(`INSERT INTO schema_migrations(version, applied_at) VALUES(?, ?)`), v, time.Now().UnixNano()); err != nil {
			tx.Rollback()
			return err
		}
		if err := tx.Commit(); err != nil {
			return fmt.Errorf("migration %d: %w", v, err)
		}
	}
	return nil
}

// LatestSchemaVersion is the migration number this build migrates to.
func LatestSchemaVersion() int { return len(migrations) - 1 }

// ServerVersionNum is PostgreSQL's server_version_num (150018 for 15.18);
// 0 for SQLite. Doctor checks it against the oldest supported release.
func (s *Store) ServerVersionNum(ctx context.Context) (int, error) {
	if !s.pg {
		return 0, nil
	}
	var v string
	if err := s.db.QueryRowContext(ctx, `SHOW server_version_num`).Scan(&v); err != nil {
		return 0, err
	}
	return strconv.Atoi(v)
}

// SchemaVersion returns the applied migration number.
func (s *Store) SchemaVersion(ctx context.Context) (int, error) {
	var v int
	err := s.db.QueryRowContext(ctx, `SELECT COALESCE(MAX(version),0) FROM schema_migrations`).Scan(&v)
	return v, err
}

// Checkpoint copies the WAL into the database file, on the checkpointer's
// own connection so writers are not blocked (PASSIVE never waits).
func (s *Store) Checkpoint(ctx context.Context) error {
	if s.readOnly || s.ckpt == nil || s.pg {
		return nil
	}
	_, err := s.ckpt.ExecContext(ctx, `PRAGMA wal_checkpoint(PASSIVE)`)
	return err
}
