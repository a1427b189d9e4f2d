package controller

import (
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
)

// gitLabStub is an httptest GitLab following the documented REST shapes the
// controller uses (api/v4): GET /projects/:id/jobs/:job_id (with tag_list),
// GET /projects/:id/jobs?scope[]=pending, GET /groups/:id/projects,
// POST /user/runners -> 201 {id, token: "glrt-..."}, POST /runners (legacy),
// DELETE /runners/:id -> 204 (404 when unknown), GET /runners,
// GET /runners/:id/jobs (newest first).
type gitLabStub struct {
	srv   *httptest.Server
	token string

	mu         sync.Mutex
	jobs       map[int64]*stubJob
	groups     map[int64][]int64
	runners    map[int64]*stubRunner
	nextRunner int64
	failures   map[string][]stubFailure // op -> responses to give before behaving
	outages    map[string]stubFailure   // op -> response to give until cleared
	nextJob    int64
	calls      map[string]int
	created    int
	deleted    []int64
	onDelete   func(runnerID int64) // benchmark hook, called after a deletion
	// onRunnerJobs, when set, is called after GET /runners/:id/jobs answered
	// (outside the lock): what GitLab does right after that answer.
	onRunnerJobs func(runnerID int64)
}

type stubJob struct {
	ID, ProjectID int64
	Name, Ref     string
	Status        string
	Tags          []string
	RunnerID      int64 // the runner that picked it (0: none)
}

type stubRunner struct {
	ID                  int64
	Token               string
	Description         string
	RunnerType          string
	ProjectID, GroupID  int64
	Tags                []string
	Locked, RunUntagged bool
	Paused              bool
	MaximumTimeout      int64
}

type stubFailure struct {
	status int
	body   string
}

func newGitLabStub(t testing.TB) *gitLabStub {
	g := &gitLabStub{token: "glpat-test-api-token", jobs: map[int64]*stubJob{}, groups: map[int64][]int64{},
		runners: map[int64]*stubRunner{}, nextRunner: 1000, failures: map[string][]stubFailure{}, outages: map[string]stubFailure{},
		calls: map[string]int{}, nextJob: 50000}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /api/v4/projects/{pid}/jobs/{jid}", g.auth("get_job", g.getJob))
	mux.HandleFunc("GET /api/v4/projects/{pid}/jobs", g.auth("list_jobs", g.listJobs))
	mux.HandleFunc("GET /api/v4/groups/{gid}/projects", g.auth("list_group_projects", g.groupProjects))
	mux.HandleFunc("POST /api/v4/user/runners", g.auth("create_runner", g.createRunner))
	mux.HandleFunc("POST /api/v4/runners", g.registerLegacy) // authenticated by registration token
	mux.HandleFunc("DELETE /api/v4/runners/{rid}", g.auth("delete_runner", g.deleteRunner))
	mux.HandleFunc("GET /api/v4/runners", g.auth("list_runners", g.listRunners))
	mux.HandleFunc("GET /api/v4/runners/{rid}/jobs", g.auth("runner_jobs", g.runnerJobs))
	mux.HandleFunc("PUT /api/v4/runners/{rid}", g.auth("update_runner", g.updateRunner))
	g.srv = httptest.NewServer(mux)
	t.Cleanup(g.srv.Close)
	return g
}

func (g *gitLabStub) URL() string { return g.srv.URL }

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

func (g *gitLabStub) auth(op string, h http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("PRIVATE-TOKEN") != g.token {
			writeJSON(w, 401, map[string]string{"message": "401 Unauthorized"})
			return
		}
		g.mu.Lock()
		g.calls[op]++
		f, fail := g.outages[op]
		if q := g.failures[op]; len(q) > 0 {
			f, fail = q[0], true
			g.failures[op] = q[1:]
		}
		if fail {
			g.mu.Unlock()
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(f.status)
			_, _ = w.Write([]byte(f.body))
			return
		}
		g.mu.Unlock()
		h(w, r)
	}
}

// failNext makes the next n calls of op answer status with body.
func (g *gitLabStub) failNext(op string, n, status int, body string) {
	g.mu.Lock()
	defer g.mu.Unlock()
	for range n {
		g.failures[op] = append(g.failures[op], stubFailure{status, body})
	}
}

// failUntil makes every call of op answer status with body until
// clearFailures(op): an outage.
func (g *gitLabStub) failUntil(op string, status int, body string) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.outages[op] = stubFailure{status, body}
}

// clearFailures ends op's outage and drops its queued failures.
func (g *gitLabStub) clearFailures(op string) {
	g.mu.Lock()
	defer g.mu.Unlock()
	delete(g.outages, op)
	delete(g.failures, op)
}

// newJob adds a pending job with tags to project pid and returns its id.
func (g *gitLabStub) newJob(pid int64, tags ...string) int64 {
	g.mu.Lock()
	g.nextJob++
	id := g.nextJob
	g.mu.Unlock()
	g.addJob(stubJob{ID: id, ProjectID: pid, Tags: tags})
	return id
}

func (g *gitLabStub) addJob(j stubJob) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if j.Status == "" {
		j.Status = "pending"
	}
	if j.Name == "" {
		j.Name = "build"
	}
	if j.Ref == "" {
		j.Ref = "main"
	}
	g.jobs[j.ID] = &j
}

func (g *gitLabStub) setStatus(id int64, status string) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.jobs[id].Status = status
}

// pick records that runner rid took job id (as POST /jobs/request would).
func (g *gitLabStub) pick(id, rid int64) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.jobs[id].Status, g.jobs[id].RunnerID = "running", rid
}

// request is POST /jobs/request by runner rid, by GitLab's rule: the oldest
// pending job of the runner's project whose tags are a subset of the
// runner's (0: none).
func (g *gitLabStub) request(rid int64) int64 {
	g.mu.Lock()
	defer g.mu.Unlock()
	r, ok := g.runners[rid]
	if !ok || r.Paused {
		return 0
	}
	var best *stubJob
	for _, j := range g.jobs {
		if j.Status != "pending" || (r.RunnerType == "project_type" && j.ProjectID != r.ProjectID) || len(j.Tags) == 0 {
			continue
		}
		sub := true
		for _, t := range j.Tags {
			sub = sub && slices.Contains(r.Tags, t)
		}
		if sub && (best == nil || j.ID < best.ID) {
			best = j
		}
	}
	if best == nil {
		return 0
	}
	best.Status, best.RunnerID = "running", rid
	return best.ID
}

// runnerByToken is the runner a token authenticates (0: none).
func (g *gitLabStub) runnerByToken(tok string) int64 {
	g.mu.Lock()
	defer g.mu.Unlock()
	for _, r := range g.runners {
		if r.Token == tok {
			return r.ID
		}
	}
	return 0
}

// runnerTags returns runner rid's tags as GitLab holds them.
func (g *gitLabStub) runnerTags(rid int64) []string {
	g.mu.Lock()
	defer g.mu.Unlock()
	if r, ok := g.runners[rid]; ok {
		return slices.Clone(r.Tags)
	}
	return nil
}

func (g *gitLabStub) updateRunner(w http.ResponseWriter, r *http.Request) {
	var b struct {
		TagList *[]string `json:"tag_list"`
		Paused  *bool     `json:"paused"`
	}
	if err := json.NewDecoder(r.Body).Decode(&b); err != nil {
		writeJSON(w, 400, map[string]string{"error": "invalid body"})
		return
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	rr, ok := g.runners[id(r, "rid")]
	if !ok {
		writeJSON(w, 404, map[string]string{"message": "404 Runner Not Found"})
		return
	}
	if b.TagList != nil {
		rr.Tags = *b.TagList
	}
	if b.Paused != nil {
		rr.Paused = *b.Paused
	}
	writeJSON(w, 200, map[string]any{"id": rr.ID, "description": rr.Description, "tag_list": rr.Tags})
}

func (g *gitLabStub) runnerJobs(w http.ResponseWriter, r *http.Request) {
	rid := id(r, "rid")
	g.mu.Lock()
	after := g.onRunnerJobs
	g.mu.Unlock()
	if after != nil {
		defer after(rid)
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	if _, ok := g.runners[rid]; !ok {
		writeJSON(w, 404, map[string]string{"message": "404 Runner Not Found"})
		return
	}
	out := []map[string]any{}
	for _, j := range g.jobs {
		if j.RunnerID == rid {
			out = append(out, jobJSON(j))
		}
	}
	sort.Slice(out, func(a, b int) bool { return out[a]["id"].(int64) > out[b]["id"].(int64) })
	writeJSON(w, 200, out)
}

func (g *gitLabStub) callCount(op string) int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.calls[op]
}

func (g *gitLabStub) runnerList() []stubRunner {
	g.mu.Lock()
	defer g.mu.Unlock()
	var out []stubRunner
	for _, r := range g.runners {
		out = append(out, *r)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out
}

func (g *gitLabStub) createdCount() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.created
}

// addRunner puts a runner into GitLab directly (e.g. one leaked by a crash).
func (g *gitLabStub) addRunner(desc string) int64 {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.nextRunner++
	g.runners[g.nextRunner] = &stubRunner{ID: g.nextRunner, Token: fmt.Sprintf("glrt-leak%d", g.nextRunner), Description: desc}
	return g.nextRunner
}

func id(r *http.Request, name string) int64 {
	n, _ := strconv.ParseInt(r.PathValue(name), 10, 64)
	return n
}

func jobJSON(j *stubJob) map[string]any {
	out := map[string]any{
		"id": j.ID, "name": j.Name, "ref": j.Ref, "status": j.Status, "stage": "test", "tag_list": j.Tags,
		"pipeline":   map[string]any{"id": 77, "project_id": j.ProjectID, "ref": j.Ref, "status": "pending"},
		"created_at": "2025-05-21T16:06:02.000Z", "web_url": fmt.Sprintf("https://gitlab.example/p/-/jobs/%d", j.ID),
	}
	if j.RunnerID != 0 {
		out["runner"] = map[string]any{"id": j.RunnerID, "description": "x", "active": true, "is_shared": false}
	}
	return out
}

func (g *gitLabStub) getJob(w http.ResponseWriter, r *http.Request) {
	g.mu.Lock()
	defer g.mu.Unlock()
	j, ok := g.jobs[id(r, "jid")]
	if !ok || j.ProjectID != id(r, "pid") {
		writeJSON(w, 404, map[string]string{"message": "404 Job Not Found"})
		return
	}
	writeJSON(w, 200, jobJSON(j))
}

func (g *gitLabStub) listJobs(w http.ResponseWriter, r *http.Request) {
	scopes := r.URL.Query()["scope[]"]
	g.mu.Lock()
	defer g.mu.Unlock()
	pid := id(r, "pid")
	out := []map[string]any{}
	var ids []int64
	for jid, j := range g.jobs {
		if j.ProjectID != pid {
			continue
		}
		match := len(scopes) == 0
		for _, s := range scopes {
			match = match || s == j.Status
		}
		if match {
			ids = append(ids, jid)
		}
	}
	sort.Slice(ids, func(i, j int) bool { return ids[i] > ids[j] }) // GitLab lists newest first
	for _, jid := range ids {
		out = append(out, jobJSON(g.jobs[jid]))
	}
	w.Header().Set("X-Page", "1")
	w.Header().Set("X-Next-Page", "")
	w.Header().Set("X-Total-Pages", "1")
	writeJSON(w, 200, out)
}

func (g *gitLabStub) groupProjects(w http.ResponseWriter, r *http.Request) {
	g.mu.Lock()
	defer g.mu.Unlock()
	out := []map[string]any{}
	for _, p := range g.groups[id(r, "gid")] {
		out = append(out, map[string]any{"id": p, "name": fmt.Sprintf("p%d", p), "path_with_namespace": fmt.Sprintf("g/p%d", p)})
	}
	w.Header().Set("X-Next-Page", "")
	writeJSON(w, 200, out)
}

type createRunnerBody struct {
	RunnerType     string   `json:"runner_type"`
	ProjectID      int64    `json:"project_id"`
	GroupID        int64    `json:"group_id"`
	Description    string   `json:"description"`
	Locked         *bool    `json:"locked"`
	RunUntagged    *bool    `json:"run_untagged"`
	TagList        []string `json:"tag_list"`
	MaximumTimeout int64    `json:"maximum_timeout"`
	Token          string   `json:"token"` // legacy registration token
}

func (g *gitLabStub) newRunner(b createRunnerBody, w http.ResponseWriter) {
	if b.MaximumTimeout != 0 && b.MaximumTimeout < 600 {
		writeJSON(w, 400, map[string]any{"message": map[string][]string{"maximum_timeout": {"needs to be at least 10 minutes"}}})
		return
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	g.nextRunner++
	r := &stubRunner{ID: g.nextRunner, Token: fmt.Sprintf("glrt-t%dsecret", g.nextRunner), Description: b.Description,
		RunnerType: b.RunnerType, ProjectID: b.ProjectID, GroupID: b.GroupID, Tags: b.TagList, MaximumTimeout: b.MaximumTimeout}
	if b.Locked != nil {
		r.Locked = *b.Locked
	}
	if b.RunUntagged != nil {
		r.RunUntagged = *b.RunUntagged
	} else {
		r.RunUntagged = true // GitLab's default
	}
	g.runners[r.ID] = r
	g.created++
	writeJSON(w, 201, map[string]any{"id": r.ID, "token": r.Token, "token_expires_at": nil})
}

func (g *gitLabStub) createRunner(w http.ResponseWriter, r *http.Request) {
	var b createRunnerBody
	if err := json.NewDecoder(r.Body).Decode(&b); err != nil {
		writeJSON(w, 400, map[string]string{"error": "invalid body"})
		return
	}
	switch b.RunnerType {
	case "project_type":
		if b.ProjectID == 0 {
			writeJSON(w, 400, map[string]string{"error": "project_id is missing"})
			return
		}
	case "group_type", "instance_type":
	default:
		writeJSON(w, 400, map[string]string{"error": "runner_type does not have a valid value"})
		return
	}
	g.newRunner(b, w)
}

func (g *gitLabStub) registerLegacy(w http.ResponseWriter, r *http.Request) {
	var b createRunnerBody
	if err := json.NewDecoder(r.Body).Decode(&b); err != nil || b.Token != "GR1348941legacy" {
		writeJSON(w, 403, map[string]string{"message": "403 Forbidden"})
		return
	}
	g.newRunner(b, w)
}

func (g *gitLabStub) deleteRunner(w http.ResponseWriter, r *http.Request) {
	g.mu.Lock()
	defer g.mu.Unlock()
	rid := id(r, "rid")
	if _, ok := g.runners[rid]; !ok {
		writeJSON(w, 404, map[string]string{"message": "404 Runner Not Found"})
		return
	}
	delete(g.runners, rid)
	g.deleted = append(g.deleted, rid)
	w.WriteHeader(204)
	if g.onDelete != nil {
		g.onDelete(rid)
	}
}

func (g *gitLabStub) listRunners(w http.ResponseWriter, r *http.Request) {
	g.mu.Lock()
	defer g.mu.Unlock()
	out := []map[string]any{}
	var ids []int64
	for rid := range g.runners {
		ids = append(ids, rid)
	}
	sort.Slice(ids, func(i, j int) bool { return ids[i] < ids[j] })
	for _, rid := range ids {
		rr := g.runners[rid]
		out = append(out, map[string]any{"id": rr.ID, "description": rr.Description, "active": true, "paused": false,
			"is_shared": rr.RunnerType == "instance_type", "runner_type": rr.RunnerType, "name": nil, "online": false, "status": "never_contacted"})
	}
	w.Header().Set("X-Next-Page", "")
	writeJSON(w, 200, out)
}

// jobHook renders a Job Hook body as GitLab sends it (note the non-ISO
// timestamps and runner: null while pending).
func jobHook(jobID, projectID int64, status string, runnerID int64) []byte {
	var runner any
	if runnerID != 0 {
		runner = map[string]any{"id": runnerID, "description": "x", "runner_type": "project_type", "active": true, "is_shared": false, "tags": []string{}}
	}
	b, _ := json.Marshal(map[string]any{
		"object_kind": "build", "ref": "main", "tag": false, "before_sha": strings.Repeat("0", 40), "sha": strings.Repeat("a", 40),
		"build_id": jobID, "build_name": "build", "build_stage": "test", "build_status": status,
		"build_created_at": "2025-05-21 16:06:02 UTC", "build_started_at": nil, "build_finished_at": nil,
		"build_created_at_iso": "2025-05-21T16:06:02Z", "build_duration": nil, "build_allow_failure": false,
		"build_failure_reason": "unknown_failure", "pipeline_id": 77, "runner": runner, "project_id": projectID,
		"project_name": "Group / Project",
		"user":         map[string]any{"id": 1, "name": "Admin", "username": "root"},
		"commit":       map[string]any{"id": 77, "sha": strings.Repeat("a", 40), "message": "m", "status": status},
		"repository":   map[string]any{"name": "project", "homepage": "https://gitlab.example/g/p"},
		"project":      map[string]any{"id": projectID, "name": "project", "path_with_namespace": "g/p", "default_branch": "main"},
		"environment":  nil,
	})
	return b
}

// deletedRunners returns the ids DELETE /runners/:id removed, in order.
func (g *gitLabStub) deletedRunners() []int64 {
	g.mu.Lock()
	defer g.mu.Unlock()
	return slices.Clone(g.deleted)
}
