package runners

import (
	"context"
	"errors"
	"testing"

	"github.com/firerunner/firerunner/internal/gitlabapi"
)

// poolAPI is recordingAPI plus token resets; created runners are listed.
type poolAPI struct {
	recordingAPI
	resets []int64
	gone   map[int64]bool
}

func (a *poolAPI) CreateRunner(ctx context.Context, s gitlabapi.RunnerSpec) (gitlabapi.Runner, error) {
	r, err := a.recordingAPI.CreateRunner(ctx, s)
	if err == nil {
		a.list = append(a.list, gitlabapi.RunnerInfo{ID: r.ID, Description: s.Description})
	}
	return r, err
}

func (a *poolAPI) ResetRunnerToken(_ context.Context, id int64) (string, error) {
	if a.gone[id] {
		return "", &gitlabapi.APIError{Op: "reset_runner_token", Status: 404, Message: "404 Runner Not Found"}
	}
	a.resets = append(a.resets, id)
	return "glrt-" + "rotated", nil
}

// TestPooledOneRunnerPerPoolRotatedAtRestart: a pool's runner is created
// once and shared (every lease the same runner); a new provider (a
// restart) finds it by its description and rotates its token instead of
// creating another; releasing never deletes it; a runner deleted behind
// FireRunner's back is replaced.
func TestPooledOneRunnerPerPoolRotatedAtRestart(t *testing.T) {
	ctx := context.Background()
	api := &poolAPI{}
	cfg := PooledConfig{OneOffConfig: OneOffConfig{Scope: "instance", DescriptionPrefix: "fr", HostID: "h1"}, Pools: []string{"firecracker-1cpu-1gb"}}
	p, err := NewPooled(api, cfg)
	if err != nil {
		t.Fatal(err)
	}
	var first Lease
	for i := range 3 {
		l, err := p.PoolLease(ctx, "firecracker-1cpu-1gb")
		if err != nil || !l.Shared || l.RunnerID == 0 || l.Token == "" {
			t.Fatalf("lease %d: %+v %v", i, l, err)
		}
		if i == 0 {
			first = l
		} else if l.RunnerID != first.RunnerID {
			t.Fatalf("lease %d got runner %d, want the pool's %d", i, l.RunnerID, first.RunnerID)
		}
	}
	if len(api.specs) != 1 || api.specs[0].Description != "fr h1 pool firecracker-1cpu-1gb" || api.specs[0].RunUntagged ||
		len(api.specs[0].TagList) != 1 || api.specs[0].TagList[0] != "firecracker-1cpu-1gb" {
		t.Fatalf("creations: %+v", api.specs)
	}
	if err := p.Release(ctx, Lease{RunnerID: first.RunnerID}); err != nil || len(api.deleted) != 0 {
		t.Fatalf("release deleted the pool's runner: %v %v", err, api.deleted)
	}
	if _, err := p.PoolLease(ctx, "firecracker-2cpu-2gb"); err == nil {
		t.Fatal("a lease of a size without a pool")
	}
	owned, err := p.Owned(ctx)
	if err != nil || len(owned) != 1 || owned[0].Pool != "firecracker-1cpu-1gb" || owned[0].RunnerID != first.RunnerID {
		t.Fatalf("owned: %+v %v", owned, err)
	}

	restarted, err := NewPooled(api, cfg)
	if err != nil {
		t.Fatal(err)
	}
	l, err := restarted.PoolLease(ctx, "firecracker-1cpu-1gb")
	if err != nil || l.RunnerID != first.RunnerID || len(api.specs) != 1 || len(api.resets) != 1 || api.resets[0] != first.RunnerID {
		t.Fatalf("after restart: %+v %v, creations %d, resets %v", l, err, len(api.specs), api.resets)
	}
	if err := restarted.Rotate(ctx, first.RunnerID); err != nil || len(api.resets) != 2 {
		t.Fatalf("rotate: %v %v", err, api.resets)
	}

	api.gone = map[int64]bool{first.RunnerID: true}
	again, _ := NewPooled(api, cfg)
	if l, err := again.PoolLease(ctx, "firecracker-1cpu-1gb"); err != nil || l.RunnerID == first.RunnerID || len(api.specs) != 2 {
		t.Fatalf("a deleted pool runner should be replaced: %+v %v", l, err)
	}

	api.err = errors.New("wrapped: " + gitlabapi.ErrRunnerLimit.Error())
	if _, err := NewPooled(api, PooledConfig{OneOffConfig: OneOffConfig{Scope: "project", DescriptionPrefix: "fr", HostID: "h1"}}); err == nil {
		t.Fatal("pooled mode accepted scope project")
	}
}
