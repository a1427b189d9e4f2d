package gitlabapi

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/firerunner/firerunner/internal/testsupport/gitlabstandin"
)

// TestAgainstStandin runs the client against the repository's GitLab
// stand-in, an independent implementation of the same REST contract, so the
// two cannot drift apart unnoticed.
func TestAgainstStandin(t *testing.T) {
	s, err := gitlabstandin.New(gitlabstandin.Options{ProjectRunnerCap: 2})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	tok := "glpat" + "-interop-token-000000"
	s.AddToken(tok, gitlabstandin.ScopeAPI)
	top, err := s.AddGroup("grp")
	if err != nil {
		t.Fatal(err)
	}
	p, err := s.AddProject(gitlabstandin.ProjectSpec{Path: "grp/sub/app", Files: map[string]string{"README": "x"}})
	if err != nil {
		t.Fatal(err)
	}
	pl, err := s.CreatePipeline(p.ID,
		gitlabstandin.JobSpec{Name: "build", Script: []string{"true"}, Tags: []string{"firecracker-2cpu-4gb"}},
		gitlabstandin.JobSpec{Name: "lint", Script: []string{"true"}, Tags: []string{"firecracker-1cpu-1gb"}})
	if err != nil {
		t.Fatal(err)
	}
	var logs bytes.Buffer
	c, err := New(s.URL(), tok, WithRetries(1), WithBackoff(time.Millisecond, time.Millisecond),
		WithLogger(slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug}))))
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()

	j, err := c.GetJob(ctx, p.ID, pl.JobIDs[0])
	if err != nil || j.ID != pl.JobIDs[0] || j.ProjectID != p.ID || j.Status != "pending" || !slices.Equal(j.TagList, []string{"firecracker-2cpu-4gb"}) {
		t.Fatalf("GetJob: %+v %v", j, err)
	}
	pend, err := c.ListPendingJobs(ctx, p.ID)
	if err != nil || len(pend) != 2 {
		t.Fatalf("ListPendingJobs: %+v %v", pend, err)
	}
	ids, err := c.ListGroupProjects(ctx, top.ID)
	if err != nil || !slices.Equal(ids, []int64{p.ID}) {
		t.Fatalf("ListGroupProjects(top, with subgroups): %v %v", ids, err)
	}

	var created []Runner
	spec := RunnerSpec{Scope: "project", ProjectID: p.ID, TagList: []string{"firecracker-2cpu-4gb"},
		Description: "firerunner job 1", MaximumTimeout: time.Hour, Locked: true}
	for range 2 {
		r, err := c.CreateRunner(ctx, spec)
		if err != nil || !strings.HasPrefix(r.Token, "glrt-") {
			t.Fatalf("CreateRunner: %+v %v", r, err)
		}
		created = append(created, r)
	}
	if _, err := c.CreateRunner(ctx, spec); !errors.Is(err, ErrRunnerLimit) || !strings.Contains(err.Error(), "Maximum number") {
		t.Fatalf("over the cap: want ErrRunnerLimit, got %v", err)
	}
	if jobs, err := c.RunnerJobs(ctx, created[0].ID); err != nil || len(jobs) != 0 {
		t.Fatalf("RunnerJobs before a pick: %+v %v", jobs, err)
	}
	if _, err := c.RunnerJobs(ctx, 999999); !IsNotFound(err) {
		t.Fatalf("RunnerJobs of an unknown runner: want not found, got %v", err)
	}
	owned, err := c.ListOwnedRunners(ctx, "firerunner ")
	if err != nil || len(owned) != 2 {
		t.Fatalf("ListOwnedRunners: %+v %v", owned, err)
	}
	// Paused: GitLab hands it no job; the other runner stays active.
	if err := c.PauseRunner(ctx, created[0].ID); err != nil {
		t.Fatalf("PauseRunner: %v", err)
	}
	if r, _ := s.Runner(created[0].ID); !r.Paused {
		t.Fatalf("runner %d not paused in GitLab: %+v", r.ID, r)
	}
	if r, _ := s.Runner(created[1].ID); r.Paused {
		t.Fatalf("runner %d paused too", r.ID)
	}
	if err := c.PauseRunner(ctx, 999999); !IsNotFound(err) {
		t.Fatalf("PauseRunner of an unknown runner: want not found, got %v", err)
	}
	for _, r := range created {
		if err := c.DeleteRunner(ctx, r.ID); err != nil {
			t.Fatal(err)
		}
		if err := c.DeleteRunner(ctx, r.ID); err != nil {
			t.Fatalf("second delete must be a no-op: %v", err)
		}
	}
	if owned, _ := c.ListOwnedRunners(ctx, "firerunner "); len(owned) != 0 {
		t.Fatalf("runners left: %+v", owned)
	}
	for _, sec := range []string{tok, "glrt-"} {
		if strings.Contains(logs.String(), sec) {
			t.Fatalf("%q in logs: %s", sec, logs.String())
		}
	}
}

// TestSharedRunnerCallsAgainstStandin: the calls of pooled mode. A job's
// runner manager (system_id) is read from the job API, one manager's jobs
// are listed, and a token reset returns a new token while the old one is
// refused; none of the tokens reaches the log.
func TestSharedRunnerCallsAgainstStandin(t *testing.T) {
	s, err := gitlabstandin.New(gitlabstandin.Options{LongPoll: -1})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	tok := "glpat" + "-interop-token-000001"
	s.AddToken(tok, gitlabstandin.ScopeAPI)
	p, err := s.AddProject(gitlabstandin.ProjectSpec{Path: "grp/app", Files: map[string]string{"README": "x"}})
	if err != nil {
		t.Fatal(err)
	}
	pl, err := s.CreatePipeline(p.ID, gitlabstandin.JobSpec{Name: "a", Script: []string{"true"}, Tags: []string{"firecracker-1cpu-1gb"}})
	if err != nil {
		t.Fatal(err)
	}
	r, err := s.CreateRunner(gitlabstandin.RunnerSpec{Type: "instance_type", Tags: []string{"firecracker-1cpu-1gb"}})
	if err != nil {
		t.Fatal(err)
	}
	var logs bytes.Buffer
	c, err := New(s.URL(), tok, WithRetries(1), WithBackoff(time.Millisecond, time.Millisecond),
		WithLogger(slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug}))))
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if j, err := c.GetJob(ctx, p.ID, pl.JobIDs[0]); err != nil || j.RunnerSystemID != "" {
		t.Fatalf("pending job: %+v %v", j, err)
	}
	body := `{"token":"` + r.Token + `","system_id":"s_fr0123456789"}`
	resp, err := http.Post(s.URL()+"/api/v4/jobs/request", "application/json", strings.NewReader(body))
	if err != nil || resp.StatusCode != http.StatusCreated {
		t.Fatalf("job request: %v %v", resp, err)
	}
	resp.Body.Close()
	j, err := c.GetJob(ctx, p.ID, pl.JobIDs[0])
	if err != nil || j.RunnerID != r.ID || j.RunnerSystemID != "s_fr0123456789" {
		t.Fatalf("running job: %+v %v", j, err)
	}
	mine, err := c.ManagerJobs(ctx, r.ID, "s_fr0123456789")
	if err != nil || len(mine) != 1 || mine[0].ID != j.ID {
		t.Fatalf("ManagerJobs: %+v %v", mine, err)
	}
	if other, err := c.ManagerJobs(ctx, r.ID, "s_fr9999999999"); err != nil || len(other) != 0 {
		t.Fatalf("ManagerJobs of another manager: %+v %v", other, err)
	}
	nt, err := c.ResetRunnerToken(ctx, r.ID)
	if err != nil || nt == "" || nt == r.Token {
		t.Fatalf("ResetRunnerToken: %v", err)
	}
	if now, _ := s.Runner(r.ID); now.Token != nt {
		t.Fatal("the stand-in did not keep the new token")
	}
	if _, err := c.ResetRunnerToken(ctx, 999999); !IsNotFound(err) {
		t.Fatalf("reset of an unknown runner: %v", err)
	}
	if strings.Contains(logs.String(), nt) || strings.Contains(logs.String(), r.Token) {
		t.Fatalf("a runner token reached the log:\n%s", logs.String())
	}
}
