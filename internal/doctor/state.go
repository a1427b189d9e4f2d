package doctor

import (
	"context"
	"fmt"
	"strconv"
	"time"

	"github.com/firerunner/firerunner/internal/config"
	"github.com/firerunner/firerunner/internal/store"
)

// minPostgres is the oldest PostgreSQL the store's SQL is written for
// (docs/fleet.md): SKIP LOCKED, ON CONFLICT and the JSON it uses are older,
// but 13 is the oldest release still tested here and supported upstream.
const minPostgres = 130000

// checkState checks the store the config names. SQLite needs nothing but
// state_dir (checked with the disk); a PostgreSQL fleet store is the part
// of a multi-host setup most often wrong at first start, so doctor connects
// read-only, as `serve` would, and says what is missing: the DSN file's
// mode, the server, its version, and whether this binary's migrations ran.
func checkState(ctx context.Context, e *Env) Result {
	st := e.Config.State
	if st.Backend != "postgres" {
		return pass("state", "SQLite store in %s (one host; state.backend postgres for a fleet)", e.Config.StateDir)
	}
	fix := fmt.Sprintf("put a libpq connection string (postgres://user:password@host/db) in %s, mode 0600, owned by root; see docs/fleet.md", st.PostgresDSNFile)
	dsn, err := config.ReadSecret(st.PostgresDSNFile)
	if err != nil {
		return res("state", Fail, fix, "state.postgres_dsn_file: %v", err)
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	s, err := store.OpenPostgresReadOnly(ctx, dsn)
	if err != nil {
		return res("state", Fail, "check that the server runs, is reachable from this host and accepts the DSN's user (pg_hba.conf)", "%v", err)
	}
	defer s.Close()
	num, err := s.ServerVersionNum(ctx)
	if err != nil {
		return res("state", Fail, "check the server and the DSN's user", "PostgreSQL server version: %v", err)
	}
	if num < minPostgres {
		return res("state", Fail, "upgrade PostgreSQL to 13 or newer", "PostgreSQL %s is older than 13", pgVersion(num))
	}
	have, err := s.SchemaVersion(ctx)
	if err != nil {
		// No schema_migrations table yet: nothing has migrated this database.
		have = 0
	}
	switch want := store.LatestSchemaVersion(); {
	case have < want:
		return res("state", Warn, "the first `firerunner serve` of this release migrates it (under an advisory lock, so hosts starting together are safe)",
			"PostgreSQL %s reachable; schema version %d, this release needs %d", pgVersion(num), have, want)
	case have > want:
		return res("state", Fail, "upgrade this host to the release the other hosts run",
			"schema version %d is newer than this release's %d: another host runs a newer FireRunner", have, want)
	}
	return pass("state", "PostgreSQL %s reachable, schema version %d (current)", pgVersion(num), have)
}

// pgVersion renders server_version_num (150018) as 15.18.
func pgVersion(num int) string {
	return strconv.Itoa(num/10000) + "." + strconv.Itoa(num%10000)
}
