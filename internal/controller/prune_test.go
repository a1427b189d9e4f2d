package controller

import (
	"context"
	"database/sql"
	"path/filepath"
	"testing"
	"time"

	"github.com/firerunner/firerunner/internal/job"
	"github.com/firerunner/firerunner/internal/store"
)

// The periodic sweep applies state.retention: an ended job last changed
// longer ago is pruned with its transitions; a recent one stays; with
// retention 0 nothing is pruned.
func TestSweepPrunesOldHistory(t *testing.T) {
	for _, tc := range []struct {
		name      string
		retention time.Duration
		oldGone   bool
	}{{"default 14 days", 14 * 24 * time.Hour, true}, {"retention 0 keeps everything", 0, false}} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t, func(h *harness) { h.cfg.State.Retention = tc.retention })
			// Two jobs without a size tag: ignored at once.
			old, recent := h.newJob("docker"), h.newJob("docker")
			h.waitState(old, job.Ignored)
			h.waitState(recent, job.Ignored)
			// Job 1 ended 20 days ago (dated through a second connection,
			// as SQLite's WAL allows).
			db, err := sql.Open("sqlite", filepath.Join(h.dir, store.FileName))
			if err != nil {
				t.Fatal(err)
			}
			defer db.Close()
			if _, err := db.Exec(`UPDATE jobs SET updated_at = ? WHERE job_id = ?`, time.Now().Add(-20*24*time.Hour).UnixNano(), old); err != nil {
				t.Fatal(err)
			}
			h.c.ReconcileOnce(context.Background())
			if _, err := h.st.GetJob(context.Background(), old); (err == nil) == tc.oldGone {
				t.Errorf("job 1 (ended 20 days ago): GetJob err %v; want pruned %v", err, tc.oldGone)
			}
			if tr, _ := h.st.Transitions(context.Background(), old); (len(tr) == 0) != tc.oldGone {
				t.Errorf("job 1's transitions: %d left; want pruned %v", len(tr), tc.oldGone)
			}
			h.job(recent) // recent: kept
		})
	}
}
