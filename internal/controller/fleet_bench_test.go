package controller

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/firerunner/firerunner/internal/job"
	"github.com/firerunner/firerunner/internal/store"
	"github.com/firerunner/firerunner/internal/testsupport/pgtest"
)

// benchDSN, when set, makes runBenchIn put its store in that PostgreSQL
// database instead of SQLite.
var benchDSN string

// BenchmarkFleet prints PostgreSQL next to SQLite (make bench-fleet), on a
// throwaway PostgreSQL cluster with fsync on (durable, like production):
//   - claims per second: 3,000 waiting jobs claimed by three hosts at once
//     (each its own connection pool, 4 claimers each, every claimer trying
//     every job in its own random order: most attempts lose), against one
//     SQLite host claiming them alone;
//   - BenchmarkControllerOverhead's run (1,000 jobs, the real controller,
//     fake VMs, loopback GitLab stand-in) on each store: webhook → VM start
//     request p50/p99 one job at a time, and jobs/s with 16 senders.
func BenchmarkFleet(b *testing.B) {
	if why := pgtest.Available(); why != "" {
		b.Skip("PostgreSQL: " + why)
	}
	pg, err := pgtest.Start(pgtest.Options{Durable: true})
	if err != nil {
		b.Fatal(err)
	}
	defer pg.Stop()
	const claims, jobs = 3000, 1000
	type row struct {
		name               string
		claimsPerSec       float64
		claimHosts         int
		seq, con           benchResult
		lostAttempts       int64
		claimedMoreThanOne bool
	}
	var rows []row
	for i := 0; i < b.N; i++ {
		rows = rows[:0]
		for _, backend := range []string{"sqlite", "postgres"} {
			r := row{name: backend}
			// Claims.
			var open func() *store.Store
			if backend == "sqlite" {
				dir := b.TempDir()
				s, err := store.Open(context.Background(), dir)
				if err != nil {
					b.Fatal(err)
				}
				defer s.Close()
				open = func() *store.Store { return s }
				r.claimHosts = 1
			} else {
				dsn, err := pg.CreateDatabase()
				if err != nil {
					b.Fatal(err)
				}
				open = func() *store.Store {
					s, err := store.OpenPostgres(context.Background(), dsn)
					if err != nil {
						b.Fatal(err)
					}
					b.Cleanup(func() { s.Close() })
					return s
				}
				r.claimHosts = 3
			}
			r.claimsPerSec, r.lostAttempts, r.claimedMoreThanOne = benchClaims(b, open, r.claimHosts, claims)
			// The controller's runs, each on a fresh store (job ids restart
			// with each GitLab stand-in).
			fresh := func() {
				if backend == "postgres" {
					dsn, err := pg.CreateDatabase()
					if err != nil {
						b.Fatal(err)
					}
					benchDSN = dsn
				}
			}
			fresh()
			r.seq = runBench(b, jobs, 1)
			fresh()
			r.con = runBench(b, jobs, 16)
			benchDSN = ""
			rows = append(rows, r)
			b.ReportMetric(r.claimsPerSec, backend+"-claims/s")
			b.ReportMetric(r.seq.p99.Seconds()*1e3, backend+"-p99-ms")
		}
	}
	fmt.Printf("\nFireRunner fleet store, GOMAXPROCS=%d (PostgreSQL %s, fsync on, Unix socket; SQLite WAL in a temp dir)\n", runtime.GOMAXPROCS(0), "throwaway cluster")
	fmt.Printf("%-10s %7s %14s %16s %13s %13s %13s %17s\n", "store", "hosts", "claims/s", "lost attempts", "p50 webhook→", "p99 webhook→", "max webhook→", "jobs/s (16 senders,")
	fmt.Printf("%-10s %7s %14s %16s %13s %13s %13s %17s\n", "", "claiming", "(3,000 jobs)", "(claim races)", "VM start req", "VM start req", "VM start req", "webhook→cleanup)")
	for _, r := range rows {
		fmt.Printf("%-10s %7d %14.0f %16d %13s %13s %13s %17.0f\n", r.name, r.claimHosts, r.claimsPerSec, r.lostAttempts, ms(r.seq.p50), ms(r.seq.p99), ms(r.seq.max), r.con.jobsPerSec)
		if r.claimedMoreThanOne {
			b.Errorf("%s: a job was claimed by two hosts", r.name)
		}
	}
	if l, err := os.ReadFile("/proc/loadavg"); err == nil {
		fmt.Printf("host load average: %s", l)
	}
	fmt.Printf("webhook→VM start request is one host's path (its own store handle); claims race across hosts on PostgreSQL only\n\n")
}

// benchClaims queues n jobs, then lets hosts claim them concurrently (4
// claimers per host, each trying every job in its own random order). It
// returns successful claims per second, the attempts that lost a race,
// and whether any job was claimed twice.
func benchClaims(b *testing.B, open func() *store.Store, hosts, n int) (perSec float64, lost int64, twice bool) {
	ctx := context.Background()
	s0 := open()
	size := sizeOf(&testing.T{}, tag1x1)
	for id := int64(1); id <= int64(n); id++ {
		if _, _, err := s0.Observe(ctx, store.Observation{JobID: id, ProjectID: 1, Status: job.StatusPending, Source: "webhook", At: time.Now(), Create: true}); err != nil {
			b.Fatal(err)
		}
		if _, err := s0.UpdateJob(ctx, id, func(j *job.Job) error { return j.Accept([]string{tag1x1}, size, time.Now()) }); err != nil {
			b.Fatal(err)
		}
	}
	stores := []*store.Store{s0}
	for len(stores) < hosts {
		stores = append(stores, open())
	}
	for h := range hosts {
		if _, err := stores[h].Heartbeat(ctx, store.Host{ID: fmt.Sprint("bench-", h)}, time.Hour); err != nil {
			b.Fatal(err)
		}
	}
	owner := make([]atomic.Int32, n+1)
	var lostN atomic.Int64
	var twiceB atomic.Bool
	var wg sync.WaitGroup
	begin := time.Now()
	for h := range hosts {
		for w := range 4 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				rnd := rand.New(rand.NewPCG(uint64(h), uint64(w)))
				for _, i := range rnd.Perm(n) {
					id := int64(i + 1)
					if owner[id].Load() != 0 {
						continue // known taken: a real plan would not list it again
					}
					err := stores[h].Tx(ctx, func(tx *store.Tx) error { return tx.ClaimJob(id, fmt.Sprint("bench-", h)) })
					switch {
					case err == nil:
						if !owner[id].CompareAndSwap(0, int32(h+1)) && owner[id].Load() != int32(h+1) {
							twiceB.Store(true)
						}
					case errors.Is(err, store.ErrNotClaimed):
						lostN.Add(1)
					default:
						b.Error(err)
						return
					}
				}
			}()
		}
	}
	wg.Wait()
	return float64(n) / time.Since(begin).Seconds(), lostN.Load(), twiceB.Load()
}
