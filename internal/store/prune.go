package store

import (
	"context"
	"encoding/json"
	"time"
)

// Pruned counts what one Prune removed.
type Pruned struct {
	Jobs, VMs, Runners, Transitions int64
	// LongestTx is the longest of its transactions: the longest any other
	// store user waited for the connection because of it.
	LongestTx time.Duration
}

// Any reports whether anything was removed.
func (p Pruned) Any() bool { return p.Jobs+p.VMs+p.Runners+p.Transitions > 0 }

// Prune batches: each batch is one short transaction, so the store's one
// connection is free for webhooks and reconciles between batches; one call
// removes at most pruneMaxPerCall records of each kind and the next sweep
// goes on (a first prune of a long history spreads over a few sweeps).
var (
	pruneBatch      = 200
	pruneMaxPerCall = 20000
)

// Candidate queries. Their WHERE clauses repeat the partial indexes'
// conditions word for word (migration 4), which is what lets SQLite use
// those indexes; TestQueriesUseIndexes checks it.
const (
	// Ended jobs last changed before the cutoff, that no live VM is for or ran.
	pruneJobsSQL = `SELECT job_id FROM jobs
		WHERE state IN ('done', 'failed', 'canceled', 'ignored') AND updated_at < ?
		AND NOT EXISTS (SELECT 1 FROM vms WHERE vms.for_job = jobs.job_id AND vms.state != 'gone')
		AND NOT EXISTS (SELECT 1 FROM vms WHERE vms.picked_job_id = jobs.job_id AND vms.picked_job_id != 0 AND vms.state != 'gone')
		LIMIT ?`
	// Gone VMs last changed before the cutoff, unless the job they were for
	// or ran is still active (its timeline keeps them).
	pruneVMsSQL = `SELECT vm_id FROM vms
		WHERE state = 'gone' AND updated_at < ?
		AND NOT EXISTS (SELECT 1 FROM jobs WHERE jobs.job_id = vms.for_job AND jobs.state IN ('new', 'queued', 'running'))
		AND NOT EXISTS (SELECT 1 FROM jobs WHERE jobs.job_id = vms.picked_job_id AND jobs.state IN ('new', 'queued', 'running'))
		LIMIT ?`
	// Runners deleted in GitLab before the cutoff.
	pruneRunnersSQL = `SELECT runner_id FROM runners WHERE deleted_at != 0 AND deleted_at < ? LIMIT ?`
)

// Prune removes the history older than before: ended jobs (done, failed,
// canceled, ignored) last changed before it, with their transitions; gone
// VMs, with theirs; and runners deleted in GitLab before it. Nothing that
// is active, or that an active job's timeline shows, is touched. The
// controller's sweep calls it with now − state.retention; the zero time
// removes nothing.
func (s *Store) Prune(ctx context.Context, before time.Time) (Pruned, error) {
	var p Pruned
	if s.readOnly {
		return p, ErrReadOnly
	}
	if before.IsZero() {
		return p, nil
	}
	cut := before.UnixNano()
	for _, k := range []struct {
		pick  string
		del   []string // each takes the JSON array of ids
		count *int64
		trans bool // del[0] removes transitions
	}{
		{pruneJobsSQL, []string{
			`DELETE FROM transitions WHERE job_id IN (SELECT value FROM json_each(?))`,
			`DELETE FROM jobs WHERE job_id IN (SELECT value FROM json_each(?))`}, &p.Jobs, true},
		{pruneVMsSQL, []string{
			`DELETE FROM vm_transitions WHERE vm_id IN (SELECT value FROM json_each(?))`,
			`DELETE FROM vms WHERE vm_id IN (SELECT value FROM json_each(?))`}, &p.VMs, true},
		{pruneRunnersSQL, []string{
			`DELETE FROM runners WHERE runner_id IN (SELECT value FROM json_each(?))`}, &p.Runners, false},
	} {
		for done := 0; done < pruneMaxPerCall; {
			var n int
			t0 := time.Now()
			err := s.Tx(ctx, func(tx *Tx) error {
				rows, err := tx.query(k.pick, cut, pruneBatch)
				ids, err := scanRows(rows, err, func(r scanner) (any, error) {
					var id any
					return id, r.Scan(&id)
				})
				if err != nil || len(ids) == 0 {
					return err
				}
				arg, _ := json.Marshal(ids)
				for i, q := range k.del {
					res, err := tx.exec(s.pruneSQL(q), string(arg))
					if err != nil {
						return err
					}
					if i == 0 && k.trans {
						m, _ := res.RowsAffected()
						p.Transitions += m
					}
				}
				n = len(ids)
				return nil
			})
			p.LongestTx = max(p.LongestTx, time.Since(t0))
			if err != nil {
				return p, err
			}
			*k.count += int64(n)
			done += n
			if n < pruneBatch {
				break
			}
		}
	}
	return p, nil
}
