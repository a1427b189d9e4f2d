package gitlabstandin

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"slices"
	"strings"
	"time"
)

// Token scopes (GitLab personal access token scopes the stand-in enforces).
const (
	ScopeAPI            = "api"
	ScopeReadAPI        = "read_api"
	ScopeCreateRunner   = "create_runner"
	ScopeManageRunner   = "manage_runner"
	ScopeReadRepository = "read_repository"
)

// Job statuses.
const (
	StatusCreated   = "created"
	StatusPending   = "pending"
	StatusRunning   = "running"
	StatusCanceling = "canceling"
	StatusSuccess   = "success"
	StatusFailed    = "failed"
	StatusCanceled  = "canceled"
	StatusSkipped   = "skipped"
)

// Terminal reports whether a job status is final.
func Terminal(status string) bool {
	switch status {
	case StatusSuccess, StatusFailed, StatusCanceled, StatusSkipped:
		return true
	}
	return false
}

type token struct {
	value  string
	scopes []string
	admin  bool // the token's user is an administrator
}

func (t *token) has(scopes ...string) bool {
	for _, sc := range scopes {
		if slices.Contains(t.scopes, sc) {
			return true
		}
	}
	return false
}

type group struct {
	id           int64
	name, path   string // path is the full path
	parentID     int64
	runnersToken string
}

type project struct {
	id            int64
	name, path    string // path is the full path, e.g. "demo/app"
	groupID       int64
	defaultBranch string
	runnersToken  string
	repoDir       string
	headMessage   string
	vars          []Variable // project CI/CD variables
}

type pipeline struct {
	id, projectID int64
	ref, sha      string
	beforeSHA     string
	jobIDs        []int64
	stages        []string
	createdAt     time.Time
	startedAt     time.Time
	finishedAt    time.Time
}

type job struct {
	id, projectID, pipelineID int64
	spec                      JobSpec
	status                    string
	failureReason             string
	exitCode                  int
	token                     string
	runnerID                  int64
	managerID                 int64 // the runner manager (system_id) that took it
	runnerGraceful            bool
	trace                     []byte
	artifacts                 []byte // the archive (zip) it uploaded
	createdAt, queuedAt       time.Time
	startedAt, finishedAt     time.Time
	canceledByUser            bool
}

type runner struct {
	id             int64
	uuid           string
	token          string
	description    string
	runnerType     string // instance_type, group_type, project_type
	groupID        int64
	projectIDs     []int64
	tags           []string
	runUntagged    bool
	locked         bool
	paused         bool
	accessLevel    string
	maximumTimeout int64
	createdAt      time.Time
	contactedAt    time.Time
	firstRequestAt time.Time // first POST /jobs/request
	deletedAt      time.Time
	jobIDs         []int64
	version        string
	// managers are the runner's runner managers (GitLab 16+): every
	// gitlab-runner process that uses the runner's token, keyed by the
	// system_id it sends with each job request.
	managers    []*manager
	tokenResets int
}

// manager is one runner manager (Ci::RunnerManager): the gitlab-runner
// process of one machine, system_xid its system_id.
type manager struct {
	id                     int64
	systemID               string
	version, revision      string
	platform, architecture string
	createdAt, contactedAt time.Time
}

// managerLocked returns (creating it on first contact, as GitLab's
// ensure_runner_manager does) runner r's manager of systemID.
func (s *Server) managerLocked(r *runner, systemID string, info runnerInfo) *manager {
	now := time.Now().UTC()
	for _, m := range r.managers {
		if m.systemID == systemID {
			m.contactedAt, m.version = now, info.Version
			return m
		}
	}
	m := &manager{id: s.id("runner_manager"), systemID: systemID, version: info.Version, revision: info.Revision,
		platform: info.Platform, architecture: info.Architecture, createdAt: now, contactedAt: now}
	r.managers = append(r.managers, m)
	return m
}

// managerByIDLocked finds a runner manager by id among all runners, deleted ones too.
func (s *Server) managerByIDLocked(runnerID, id int64) *manager {
	r, ok := s.runners[runnerID]
	if !ok {
		r, ok = s.deleted[runnerID]
	}
	if !ok || id == 0 {
		return nil
	}
	for _, m := range r.managers {
		if m.id == id {
			return m
		}
	}
	return nil
}

// ManagerState is a snapshot of a runner manager.
type ManagerState struct {
	ID          int64
	SystemID    string
	Version     string
	CreatedAt   time.Time
	ContactedAt time.Time
}

func randomHex(n int) string {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		panic(err)
	}
	return hex.EncodeToString(b)
}

// AddToken registers a personal access token of the stand-in's
// administrator (root) with the given scopes (Scope* constants).
func (s *Server) AddToken(value string, scopes ...string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.tokens[value] = &token{value: value, scopes: append([]string(nil), scopes...), admin: true}
}

// AddUserToken registers a personal access token of a user who is not an
// administrator. The stand-in has no membership model: such a user may do
// what root may in every project and group, except what GitLab reserves to
// administrators (GET /runners/all).
func (s *Server) AddUserToken(value string, scopes ...string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.tokens[value] = &token{value: value, scopes: append([]string(nil), scopes...)}
}

// RevokeToken removes a personal access token (requests with it get 401).
func (s *Server) RevokeToken(value string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.tokens, value)
}

// Group describes a group.
type Group struct {
	ID           int64
	Path         string // full path
	ParentID     int64
	RunnersToken string // legacy registration token
}

// AddGroup creates a group (and its parents) by full path, e.g. "acme/platform";
// it returns the existing group when the path exists.
func (s *Server) AddGroup(fullPath string) (Group, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	g, err := s.ensureGroup(fullPath)
	if err != nil {
		return Group{}, err
	}
	return g.public(), nil
}

func (g *group) public() Group {
	return Group{ID: g.id, Path: g.path, ParentID: g.parentID, RunnersToken: g.runnersToken}
}

func validPath(p string) bool {
	if p == "" || strings.HasPrefix(p, "/") || strings.HasSuffix(p, "/") || strings.Contains(p, "..") {
		return false
	}
	for _, c := range p {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || strings.ContainsRune("-_./", c)) {
			return false
		}
	}
	return !strings.HasSuffix(p, ".git")
}

func (s *Server) ensureGroup(fullPath string) (*group, error) {
	if !validPath(fullPath) {
		return nil, fmt.Errorf("invalid group path %q", fullPath)
	}
	var parent *group
	parts := strings.Split(fullPath, "/")
	for i := range parts {
		p := strings.Join(parts[:i+1], "/")
		var found *group
		for _, g := range s.groups {
			if g.path == p {
				found = g
			}
		}
		if found == nil {
			found = &group{id: s.id("namespace"), name: parts[i], path: p, runnersToken: "GR1348941" + randomHex(10)}
			if parent != nil {
				found.parentID = parent.id
			}
			s.groups[found.id] = found
		}
		parent = found
	}
	return parent, nil
}

// ProjectSpec describes a project to create.
type ProjectSpec struct {
	// Path is the full path "group[/subgroup]/name"; the groups are created.
	Path string
	// Files are committed to DefaultBranch as the first commit (path → content).
	Files map[string]string
	// DefaultBranch defaults to "main".
	DefaultBranch string
	// Message of the first commit.
	Message string
}

// Project describes a project.
type Project struct {
	ID            int64
	Path          string // full path
	GroupID       int64
	DefaultBranch string
	HeadSHA       string // head of DefaultBranch
	RunnersToken  string // legacy registration token
	HTTPURL       string // http_url_to_repo
}

// AddProject creates a project with a real git repository holding spec.Files.
func (s *Server) AddProject(spec ProjectSpec) (Project, error) {
	if !validPath(spec.Path) || !strings.Contains(spec.Path, "/") {
		return Project{}, fmt.Errorf("project path %q: want group/name", spec.Path)
	}
	if spec.DefaultBranch == "" {
		spec.DefaultBranch = "main"
	}
	if spec.Message == "" {
		spec.Message = "Initial commit"
	}
	ns, name := spec.Path[:strings.LastIndex(spec.Path, "/")], spec.Path[strings.LastIndex(spec.Path, "/")+1:]
	s.mu.Lock()
	for _, p := range s.projects {
		if p.path == spec.Path {
			s.mu.Unlock()
			return Project{}, fmt.Errorf("project %q exists", spec.Path)
		}
	}
	g, err := s.ensureGroup(ns)
	if err != nil {
		s.mu.Unlock()
		return Project{}, err
	}
	p := &project{
		id: s.id("project"), name: name, path: spec.Path, groupID: g.id,
		defaultBranch: spec.DefaultBranch, runnersToken: "GR1348941" + randomHex(10),
		repoDir: s.repoDir(spec.Path), headMessage: spec.Message,
	}
	s.mu.Unlock()

	if err := initRepo(p.repoDir, spec.DefaultBranch); err != nil {
		return Project{}, err
	}
	if _, err := commitFiles(p.repoDir, spec.DefaultBranch, spec.Files, spec.Message); err != nil {
		return Project{}, err
	}
	s.mu.Lock()
	s.projects[p.id] = p
	s.mu.Unlock()
	return s.Project(p.id)
}

// Project returns a project by id.
func (s *Server) Project(id int64) (Project, error) {
	s.mu.Lock()
	p, ok := s.projects[id]
	s.mu.Unlock()
	if !ok {
		return Project{}, ErrNotFound
	}
	sha, err := revParse(p.repoDir, "refs/heads/"+p.defaultBranch)
	if err != nil {
		return Project{}, err
	}
	return Project{ID: p.id, Path: p.path, GroupID: p.groupID, DefaultBranch: p.defaultBranch,
		HeadSHA: sha, RunnersToken: p.runnersToken, HTTPURL: s.baseURL + "/" + p.path + ".git"}, nil
}

// Commit commits files (path → content; others kept) on branch (created from
// the default branch if missing) and returns the new commit's sha.
func (s *Server) Commit(projectID int64, branch string, files map[string]string, message string) (string, error) {
	s.mu.Lock()
	p, ok := s.projects[projectID]
	s.mu.Unlock()
	if !ok {
		return "", ErrNotFound
	}
	return commitFiles(p.repoDir, branch, files, message)
}

// SetProjectVariables sets a project's CI/CD variables (Settings > CI/CD >
// Variables), sent to every later job of the project before the job's own.
func (s *Server) SetProjectVariables(projectID int64, vars ...Variable) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	p, ok := s.projects[projectID]
	if !ok {
		return ErrNotFound
	}
	p.vars = append([]Variable(nil), vars...)
	return nil
}

// Variable is a CI/CD variable of a job.
type Variable struct {
	Key, Value string
	Masked     bool
	File       bool
	Raw        bool
}

// JobSpec describes a job of a pipeline.
type JobSpec struct {
	Name         string
	Stage        string // default "test"; stages run in order of first appearance
	Script       []string
	AfterScript  []string
	Variables    []Variable
	Tags         []string
	Timeout      time.Duration // default 1h
	AllowFailure bool
	// Image and Services are the job's `image:` and `services:` (the
	// docker executor's); nil/empty: none.
	Image    *ImageSpec
	Services []ImageSpec
	// Artifacts are the job's `artifacts: paths:` (one zip archive,
	// uploaded on success); nil: none.
	Artifacts []string
	// Dependencies are the job's `dependencies:`, the earlier jobs whose
	// artifacts it downloads; nil: every job of the earlier stages, as in
	// GitLab; empty (not nil): none.
	Dependencies []string
}

// ImageSpec is an `image:` or a `services:` entry, as the runner API's job
// payload carries it (gitlab-runner common/spec Image).
type ImageSpec struct {
	Name       string   `yaml:"name"`
	Alias      string   `yaml:"alias"`
	Entrypoint []string `yaml:"entrypoint"`
	Command    []string `yaml:"command"`
}

// PipelineSpec describes a pipeline; Ref defaults to the default branch.
type PipelineSpec struct {
	Ref  string
	Jobs []JobSpec
}

// Pipeline describes a created pipeline.
type Pipeline struct {
	ID, ProjectID int64
	Ref, SHA      string
	JobIDs        []int64 // in the order of the spec's jobs
}

// CreatePipeline creates a pipeline of jobs on the default branch.
func (s *Server) CreatePipeline(projectID int64, jobs ...JobSpec) (Pipeline, error) {
	return s.CreatePipelineSpec(projectID, PipelineSpec{Jobs: jobs})
}

// CreatePipelineSpec creates a pipeline at spec.Ref (branch name). Its first
// stage's jobs become pending at once; Job Hooks fire for created and pending.
func (s *Server) CreatePipelineSpec(projectID int64, spec PipelineSpec) (Pipeline, error) {
	if len(spec.Jobs) == 0 {
		return Pipeline{}, fmt.Errorf("pipeline without jobs")
	}
	for _, j := range spec.Jobs {
		if j.Name == "" || len(j.Script) == 0 {
			return Pipeline{}, fmt.Errorf("job %q: name and script are required", j.Name)
		}
	}
	s.mu.Lock()
	p, ok := s.projects[projectID]
	s.mu.Unlock()
	if !ok {
		return Pipeline{}, ErrNotFound
	}
	ref := spec.Ref
	if ref == "" {
		ref = p.defaultBranch
	}
	sha, err := revParse(p.repoDir, "refs/heads/"+ref)
	if err != nil {
		return Pipeline{}, fmt.Errorf("ref %q: %w", ref, err)
	}

	s.mu.Lock()
	defer s.mu.Unlock()
	now := time.Now().UTC()
	pl := &pipeline{id: s.id("pipeline"), projectID: projectID, ref: ref, sha: sha,
		beforeSHA: strings.Repeat("0", 40), createdAt: now}
	// GitLab keeps refs/pipelines/<id>; the runner fetches it by refspec.
	if err := updateRef(p.repoDir, fmt.Sprintf("refs/pipelines/%d", pl.id), sha); err != nil {
		return Pipeline{}, err
	}
	for _, js := range spec.Jobs {
		if js.Stage == "" {
			js.Stage = "test"
		}
		if js.Timeout == 0 {
			js.Timeout = time.Hour
		}
		js.Tags = append([]string(nil), js.Tags...)
		j := &job{id: s.id("job"), projectID: projectID, pipelineID: pl.id, spec: js, status: StatusCreated, createdAt: now}
		s.jobs[j.id] = j
		pl.jobIDs = append(pl.jobIDs, j.id)
		if !slices.Contains(pl.stages, js.Stage) {
			pl.stages = append(pl.stages, js.Stage)
		}
	}
	s.pipes[pl.id] = pl
	for _, id := range pl.jobIDs {
		s.hookLocked(s.jobs[id])
	}
	s.advanceLocked(pl)
	s.notify()
	return Pipeline{ID: pl.id, ProjectID: projectID, Ref: ref, SHA: sha, JobIDs: append([]int64(nil), pl.jobIDs...)}, nil
}

// advanceLocked makes the next stage's jobs pending once earlier stages are
// done, and skips the rest after a failure (no allow_failure).
func (s *Server) advanceLocked(pl *pipeline) {
	failed := false
	for _, stage := range pl.stages {
		done := true
		for _, id := range pl.jobIDs {
			j := s.jobs[id]
			if j.spec.Stage != stage {
				continue
			}
			switch {
			case failed && j.status == StatusCreated:
				s.setStatusLocked(j, StatusSkipped)
			case j.status == StatusCreated:
				s.setStatusLocked(j, StatusPending)
				done = false
			case !Terminal(j.status):
				done = false
			case (j.status == StatusFailed || j.status == StatusCanceled) && !j.spec.AllowFailure:
				failed = true
			}
		}
		if !done && !failed {
			return
		}
	}
}

// setStatusLocked changes a job's status, stamps times and sends the Job Hook.
func (s *Server) setStatusLocked(j *job, status string) {
	if j.status == status {
		return
	}
	now := time.Now().UTC()
	j.status = status
	switch status {
	case StatusPending:
		j.queuedAt = now
	case StatusRunning:
		j.startedAt = now
	case StatusSuccess, StatusFailed, StatusCanceled, StatusSkipped:
		j.finishedAt = now
	}
	s.hookLocked(j)
	if Terminal(status) {
		s.advanceLocked(s.pipes[j.pipelineID])
	}
	s.notify()
}

// JobState is a snapshot of a job.
type JobState struct {
	ID, ProjectID, PipelineID int64
	Name, Stage, Ref, SHA     string
	Tags                      []string
	Status                    string
	FailureReason             string
	ExitCode                  int
	RunnerID                  int64 // 0 until a runner picked it
	// RunnerManagerSystemID is the system_id of the runner manager that
	// picked it ("" when none, or when the runner sent no system_id).
	RunnerManagerSystemID string
	Trace                 string
	CreatedAt, QueuedAt   time.Time
	StartedAt, FinishedAt time.Time // StartedAt: picked by a runner
}

func (s *Server) jobStateLocked(j *job) JobState {
	pl := s.pipes[j.pipelineID]
	sid := ""
	if m := s.managerByIDLocked(j.runnerID, j.managerID); m != nil {
		sid = m.systemID
	}
	return JobState{
		RunnerManagerSystemID: sid,
		ID:                    j.id, ProjectID: j.projectID, PipelineID: j.pipelineID,
		Name: j.spec.Name, Stage: j.spec.Stage, Ref: pl.ref, SHA: pl.sha,
		Tags: append([]string(nil), j.spec.Tags...), Status: j.status,
		FailureReason: j.failureReason, ExitCode: j.exitCode, RunnerID: j.runnerID,
		Trace: string(j.trace), CreatedAt: j.createdAt, QueuedAt: j.queuedAt,
		StartedAt: j.startedAt, FinishedAt: j.finishedAt,
	}
}

// Job returns a snapshot of a job.
func (s *Server) Job(id int64) (JobState, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	j, ok := s.jobs[id]
	if !ok {
		return JobState{}, false
	}
	return s.jobStateLocked(j), true
}

// WaitJob waits until the job's state satisfies cond (nil: a terminal
// status) and returns it, or returns ctx's error with the last state.
func (s *Server) WaitJob(ctx context.Context, id int64, cond func(JobState) bool) (JobState, error) {
	if cond == nil {
		cond = func(j JobState) bool { return Terminal(j.Status) }
	}
	for {
		s.mu.Lock()
		j, ok := s.jobs[id]
		if !ok {
			s.mu.Unlock()
			return JobState{}, ErrNotFound
		}
		st := s.jobStateLocked(j)
		ch := s.changed
		s.mu.Unlock()
		if cond(st) {
			return st, nil
		}
		select {
		case <-ctx.Done():
			return st, fmt.Errorf("job %d still %s: %w", id, st.Status, ctx.Err())
		case <-ch:
		}
	}
}

// Cancel cancels a job like the UI's cancel button: a pending or created job
// becomes canceled; a running job becomes canceling when its runner supports
// graceful cancellation (then canceled when the runner reports back), else
// canceled at once. The runner learns it from the Job-Status header.
func (s *Server) Cancel(id int64) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	j, ok := s.jobs[id]
	if !ok {
		return ErrNotFound
	}
	j.canceledByUser = true
	switch j.status {
	case StatusCreated, StatusPending:
		s.setStatusLocked(j, StatusCanceled)
	case StatusRunning:
		if j.runnerGraceful && !s.opts.HardCancel {
			s.setStatusLocked(j, StatusCanceling)
		} else {
			s.setStatusLocked(j, StatusCanceled)
		}
	default:
		return fmt.Errorf("job %d is %s: cannot cancel", id, j.status)
	}
	return nil
}

// RunnerSpec describes a runner created through the Go API.
type RunnerSpec struct {
	Type           string // project_type (default), group_type, instance_type
	ProjectID      int64
	GroupID        int64
	Description    string
	Tags           []string
	RunUntagged    bool
	Locked         bool
	Paused         bool
	MaximumTimeout int64
}

// RunnerState is a snapshot of a runner.
type RunnerState struct {
	ID             int64
	Token          string
	Type           string
	Description    string
	ProjectIDs     []int64
	GroupID        int64
	Tags           []string
	RunUntagged    bool
	Locked, Paused bool
	MaximumTimeout int64
	CreatedAt      time.Time
	ContactedAt    time.Time // zero: never contacted
	FirstRequestAt time.Time // first POST /jobs/request; zero: none yet
	DeletedAt      time.Time // zero: exists
	JobIDs         []int64   // jobs it picked
	Version        string    // gitlab-runner version it reported
	Managers       []ManagerState
	// TokenResets counts POST /runners/:id/reset_authentication_token.
	TokenResets int
}

// CreateRunner creates a runner like POST /user/runners (subject to the cap).
func (s *Server) CreateRunner(spec RunnerSpec) (RunnerState, error) {
	if spec.Type == "" {
		spec.Type = "project_type"
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	r, apiErr := s.createRunnerLocked(spec, "glrt-")
	if apiErr != nil {
		return RunnerState{}, fmt.Errorf("create runner: %d %v", apiErr.status, apiErr.body)
	}
	return r.state(), nil
}

func (r *runner) state() RunnerState {
	return RunnerState{
		ID: r.id, Token: r.token, Type: r.runnerType, Description: r.description,
		ProjectIDs: append([]int64(nil), r.projectIDs...), GroupID: r.groupID,
		Tags: append([]string(nil), r.tags...), RunUntagged: r.runUntagged,
		Locked: r.locked, Paused: r.paused, MaximumTimeout: r.maximumTimeout,
		CreatedAt: r.createdAt, ContactedAt: r.contactedAt, FirstRequestAt: r.firstRequestAt,
		DeletedAt: r.deletedAt, JobIDs: append([]int64(nil), r.jobIDs...), Version: r.version,
		Managers: r.managerStates(), TokenResets: r.tokenResets,
	}
}

func (r *runner) managerStates() []ManagerState {
	var out []ManagerState
	for _, m := range r.managers {
		out = append(out, ManagerState{ID: m.id, SystemID: m.systemID, Version: m.version, CreatedAt: m.createdAt, ContactedAt: m.contactedAt})
	}
	return out
}

// Runner returns a runner by id, including deleted ones (DeletedAt set).
func (s *Server) Runner(id int64) (RunnerState, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if r, ok := s.runners[id]; ok {
		return r.state(), true
	}
	if r, ok := s.deleted[id]; ok {
		return r.state(), true
	}
	return RunnerState{}, false
}

// deleteRunnerLocked removes a runner; its jobs keep running like on GitLab.
func (s *Server) deleteRunnerLocked(id int64) {
	r := s.runners[id]
	r.deletedAt = time.Now().UTC()
	r.token = ""
	delete(s.runners, id)
	s.deleted[id] = r
	s.notify()
}

// Runners returns the existing (not deleted) runners, by id.
func (s *Server) Runners() []RunnerState {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []RunnerState
	for _, r := range s.sortedRunnersLocked() {
		out = append(out, r.state())
	}
	return out
}

// SetRunnerCaps changes the per-project and per-group runner creation caps
// (0 means 50, <0 unlimited).
func (s *Server) SetRunnerCaps(project, group int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.projCap, s.groupCap = capOrDefault(project), capOrDefault(group)
}

type apiError struct {
	status int
	body   any
}

func (s *Server) createRunnerLocked(spec RunnerSpec, prefix string) (*runner, *apiError) {
	bad := func(field, msg string) *apiError {
		return &apiError{400, map[string]any{"message": map[string][]string{field: {msg}}}}
	}
	if spec.MaximumTimeout != 0 && spec.MaximumTimeout < 600 {
		return nil, bad("maximum_timeout", "needs to be at least 10 minutes")
	}
	if !spec.RunUntagged && len(spec.Tags) == 0 {
		return nil, bad("tags_list", "can not be empty when runner is not allowed to pick untagged jobs")
	}
	now := time.Now().UTC()
	r := &runner{
		description: spec.Description, runnerType: spec.Type, tags: normTags(spec.Tags),
		runUntagged: spec.RunUntagged, locked: spec.Locked, paused: spec.Paused,
		maximumTimeout: spec.MaximumTimeout, createdAt: now, accessLevel: "not_protected",
	}
	// GitLab's plan limit ("maximum number of runners created or active in
	// a project/group during the past seven days") counts the scope's
	// runners that exist and were created or contacted in the past seven
	// days (Ci::RunnerProject's limit relation: Ci::Runner.recent of the
	// project): a deleted runner no longer counts.
	recent := func(match func(*runner) bool) int {
		n := 0
		for _, r := range s.runners {
			if match(r) && (now.Sub(r.createdAt) < 7*24*time.Hour || now.Sub(r.contactedAt) < 7*24*time.Hour) {
				n++
			}
		}
		return n
	}
	switch spec.Type {
	case "project_type":
		p, ok := s.projects[spec.ProjectID]
		if !ok {
			return nil, &apiError{403, map[string]any{"message": "403 Forbidden"}}
		}
		inProject := func(r *runner) bool { return r.runnerType == "project_type" && slices.Contains(r.projectIDs, p.id) }
		if s.projCap > 0 && recent(inProject) >= s.projCap {
			return nil, bad("runner_projects.base", fmt.Sprintf("Maximum number of ci registered project runners (%d) exceeded", s.projCap))
		}
		r.projectIDs = []int64{p.id}
	case "group_type":
		g, ok := s.groups[spec.GroupID]
		if !ok {
			return nil, &apiError{403, map[string]any{"message": "403 Forbidden"}}
		}
		inGroup := func(r *runner) bool { return r.runnerType == "group_type" && r.groupID == g.id }
		if s.groupCap > 0 && recent(inGroup) >= s.groupCap {
			return nil, bad("runner_namespaces.base", fmt.Sprintf("Maximum number of ci registered group runners (%d) exceeded", s.groupCap))
		}
		r.groupID = g.id
	case "instance_type":
	default:
		return nil, &apiError{400, map[string]any{"error": "runner_type does not have a valid value"}}
	}
	r.id = s.id("runner")
	r.uuid = uuid()
	r.token = prefix + randomHex(10)
	s.runners[r.id] = r
	s.notify()
	return r, nil
}

func normTags(tags []string) []string {
	var out []string
	for _, t := range tags {
		t = strings.TrimSpace(t)
		if t != "" && !slices.Contains(out, t) {
			out = append(out, t)
		}
	}
	slices.Sort(out)
	return out
}

func (s *Server) sortedRunnersLocked() []*runner {
	var out []*runner
	for _, r := range s.runners {
		out = append(out, r)
	}
	slices.SortFunc(out, func(a, b *runner) int { return int(a.id - b.id) })
	return out
}

// projectInGroupLocked reports whether project p is in group gid or a subgroup.
func (s *Server) projectInGroupLocked(p *project, gid int64) bool {
	for id := p.groupID; id != 0; {
		if id == gid {
			return true
		}
		g, ok := s.groups[id]
		if !ok {
			return false
		}
		id = g.parentID
	}
	return false
}

// canPick reports whether runner r may run job j: project scope, tags
// (job tags ⊆ runner tags), run_untagged, paused.
func (s *Server) canPickLocked(r *runner, j *job) bool {
	if r.paused {
		return false
	}
	p := s.projects[j.projectID]
	switch r.runnerType {
	case "project_type":
		if !slices.Contains(r.projectIDs, j.projectID) {
			return false
		}
	case "group_type":
		if !s.projectInGroupLocked(p, r.groupID) {
			return false
		}
	}
	if len(j.spec.Tags) == 0 {
		return r.runUntagged
	}
	for _, t := range j.spec.Tags {
		if !slices.Contains(r.tags, t) {
			return false
		}
	}
	return true
}

// Wait waits until cond returns true, re-checking it after every state
// change (job, runner, trace); cond may call the Server's methods.
func (s *Server) Wait(ctx context.Context, cond func() bool) error {
	for {
		s.mu.Lock()
		ch := s.changed
		s.mu.Unlock()
		if cond() {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-ch:
		}
	}
}

// durations are GitLab's duration (started → finished, or now) and
// queued_duration (queued → started, or now while pending), in seconds; nil
// when not applicable, as GitLab's API and Job Hook render them.
func (j *job) durations() (duration, queued any) {
	if !j.startedAt.IsZero() {
		end := j.finishedAt
		if end.IsZero() {
			end = time.Now()
		}
		return end.Sub(j.startedAt).Seconds(), j.startedAt.Sub(j.queuedAt).Seconds()
	}
	if !j.queuedAt.IsZero() {
		return nil, time.Since(j.queuedAt).Seconds()
	}
	return nil, nil
}
