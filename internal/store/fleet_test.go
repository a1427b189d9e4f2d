package store

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/firerunner/firerunner/internal/job"
	"github.com/firerunner/firerunner/internal/tags"
)

// queue records n waiting jobs (ids 1..n) of size 1cpu-1gb.
func queue(t *testing.T, s *Store, n int) {
	t.Helper()
	size, _, _ := tags.Parse([]string{"firecracker-1cpu-1gb"}, tags.Limits{})
	for id := int64(1); id <= int64(n); id++ {
		observe(t, s, id, job.StatusPending, 0, true)
		if _, err := s.UpdateJob(context.Background(), id, func(j *job.Job) error {
			return j.Accept([]string{"firecracker-1cpu-1gb"}, size, time.Now())
		}); err != nil {
			t.Fatal(err)
		}
	}
}

// TestClaimExactlyOnce: three hosts, each on its own connection pool,
// race to claim the same 200 waiting jobs; every job ends claimed by
// exactly one host, and each host's claim is what the store says.
func TestClaimExactlyOnce(t *testing.T) { eachBackend(t, testClaimExactlyOnce) }

func testClaimExactlyOnce(t *testing.T, b backend) {
	ctx := context.Background()
	const n = 200
	s0 := b.open(t)
	queue(t, s0, n)
	hosts := []string{"h1", "h2", "h3"}
	stores := map[string]*Store{}
	for _, h := range hosts {
		s := s0
		if b.name != "sqlite" { // SQLite is one host's store: one handle
			s = b.open(t)
		}
		stores[h] = s
		if _, err := s.Heartbeat(ctx, Host{ID: h, VCPUs: 4}, time.Minute); err != nil {
			t.Fatal(err)
		}
	}
	got := map[string][]int64{}
	var mu sync.Mutex
	var wg sync.WaitGroup
	for _, h := range hosts {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for id := int64(1); id <= n; id++ {
				err := stores[h].Tx(ctx, func(tx *Tx) error { return tx.ClaimJob(id, h) })
				switch {
				case err == nil:
					mu.Lock()
					got[h] = append(got[h], id)
					mu.Unlock()
				case !errors.Is(err, ErrNotClaimed):
					t.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
	owner := map[int64]string{}
	for h, ids := range got {
		for _, id := range ids {
			if o, dup := owner[id]; dup && o != h {
				t.Fatalf("job %d claimed by %s and %s", id, o, h)
			}
			owner[id] = h
		}
	}
	for id := int64(1); id <= n; id++ {
		j, err := s0.GetJob(ctx, id)
		if err != nil || j.HostID == "" || j.HostID != owner[id] {
			t.Fatalf("job %d: stored claim %q, claimer %q (%v)", id, j.HostID, owner[id], err)
		}
	}
	for _, f := range []Filter{{ActiveOnly: true, ClaimableBy: "h1"}, {State: job.Queued, ClaimableBy: "h1"}, {ClaimableBy: "h1"}, {ClaimableBy: "h1", Limit: 500}} {
		if js, err := s0.ListJobs(ctx, f); err != nil || len(js) != len(got["h1"]) {
			t.Fatalf("jobs claimable by h1 (%+v): %d %v, want %d", f, len(js), err, len(got["h1"]))
		}
	}
	if c, err := s0.UnclaimedReady(ctx); err != nil || c != 0 {
		t.Fatalf("unclaimed %d %v", c, err)
	}
	t.Logf("%s: claims per host %d/%d/%d", b.name, len(got["h1"]), len(got["h2"]), len(got["h3"]))
}

// TestHostLeases: a host without a valid lease cannot claim; an expired
// host is reaped by exactly one other host, once per lease; its next
// heartbeat learns who reaped it; the poll lease has one holder.
func TestHostLeases(t *testing.T) { eachBackend(t, testHostLeases) }

func testHostLeases(t *testing.T, b backend) {
	ctx := context.Background()
	s := b.open(t)
	queue(t, s, 2)
	claim := func(id int64, h string) error { return s.Tx(ctx, func(tx *Tx) error { return tx.ClaimJob(id, h) }) }
	if err := claim(1, "ghost"); !errors.Is(err, ErrNotClaimed) {
		t.Fatalf("a host that never heartbeat claimed a job: %v", err)
	}
	if _, err := s.Heartbeat(ctx, Host{ID: "a", VCPUs: 2, MemoryMiB: 2048}, 50*time.Millisecond); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Heartbeat(ctx, Host{ID: "b"}, time.Minute); err != nil {
		t.Fatal(err)
	}
	if err := claim(1, "a"); err != nil {
		t.Fatal(err)
	}
	if err := claim(1, "b"); !errors.Is(err, ErrNotClaimed) {
		t.Fatalf("b took a's job: %v", err)
	}
	if ok, err := s.Reap(ctx, "a", "b", time.Minute); ok || err != nil {
		t.Fatalf("a live host reaped: %v %v", ok, err)
	}
	time.Sleep(80 * time.Millisecond)
	if err := claim(2, "a"); !errors.Is(err, ErrNotClaimed) {
		t.Fatalf("a host whose lease ended claimed a job: %v", err)
	}
	var wins int
	for _, by := range []string{"b", "c", "b"} {
		ok, err := s.Reap(ctx, "a", by, time.Minute)
		if err != nil {
			t.Fatal(err)
		}
		if ok {
			wins++
		}
	}
	if wins != 1 {
		t.Fatalf("a dead host was reaped %d times within one lease", wins)
	}
	if by, err := s.Heartbeat(ctx, Host{ID: "a"}, time.Minute); err != nil || by != "b" {
		t.Fatalf("returning host: reaped by %q %v, want b", by, err)
	}
	if cl, err := s.ClaimedJobs(ctx, "a"); err != nil || len(cl) != 1 || cl[0].ID != 1 {
		t.Fatalf("claimed jobs of a: %+v %v", cl, err)
	}
	hs, err := s.Hosts(ctx)
	if err != nil || len(hs) != 2 || !hs[0].Alive(time.Now()) || hs[0].ReapedBy != "" {
		t.Fatalf("hosts %+v %v", hs, err)
	}
	for i, want := range []bool{true, false, true} {
		h := []string{"a", "b", "a"}[i]
		if ok, err := s.TryLease(ctx, "poll", h, time.Minute); err != nil || ok != want {
			t.Fatalf("lease %d for %s: %v %v, want %v", i, h, ok, err, want)
		}
	}
	if err := s.LeaveFleet(ctx, "a"); err != nil {
		t.Fatal(err)
	}
	if ok, _ := s.Reap(ctx, "a", "b", time.Minute); ok {
		t.Fatal("a host that left cleanly was reaped")
	}
	load, err := s.FleetLoad(ctx)
	if err != nil || load["a"] == nil || load["a"].Jobs[job.Queued] != 1 || load[""].Jobs[job.Queued] != 1 {
		t.Fatalf("load %v %v", fmt.Sprint(load), err)
	}
}

// TestPostgresErrorsHideTheDSN: a bad or unreachable connection string
// fails with an error that never quotes its password.
func TestPostgresErrorsHideTheDSN(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for _, dsn := range []string{
		"postgres://fr:s3cretpw@[::1", // unparsable
		"host=/nonexistent-dir port=5432 user=fr password=s3cretpw dbname=x connect_timeout=2", // unreachable
	} {
		s, err := OpenPostgres(ctx, dsn)
		if err == nil {
			s.Close()
			t.Fatalf("%q opened", dsn)
		}
		t.Logf("%v", err)
		if strings.Contains(err.Error(), "s3cretpw") {
			t.Errorf("the password reached the error: %v", err)
		}
	}
}
