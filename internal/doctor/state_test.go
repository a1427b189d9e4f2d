package doctor

import (
	"context"
	"os"
	"strings"
	"testing"

	"github.com/firerunner/firerunner/internal/config"
	"github.com/firerunner/firerunner/internal/store"
	"github.com/firerunner/firerunner/internal/testsupport/pgtest"
)

func TestMain(m *testing.M) { os.Exit(pgtest.Main(m)) }

// TestStateCheck: the state check against a real throwaway PostgreSQL, from
// an unmigrated database to a current one, and each way it fails; the DSN
// (which holds the password) never appears in what it says.
func TestStateCheck(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	dsn := pgtest.NewDatabase(t)
	env := &Env{Config: config.Default()}
	env.Config.State.Backend = "postgres"
	env.Config.State.PostgresDSNFile = pgtest.DSNFile(t, dir, dsn)
	check := func(want Status, detail string) {
		t.Helper()
		r := checkState(ctx, env)
		if r.Status != want || !strings.Contains(r.Detail, detail) {
			t.Fatalf("state check = %s %q (fix %q), want %s containing %q", r.Status, r.Detail, r.Fix, want, detail)
		}
		if strings.Contains(r.Detail+r.Fix, dsn) {
			t.Fatalf("state check shows the DSN: %q", r.Detail)
		}
	}
	check(Warn, "schema version 0, this release needs")
	s, err := store.OpenPostgres(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	s.Close()
	check(Pass, "PostgreSQL 1")

	if err := os.Chmod(env.Config.State.PostgresDSNFile, 0o644); err != nil {
		t.Fatal(err)
	}
	check(Fail, "0644")
	env.Config.State.PostgresDSNFile = pgtest.DSNFile(t, t.TempDir(), "postgres://nobody@127.0.0.1:1/none?connect_timeout=2")
	check(Fail, "open store")
	env.Config.State.Backend = "sqlite"
	check(Pass, "SQLite store")
}
