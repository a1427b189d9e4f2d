package store

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/firerunner/firerunner/internal/job"
)

// Host is one fleet member's row: what it offers and its lease. A host
// heartbeats every state.heartbeat_interval, extending its lease by
// state.host_lease; a host whose lease ended is dead to the others, and one
// of them reconciles its jobs (Reap).
type Host struct {
	ID                       string
	VCPUs, MemoryMiB, MaxVMs int
	Pools                    string // the pools' sizes and bounds, for status
	Version                  string
	StartedAt, LastSeen      time.Time
	LeaseUntil               time.Time
	ReapedBy                 string // the host that reconciled it after its lease ended
	ReapedAt                 time.Time
}

// Alive reports whether the host's lease runs at now.
func (h Host) Alive(now time.Time) bool { return h.LeaseUntil.After(now) }

var hostCols = []string{"host_id", "capacity_vcpus", "capacity_memory_mib", "max_vms", "pools", "version", "started_at", "last_seen",
	"lease_until", "reaped_by", "reaped_at"}

func scanHost(r scanner) (Host, error) {
	var h Host
	var started, seen, until, reaped int64
	err := r.Scan(&h.ID, &h.VCPUs, &h.MemoryMiB, &h.MaxVMs, &h.Pools, &h.Version, &started, &seen, &until, &h.ReapedBy, &reaped)
	h.StartedAt, h.LastSeen, h.LeaseUntil, h.ReapedAt = tm(started), tm(seen), tm(until), tm(reaped)
	return h, err
}

// Heartbeat records that host h is alive until now+lease. It returns the
// host that reaped h (reconciled its jobs because its lease had ended)
// since h's previous heartbeat, or "": h's own records then were already
// settled by that host (its VMs stopping with reason host_lost), which
// h's sweep finishes.
func (s *Store) Heartbeat(ctx context.Context, h Host, lease time.Duration) (reapedBy string, err error) {
	now := time.Now()
	err = s.Tx(ctx, func(tx *Tx) error {
		rows, err := tx.query(`SELECT reaped_by FROM hosts WHERE host_id = ?`+tx.s.forUpdate(), h.ID)
		prev, err := scanRows(rows, err, func(r scanner) (string, error) {
			var x string
			return x, r.Scan(&x)
		})
		if err != nil {
			return err
		}
		reapedBy = ""
		if len(prev) == 1 {
			reapedBy = prev[0]
		}
		started := ns(h.StartedAt)
		if started == 0 {
			started = ns(now)
		}
		_, err = tx.exec(`INSERT INTO hosts(host_id, capacity_vcpus, capacity_memory_mib, max_vms, pools, version, started_at, last_seen, lease_until, reaped_by, reaped_at)
			VALUES(?, ?, ?, ?, ?, ?, ?, ?, ?, '', 0)
			ON CONFLICT(host_id) DO UPDATE SET capacity_vcpus = excluded.capacity_vcpus, capacity_memory_mib = excluded.capacity_memory_mib,
				max_vms = excluded.max_vms, pools = excluded.pools, version = excluded.version, started_at = excluded.started_at,
				last_seen = excluded.last_seen, lease_until = excluded.lease_until, reaped_by = '', reaped_at = 0`,
			h.ID, h.VCPUs, h.MemoryMiB, h.MaxVMs, h.Pools, h.Version, started, ns(now), ns(now.Add(lease)))
		return err
	})
	return reapedBy, err
}

// forUpdate is the row-lock suffix of a SELECT inside a Tx (PostgreSQL).
func (s *Store) forUpdate() string {
	if s.pg {
		return ` FOR UPDATE`
	}
	return ``
}

// LeaveFleet ends host's lease at once after a clean drain, marking it
// reaped by itself: nothing of it is left for another host to reconcile.
func (s *Store) LeaveFleet(ctx context.Context, host string) error {
	return s.Tx(ctx, func(tx *Tx) error {
		_, err := tx.exec(`UPDATE hosts SET lease_until = ?, last_seen = ?, reaped_by = host_id, reaped_at = ? WHERE host_id = ?`,
			ns(tx.now), ns(tx.now), ns(tx.now), host)
		return err
	})
}

// Hosts lists the fleet's hosts by id.
func (s *Store) Hosts(ctx context.Context) ([]Host, error) {
	rows, err := s.query(ctx, selectSQL("hosts", hostCols, `ORDER BY host_id`))
	return scanRows(rows, err, scanHost)
}

// Reap takes the right to reconcile dead host's jobs: its lease ended
// before now, and no host reaped it within the last lease (a reaper that
// died half-way is replaced; every reap step is idempotent). Exactly one
// caller gets true.
func (s *Store) Reap(ctx context.Context, dead, by string, lease time.Duration) (bool, error) {
	var ok bool
	err := s.Tx(ctx, func(tx *Tx) error {
		res, err := tx.exec(`UPDATE hosts SET reaped_by = ?, reaped_at = ? WHERE host_id = ? AND host_id != ? AND lease_until < ? AND reaped_at < ?`,
			by, ns(tx.now), dead, by, ns(tx.now), ns(tx.now.Add(-lease)))
		if err != nil {
			return err
		}
		n, _ := res.RowsAffected()
		ok = n == 1
		return nil
	})
	return ok, err
}

// TryLease takes or renews the named lease for host until now+ttl; it
// fails (false) while another host holds it. The backstop poll's leader
// holds "poll".
func (s *Store) TryLease(ctx context.Context, name, host string, ttl time.Duration) (bool, error) {
	var ok bool
	err := s.Tx(ctx, func(tx *Tx) error {
		res, err := tx.exec(`INSERT INTO leases(name, host_id, until) VALUES(?, ?, ?)
			ON CONFLICT(name) DO UPDATE SET host_id = excluded.host_id, until = excluded.until
			WHERE leases.host_id = excluded.host_id OR leases.until < ?`, name, host, ns(tx.now.Add(ttl)), ns(tx.now))
		if err != nil {
			return err
		}
		n, _ := res.RowsAffected()
		ok = n == 1
		return nil
	})
	return ok, err
}

// ErrNotClaimed is returned by ClaimJob when the job is not (or no longer)
// a waiting job this host may take: another host claimed it, it moved on,
// or this host's own lease is not valid (it must not start VMs then).
var ErrNotClaimed = errors.New("job not claimed")

// ClaimJob makes host the one that serves waiting job id, atomically: the
// conditional UPDATE succeeds for exactly one host, and only while that
// host's lease runs and it was not reaped. Claiming a job already this
// host's is a no-op success.
func (t *Tx) ClaimJob(id int64, host string) error {
	res, err := t.exec(`UPDATE jobs SET host_id = ? WHERE job_id = ? AND state = 'queued' AND host_id IN ('', ?)
		AND EXISTS (SELECT 1 FROM hosts WHERE hosts.host_id = ? AND hosts.lease_until > ? AND hosts.reaped_by = '')`,
		host, id, host, host, ns(t.now))
	if err != nil {
		return fmt.Errorf("claim job %d: %w", id, err)
	}
	if n, _ := res.RowsAffected(); n != 1 {
		return ErrNotClaimed
	}
	return nil
}

// HostAlive reports, inside the transaction, whether host's lease runs
// and it was not reaped (a warm VM is planned only then).
func (t *Tx) HostAlive(host string) (bool, error) {
	rows, err := t.query(`SELECT 1 FROM hosts WHERE host_id = ? AND lease_until > ? AND reaped_by = ''`, host, ns(t.now))
	n, err := scanRows(rows, err, func(r scanner) (int, error) {
		var x int
		return x, r.Scan(&x)
	})
	return len(n) == 1, err
}

// UnclaimedReady counts waiting jobs no host claimed whose back-off is
// over: a host with room plans when there are any.
func (s *Store) UnclaimedReady(ctx context.Context) (int, error) {
	var n int
	err := s.db.QueryRowContext(ctx, s.bind(`SELECT COUNT(*) FROM jobs WHERE host_id = '' AND state = 'queued' AND not_before <= ?`),
		ns(time.Now())).Scan(&n)
	return n, err
}

// ClaimedJobs lists the active jobs host claimed (a dead host's, for Reap).
func (s *Store) ClaimedJobs(ctx context.Context, host string) ([]job.Job, error) {
	rows, err := s.query(ctx, selectSQL("jobs", jobCols, `WHERE host_id = ? AND state IN ('new', 'queued', 'running') ORDER BY created_at, job_id`), host)
	return scanRows(rows, err, scanJob)
}

// HostLoad is what one host holds now, for firerunner status --fleet.
type HostLoad struct {
	Jobs             map[job.State]int // active jobs it claimed
	VMs              int               // its live VMs
	VCPUs, MemoryMiB int               // their size
}

// FleetLoad returns each host's load.
func (s *Store) FleetLoad(ctx context.Context) (map[string]*HostLoad, error) {
	out := map[string]*HostLoad{}
	get := func(h string) *HostLoad {
		if out[h] == nil {
			out[h] = &HostLoad{Jobs: map[job.State]int{}}
		}
		return out[h]
	}
	rows, err := s.query(ctx, `SELECT host_id, state, COUNT(*) FROM jobs WHERE state IN ('new', 'queued', 'running') GROUP BY host_id, state`)
	if _, err := scanRows(rows, err, func(r scanner) (int, error) {
		var h, st string
		var n int
		err := r.Scan(&h, &st, &n)
		get(h).Jobs[job.State(st)] = n
		return n, err
	}); err != nil {
		return nil, err
	}
	rows, err = s.query(ctx, `SELECT host_id, COUNT(*), COALESCE(SUM(vcpus), 0), COALESCE(SUM(memory_mib), 0) FROM vms WHERE state != 'gone' GROUP BY host_id`)
	if _, err := scanRows(rows, err, func(r scanner) (int, error) {
		var h string
		var n, c, m int
		err := r.Scan(&h, &n, &c, &m)
		l := get(h)
		l.VMs, l.VCPUs, l.MemoryMiB = n, c, m
		return n, err
	}); err != nil {
		return nil, err
	}
	return out, nil
}

// pokeChannel is the PostgreSQL notification channel on which a host says
// "a waiting job is unclaimed": hosts with room plan at once instead of at
// their next heartbeat.
const pokeChannel = "firerunner_unclaimed"

// Poke tells every host of the fleet that waiting jobs may be unclaimed
// (pg_notify; a no-op on SQLite). Notifications are coalesced by the
// receivers, so poking often is cheap.
func (s *Store) Poke(ctx context.Context) error {
	if !s.pg || s.readOnly {
		return nil
	}
	_, err := s.db.ExecContext(ctx, `SELECT pg_notify($1, '')`, pokeChannel)
	return err
}

// Listen calls fn for every Poke of any host until ctx ends, on a
// connection of its own taken out of the pool (it stays in LISTEN). A lost
// connection is re-established after a second; the heartbeat's periodic
// scan covers the gap. SQLite: returns at once.
func (s *Store) Listen(ctx context.Context, fn func()) {
	if !s.pg {
		return
	}
	for ctx.Err() == nil {
		pc, err := s.pool.Acquire(ctx)
		if err != nil {
			sleepCtx(ctx, time.Second)
			continue
		}
		conn := pc.Hijack() // a LISTENing connection must not go back to the pool
		if _, err := conn.Exec(ctx, `LISTEN `+pokeChannel); err == nil {
			for {
				if _, err := conn.WaitForNotification(ctx); err != nil {
					break
				}
				fn()
			}
		}
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		_ = conn.Close(cctx)
		cancel()
		sleepCtx(ctx, time.Second)
	}
}

func sleepCtx(ctx context.Context, d time.Duration) {
	select {
	case <-ctx.Done():
	case <-time.After(d):
	}
}
