package store

import (
	"context"
	"testing"
	"time"

	"github.com/firerunner/firerunner/internal/job"
)

// BenchmarkDisplaced: the displaced-job lookup runs on every "finished"
// webhook, over a day of history (20,000 ended jobs, 1% of them swapped).
func BenchmarkDisplaced(b *testing.B) {
	ctx := context.Background()
	s, err := Open(ctx, b.TempDir())
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	for id := int64(1); id <= 20000; id++ {
		if _, _, err := s.Create(ctx, newJob(id)); err != nil {
			b.Fatal(err)
		}
		picked := id // ran its own job
		if id%100 == 0 {
			picked = id + 1 // ran the next job: id is displaced
		}
		if _, err := s.UpdatePath(ctx, id, []job.State{job.RunnerCreated, job.VMStarting, job.Running, job.Cleaning, job.Done}, func(j *job.Job) error {
			j.RunnerID, j.VMID, j.PickedJobID = id, job.VMIDFor(id), picked
			return nil
		}); err != nil {
			b.Fatal(err)
		}
	}
	since := time.Now().Add(-24 * time.Hour)
	b.ResetTimer()
	for b.Loop() {
		got, err := s.Displaced(ctx, since)
		if err != nil || len(got) != 200 {
			b.Fatalf("displaced: %d jobs, %v; want 200", len(got), err)
		}
	}
}
