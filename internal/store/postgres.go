package store

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/jackc/pgx/v5/stdlib"
)

// migrateLockKey is the advisory lock two hosts starting at once take
// around migrations ("FRMIGRAT" in ASCII).
const migrateLockKey int64 = 0x46524d4947524154

// pgMigrations is the PostgreSQL dialect of migrations, version for
// version: the schema is the same (BIGINT for SQLite's 64-bit INTEGER,
// BOOLEAN for flags, a PL/pgSQL trigger for the job counts). PostgreSQL
// support came with SQLite's schema 5, so 1–4 are empty and 5 creates that
// schema; every migration after is written twice, once per dialect, with
// the same number (TestMigrationsPaired).
var pgMigrations = []string{
	1: ``, 2: ``, 3: ``, 4: ``,
	5: `
CREATE TABLE jobs (
	job_id            BIGINT  PRIMARY KEY,
	project_id        BIGINT  NOT NULL,
	project_path      TEXT    NOT NULL DEFAULT '',
	pipeline_id       BIGINT  NOT NULL DEFAULT 0,
	name              TEXT    NOT NULL DEFAULT '',
	ref               TEXT    NOT NULL DEFAULT '',
	tags              TEXT    NOT NULL DEFAULT '[]',
	size_tag          TEXT    NOT NULL DEFAULT '',
	vcpus             BIGINT  NOT NULL DEFAULT 0,
	memory_mib        BIGINT  NOT NULL DEFAULT 0,
	source            TEXT    NOT NULL DEFAULT '',
	state             TEXT    NOT NULL,
	outcome           TEXT    NOT NULL DEFAULT '',
	reason            TEXT    NOT NULL DEFAULT '',
	runner_id         BIGINT  NOT NULL DEFAULT 0,
	vm_id             TEXT    NOT NULL DEFAULT '',
	picked_job_id     BIGINT  NOT NULL DEFAULT 0,
	exit_code         BIGINT,
	created_at        BIGINT  NOT NULL,
	updated_at        BIGINT  NOT NULL,
	t_webhook         BIGINT  NOT NULL DEFAULT 0,
	t_tags            BIGINT  NOT NULL DEFAULT 0,
	t_runner_created  BIGINT  NOT NULL DEFAULT 0,
	t_vm_start_req    BIGINT  NOT NULL DEFAULT 0,
	t_vm_started      BIGINT  NOT NULL DEFAULT 0,
	t_job_picked      BIGINT  NOT NULL DEFAULT 0,
	t_vm_exited       BIGINT  NOT NULL DEFAULT 0,
	t_vm_destroyed    BIGINT  NOT NULL DEFAULT 0,
	t_runner_deleted  BIGINT  NOT NULL DEFAULT 0,
	t_finished        BIGINT  NOT NULL DEFAULT 0,
	attempts          BIGINT  NOT NULL DEFAULT 0,
	not_before        BIGINT  NOT NULL DEFAULT 0,
	gitlab_status     TEXT    NOT NULL DEFAULT '',
	gitlab_runner     BIGINT  NOT NULL DEFAULT 0,
	observed_at       BIGINT  NOT NULL DEFAULT 0
);
CREATE INDEX jobs_state ON jobs(state);
CREATE INDEX jobs_ended ON jobs(updated_at) WHERE state IN ('done', 'failed', 'canceled', 'ignored');
CREATE INDEX jobs_created ON jobs(created_at, job_id);
CREATE TABLE transitions (
	id         BIGSERIAL PRIMARY KEY,
	job_id     BIGINT  NOT NULL REFERENCES jobs(job_id),
	from_state TEXT    NOT NULL,
	to_state   TEXT    NOT NULL,
	reason     TEXT    NOT NULL DEFAULT '',
	at         BIGINT  NOT NULL
);
CREATE INDEX transitions_job ON transitions(job_id, id);
CREATE TABLE vms (
	vm_id             TEXT    PRIMARY KEY,
	host_id           TEXT    NOT NULL,
	for_job           BIGINT  NOT NULL,
	project_id        BIGINT  NOT NULL DEFAULT 0,
	tags              TEXT    NOT NULL DEFAULT '[]',
	vcpus             BIGINT  NOT NULL,
	memory_mib        BIGINT  NOT NULL,
	state             TEXT    NOT NULL,
	reason            TEXT    NOT NULL DEFAULT '',
	runner_id         BIGINT  NOT NULL DEFAULT 0,
	tags_stale        BOOLEAN NOT NULL DEFAULT false,
	picked_job_id     BIGINT  NOT NULL DEFAULT 0,
	exit_code         BIGINT,
	exit_reason       TEXT    NOT NULL DEFAULT '',
	created_at        BIGINT  NOT NULL,
	updated_at        BIGINT  NOT NULL,
	t_planned         BIGINT  NOT NULL DEFAULT 0,
	t_runner_created  BIGINT  NOT NULL DEFAULT 0,
	t_start_req       BIGINT  NOT NULL DEFAULT 0,
	t_started         BIGINT  NOT NULL DEFAULT 0,
	t_picked          BIGINT  NOT NULL DEFAULT 0,
	t_exited          BIGINT  NOT NULL DEFAULT 0,
	t_stop_req        BIGINT  NOT NULL DEFAULT 0,
	t_destroyed       BIGINT  NOT NULL DEFAULT 0,
	t_runner_deleted  BIGINT  NOT NULL DEFAULT 0,
	t_gone            BIGINT  NOT NULL DEFAULT 0,
	t_assigned        BIGINT  NOT NULL DEFAULT 0,
	t_ready           BIGINT  NOT NULL DEFAULT 0
);
CREATE INDEX vms_live ON vms(state) WHERE state != 'gone';
CREATE INDEX vms_runner ON vms(runner_id) WHERE runner_id != 0;
CREATE INDEX vms_for_job ON vms(for_job);
CREATE INDEX vms_picked ON vms(picked_job_id) WHERE picked_job_id != 0;
CREATE INDEX vms_gone ON vms(updated_at) WHERE state = 'gone';
CREATE TABLE vm_transitions (
	id         BIGSERIAL PRIMARY KEY,
	vm_id      TEXT    NOT NULL,
	from_state TEXT    NOT NULL,
	to_state   TEXT    NOT NULL,
	reason     TEXT    NOT NULL DEFAULT '',
	at         BIGINT  NOT NULL
);
CREATE INDEX vm_transitions_vm ON vm_transitions(vm_id, id);
CREATE TABLE runners (
	runner_id  BIGINT  PRIMARY KEY,
	host_id    TEXT    NOT NULL,
	mode       TEXT    NOT NULL,
	vm_id      TEXT    NOT NULL DEFAULT '',
	tags       TEXT    NOT NULL DEFAULT '[]',
	created_at BIGINT  NOT NULL,
	deleted_at BIGINT  NOT NULL DEFAULT 0
);
CREATE INDEX runners_active ON runners(vm_id) WHERE deleted_at = 0;
CREATE INDEX runners_deleted ON runners(deleted_at) WHERE deleted_at != 0;
CREATE TABLE projects (
	project_id   BIGINT PRIMARY KEY,
	path         TEXT   NOT NULL DEFAULT '',
	last_hook_at BIGINT NOT NULL
);
CREATE TABLE job_counts (
	state TEXT   PRIMARY KEY,
	n     BIGINT NOT NULL
);
CREATE FUNCTION job_counts_fn() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
	IF TG_OP IN ('UPDATE', 'DELETE') THEN
		UPDATE job_counts SET n = n - 1 WHERE state = OLD.state;
	END IF;
	IF TG_OP IN ('UPDATE', 'INSERT') THEN
		INSERT INTO job_counts(state, n) VALUES (NEW.state, 1) ON CONFLICT(state) DO UPDATE SET n = job_counts.n + 1;
	END IF;
	RETURN NULL;
END $$;
CREATE TRIGGER job_counts_insert_delete AFTER INSERT OR DELETE ON jobs FOR EACH ROW EXECUTE FUNCTION job_counts_fn();
CREATE TRIGGER job_counts_update AFTER UPDATE OF state ON jobs FOR EACH ROW WHEN (OLD.state IS DISTINCT FROM NEW.state) EXECUTE FUNCTION job_counts_fn();
`,
	6: `
ALTER TABLE jobs ADD COLUMN host_id TEXT NOT NULL DEFAULT '';
CREATE INDEX jobs_claimed ON jobs(host_id) WHERE state IN ('new', 'queued', 'running');
CREATE TABLE hosts (
	host_id             TEXT   PRIMARY KEY,
	capacity_vcpus      BIGINT NOT NULL DEFAULT 0,
	capacity_memory_mib BIGINT NOT NULL DEFAULT 0,
	max_vms             BIGINT NOT NULL DEFAULT 0,
	pools               TEXT   NOT NULL DEFAULT '',
	version             TEXT   NOT NULL DEFAULT '',
	started_at          BIGINT NOT NULL DEFAULT 0,
	last_seen           BIGINT NOT NULL DEFAULT 0,
	lease_until         BIGINT NOT NULL DEFAULT 0,
	reaped_by           TEXT   NOT NULL DEFAULT '',
	reaped_at           BIGINT NOT NULL DEFAULT 0
);
CREATE TABLE leases (
	name    TEXT   PRIMARY KEY,
	host_id TEXT   NOT NULL,
	until   BIGINT NOT NULL
);
`,
}

// OpenPostgres opens the store in the PostgreSQL database dsn names and
// migrates it. dsn holds the password: it is never logged, and errors are
// pgx's, which name the host and user but not the password.
func OpenPostgres(ctx context.Context, dsn string) (*Store, error) {
	return openPostgres(ctx, dsn, false)
}

// OpenPostgresReadOnly opens a PostgreSQL store for inspection (firerunner
// status): no migration, no writes.
func OpenPostgresReadOnly(ctx context.Context, dsn string) (*Store, error) {
	return openPostgres(ctx, dsn, true)
}

func openPostgres(ctx context.Context, dsn string, readOnly bool) (*Store, error) {
	pc, err := pgxpool.ParseConfig(dsn)
	if err != nil {
		// pgx's parse errors may quote the DSN: say only that it is bad.
		return nil, errors.New("open store: state.postgres_dsn_file does not hold a valid PostgreSQL connection string")
	}
	if pc.MaxConns < 8 {
		// Webhooks, reconcile workers and the heartbeat each hold one
		// briefly; pgxpool's default (the CPU count) is small on 2 cores.
		pc.MaxConns = 8
	}
	pc.ConnConfig.RuntimeParams["application_name"] = "firerunner"
	if readOnly {
		pc.ConnConfig.RuntimeParams["default_transaction_read_only"] = "on"
	}
	pool, err := pgxpool.NewWithConfig(ctx, pc)
	if err != nil {
		return nil, fmt.Errorf("open store: %w", err)
	}
	db := stdlib.OpenDBFromPool(pool)
	s := &Store{db: db, pg: true, readOnly: readOnly, pool: pool}
	if err := db.PingContext(ctx); err != nil {
		s.Close()
		return nil, fmt.Errorf("open store: %w", err)
	}
	if !readOnly {
		if err := s.migrate(ctx); err != nil {
			s.Close()
			return nil, err
		}
	}
	return s, nil
}

// bind rewrites ? placeholders as $1, $2, … and ?N as $N for PostgreSQL
// (none of the store's SQL has a ? inside a string literal).
func (s *Store) bind(q string) string {
	if !s.pg {
		return q
	}
	if b, ok := s.bound.Load(q); ok {
		return b.(string)
	}
	var sb strings.Builder
	n := 0
	for i := 0; i < len(q); i++ {
		switch {
		case q[i] != '?':
			sb.WriteByte(q[i])
		case i+1 < len(q) && q[i+1] >= '1' && q[i+1] <= '9':
			sb.WriteByte('$') // numbered (?1): the same in both dialects
		default:
			n++
			sb.WriteString("$" + strconv.Itoa(n))
		}
	}
	b := sb.String()
	s.bound.Store(q, b)
	return b
}

// namedSQL is a named query's PostgreSQL text.
func (s *Store) namedSQL(name string) string {
	q := queries[name]
	if name == "lockJob" || name == "lockVM" {
		q += ` FOR UPDATE`
	}
	return s.bind(q)
}

// pruneSQL turns Prune's SQLite deletes (json_each over a JSON array of
// ids) into PostgreSQL's json_array_elements_text.
func (s *Store) pruneSQL(q string) string {
	if !s.pg {
		return q
	}
	cast := "::bigint"
	if strings.Contains(q, "vm_id IN") {
		cast = ""
	}
	return strings.Replace(q, "SELECT value FROM json_each(?)", "SELECT value"+cast+" FROM json_array_elements_text(?::json)", 1)
}

// retryable reports a PostgreSQL error that says "run the transaction
// again": a deadlock or a serialization failure between hosts.
func retryable(err error) bool {
	var pe *pgconn.PgError
	return errors.As(err, &pe) && (pe.Code == "40P01" || pe.Code == "40001")
}
