package gitlabapi

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strings"

	gitlab "gitlab.com/gitlab-org/api/client-go"
)

// ErrInvalidSpec is wrapped by local validation errors of a RunnerSpec.
var ErrInvalidSpec = errors.New("invalid runner spec")

func toJob(j *gitlab.Job, projectID int64) Job {
	out := Job{ID: j.ID, ProjectID: projectID, PipelineID: j.Pipeline.ID, Name: j.Name, Ref: j.Ref, Status: j.Status, TagList: j.TagList,
		RunnerID: j.Runner.ID}
	switch {
	case j.Project != nil && j.Project.ID != 0:
		out.ProjectID = j.Project.ID
	case j.Pipeline.ProjectID != 0:
		out.ProjectID = j.Pipeline.ProjectID
	}
	return out
}

// GetJob reads one job (GET /projects/:id/jobs/:job_id); the token needs read_api.
// The Job Hook payload lacks the job's tags, so this is how they are learnt.
//
// client-go's Job has no runner_manager, so the response is decoded here
// with it: a pooled runner's job names the VM that ran it only there.
func (c *Client) GetJob(ctx context.Context, projectID, jobID int64) (Job, error) {
	var j *jobWithManager
	err := c.call(ctx, "get_job", nil, []any{"project_id", projectID, "job_id", jobID},
		func(ro ...gitlab.RequestOptionFunc) (*gitlab.Response, error) {
			req, err := c.gl.NewRequest(http.MethodGet, fmt.Sprintf("projects/%d/jobs/%d", projectID, jobID), nil, ro)
			if err != nil {
				return nil, err
			}
			j = new(jobWithManager)
			return c.gl.Do(req, j)
		})
	if err != nil {
		return Job{}, err
	}
	if j == nil || j.ID == 0 {
		return Job{}, fmt.Errorf("gitlab get_job: empty response for job %d", jobID)
	}
	out := toJob(&j.Job, projectID)
	if j.RunnerManager != nil {
		out.RunnerSystemID = j.RunnerManager.SystemID
	}
	return out, nil
}

// jobWithManager is GitLab's job entity with its runner_manager
// (API::Entities::Ci::RunnerManager: id, system_id, version, …).
type jobWithManager struct {
	gitlab.Job
	RunnerManager *struct {
		ID       int64  `json:"id"`
		SystemID string `json:"system_id"`
	} `json:"runner_manager"`
}

// ManagerJobs lists the jobs one runner manager (system_id) of a runner
// has picked, newest first (GET /runners/:id/jobs?system_id=, GitLab 16.9+):
// with one runner shared by many VMs, whether one VM took a job.
func (c *Client) ManagerJobs(ctx context.Context, runnerID int64, systemID string) ([]Job, error) {
	if systemID == "" {
		return nil, fmt.Errorf("%w: manager_jobs needs a system_id", ErrInvalidSpec)
	}
	var list []*gitlab.Job
	opt := &managerJobsOptions{ListRunnerJobsOptions: gitlab.ListRunnerJobsOptions{
		ListOptions: gitlab.ListOptions{PerPage: 20, Page: 1}, OrderBy: gitlab.Ptr("id"), Sort: gitlab.Ptr("desc"),
	}, SystemID: systemID}
	err := c.call(ctx, "manager_jobs", nil, []any{"runner_id", runnerID, "system_id", systemID},
		func(ro ...gitlab.RequestOptionFunc) (*gitlab.Response, error) {
			req, err := c.gl.NewRequest(http.MethodGet, fmt.Sprintf("runners/%d/jobs", runnerID), opt, ro)
			if err != nil {
				return nil, err
			}
			return c.gl.Do(req, &list)
		})
	if err != nil {
		return nil, err
	}
	out := make([]Job, 0, len(list))
	for _, j := range list {
		if j != nil {
			x := toJob(j, 0)
			x.RunnerSystemID = systemID
			out = append(out, x)
		}
	}
	return out, nil
}

// managerJobsOptions adds system_id (GitLab 16.9+), which client-go's
// ListRunnerJobsOptions lacks.
type managerJobsOptions struct {
	gitlab.ListRunnerJobsOptions
	SystemID string `url:"system_id"`
}

// ResetRunnerToken gives a runner a new authentication token (POST
// /runners/:id/reset_authentication_token; manage_runner or api) and
// returns it; the old token stops working at once, for every gitlab-runner
// still using it. The token is a secret: never log it.
func (c *Client) ResetRunnerToken(ctx context.Context, runnerID int64) (string, error) {
	var t *gitlab.RunnerAuthenticationToken
	err := c.call(ctx, "reset_runner_token", nil, []any{"runner_id", runnerID},
		func(ro ...gitlab.RequestOptionFunc) (*gitlab.Response, error) {
			var resp *gitlab.Response
			var err error
			t, resp, err = c.gl.Runners.ResetRunnerAuthenticationToken(runnerID, ro...)
			return resp, err
		})
	if err != nil {
		return "", err
	}
	if t == nil || t.Token == nil || *t.Token == "" {
		return "", errors.New("gitlab reset_runner_token: response lacks a token")
	}
	return *t.Token, nil
}

// RunnerJobs lists the jobs a runner has picked, newest first
// (GET /runners/:id/jobs, first page): FireRunner's runners take at most
// one job, so this tells whether a VM's runner is busy when the "running"
// webhook was lost. The token needs read_api (and a Maintainer role).
func (c *Client) RunnerJobs(ctx context.Context, runnerID int64) ([]Job, error) {
	var list []*gitlab.Job
	opt := &gitlab.ListRunnerJobsOptions{
		ListOptions: gitlab.ListOptions{PerPage: 20, Page: 1},
		OrderBy:     gitlab.Ptr("id"), Sort: gitlab.Ptr("desc"),
	}
	err := c.call(ctx, "runner_jobs", nil, []any{"runner_id", runnerID},
		func(ro ...gitlab.RequestOptionFunc) (*gitlab.Response, error) {
			var resp *gitlab.Response
			var err error
			list, resp, err = c.gl.Runners.ListRunnerJobs(runnerID, opt, ro...)
			return resp, err
		})
	if err != nil {
		return nil, err
	}
	out := make([]Job, 0, len(list))
	for _, j := range list {
		if j != nil {
			out = append(out, toJob(j, 0))
		}
	}
	return out, nil
}

// ListPendingJobs lists a project's pending jobs, all pages
// (GET /projects/:id/jobs?scope[]=pending).
func (c *Client) ListPendingJobs(ctx context.Context, projectID int64) ([]Job, error) {
	var out []Job
	opt := &gitlab.ListJobsOptions{
		ListOptions: gitlab.ListOptions{PerPage: perPage, Page: 1},
		Scope:       &[]gitlab.BuildStateValue{gitlab.Pending},
	}
	for range maxPages {
		var page []*gitlab.Job
		var next int64
		err := c.call(ctx, "list_pending_jobs", nil, []any{"project_id", projectID, "page", opt.Page},
			func(ro ...gitlab.RequestOptionFunc) (*gitlab.Response, error) {
				var resp *gitlab.Response
				var err error
				page, resp, err = c.gl.Jobs.ListProjectJobs(projectID, opt, ro...)
				if resp != nil {
					next = resp.NextPage
				}
				return resp, err
			})
		if err != nil {
			return nil, err
		}
		for _, j := range page {
			if j != nil {
				out = append(out, toJob(j, projectID))
			}
		}
		if next == 0 || next <= opt.Page {
			return out, nil
		}
		opt.Page = next
	}
	return out, fmt.Errorf("gitlab list_pending_jobs: project %d: more than %d pages", projectID, maxPages)
}

// ListGroupProjects lists the ids of a group's non-archived projects,
// including subgroups, excluding projects merely shared with the group.
func (c *Client) ListGroupProjects(ctx context.Context, groupID int64) ([]int64, error) {
	var out []int64
	opt := &gitlab.ListGroupProjectsOptions{
		ListOptions:      gitlab.ListOptions{PerPage: perPage, Page: 1},
		IncludeSubGroups: gitlab.Ptr(true),
		Archived:         gitlab.Ptr(false),
		WithShared:       gitlab.Ptr(false),
		Simple:           gitlab.Ptr(true),
	}
	for range maxPages {
		var page []*gitlab.Project
		var next int64
		err := c.call(ctx, "list_group_projects", nil, []any{"group_id", groupID, "page", opt.Page},
			func(ro ...gitlab.RequestOptionFunc) (*gitlab.Response, error) {
				var resp *gitlab.Response
				var err error
				page, resp, err = c.gl.Groups.ListGroupProjects(groupID, opt, ro...)
				if resp != nil {
					next = resp.NextPage
				}
				return resp, err
			})
		if err != nil {
			return nil, err
		}
		for _, p := range page {
			if p != nil {
				out = append(out, p.ID)
			}
		}
		if next == 0 || next <= opt.Page {
			return out, nil
		}
		opt.Page = next
	}
	return out, fmt.Errorf("gitlab list_group_projects: group %d: more than %d pages", groupID, maxPages)
}

// validate checks a spec locally so GitLab's predictable 400s become clear
// errors before any request, and returns the runner_type.
func (s RunnerSpec) validate(legacy bool) (runnerType string, err error) {
	bad := func(format string, a ...any) (string, error) {
		return "", fmt.Errorf("%w: %s", ErrInvalidSpec, fmt.Sprintf(format, a...))
	}
	if s.MaximumTimeout != 0 && s.MaximumTimeout < MinMaximumTimeout {
		return "", fmt.Errorf("%w: %w (got %s); GitLab rejects shorter runner timeouts with 400",
			ErrInvalidSpec, ErrMaximumTimeout, s.MaximumTimeout)
	}
	if len(s.TagList) == 0 && !s.RunUntagged {
		return bad("a runner with no tags and run_untagged=false could never pick a job")
	}
	if legacy {
		// The registration token decides the scope.
		return "", nil
	}
	switch s.Scope {
	case "", "project":
		if s.ProjectID <= 0 {
			return bad("scope project needs a project id")
		}
		return "project_type", nil
	case "group":
		if s.GroupID <= 0 {
			return bad("scope group needs a group id")
		}
		return "group_type", nil
	case "instance":
		return "instance_type", nil
	}
	return bad("scope %q: want project, group or instance", s.Scope)
}

func timeoutSeconds(s RunnerSpec) *int64 {
	if s.MaximumTimeout == 0 {
		return nil
	}
	return gitlab.Ptr(int64(s.MaximumTimeout.Seconds()))
}

func specAttrs(s RunnerSpec) []any {
	a := []any{"description", s.Description, "tags", strings.Join(s.TagList, ",")}
	if s.JobID != 0 {
		a = append(a, "job_id", s.JobID)
	}
	if s.Scope != "" {
		a = append(a, "scope", s.Scope)
	}
	if s.ProjectID != 0 {
		a = append(a, "project_id", s.ProjectID)
	}
	if s.GroupID != 0 {
		a = append(a, "group_id", s.GroupID)
	}
	return a
}

// CreateRunner creates a runner with POST /user/runners (GitLab >= 15.10;
// token scope create_runner or api). The returned Token (glrt-...) is secret.
//
// A request that timed out may still have created a runner; FireRunner's
// reconcile deletes runners by description prefix, which covers that leak.
func (c *Client) CreateRunner(ctx context.Context, s RunnerSpec) (Runner, error) {
	rt, err := s.validate(false)
	if err != nil {
		return Runner{}, err
	}
	opt := &gitlab.CreateUserRunnerOptions{
		RunnerType:     gitlab.Ptr(rt),
		Description:    gitlab.Ptr(s.Description),
		Locked:         gitlab.Ptr(s.Locked),
		RunUntagged:    gitlab.Ptr(s.RunUntagged),
		TagList:        gitlab.Ptr(s.TagList),
		MaximumTimeout: timeoutSeconds(s),
	}
	switch rt {
	case "project_type":
		opt.ProjectID = gitlab.Ptr(s.ProjectID)
	case "group_type":
		opt.GroupID = gitlab.Ptr(s.GroupID)
	}
	var r *gitlab.UserRunner
	err = c.call(ctx, "create_runner", nil, specAttrs(s),
		func(ro ...gitlab.RequestOptionFunc) (*gitlab.Response, error) {
			var resp *gitlab.Response
			var err error
			r, resp, err = c.gl.Users.CreateUserRunner(opt, ro...)
			return resp, err
		})
	if err != nil {
		return Runner{}, err
	}
	if r == nil || r.ID == 0 || r.Token == "" {
		return Runner{}, errors.New("gitlab create_runner: response lacks runner id or token")
	}
	return Runner{ID: r.ID, Token: r.Token}, nil
}

// RegisterRunnerLegacy registers a runner with POST /runners and a
// registration token (deprecated flow, for GitLab before 15.10). The scope
// comes from the registration token; Scope/ProjectID/GroupID are ignored.
func (c *Client) RegisterRunnerLegacy(ctx context.Context, regToken string, s RunnerSpec) (Runner, error) {
	if regToken == "" {
		return Runner{}, fmt.Errorf("%w: registration token is empty", ErrInvalidSpec)
	}
	if _, err := s.validate(true); err != nil {
		return Runner{}, err
	}
	opt := &gitlab.RegisterNewRunnerOptions{
		Token:          gitlab.Ptr(regToken),
		Description:    gitlab.Ptr(s.Description),
		Locked:         gitlab.Ptr(s.Locked),
		RunUntagged:    gitlab.Ptr(s.RunUntagged),
		TagList:        gitlab.Ptr(s.TagList),
		MaximumTimeout: timeoutSeconds(s),
	}
	var r *gitlab.Runner
	err := c.call(ctx, "register_runner", []string{regToken}, specAttrs(s),
		func(ro ...gitlab.RequestOptionFunc) (*gitlab.Response, error) {
			var resp *gitlab.Response
			var err error
			r, resp, err = c.gl.Runners.RegisterNewRunner(opt, ro...)
			return resp, err
		})
	if err != nil {
		return Runner{}, err
	}
	if r == nil || r.ID == 0 || r.Token == "" {
		return Runner{}, errors.New("gitlab register_runner: response lacks runner id or token")
	}
	return Runner{ID: r.ID, Token: r.Token}, nil
}

// DeleteRunner deletes a runner (DELETE /runners/:id; manage_runner or api).
// A runner that is already gone is success, so cleanup can be repeated.
func (c *Client) DeleteRunner(ctx context.Context, id int64) error {
	err := c.call(ctx, "delete_runner", nil, []any{"runner_id", id},
		func(ro ...gitlab.RequestOptionFunc) (*gitlab.Response, error) {
			return c.gl.Runners.DeleteRegisteredRunnerByID(id, ro...)
		})
	if IsNotFound(err) {
		c.log.Debug("runner already deleted", "runner_id", id)
		return nil
	}
	return err
}

// ListOwnedRunners lists runners visible to the token (GET /runners, all
// pages) whose description starts with descriptionPrefix. An empty prefix is
// refused: reconcile deletes what this returns, and must never touch runners
// FireRunner did not create. TagList is empty: GitLab's list omits tags.
func (c *Client) ListOwnedRunners(ctx context.Context, descriptionPrefix string) ([]RunnerInfo, error) {
	return c.listRunners(ctx, "list_runners", descriptionPrefix, c.gl.Runners.ListRunners)
}

// ListAllRunners is ListOwnedRunners over GET /runners/all (administrators
// only), which also shows instance runners; use it with scope instance.
func (c *Client) ListAllRunners(ctx context.Context, descriptionPrefix string) ([]RunnerInfo, error) {
	return c.listRunners(ctx, "list_all_runners", descriptionPrefix, c.gl.Runners.ListAllRunners)
}

type listRunnersFunc func(*gitlab.ListRunnersOptions, ...gitlab.RequestOptionFunc) ([]*gitlab.Runner, *gitlab.Response, error)

func (c *Client) listRunners(ctx context.Context, op, descriptionPrefix string, list listRunnersFunc) ([]RunnerInfo, error) {
	if descriptionPrefix == "" {
		return nil, fmt.Errorf("gitlab %s: empty description prefix refused", op)
	}
	var out []RunnerInfo
	opt := &gitlab.ListRunnersOptions{ListOptions: gitlab.ListOptions{PerPage: perPage, Page: 1}}
	for range maxPages {
		var page []*gitlab.Runner
		var next int64
		err := c.call(ctx, op, nil, []any{"page", opt.Page},
			func(ro ...gitlab.RequestOptionFunc) (*gitlab.Response, error) {
				var resp *gitlab.Response
				var err error
				page, resp, err = list(opt, ro...)
				if resp != nil {
					next = resp.NextPage
				}
				return resp, err
			})
		if err != nil {
			return nil, err
		}
		for _, r := range page {
			if r != nil && strings.HasPrefix(r.Description, descriptionPrefix) {
				out = append(out, RunnerInfo{ID: r.ID, Description: r.Description, Status: r.Status})
			}
		}
		if next == 0 || next <= opt.Page {
			return out, nil
		}
		opt.Page = next
	}
	return out, fmt.Errorf("gitlab %s: more than %d pages", op, maxPages)
}

// UpdateRunnerTags replaces a runner's tags (PUT /runners/:id; manage_runner
// or api). GitLab matches jobs against the tags it holds at each job
// request, so a runner that is already polling takes jobs by its new tags.
func (c *Client) UpdateRunnerTags(ctx context.Context, id int64, tagList []string) error {
	opt := &gitlab.UpdateRunnerDetailsOptions{TagList: &tagList}
	return c.call(ctx, "update_runner", nil, []any{"runner_id", id},
		func(ro ...gitlab.RequestOptionFunc) (*gitlab.Response, error) {
			_, resp, err := c.gl.Runners.UpdateRunnerDetails(id, opt, ro...)
			return resp, err
		})
}

// PauseRunner pauses a runner (PUT /runners/:id paused=true; manage_runner
// or api): GitLab hands a paused runner no new job, while a job it already
// took runs to its end.
func (c *Client) PauseRunner(ctx context.Context, id int64) error {
	paused := true
	opt := &gitlab.UpdateRunnerDetailsOptions{Paused: &paused}
	return c.call(ctx, "pause_runner", nil, []any{"runner_id", id},
		func(ro ...gitlab.RequestOptionFunc) (*gitlab.Response, error) {
			_, resp, err := c.gl.Runners.UpdateRunnerDetails(id, opt, ro...)
			return resp, err
		})
}
