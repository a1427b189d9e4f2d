package runners

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/firerunner/firerunner/internal/gitlabapi"
)

// recordingAPI records what the provider asks GitLab for. The HTTP side of
// these calls is tested in gitlabapi and end to end in controller.
type recordingAPI struct {
	specs   []gitlabapi.RunnerSpec
	legacy  []string
	deleted []int64
	err     error
	list    []gitlabapi.RunnerInfo
	// listedAll counts GET /runners/all calls.
	listedAll int
	retagged  map[int64][]string
}

func (a *recordingAPI) UpdateRunnerTags(_ context.Context, id int64, t []string) error {
	if a.retagged == nil {
		a.retagged = map[int64][]string{}
	}
	a.retagged[id] = t
	return nil
}

func (a *recordingAPI) CreateRunner(_ context.Context, s gitlabapi.RunnerSpec) (gitlabapi.Runner, error) {
	a.specs = append(a.specs, s)
	if a.err != nil {
		return gitlabapi.Runner{}, a.err
	}
	return gitlabapi.Runner{ID: int64(len(a.specs)), Token: "glrt-secret"}, nil
}

func (a *recordingAPI) RegisterRunnerLegacy(ctx context.Context, tok string, s gitlabapi.RunnerSpec) (gitlabapi.Runner, error) {
	a.legacy = append(a.legacy, tok)
	return a.CreateRunner(ctx, s)
}

func (a *recordingAPI) DeleteRunner(_ context.Context, id int64) error {
	a.deleted = append(a.deleted, id)
	return nil
}

func (a *recordingAPI) ListAllRunners(ctx context.Context, prefix string) ([]gitlabapi.RunnerInfo, error) {
	a.listedAll++
	return a.ListOwnedRunners(ctx, prefix)
}

func (a *recordingAPI) ListOwnedRunners(_ context.Context, prefix string) ([]gitlabapi.RunnerInfo, error) {
	var out []gitlabapi.RunnerInfo
	for _, r := range a.list {
		if strings.HasPrefix(r.Description, prefix) {
			out = append(out, r)
		}
	}
	return out, nil
}

func TestOneOff(t *testing.T) {
	api := &recordingAPI{}
	p, err := NewOneOff(api, OneOffConfig{Scope: "project", MaximumTimeout: time.Hour, DescriptionPrefix: "fr", HostID: "h1"})
	if err != nil {
		t.Fatal(err)
	}
	l, err := p.Acquire(context.Background(), Request{VMID: "fr-abc", JobID: 42, ProjectID: 7, Tags: []string{"firecracker-2cpu-4gb", "Linux"}, JobName: "test"})
	if err != nil {
		t.Fatal(err)
	}
	s := api.specs[0]
	if s.Scope != "project" || s.ProjectID != 7 || !s.Locked || s.RunUntagged || s.MaximumTimeout != time.Hour ||
		s.Description != "fr h1 vm fr-abc job 42 project 7 (test)" || len(s.TagList) != 2 {
		t.Fatalf("spec %+v", s)
	}
	if l.TagSet != "firecracker-2cpu-4gb,linux" || l.Token != "glrt-secret" {
		t.Fatalf("lease %+v", l)
	}
	var buf bytes.Buffer
	slog.New(slog.NewTextHandler(&buf, nil)).Info("x", "lease", l)
	if strings.Contains(buf.String(), "glrt") || strings.Contains(fmt.Sprint(l), "glrt") {
		t.Fatalf("token printed: %s", buf.String())
	}
	if err := p.Release(context.Background(), Lease{RunnerID: 9}); err != nil || api.deleted[0] != 9 {
		t.Fatal("release did not delete")
	}

	if err := p.Retag(context.Background(), 9, []string{"a", "b"}); err != nil || len(api.retagged[9]) != 2 {
		t.Fatalf("retag: %v %v", err, api.retagged)
	}

	// Only this host's runners, and legacy ones (from before host ids).
	api.list = []gitlabapi.RunnerInfo{{ID: 1, Description: "fr h1 vm fr-abc job 42 project 7 (test)"}, {ID: 2, Description: "fr job x"},
		{ID: 3, Description: "frobnicator job 5"}, {ID: 4, Description: "fr job 99"}, {ID: 5, Description: "fr h2 vm fr-xyz job 43 project 7"},
		{ID: 6, Description: "fr h1x vm fr-abd job 44 project 7"}}
	owned, err := p.Owned(context.Background())
	if err != nil || len(owned) != 2 || owned[0].JobID != 42 || owned[0].VMID != "fr-abc" || owned[0].Legacy ||
		owned[1].JobID != 99 || !owned[1].Legacy {
		t.Fatalf("owned %+v %v", owned, err)
	}
	if api.listedAll != 0 {
		t.Fatal("project scope listed /runners/all")
	}

	api.err = fmt.Errorf("wrapped: %w", gitlabapi.ErrRunnerLimit)
	if _, err := p.Acquire(context.Background(), Request{JobID: 43, ProjectID: 7}); !errors.Is(err, ErrLimit) || !errors.Is(err, gitlabapi.ErrRunnerLimit) {
		t.Fatalf("limit error not mapped: %v", err)
	}
	// Any other error is passed on as it is: not a limit.
	other := &gitlabapi.APIError{Op: "create_runner", Status: 403, Message: "403 Forbidden"}
	api.err = other
	if l, err := p.Acquire(context.Background(), Request{JobID: 44, ProjectID: 7}); err != other || errors.Is(err, ErrLimit) || l.RunnerID != 0 {
		t.Fatalf("other error: %v (lease %+v), want the API's error unchanged", err, l)
	}
}

func TestOneOffScopesAndLegacy(t *testing.T) {
	api := &recordingAPI{}
	p, err := NewOneOff(api, OneOffConfig{Scope: "group", GroupID: 3, DescriptionPrefix: "fr", HostID: "h", LegacyRegistrationToken: "GR1348941x"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := p.Acquire(context.Background(), Request{JobID: 1, ProjectID: 7}); err != nil {
		t.Fatal(err)
	}
	if api.specs[0].GroupID != 3 || api.specs[0].ProjectID != 0 || len(api.legacy) != 1 {
		t.Fatalf("group/legacy: %+v %v", api.specs[0], api.legacy)
	}
	for _, tc := range []struct {
		cfg  OneOffConfig
		want string
	}{
		{OneOffConfig{Scope: "project", DescriptionPrefix: "fr", HostID: "a b"}, `runners: host id "a b" must be set and contain no spaces`},
		{OneOffConfig{Scope: "project", DescriptionPrefix: "fr"}, `runners: host id "" must be set and contain no spaces`},
		{OneOffConfig{Scope: "group", DescriptionPrefix: "fr", HostID: "h"}, "runners: group scope needs a group id"},
		{OneOffConfig{Scope: "project", HostID: "h"}, "runners: description prefix must be set"},
		{OneOffConfig{Scope: "user", DescriptionPrefix: "fr", HostID: "h"}, `runners: unknown scope "user"`},
	} {
		if p, err := NewOneOff(api, tc.cfg); p != nil || err == nil || err.Error() != tc.want {
			t.Errorf("%+v: %v, want %q", tc.cfg, err, tc.want)
		}
	}
}

// Instance runners are missing from GET /runners: scope instance must list
// /runners/all, or a runner leaked by a crash would never be found.
func TestOneOffInstanceScopeListsAllRunners(t *testing.T) {
	api := &recordingAPI{list: []gitlabapi.RunnerInfo{{ID: 5, Description: "fr h vm fr-a job 7 project 1"}}}
	p, err := NewOneOff(api, OneOffConfig{Scope: "instance", MaximumTimeout: time.Hour, DescriptionPrefix: "fr", HostID: "h"})
	if err != nil {
		t.Fatal(err)
	}
	owned, err := p.Owned(context.Background())
	if err != nil || len(owned) != 1 || owned[0].RunnerID != 5 || api.listedAll != 1 {
		t.Fatalf("owned %+v, err %v, /runners/all calls %d", owned, err, api.listedAll)
	}
}
