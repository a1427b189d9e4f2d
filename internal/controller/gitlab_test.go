package controller

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/firerunner/firerunner/internal/testenv"
	"github.com/firerunner/firerunner/internal/testsupport/gitlabstandin"
)

// gitLab is the GitLab the controller tests run against: the project's
// stand-in (internal/testsupport/gitlabstandin), which enforces token
// scopes, GitLab's 400 rules and pagination, plus what the tests do as
// GitLab's users and runners would: create pipelines, make a runner take
// a job through the runner API (POST /jobs/request, GitLab's rule: the
// oldest pending job whose tags its tags cover), report the job's end
// (PUT /jobs/:id), cancel. Hooks are not sent by the stand-in: a test posts
// GitLab's payload (JobHook) itself, when it wants, as often as it wants.
type gitLab struct {
	*gitlabstandin.Server
	t     testing.TB
	token string // FireRunner's API token (scope api)
	proj  gitlabstandin.Project

	mu        sync.Mutex
	jobTokens map[int64]string                     // job → its job token (from the runner that took it)
	foreign   map[string]gitlabstandin.RunnerState // runners of other hosts, by tag set
}

func newGitLab(t testing.TB) *gitLab {
	t.Helper()
	if tt, ok := t.(*testing.T); ok {
		testenv.Git(tt) // the stand-in keeps real repositories
	}
	s, err := gitlabstandin.New(gitlabstandin.Options{LongPoll: -1, ProjectRunnerCap: -1, GroupRunnerCap: -1})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close() })
	g := &gitLab{Server: s, t: t, token: "glpat-" + "controller-tests-0001", jobTokens: map[int64]string{},
		foreign: map[string]gitlabstandin.RunnerState{}}
	s.AddToken(g.token, gitlabstandin.ScopeAPI)
	if g.proj, err = s.AddProject(gitlabstandin.ProjectSpec{Path: "g/p", Files: map[string]string{"README.md": "test\n"}}); err != nil {
		t.Fatal(err)
	}
	return g
}

// project creates another project (group path/name) and returns its id.
func (g *gitLab) project(path string) int64 {
	g.t.Helper()
	p, err := g.AddProject(gitlabstandin.ProjectSpec{Path: path, Files: map[string]string{"README.md": "test\n"}})
	if err != nil {
		g.t.Fatal(err)
	}
	return p.ID
}

// newJob creates a pipeline of one pending job with tags in project pid.
func (g *gitLab) newJob(pid int64, tags ...string) int64 {
	g.t.Helper()
	pl, err := g.CreatePipeline(pid, gitlabstandin.JobSpec{Name: "build", Tags: tags, Script: []string{"true"}})
	if err != nil {
		g.t.Fatal(err)
	}
	return pl.JobIDs[0]
}

// job is GitLab's state of job id.
func (g *gitLab) job(id int64) gitlabstandin.JobState {
	g.t.Helper()
	js, ok := g.Job(id)
	if !ok {
		g.t.Fatalf("no job %d in GitLab", id)
	}
	return js
}

// hook is the Job Hook GitLab sends for job id's current state.
func (g *gitLab) hook(id int64) []byte {
	g.t.Helper()
	b, err := g.JobHook(id)
	if err != nil {
		g.t.Fatalf("job hook of %d: %v", id, err)
	}
	return b
}

func (g *gitLab) call(method, path string, body any, hdr ...string) (int, []byte, error) {
	b, _ := json.Marshal(body)
	req, err := http.NewRequest(method, g.URL()+path, bytes.NewReader(b))
	if err != nil {
		return 0, nil, err
	}
	req.Header.Set("Content-Type", "application/json")
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	out, err := io.ReadAll(resp.Body)
	return resp.StatusCode, out, err
}

// requestWith is POST /jobs/request with a runner token, as gitlab-runner
// sends it: the job GitLab handed out (0: none) and its job token.
func (g *gitLab) requestWith(token string) (int64, string, error) {
	return g.requestAs(token, "")
}

// requestAs is requestWith from a runner manager with a system_id (the
// gitlab-runner of one VM on a shared runner).
func (g *gitLab) requestAs(token, systemID string) (int64, string, error) {
	body := map[string]any{"token": token, "info": map[string]any{"name": "gitlab-runner", "version": "17.0.0", "executor": "shell"}}
	if systemID != "" {
		body["system_id"] = systemID
	}
	code, out, err := g.call(http.MethodPost, "/api/v4/jobs/request", body)
	return g.requestResult(code, out, err)
}

func (g *gitLab) requestResult(code int, body []byte, err error) (int64, string, error) {
	switch {
	case err != nil:
		return 0, "", err
	case code == http.StatusNoContent:
		return 0, "", nil
	case code != http.StatusCreated:
		return 0, "", fmt.Errorf("POST /jobs/request: HTTP %d %s", code, body)
	}
	var j struct {
		ID    int64  `json:"id"`
		Token string `json:"token"`
	}
	if err := json.Unmarshal(body, &j); err != nil {
		return 0, "", err
	}
	g.mu.Lock()
	g.jobTokens[j.ID] = j.Token
	g.mu.Unlock()
	return j.ID, j.Token, nil
}

// request makes runner rid ask GitLab for a job (0: none for it).
func (g *gitLab) request(rid int64) int64 {
	r, ok := g.Runner(rid)
	if !ok || !r.DeletedAt.IsZero() {
		return 0
	}
	id, _, err := g.requestWith(r.Token)
	if err != nil {
		g.t.Errorf("runner %d: %v", rid, err)
	}
	return id
}

// pick makes runner rid take job id through the runner API; GitLab must
// hand it exactly that job (the oldest pending one its tags cover).
func (g *gitLab) pick(id, rid int64) {
	g.t.Helper()
	if got := g.request(rid); got != id {
		g.t.Fatalf("runner %d asked GitLab for a job and got %d, want %d", rid, got, id)
	}
}

// other is a runner of another host (or no FireRunner at all) with exactly
// the tags of job id; it takes job id, which must be the oldest pending job
// those tags cover. It returns the runner's id.
func (g *gitLab) other(id int64) int64 {
	g.t.Helper()
	tags := g.job(id).Tags
	key := strings.Join(tags, ",")
	g.mu.Lock()
	r, ok := g.foreign[key]
	g.mu.Unlock()
	if !ok {
		var err error
		if r, err = g.CreateRunner(gitlabstandin.RunnerSpec{ProjectID: g.job(id).ProjectID, Description: "someone else's runner",
			Tags: tags, RunUntagged: len(tags) == 0}); err != nil {
			g.t.Fatal(err)
		}
		g.mu.Lock()
		g.foreign[key] = r
		g.mu.Unlock()
	}
	g.pick(id, r.ID)
	return r.ID
}

// finish reports the end of running job id (success or failed) as its
// runner does, with the job's token.
func (g *gitLab) finish(id int64, state string) {
	g.t.Helper()
	g.mu.Lock()
	tok := g.jobTokens[id]
	g.mu.Unlock()
	if tok == "" {
		g.t.Fatalf("job %d was not taken through the runner API", id)
	}
	if err := g.finishWith(id, tok, state); err != nil {
		g.t.Fatal(err)
	}
}

// finishWith is PUT /jobs/:id with the job token (any goroutine).
func (g *gitLab) finishWith(id int64, jobToken, state string) error {
	code, body, err := g.call(http.MethodPut, fmt.Sprintf("/api/v4/jobs/%d", id), map[string]any{"token": jobToken, "state": state, "exit_code": 0})
	if err == nil && code != http.StatusOK {
		err = fmt.Errorf("PUT /jobs/%d %s: HTTP %d %s", id, state, code, body)
	}
	return err
}

// setStatus ends job id in GitLab: success or failed as its runner reports
// them, canceled as a user cancels.
func (g *gitLab) setStatus(id int64, status string) {
	g.t.Helper()
	if status == gitlabstandin.StatusCanceled {
		if err := g.Cancel(id); err != nil {
			g.t.Fatal(err)
		}
		return
	}
	g.finish(id, status)
}

// runnerTags returns runner rid's tags as GitLab holds them.
func (g *gitLab) runnerTags(rid int64) []string {
	r, _ := g.Runner(rid)
	return r.Tags
}

// runnerList returns the runners that exist, by id.
func (g *gitLab) runnerList() []gitlabstandin.RunnerState { return g.Runners() }

// deleted reports whether runner rid existed and was deleted.
func (g *gitLab) deleted(rid int64) bool {
	r, ok := g.Runner(rid)
	return ok && !r.DeletedAt.IsZero()
}

// addRunner puts a runner into GitLab directly (e.g. one leaked by a crash).
func (g *gitLab) addRunner(desc string) int64 {
	g.t.Helper()
	r, err := g.CreateRunner(gitlabstandin.RunnerSpec{ProjectID: g.proj.ID, Description: desc, RunUntagged: true})
	if err != nil {
		g.t.Fatal(err)
	}
	return r.ID
}

// ops are FireRunner's GitLab calls, by the client's op names.
var ops = map[string]struct {
	method string
	path   *regexp.Regexp
	prefix string // for failure injection
}{
	"get_job":       {"GET", regexp.MustCompile(`^/api/v4/projects/[^/]+/jobs/\d+$`), "/api/v4/projects/"},
	"list_jobs":     {"GET", regexp.MustCompile(`^/api/v4/projects/[^/]+/jobs$`), "/api/v4/projects/"},
	"create_runner": {"POST", regexp.MustCompile(`^/api/v4/user/runners$`), "/api/v4/user/runners"},
	"delete_runner": {"DELETE", regexp.MustCompile(`^/api/v4/runners/\d+$`), "/api/v4/runners/"},
	"update_runner": {"PUT", regexp.MustCompile(`^/api/v4/runners/\d+$`), "/api/v4/runners/"},
	"list_runners":  {"GET", regexp.MustCompile(`^/api/v4/runners$`), "/api/v4/runners"},
	"runner_jobs":   {"GET", regexp.MustCompile(`^/api/v4/runners/\d+/jobs$`), "/api/v4/runners/"},
}

func (g *gitLab) op(name string) (string, *regexp.Regexp, string) {
	g.t.Helper()
	o, ok := ops[name]
	if !ok {
		g.t.Fatalf("unknown op %q", name)
	}
	return o.method, o.path, o.prefix
}

// callCount is how many op requests GitLab answered (failed ones too).
func (g *gitLab) callCount(name string) int {
	method, path, _ := g.op(name)
	n := 0
	for _, r := range g.Requests() {
		if r.Method == method && path.MatchString(r.Path) {
			n++
		}
	}
	return n
}

// createdCount is how many runners FireRunner created (201s to POST
// /user/runners).
func (g *gitLab) createdCount() int {
	n := 0
	for _, r := range g.Requests() {
		if r.Method == http.MethodPost && r.Path == "/api/v4/user/runners" && r.Status == http.StatusCreated {
			n++
		}
	}
	return n
}

// deletedCount is how many runners DELETE /runners/:id removed.
func (g *gitLab) deletedCount() int {
	n := 0
	for _, r := range g.Requests() {
		if r.Method == http.MethodDelete && strings.HasPrefix(r.Path, "/api/v4/runners/") && r.Status == http.StatusNoContent {
			n++
		}
	}
	return n
}

// failNext makes the next n op requests fail with status (the method and
// a path prefix select them, as on a real outage of one endpoint).
func (g *gitLab) failNext(name string, n, status int) {
	method, _, prefix := g.op(name)
	g.FailNext(method, prefix, status, n)
}

// failUntil makes every op request fail with status until clearFailures.
func (g *gitLab) failUntil(name string, status int) {
	method, _, prefix := g.op(name)
	g.FailFor(method, prefix, status, time.Hour)
}

// clearFailures: GitLab recovers.
func (g *gitLab) clearFailures() { g.ClearFaults() }
