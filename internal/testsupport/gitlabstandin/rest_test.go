package gitlabstandin

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/firerunner/firerunner/internal/testenv"
	gitlab "gitlab.com/gitlab-org/api/client-go"
)

// adminToken is assembled so it never looks like a committed real token.
var adminToken = "glpat" + "-admin-token-0001"

func newServer(t *testing.T, opts Options) *Server {
	t.Helper()
	testenv.Git(t)
	s, err := New(opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close() })
	s.AddToken(adminToken, ScopeAPI)
	return s
}

func client(t *testing.T, s *Server, tok string) *gitlab.Client {
	t.Helper()
	c, err := gitlab.NewClient(tok, gitlab.WithBaseURL(s.URL()+"/api/v4"), gitlab.WithCustomRetryMax(0))
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func addProject(t *testing.T, s *Server, path string) Project {
	t.Helper()
	p, err := s.AddProject(ProjectSpec{Path: path, Files: map[string]string{"README.md": "hello\n"}})
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func statusOf(err error) int {
	var er *gitlab.ErrorResponse
	if errors.Is(err, gitlab.ErrNotFound) {
		return 404
	}
	if errors.As(err, &er) {
		return er.Response.StatusCode
	}
	return 0
}

func TestAuthScopesAndNotFound(t *testing.T) {
	s := newServer(t, Options{})
	p := addProject(t, s, "acme/app")
	pl, err := s.CreatePipeline(p.ID, JobSpec{Name: "build", Script: []string{"true"}, Tags: []string{"firecracker-1cpu-1gb"}})
	if err != nil {
		t.Fatal(err)
	}
	s.AddToken("glpat-runner-only", ScopeCreateRunner, ScopeManageRunner)
	s.AddToken("glpat-read", ScopeReadAPI)

	// Missing and invalid tokens: 401.
	if _, _, err := client(t, s, "").Jobs.GetJob(p.ID, pl.JobIDs[0]); statusOf(err) != 401 {
		t.Fatalf("no token: want 401, got %v", err)
	}
	if _, _, err := client(t, s, "glpat-wrong").Jobs.GetJob(p.ID, pl.JobIDs[0]); statusOf(err) != 401 {
		t.Fatalf("bad token: want 401, got %v", err)
	}
	// A token without read_api cannot read jobs: 403 insufficient_scope.
	_, resp, err := client(t, s, "glpat-runner-only").Jobs.GetJob(p.ID, pl.JobIDs[0])
	if statusOf(err) != 403 || !strings.Contains(err.Error(), "insufficient_scope") {
		t.Fatalf("runner-only token: want 403 insufficient_scope, got %v", err)
	}
	_ = resp
	// read_api cannot create runners.
	rt := "project_type"
	if _, _, err := client(t, s, "glpat-read").Users.CreateUserRunner(&gitlab.CreateUserRunnerOptions{
		RunnerType: &rt, ProjectID: &p.ID, TagList: &[]string{"x"}}); statusOf(err) != 403 {
		t.Fatalf("read token creating runner: want 403, got %v", err)
	}
	// read_api reads the job with its tag list; unknown job/project: 404.
	j, _, err := client(t, s, "glpat-read").Jobs.GetJob(p.ID, pl.JobIDs[0])
	if err != nil {
		t.Fatal(err)
	}
	if j.Status != "pending" || len(j.TagList) != 1 || j.TagList[0] != "firecracker-1cpu-1gb" || j.Pipeline.ID != pl.ID || j.Name != "build" {
		t.Fatalf("job = %+v", j)
	}
	if _, _, err := client(t, s, adminToken).Jobs.GetJob(p.ID, 9999); statusOf(err) != 404 {
		t.Fatalf("unknown job: want 404, got %v", err)
	}
	if _, _, err := client(t, s, adminToken).Jobs.GetJob("acme/nope", pl.JobIDs[0]); statusOf(err) != 404 {
		t.Fatalf("unknown project: want 404, got %v", err)
	}
	if tr, _, err := client(t, s, "glpat-read").Jobs.GetTraceFile(p.ID, pl.JobIDs[0]); err != nil || tr.Len() != 0 {
		t.Fatalf("trace of a pending job: %v", err)
	}
	// The project may be addressed by its URL-encoded path.
	if _, _, err := client(t, s, adminToken).Jobs.GetJob("acme/app", pl.JobIDs[0]); err != nil {
		t.Fatalf("job by project path: %v", err)
	}
}

func TestCreateDeleteRunner(t *testing.T) {
	s := newServer(t, Options{})
	p := addProject(t, s, "acme/app")
	s.AddToken("glpat-create", ScopeCreateRunner)
	s.AddToken("glpat-manage", ScopeManageRunner)
	c := client(t, s, "glpat-create")
	rt, desc := "project_type", "firerunner job 7"
	untagged, locked := false, true
	tooShort := int64(300)
	opts := &gitlab.CreateUserRunnerOptions{RunnerType: &rt, ProjectID: &p.ID, Description: &desc,
		TagList: &[]string{"firecracker-2cpu-2gb"}, RunUntagged: &untagged, Locked: &locked, MaximumTimeout: &tooShort}
	if _, _, err := c.Users.CreateUserRunner(opts); statusOf(err) != 400 || !strings.Contains(err.Error(), "maximum_timeout") {
		t.Fatalf("maximum_timeout 300: want 400, got %v", err)
	}
	ok := int64(3600)
	opts.MaximumTimeout = &ok
	r, resp, err := c.Users.CreateUserRunner(opts)
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != 201 || r.ID == 0 || !strings.HasPrefix(r.Token, "glrt-") {
		t.Fatalf("created runner %+v (%d)", r, resp.StatusCode)
	}
	st := s.Runners()
	if len(st) != 1 || st[0].Description != desc || st[0].Tags[0] != "firecracker-2cpu-2gb" || st[0].RunUntagged ||
		!st[0].Locked || st[0].MaximumTimeout != 3600 || st[0].ProjectIDs[0] != p.ID {
		t.Fatalf("runner state %+v", st)
	}
	// Listing needs read_api (GitLab allows manage_runner only on
	// /runners/:id routes); details take read_api or manage_runner.
	s.AddToken("glpat-read", ScopeReadAPI)
	list, _, err := client(t, s, "glpat-read").Runners.ListRunners(&gitlab.ListRunnersOptions{})
	if err != nil || len(list) != 1 || list[0].ID != r.ID || list[0].Status != "never_contacted" {
		t.Fatalf("list runners: %v %+v", err, list)
	}
	if _, _, err := client(t, s, "glpat-manage").Runners.ListRunners(&gitlab.ListRunnersOptions{}); statusOf(err) != 403 {
		t.Fatalf("list runners with manage_runner: want 403, got %v", err)
	}
	for _, tok := range []string{adminToken, "glpat-manage"} {
		det, _, err := client(t, s, tok).Runners.GetRunnerDetails(r.ID)
		if err != nil || det.TagList[0] != "firecracker-2cpu-2gb" || det.Projects[0].ID != p.ID {
			t.Fatalf("runner details: %v %+v", err, det)
		}
	}
	// create_runner alone cannot delete; manage_runner can; a second delete is 404.
	if _, err := c.Runners.DeleteRegisteredRunnerByID(r.ID); statusOf(err) != 403 {
		t.Fatalf("delete with create_runner: want 403, got %v", err)
	}
	resp, err = client(t, s, "glpat-manage").Runners.DeleteRegisteredRunnerByID(r.ID)
	if err != nil || resp.StatusCode != 204 {
		t.Fatalf("delete: %v", err)
	}
	if _, err := client(t, s, "glpat-manage").Runners.DeleteRegisteredRunnerByID(r.ID); statusOf(err) != 404 {
		t.Fatalf("second delete: want 404, got %v", err)
	}
	if n := len(s.Runners()); n != 0 {
		t.Fatalf("%d runners left", n)
	}
	if st, ok := s.Runner(r.ID); !ok || st.DeletedAt.IsZero() {
		t.Fatalf("deleted runner state %+v", st)
	}
}

func TestRunnerCapError(t *testing.T) {
	s := newServer(t, Options{ProjectRunnerCap: 2})
	p := addProject(t, s, "acme/app")
	rt := "project_type"
	create := func() (*gitlab.UserRunner, error) {
		r, _, err := client(t, s, adminToken).Users.CreateUserRunner(&gitlab.CreateUserRunnerOptions{
			RunnerType: &rt, ProjectID: &p.ID, TagList: &[]string{"a"}})
		return r, err
	}
	for range 2 {
		if _, err := create(); err != nil {
			t.Fatal(err)
		}
	}
	// Raw request: the body must be GitLab's exact shape.
	req, _ := http.NewRequest("POST", s.URL()+"/api/v4/user/runners",
		strings.NewReader(`{"runner_type":"project_type","project_id":`+jsonInt(p.ID)+`,"tag_list":["a"]}`))
	req.Header.Set("PRIVATE-TOKEN", adminToken)
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	want := `{"message":{"runner_projects.base":["Maximum number of ci registered project runners (2) exceeded"]}}`
	if resp.StatusCode != 400 || strings.TrimSpace(string(body)) != want {
		t.Fatalf("cap: %d %s", resp.StatusCode, body)
	}
	if _, err := create(); statusOf(err) != 400 {
		t.Fatalf("client-go over cap: %v", err)
	}
	// Deleting a runner frees its slot, as on GitLab.
	if _, err := client(t, s, adminToken).Runners.DeleteRegisteredRunnerByID(s.Runners()[0].ID); err != nil {
		t.Fatal(err)
	}
	if _, err := create(); err != nil {
		t.Fatalf("after a delete: %v", err)
	}
	// Per project: another project has its own cap.
	other := addProject(t, s, "acme/other")
	if _, err := s.CreateRunner(RunnerSpec{ProjectID: other.ID, RunUntagged: true}); err != nil {
		t.Fatalf("another project's runner: %v", err)
	}
}

func jsonInt(n int64) string { b, _ := json.Marshal(n); return string(b) }

func TestPendingJobsPaginationAndGroupProjects(t *testing.T) {
	s := newServer(t, Options{})
	p := addProject(t, s, "acme/team/app")
	addProject(t, s, "acme/other")
	addProject(t, s, "elsewhere/x")
	var jobs []JobSpec
	for _, n := range []string{"a", "b", "c", "d", "e"} {
		jobs = append(jobs, JobSpec{Name: n, Script: []string{"true"}, Tags: []string{"t"}})
	}
	pl, err := s.CreatePipeline(p.ID, jobs...)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Cancel(pl.JobIDs[0]); err != nil {
		t.Fatal(err)
	}
	c := client(t, s, adminToken)
	opt := &gitlab.ListJobsOptions{ListOptions: gitlab.ListOptions{PerPage: 2, Page: 1},
		Scope: &[]gitlab.BuildStateValue{gitlab.Pending}}
	var got []int64
	pages := 0
	for {
		page, resp, err := c.Jobs.ListProjectJobs(p.ID, opt)
		if err != nil {
			t.Fatal(err)
		}
		pages++
		if resp.TotalItems != 4 || resp.TotalPages != 2 {
			t.Fatalf("X-Total %d X-Total-Pages %d", resp.TotalItems, resp.TotalPages)
		}
		for _, j := range page {
			got = append(got, j.ID)
			if j.Status != "pending" {
				t.Fatalf("job %d is %s", j.ID, j.Status)
			}
		}
		if resp.NextPage == 0 {
			break
		}
		opt.Page = resp.NextPage
	}
	if pages != 2 || len(got) != 4 || got[0] != pl.JobIDs[4] {
		t.Fatalf("pages %d jobs %v", pages, got)
	}

	g, err := s.AddGroup("acme")
	if err != nil {
		t.Fatal(err)
	}
	sub := true
	projs, _, err := c.Groups.ListGroupProjects(g.ID, &gitlab.ListGroupProjectsOptions{IncludeSubGroups: &sub})
	if err != nil || len(projs) != 2 {
		t.Fatalf("group projects with subgroups: %v %d", err, len(projs))
	}
	projs, _, err = c.Groups.ListGroupProjects(g.ID, &gitlab.ListGroupProjectsOptions{})
	if err != nil || len(projs) != 1 || projs[0].PathWithNamespace != "acme/other" {
		t.Fatalf("group projects without subgroups: %v %+v", err, projs)
	}
}

func TestFailureInjection(t *testing.T) {
	s := newServer(t, Options{})
	p := addProject(t, s, "acme/app")
	s.FailNext("GET", "/api/v4/projects/", 429, 1)
	s.FailNext("", "/api/v4/projects/", 500, 1)
	c := client(t, s, adminToken)
	_, resp, err := c.Projects.GetProject(p.ID, nil)
	if statusOf(err) != 429 || resp.Header.Get("Retry-After") == "" {
		t.Fatalf("first: want 429 with Retry-After, got %v", err)
	}
	if _, _, err := c.Projects.GetProject(p.ID, nil); statusOf(err) != 500 {
		t.Fatalf("second: want 500, got %v", err)
	}
	if _, _, err := c.Projects.GetProject(p.ID, nil); err != nil {
		t.Fatalf("third: %v", err)
	}
}

func TestWebhooks(t *testing.T) {
	type delivery struct {
		header http.Header
		body   map[string]any
	}
	got := make(chan delivery, 100)
	recv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var m map[string]any
		_ = json.NewDecoder(r.Body).Decode(&m)
		got <- delivery{r.Header.Clone(), m}
	})}
	s := newServer(t, Options{})
	ln, err := netListen()
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = recv.Serve(ln) }()
	t.Cleanup(func() { _ = recv.Close() })
	s.SetWebhook("http://"+ln.Addr().String()+"/webhook", "s3cret")
	p := addProject(t, s, "acme/app")
	pl, err := s.CreatePipeline(p.ID, JobSpec{Name: "build", Stage: "build", Script: []string{"true"}, Tags: []string{"firecracker-1cpu-1gb"}})
	if err != nil {
		t.Fatal(err)
	}
	next := func() delivery {
		select {
		case d := <-got:
			return d
		case <-time.After(10 * time.Second):
			t.Fatal("no webhook delivery")
		}
		return delivery{}
	}
	for _, want := range []string{"created", "pending"} {
		d := next()
		if d.header.Get("X-Gitlab-Event") != "Job Hook" || d.header.Get("X-Gitlab-Token") != "s3cret" {
			t.Fatalf("headers %v", d.header)
		}
		b := d.body
		if b["object_kind"] != "build" || b["build_status"] != want || int64(b["build_id"].(float64)) != pl.JobIDs[0] ||
			b["build_stage"] != "build" || int64(b["project_id"].(float64)) != p.ID || int64(b["pipeline_id"].(float64)) != pl.ID ||
			b["ref"] != "main" || b["sha"] != p.HeadSHA || b["runner"] != nil {
			t.Fatalf("payload %v", b)
		}
		if _, ok := b["tag_list"]; ok {
			t.Fatal("Job Hook payloads carry no job tags")
		}
		if ts, _ := b["build_created_at"].(string); !strings.HasSuffix(ts, " UTC") || len(ts) != len("2025-05-21 16:06:02 UTC") {
			t.Fatalf("build_created_at %q", ts)
		}
		if _, err := time.Parse(time.RFC3339, b["build_created_at_iso"].(string)); err != nil {
			t.Fatal(err)
		}
	}
	s.DuplicateWebhooks(1)
	if err := s.Cancel(pl.JobIDs[0]); err != nil {
		t.Fatal(err)
	}
	for range 2 {
		if d := next(); d.body["build_status"] != "canceled" {
			t.Fatalf("want duplicated canceled, got %v", d.body["build_status"])
		}
	}
	s.DuplicateWebhooks(0)
	s.DropWebhooks(true)
	if err := s.Redeliver(pl.JobIDs[0]); err != nil {
		t.Fatal(err)
	}
	s.DropWebhooks(false)
	if err := s.Redeliver(pl.JobIDs[0]); err != nil {
		t.Fatal(err)
	}
	if d := next(); d.body["build_status"] != "canceled" {
		t.Fatal("redelivery")
	}
	dropped := 0
	for _, d := range s.Deliveries() {
		if d.Dropped {
			dropped++
		}
	}
	if dropped != 1 {
		t.Fatalf("dropped %d", dropped)
	}
	select {
	case d := <-got:
		t.Fatalf("unexpected delivery %v", d.body["build_status"])
	default:
	}
}

func TestWaitJobHonoursContext(t *testing.T) {
	s := newServer(t, Options{})
	p := addProject(t, s, "acme/app")
	pl, err := s.CreatePipeline(p.ID, JobSpec{Name: "x", Script: []string{"true"}})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	st, err := s.WaitJob(ctx, pl.JobIDs[0], nil)
	if !errors.Is(err, context.DeadlineExceeded) || st.Status != "pending" {
		t.Fatalf("WaitJob: %v %+v", err, st)
	}
}

func netListen() (net.Listener, error) { return net.Listen("tcp", "127.0.0.1:0") }

func TestPipelineFromCIConfig(t *testing.T) {
	s := newServer(t, Options{})
	p, err := s.AddProject(ProjectSpec{Path: "acme/app", Files: map[string]string{".gitlab-ci.yml": `
stages: [build, test]
variables:
  GLOBAL: g
default:
  before_script: [echo before]
.hidden:
  script: nope
unit:
  stage: test
  script: make test
  after_script: [echo after]
  tags: [firecracker-2cpu-2gb]
compile:
  stage: build
  script:
    - make
  variables:
    LOCAL: l
  timeout: 10m
  allow_failure: true
`}})
	if err != nil {
		t.Fatal(err)
	}
	ref := "main"
	pl, _, err := client(t, s, adminToken).Pipelines.CreatePipeline(p.ID, &gitlab.CreatePipelineOptions{Ref: &ref})
	if err != nil {
		t.Fatal(err)
	}
	if pl.Status != "pending" || pl.Ref != "main" || pl.SHA != p.HeadSHA {
		t.Fatalf("pipeline %+v", pl)
	}
	var got []JobState
	for id := int64(1); ; id++ {
		st, ok := s.Job(id)
		if !ok {
			break
		}
		got = append(got, st)
	}
	if len(got) != 2 || got[0].Name != "compile" || got[0].Status != StatusPending || got[1].Name != "unit" ||
		got[1].Status != StatusCreated || got[1].Tags[0] != "firecracker-2cpu-2gb" {
		t.Fatalf("jobs %+v", got)
	}
	s.mu.Lock()
	c, u := s.jobs[got[0].ID].spec, s.jobs[got[1].ID].spec
	s.mu.Unlock()
	if strings.Join(c.Script, ";") != "echo before;make" || c.Timeout != 10*time.Minute || !c.AllowFailure ||
		len(c.Variables) != 2 || strings.Join(u.AfterScript, ";") != "echo after" || u.Stage != "test" {
		t.Fatalf("compile %+v unit %+v", c, u)
	}
	if _, err := ParseCIConfig([]byte("job:\n  stage: nope\n  script: x\n")); err == nil {
		t.Fatal("unknown stage accepted")
	}
}

// image: and services: (global, default:, per job; a name or a hash) reach
// the runner API's job payload as gitlab-runner reads it (common/spec Image).
func TestCIConfigImageAndServices(t *testing.T) {
	jobs, err := ParseCIConfig([]byte(`
image: busybox:latest
services: [redis:7]
default:
  services:
    - name: postgres:16
      alias: db
plain:
  script: echo
own:
  image:
    name: alpine:3
    entrypoint: [""]
  services:
    - name: frtest/web:1
      alias: web
    - mysql:8
  script: echo
`))
	if err != nil {
		t.Fatal(err)
	}
	if len(jobs) != 2 {
		t.Fatalf("jobs %+v", jobs)
	}
	p, o := jobs[0], jobs[1]
	if p.Image == nil || p.Image.Name != "busybox:latest" || len(p.Services) != 1 || p.Services[0].Name != "postgres:16" || p.Services[0].Alias != "db" {
		t.Errorf("plain: image %+v services %+v", p.Image, p.Services)
	}
	if o.Image == nil || o.Image.Name != "alpine:3" || len(o.Image.Entrypoint) != 1 || len(o.Services) != 2 ||
		o.Services[0].Alias != "web" || o.Services[1].Name != "mysql:8" {
		t.Errorf("own: image %+v services %+v", o.Image, o.Services)
	}
	if _, err := ParseCIConfig([]byte("j:\n  image: {alias: x}\n  script: echo\n")); err == nil {
		t.Error("an image without a name was accepted")
	}
	b, _ := json.Marshal(map[string]any{"image": imageJSON(o.Image), "services": servicesJSON(o.Services), "none": imageJSON(nil)})
	var got struct {
		Image    map[string]any   `json:"image"`
		Services []map[string]any `json:"services"`
		None     any              `json:"none"`
	}
	if err := json.Unmarshal(b, &got); err != nil {
		t.Fatal(err)
	}
	if got.Image["name"] != "alpine:3" || got.Services[0]["alias"] != "web" || got.Services[1]["name"] != "mysql:8" || got.None != nil {
		t.Errorf("payload %s", b)
	}
}

func TestExternalHost(t *testing.T) {
	s := newServer(t, Options{ExternalHost: "localhost"})
	if !strings.HasPrefix(s.URL(), "http://localhost:") || !strings.HasSuffix(s.URL(), s.Addr()[strings.LastIndex(s.Addr(), ":"):]) {
		t.Fatalf("URL %s addr %s", s.URL(), s.Addr())
	}
	if _, _, err := client(t, s, adminToken).Version.GetVersion(); err != nil {
		t.Fatal(err)
	}
}

func TestRunnerJobs(t *testing.T) {
	s := newServer(t, Options{LongPoll: 10 * time.Millisecond})
	p := addProject(t, s, "acme/app")
	tags := []string{"firecracker-1cpu-1gb"}
	pl, err := s.CreatePipeline(p.ID, JobSpec{Name: "build", Script: []string{"true"}, Tags: tags})
	if err != nil {
		t.Fatal(err)
	}
	c := client(t, s, adminToken)
	rt, untagged := "project_type", false
	r, _, err := c.Users.CreateUserRunner(&gitlab.CreateUserRunnerOptions{RunnerType: &rt, ProjectID: &p.ID, TagList: &tags, RunUntagged: &untagged})
	if err != nil {
		t.Fatal(err)
	}
	jobs, _, err := c.Runners.ListRunnerJobs(r.ID, nil)
	if err != nil || len(jobs) != 0 {
		t.Fatalf("before the pick: %v %+v", err, jobs)
	}
	// The runner picks the job through the runner API.
	resp, err := http.Post(s.URL()+"/api/v4/jobs/request", "application/json", strings.NewReader(`{"token":"`+r.Token+`"}`))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 201 {
		t.Fatalf("jobs/request: HTTP %d", resp.StatusCode)
	}
	jobs, _, err = c.Runners.ListRunnerJobs(r.ID, &gitlab.ListRunnerJobsOptions{OrderBy: gitlab.Ptr("id"), Sort: gitlab.Ptr("desc")})
	if err != nil || len(jobs) != 1 || jobs[0].ID != pl.JobIDs[0] || jobs[0].Status != "running" || jobs[0].Project == nil || jobs[0].Project.ID != p.ID {
		t.Fatalf("after the pick: %v %+v", err, jobs)
	}
	if jobs, _, err := c.Runners.ListRunnerJobs(r.ID, &gitlab.ListRunnerJobsOptions{Status: gitlab.Ptr("success")}); err != nil || len(jobs) != 0 {
		t.Fatalf("status=success: %v %+v", err, jobs)
	}
	if _, _, err := c.Runners.ListRunnerJobs(r.ID, &gitlab.ListRunnerJobsOptions{Status: gitlab.Ptr("bogus")}); statusOf(err) != 400 {
		t.Fatalf("bad status: want 400, got %v", err)
	}
	if _, _, err := c.Runners.ListRunnerJobs(r.ID+100, nil); statusOf(err) != 404 {
		t.Fatalf("unknown runner: want 404, got %v", err)
	}
	s.AddToken("glpat-create-only", ScopeCreateRunner)
	if _, _, err := client(t, s, "glpat-create-only").Runners.ListRunnerJobs(r.ID, nil); statusOf(err) != 403 {
		t.Fatalf("create_runner scope: want 403, got %v", err)
	}
}

// TestUpdateRunnerTagsAndHold: PUT /runners/:id changes the tags GitLab
// matches at the next job request; HoldRunners keeps chosen runners from
// taking jobs until released.
func TestUpdateRunnerTagsAndHold(t *testing.T) {
	s := newServer(t, Options{LongPoll: 10 * time.Millisecond})
	p := addProject(t, s, "acme/app")
	pl, err := s.CreatePipeline(p.ID, JobSpec{Name: "linux", Script: []string{"true"}, Tags: []string{"firecracker-1cpu-1gb", "linux"}})
	if err != nil {
		t.Fatal(err)
	}
	c := client(t, s, adminToken)
	rt, untagged := "project_type", false
	r, _, err := c.Users.CreateUserRunner(&gitlab.CreateUserRunnerOptions{RunnerType: &rt, ProjectID: &p.ID,
		TagList: &[]string{"firecracker-1cpu-1gb"}, RunUntagged: &untagged})
	if err != nil {
		t.Fatal(err)
	}
	request := func() int {
		resp, err := http.Post(s.URL()+"/api/v4/jobs/request", "application/json", strings.NewReader(`{"token":"`+r.Token+`"}`))
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	if code := request(); code != 204 {
		t.Fatalf("runner without the linux tag: HTTP %d, want 204", code)
	}
	short := int64(60)
	if _, _, err := c.Runners.UpdateRunnerDetails(r.ID, &gitlab.UpdateRunnerDetailsOptions{MaximumTimeout: &short}); statusOf(err) != 400 {
		t.Fatalf("maximum_timeout 60: want 400, got %v", err)
	}
	if _, _, err := c.Runners.UpdateRunnerDetails(r.ID, &gitlab.UpdateRunnerDetailsOptions{TagList: &[]string{}}); statusOf(err) != 400 {
		t.Fatalf("no tags on a tagged-only runner: want 400, got %v", err)
	}
	s.AddToken("glpat-read", ScopeReadAPI)
	if _, _, err := client(t, s, "glpat-read").Runners.UpdateRunnerDetails(r.ID, &gitlab.UpdateRunnerDetailsOptions{TagList: &[]string{"x"}}); statusOf(err) != 403 {
		t.Fatalf("read_api scope: want 403, got %v", err)
	}
	d, _, err := c.Runners.UpdateRunnerDetails(r.ID, &gitlab.UpdateRunnerDetailsOptions{TagList: &[]string{"firecracker-1cpu-1gb", "linux"}})
	if err != nil || len(d.TagList) != 2 {
		t.Fatalf("retag: %v %+v", err, d)
	}
	s.HoldRunners(func(rs RunnerState) bool { return rs.ID == r.ID })
	if code := request(); code != 204 {
		t.Fatalf("held runner: HTTP %d, want 204", code)
	}
	s.HoldRunners(nil)
	if code := request(); code != 201 {
		t.Fatalf("retagged runner: HTTP %d, want 201", code)
	}
	if js, _ := s.Job(pl.JobIDs[0]); js.RunnerID != r.ID {
		t.Fatalf("job taken by runner %d", js.RunnerID)
	}
	if _, _, err := c.Runners.UpdateRunnerDetails(r.ID+100, &gitlab.UpdateRunnerDetailsOptions{TagList: &[]string{"x"}}); statusOf(err) != 404 {
		t.Fatalf("unknown runner: want 404, got %v", err)
	}
}

func TestFailFor(t *testing.T) {
	s := newServer(t, Options{})
	p := addProject(t, s, "acme/app")
	start := time.Now()
	s.FailFor("GET", "/api/v4/projects/", 503, 2*time.Second)
	c := client(t, s, adminToken)
	for range 3 {
		if _, _, err := c.Projects.GetProject(p.ID, nil, gitlab.WithRequestRetry(func(context.Context, *http.Response, error) (bool, error) { return false, nil })); statusOf(err) != 503 {
			t.Fatalf("during the outage: want 503, got %v", err)
		}
	}
	time.Sleep(time.Until(start.Add(2100 * time.Millisecond)))
	if _, _, err := c.Projects.GetProject(p.ID, nil); err != nil {
		t.Fatalf("after the outage: %v", err)
	}
}

// TestTestHelpers: what the controller tests drive the stand-in with.
// JobHook is GitLab's Job Hook body for the job's current state;
// ClearFaults ends an outage; AfterRequest sees each answered request.
func TestTestHelpers(t *testing.T) {
	s := newServer(t, Options{LongPoll: -1})
	p := addProject(t, s, "acme/app")
	pl, err := s.CreatePipeline(p.ID, JobSpec{Name: "build", Tags: []string{"x"}, Script: []string{"true"}})
	if err != nil {
		t.Fatal(err)
	}
	id := pl.JobIDs[0]
	hook := func() map[string]any {
		b, err := s.JobHook(id)
		if err != nil {
			t.Fatal(err)
		}
		var m map[string]any
		if err := json.Unmarshal(b, &m); err != nil {
			t.Fatal(err)
		}
		return m
	}
	if m := hook(); m["object_kind"] != "build" || m["build_id"] != float64(id) || m["build_status"] != "pending" ||
		m["project_id"] != float64(p.ID) || m["runner"] != nil {
		t.Fatalf("pending hook: %v", m)
	}
	var mu sync.Mutex
	var seen []Request
	s.AfterRequest(func(r Request) { mu.Lock(); seen = append(seen, r); mu.Unlock() })
	r, err := s.CreateRunner(RunnerSpec{ProjectID: p.ID, Tags: []string{"x"}})
	if err != nil {
		t.Fatal(err)
	}
	req, _ := http.NewRequest("POST", s.URL()+"/api/v4/jobs/request", strings.NewReader(`{"token":"`+r.Token+`"}`))
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	_, _ = io.ReadAll(resp.Body) // the whole answer: the hook ran before its end
	resp.Body.Close()
	if m := hook(); m["build_status"] != "running" || m["runner"].(map[string]any)["id"] != float64(r.ID) {
		t.Fatalf("running hook: %v", m)
	}
	s.AfterRequest(nil)
	mu.Lock()
	defer mu.Unlock()
	if len(seen) != 1 || seen[0].Method != "POST" || seen[0].Path != "/api/v4/jobs/request" || seen[0].Status != 201 {
		t.Fatalf("after-request hook saw %+v", seen)
	}
	if _, err := s.JobHook(id + 1000); !errors.Is(err, ErrNotFound) {
		t.Fatalf("unknown job: %v", err)
	}
	s.FailFor("GET", "/api/v4/projects/", 503, time.Hour)
	s.FailNext("", "/api/v4/", 500, 5)
	c := client(t, s, adminToken)
	if _, _, err := c.Projects.GetProject(p.ID, nil); statusOf(err) != 503 {
		t.Fatalf("during the outage: %v", err)
	}
	s.ClearFaults()
	if _, _, err := c.Projects.GetProject(p.ID, nil); err != nil {
		t.Fatalf("after ClearFaults: %v", err)
	}
}
