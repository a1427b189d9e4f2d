package gitlabstandin

import (
	"cmp"
	"encoding/json"
	"fmt"
	"io"
	"mime"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"time"
)

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

func msg(w http.ResponseWriter, status int, text string) {
	writeJSON(w, status, map[string]any{"message": text})
}

// params merges query, form and JSON body parameters, like Grape.
type params map[string]any

func readParams(r *http.Request) (params, error) {
	p := params{}
	for k, v := range r.URL.Query() {
		p.setValues(k, v)
	}
	if r.Body == nil {
		return p, nil
	}
	ct, _, _ := mime.ParseMediaType(r.Header.Get("Content-Type"))
	switch ct {
	case "application/json":
		body, err := io.ReadAll(io.LimitReader(r.Body, 1<<20))
		if err != nil {
			return nil, err
		}
		if len(body) > 0 {
			var m map[string]any
			if err := json.Unmarshal(body, &m); err != nil {
				return nil, err
			}
			for k, v := range m {
				p[k] = v
			}
		}
	case "application/x-www-form-urlencoded", "multipart/form-data":
		if err := r.ParseMultipartForm(1 << 20); err != nil && err != http.ErrNotMultipart {
			return nil, err
		}
		for k, v := range r.PostForm {
			p.setValues(k, v)
		}
	}
	return p, nil
}

func (p params) setValues(k string, v []string) {
	if strings.HasSuffix(k, "[]") {
		k = strings.TrimSuffix(k, "[]")
		var arr []any
		if old, ok := p[k].([]any); ok {
			arr = old
		}
		for _, s := range v {
			arr = append(arr, s)
		}
		p[k] = arr
		return
	}
	if len(v) > 0 {
		p[k] = v[len(v)-1]
	}
}

func (p params) str(k string) string {
	switch v := p[k].(type) {
	case string:
		return v
	case float64:
		return strconv.FormatFloat(v, 'f', -1, 64)
	case bool:
		return strconv.FormatBool(v)
	}
	return ""
}

func (p params) has(k string) bool { _, ok := p[k]; return ok }

func (p params) int(k string) (int64, bool, error) {
	if !p.has(k) {
		return 0, false, nil
	}
	n, err := strconv.ParseInt(p.str(k), 10, 64)
	if err != nil {
		return 0, true, fmt.Errorf("%s is invalid", k)
	}
	return n, true, nil
}

func (p params) bool(k string, def bool) (bool, error) {
	if !p.has(k) {
		return def, nil
	}
	switch strings.ToLower(p.str(k)) {
	case "true", "1", "yes", "t":
		return true, nil
	case "false", "0", "no", "f":
		return false, nil
	}
	return false, fmt.Errorf("%s is invalid", k)
}

// list accepts an array or a comma-separated string (Grape's CommaSeparatedToArray).
func (p params) list(k string) []string {
	var out []string
	switch v := p[k].(type) {
	case []any:
		for _, e := range v {
			if s, ok := e.(string); ok {
				out = append(out, strings.Split(s, ",")...)
			}
		}
	case string:
		out = strings.Split(v, ",")
	}
	var clean []string
	for _, s := range out {
		if s = strings.TrimSpace(s); s != "" {
			clean = append(clean, s)
		}
	}
	return clean
}

// auth authenticates a personal access token and checks it has one of scopes.
func (s *Server) auth(w http.ResponseWriter, r *http.Request, scopes ...string) bool {
	_, ok := s.authToken(w, r, scopes...)
	return ok
}

// authToken is auth returning the token (its user: admin or not).
func (s *Server) authToken(w http.ResponseWriter, r *http.Request, scopes ...string) (*token, bool) {
	v := r.Header.Get("PRIVATE-TOKEN")
	if v == "" {
		if a := r.Header.Get("Authorization"); strings.HasPrefix(a, "Bearer ") {
			v = strings.TrimPrefix(a, "Bearer ")
		}
	}
	if v == "" {
		v = r.URL.Query().Get("private_token")
	}
	s.mu.Lock()
	t, ok := s.tokens[v]
	s.mu.Unlock()
	if v == "" || !ok {
		msg(w, http.StatusUnauthorized, "401 Unauthorized")
		return nil, false
	}
	if !t.has(scopes...) {
		writeJSON(w, http.StatusForbidden, map[string]any{
			"error":             "insufficient_scope",
			"error_description": "The request requires higher privileges than provided by the access token.",
			"scope":             strings.Join(scopes, " "),
		})
		return nil, false
	}
	return t, true
}

var readScopes = []string{ScopeAPI, ScopeReadAPI}

// serveAPI routes /api/v4/... Path segments are unescaped one by one so a
// project id may be a URL-encoded full path ("group%2Fproject").
func (s *Server) serveAPI(w http.ResponseWriter, r *http.Request) {
	raw := strings.TrimPrefix(r.URL.EscapedPath(), "/api/v4/")
	var seg []string
	for _, part := range strings.Split(strings.TrimSuffix(raw, "/"), "/") {
		// net/http already refused a request whose path has a bad escape
		// (400), so every segment of the escaped path unescapes.
		u, _ := url.PathUnescape(part)
		seg = append(seg, u)
	}
	route := func(method string, pattern ...string) bool {
		if r.Method != method || len(seg) != len(pattern) {
			return false
		}
		for i, p := range pattern {
			if p != "*" && p != seg[i] {
				return false
			}
		}
		return true
	}
	switch {
	// Runner API (runner or job token auth).
	case route("POST", "runners", "verify"):
		s.runnerVerify(w, r)
	case route("POST", "jobs", "request"):
		s.jobsRequest(w, r)
	case route("PUT", "jobs", "*"):
		s.jobUpdate(w, r, seg[1])
	case route("PATCH", "jobs", "*", "trace"):
		s.jobTrace(w, r, seg[1])
	case route("POST", "jobs", "*", "artifacts"):
		s.uploadArtifacts(w, r, seg[1])
	case route("GET", "jobs", "*", "artifacts"):
		s.downloadArtifacts(w, r, seg[1])
	case route("POST", "runners"):
		s.runnerRegister(w, r)
	case route("DELETE", "runners"):
		s.runnerUnregister(w, r)
	case route("DELETE", "runners", "managers"):
		s.runnerUnregister(w, r)

	// REST API (personal access token auth).
	case route("GET", "version"):
		if s.auth(w, r, readScopes...) {
			writeJSON(w, 200, map[string]any{"version": Version, "revision": "standin", "kas": map[string]any{"enabled": false}, "enterprise": false})
		}
	case route("GET", "user"):
		if s.auth(w, r, append(readScopes, ScopeCreateRunner, ScopeManageRunner)...) {
			writeJSON(w, 200, userJSON())
		}
	case route("GET", "projects", "*"):
		s.getProject(w, r, seg[1])
	case route("GET", "projects", "*", "jobs"):
		s.listJobs(w, r, seg[1])
	case route("GET", "projects", "*", "jobs", "*"):
		s.getJob(w, r, seg[1], seg[3])
	case route("POST", "projects", "*", "pipeline"):
		s.createPipeline(w, r, seg[1])
	case route("GET", "projects", "*", "jobs", "*", "trace"):
		s.getTrace(w, r, seg[1], seg[3])
	case route("POST", "projects", "*", "jobs", "*", "cancel"):
		s.cancelJob(w, r, seg[1], seg[3])
	case route("GET", "groups", "*"):
		s.getGroup(w, r, seg[1])
	case route("GET", "groups", "*", "projects"):
		s.listGroupProjects(w, r, seg[1])
	case route("POST", "user", "runners"):
		s.createUserRunner(w, r)
	case route("GET", "runners"):
		s.listRunners(w, r, false)
	case route("GET", "runners", "all"):
		s.listRunners(w, r, true)
	case route("GET", "runners", "*"):
		s.getRunner(w, r, seg[1])
	case route("GET", "runners", "*", "jobs"):
		s.listRunnerJobs(w, r, seg[1])
	case route("GET", "runners", "*", "managers"):
		s.listRunnerManagers(w, r, seg[1])
	case route("POST", "runners", "*", "reset_authentication_token"):
		s.resetRunnerToken(w, r, seg[1])
	case route("DELETE", "runners", "*"):
		s.deleteRunner(w, r, seg[1])
	case route("PUT", "runners", "*"):
		s.updateRunner(w, r, seg[1])
	default:
		msg(w, http.StatusNotFound, "404 Not Found")
	}
}

func userJSON() map[string]any {
	return map[string]any{"id": 1, "username": "root", "name": "Administrator", "state": "active",
		"is_admin": true, "email": "admin@example.com", "avatar_url": "", "web_url": ""}
}

// findProjectLocked resolves a numeric id or a full path.
func (s *Server) findProjectLocked(ref string) *project {
	if id, err := strconv.ParseInt(ref, 10, 64); err == nil {
		return s.projects[id]
	}
	for _, p := range s.projects {
		if p.path == ref {
			return p
		}
	}
	return nil
}

func (s *Server) findGroupLocked(ref string) *group {
	if id, err := strconv.ParseInt(ref, 10, 64); err == nil {
		return s.groups[id]
	}
	for _, g := range s.groups {
		if g.path == ref {
			return g
		}
	}
	return nil
}

func (s *Server) projectJSONLocked(p *project) map[string]any {
	g := s.groups[p.groupID]
	return map[string]any{
		"id": p.id, "name": p.name, "path": p.path[strings.LastIndex(p.path, "/")+1:],
		"path_with_namespace": p.path, "name_with_namespace": strings.ReplaceAll(p.path, "/", " / "),
		"description": "", "default_branch": p.defaultBranch, "visibility": "private",
		"http_url_to_repo": s.baseURL + "/" + p.path + ".git", "web_url": s.baseURL + "/" + p.path,
		"ssh_url_to_repo": "git@" + hostOf(s.baseURL) + ":" + p.path + ".git",
		"namespace": map[string]any{"id": g.id, "name": g.name, "path": g.path[strings.LastIndex(g.path, "/")+1:],
			"kind": "group", "full_path": g.path, "parent_id": nullID(g.parentID)},
		"archived": false, "jobs_enabled": true, "shared_runners_enabled": true,
	}
}

func nullID(id int64) any {
	if id == 0 {
		return nil
	}
	return id
}

func hostOf(base string) string {
	u, err := url.Parse(base)
	if err != nil {
		return ""
	}
	return u.Hostname()
}

func (s *Server) getProject(w http.ResponseWriter, r *http.Request, ref string) {
	if !s.auth(w, r, readScopes...) {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	p := s.findProjectLocked(ref)
	if p == nil {
		msg(w, 404, "404 Project Not Found")
		return
	}
	writeJSON(w, 200, s.projectJSONLocked(p))
}

func (s *Server) getGroup(w http.ResponseWriter, r *http.Request, ref string) {
	if !s.auth(w, r, readScopes...) {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	g := s.findGroupLocked(ref)
	if g == nil {
		msg(w, 404, "404 Group Not Found")
		return
	}
	writeJSON(w, 200, map[string]any{"id": g.id, "name": g.name, "path": g.path[strings.LastIndex(g.path, "/")+1:],
		"full_path": g.path, "parent_id": nullID(g.parentID), "web_url": s.baseURL + "/groups/" + g.path})
}

func (s *Server) listGroupProjects(w http.ResponseWriter, r *http.Request, ref string) {
	if !s.auth(w, r, readScopes...) {
		return
	}
	q, err := readParams(r)
	if err != nil {
		msg(w, 400, "400 Bad request - "+err.Error())
		return
	}
	sub, err := q.bool("include_subgroups", false)
	if err != nil {
		writeJSON(w, 400, map[string]any{"error": err.Error()})
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	g := s.findGroupLocked(ref)
	if g == nil {
		msg(w, 404, "404 Group Not Found")
		return
	}
	var list []*project
	for _, p := range s.projects {
		if p.groupID == g.id || (sub && s.projectInGroupLocked(p, g.id)) {
			list = append(list, p)
		}
	}
	// GitLab orders by created_at desc by default.
	slices.SortFunc(list, func(a, b *project) int { return int(b.id - a.id) })
	writePage(s, w, r, q, list, s.projectJSONLocked)
}

// writePage writes one page of list, rendered by render, with GitLab's
// pagination headers.
func writePage[T any](s *Server, w http.ResponseWriter, r *http.Request, q params, list []T, render func(T) map[string]any) {
	from, to, ok := s.paginate(w, r, q, len(list))
	if !ok {
		return
	}
	out := []map[string]any{}
	for _, v := range list[from:to] {
		out = append(out, render(v))
	}
	writeJSON(w, 200, out)
}

// paginate applies GitLab's offset pagination and sets its headers.
func (s *Server) paginate(w http.ResponseWriter, r *http.Request, q params, total int) (int, int, bool) {
	page, _, err1 := q.int("page")
	per, _, err2 := q.int("per_page")
	if err1 != nil || err2 != nil {
		writeJSON(w, 400, map[string]any{"error": "page or per_page is invalid"})
		return 0, 0, false
	}
	if page < 1 {
		page = 1
	}
	if per < 1 {
		per = 20
	}
	if per > 100 {
		per = 100
	}
	pages := (int64(total) + per - 1) / per
	if pages == 0 {
		pages = 1
	}
	h := w.Header()
	h.Set("X-Page", strconv.FormatInt(page, 10))
	h.Set("X-Per-Page", strconv.FormatInt(per, 10))
	h.Set("X-Total", strconv.Itoa(total))
	h.Set("X-Total-Pages", strconv.FormatInt(pages, 10))
	h.Set("X-Next-Page", "")
	h.Set("X-Prev-Page", "")
	link := func(p int64, rel string) string {
		u := *r.URL
		v := u.Query()
		v.Set("page", strconv.FormatInt(p, 10))
		v.Set("per_page", strconv.FormatInt(per, 10))
		v.Del("private_token")
		u.RawQuery = v.Encode()
		return fmt.Sprintf("<%s%s>; rel=\"%s\"", s.baseURL, u.RequestURI(), rel)
	}
	var links []string
	if page > 1 {
		h.Set("X-Prev-Page", strconv.FormatInt(page-1, 10))
		links = append(links, link(page-1, "prev"))
	}
	if page < pages {
		h.Set("X-Next-Page", strconv.FormatInt(page+1, 10))
		links = append(links, link(page+1, "next"))
	}
	links = append(links, link(1, "first"), link(pages, "last"))
	h.Set("Link", strings.Join(links, ", "))
	from := int((page - 1) * per)
	if from > total {
		from = total
	}
	to := from + int(per)
	if to > total {
		to = total
	}
	return from, to, true
}

func (s *Server) jobJSONLocked(j *job) map[string]any {
	p := s.projects[j.projectID]
	pl := s.pipes[j.pipelineID]
	var runnerObj any
	if r, ok := s.runners[j.runnerID]; ok && j.runnerID != 0 {
		runnerObj = s.runnerJSONLocked(r)
	}
	var managerObj any
	if m := s.managerByIDLocked(j.runnerID, j.managerID); m != nil {
		managerObj = managerJSON(m)
	}
	duration, queued := j.durations()
	out := map[string]any{
		"id": j.id, "name": j.spec.Name, "stage": j.spec.Stage, "status": j.status,
		"ref": pl.ref, "tag": false, "tag_list": nonNil(j.spec.Tags), "coverage": nil,
		"allow_failure": j.spec.AllowFailure, "archived": false,
		"created_at": isoTS(j.createdAt), "started_at": isoTS(j.startedAt),
		"finished_at": isoTS(j.finishedAt), "erased_at": nil, "duration": duration,
		"queued_duration": queued, "artifacts_expire_at": nil, "artifacts": []any{},
		"user": userJSON(), "web_url": fmt.Sprintf("%s/%s/-/jobs/%d", s.baseURL, p.path, j.id),
		"pipeline": map[string]any{"id": pl.id, "iid": pl.id, "project_id": p.id, "ref": pl.ref, "sha": pl.sha,
			"status": s.pipelineStatusLocked(pl), "source": "push"},
		"commit": map[string]any{"id": pl.sha, "short_id": pl.sha[:8], "title": p.headMessage,
			"message": p.headMessage, "author_name": "Administrator", "author_email": "admin@example.com"},
		"runner": runnerObj, "runner_manager": managerObj,
		"project": map[string]any{"ci_job_token_scope_enabled": false},
	}
	if j.status == StatusFailed {
		out["failure_reason"] = j.failureReason
	}
	return out
}

func (s *Server) getJob(w http.ResponseWriter, r *http.Request, pref, jref string) {
	if !s.auth(w, r, readScopes...) {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	p := s.findProjectLocked(pref)
	if p == nil {
		msg(w, 404, "404 Project Not Found")
		return
	}
	id, _ := strconv.ParseInt(jref, 10, 64)
	j, ok := s.jobs[id]
	if !ok || j.projectID != p.id {
		msg(w, 404, "404 Not found")
		return
	}
	writeJSON(w, 200, s.jobJSONLocked(j))
}

// getTrace is GET /projects/:id/jobs/:job_id/trace: the raw log.
func (s *Server) getTrace(w http.ResponseWriter, r *http.Request, pref, jref string) {
	if !s.auth(w, r, readScopes...) {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	p := s.findProjectLocked(pref)
	id, _ := strconv.ParseInt(jref, 10, 64)
	j, ok := s.jobs[id]
	if p == nil || !ok || j.projectID != p.id {
		msg(w, 404, "404 Not found")
		return
	}
	w.Header().Set("Content-Type", "text/plain")
	_, _ = w.Write(j.trace)
}

func (s *Server) cancelJob(w http.ResponseWriter, r *http.Request, pref, jref string) {
	if !s.auth(w, r, ScopeAPI) {
		return
	}
	s.mu.Lock()
	p := s.findProjectLocked(pref)
	id, _ := strconv.ParseInt(jref, 10, 64)
	j, ok := s.jobs[id]
	s.mu.Unlock()
	if p == nil || !ok || j.projectID != p.id {
		msg(w, 404, "404 Not found")
		return
	}
	if err := s.Cancel(id); err != nil {
		msg(w, 403, "403 Forbidden")
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	writeJSON(w, 201, s.jobJSONLocked(j))
}

var jobScopes = []string{StatusCreated, StatusPending, StatusRunning, StatusFailed, StatusSuccess,
	StatusCanceled, StatusSkipped, "waiting_for_resource", "manual", StatusCanceling, "preparing", "scheduled"}

func (s *Server) listJobs(w http.ResponseWriter, r *http.Request, pref string) {
	if !s.auth(w, r, readScopes...) {
		return
	}
	q, err := readParams(r)
	if err != nil {
		msg(w, 400, "400 Bad request - "+err.Error())
		return
	}
	scopes := q.list("scope")
	for _, sc := range scopes {
		if !slices.Contains(jobScopes, sc) {
			writeJSON(w, 400, map[string]any{"error": "scope does not have a valid value"})
			return
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	p := s.findProjectLocked(pref)
	if p == nil {
		msg(w, 404, "404 Project Not Found")
		return
	}
	var list []*job
	for _, j := range s.jobs {
		if j.projectID == p.id && (len(scopes) == 0 || slices.Contains(scopes, j.status)) {
			list = append(list, j)
		}
	}
	slices.SortFunc(list, func(a, b *job) int { return int(b.id - a.id) })
	writePage(s, w, r, q, list, s.jobJSONLocked)
}

func (s *Server) runnerStatusLocked(r *runner) string {
	switch {
	case r.contactedAt.IsZero():
		return "never_contacted"
	case time.Since(r.contactedAt) < 2*time.Hour:
		return "online"
	case time.Since(r.contactedAt) > 7*24*time.Hour:
		return "stale"
	}
	return "offline"
}

func (s *Server) runnerJSONLocked(r *runner) map[string]any {
	st := s.runnerStatusLocked(r)
	return map[string]any{
		"id": r.id, "description": r.description, "ip_address": "", "active": !r.paused, "paused": r.paused,
		"is_shared": r.runnerType == "instance_type", "runner_type": r.runnerType, "name": "gitlab-runner",
		"online": st == "online", "status": st, "created_by": userJSON(), "created_at": isoTS(r.createdAt),
	}
}

func (s *Server) runnerDetailsJSONLocked(r *runner) map[string]any {
	out := s.runnerJSONLocked(r)
	projects := []map[string]any{}
	for _, id := range r.projectIDs {
		if p, ok := s.projects[id]; ok {
			projects = append(projects, map[string]any{"id": p.id, "name": p.name,
				"name_with_namespace": strings.ReplaceAll(p.path, "/", " / "), "path": p.name, "path_with_namespace": p.path})
		}
	}
	groups := []map[string]any{}
	if g, ok := s.groups[r.groupID]; ok {
		groups = append(groups, map[string]any{"id": g.id, "name": g.name, "web_url": s.baseURL + "/groups/" + g.path})
	}
	var contacted any
	if !r.contactedAt.IsZero() {
		contacted = isoTS(r.contactedAt)
	}
	out["tag_list"] = nonNil(r.tags)
	out["run_untagged"] = r.runUntagged
	out["locked"] = r.locked
	out["access_level"] = r.accessLevel
	out["maximum_timeout"] = nullID(r.maximumTimeout)
	out["contacted_at"] = contacted
	out["maintenance_note"] = nil
	out["projects"] = projects
	out["groups"] = groups
	out["version"] = r.version
	return out
}

// Runner filter values (Ci::Runner::AVAILABLE_TYPES, AVAILABLE_STATUSES,
// and the deprecated scopes; /runners/all also takes specific and shared).
var (
	runnerTypes      = []string{"instance_type", "group_type", "project_type"}
	runnerStatuses   = []string{"online", "offline", "stale", "never_contacted"}
	runnerScopes     = []string{"active", "paused", "online", "offline", "stale", "never_contacted"}
	runnerAllScopes  = append([]string{"specific", "shared"}, append(slices.Clone(runnerTypes), runnerScopes...)...)
	runnerJobStatus  = []string{StatusRunning, StatusSuccess, StatusFailed, StatusCanceled}
	runnerJobSorts   = []string{"asc", "desc"}
	runnerJobOrderBy = []string{"id"}
)

// listRunners is GET /runners ("List owned runners": the project and group
// runners of the user's projects and groups, never instance runners) and,
// with all, GET /runners/all ("List all runners": every runner, instance
// ones included; administrators only). Both need api or read_api: GitLab
// allows manage_runner only on /runners/:id routes.
func (s *Server) listRunners(w http.ResponseWriter, r *http.Request, all bool) {
	t, ok := s.authToken(w, r, readScopes...)
	if !ok {
		return
	}
	if all && !t.admin {
		msg(w, http.StatusForbidden, "403 Forbidden")
		return
	}
	q, err := readParams(r)
	if err != nil {
		msg(w, 400, "400 Bad request - "+err.Error())
		return
	}
	typ, status, scope, tags := q.str("type"), q.str("status"), q.str("scope"), q.list("tag_list")
	scopes := runnerScopes
	if all {
		scopes = runnerAllScopes
	}
	switch {
	case q.has("type") && !slices.Contains(runnerTypes, typ):
		writeJSON(w, 400, map[string]any{"error": "type does not have a valid value"})
		return
	case q.has("status") && !slices.Contains(runnerStatuses, status):
		writeJSON(w, 400, map[string]any{"error": "status does not have a valid value"})
		return
	case q.has("scope") && !slices.Contains(scopes, scope):
		msg(w, 400, "Scope contains invalid value")
		return
	}
	paused, pausedErr := q.bool("paused", false)
	if pausedErr != nil {
		writeJSON(w, 400, map[string]any{"error": pausedErr.Error()})
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	var list []*runner
	for _, rn := range s.sortedRunnersLocked() {
		st := s.runnerStatusLocked(rn)
		if !all && rn.runnerType == "instance_type" || typ != "" && rn.runnerType != typ || status != "" && st != status ||
			q.has("paused") && rn.paused != paused || !runnerInScope(rn, st, scope) {
			continue
		}
		match := true
		for _, t := range tags {
			match = match && slices.Contains(rn.tags, t)
		}
		if match {
			list = append(list, rn)
		}
	}
	writePage(s, w, r, q, list, s.runnerJSONLocked)
}

// runnerInScope applies the deprecated scope filter.
func runnerInScope(rn *runner, status, scope string) bool {
	switch scope {
	case "":
		return true
	case "active":
		return !rn.paused
	case "paused":
		return rn.paused
	case "specific":
		return rn.runnerType != "instance_type"
	case "shared":
		return rn.runnerType == "instance_type"
	case "instance_type", "group_type", "project_type":
		return rn.runnerType == scope
	}
	return status == scope
}

// runnerLocked is the runner GitLab's /runners/:id routes name, or false
// after GitLab's 404 (caller holds s.mu).
func (s *Server) runnerLocked(w http.ResponseWriter, ref string) (*runner, bool) {
	id, _ := strconv.ParseInt(ref, 10, 64)
	rn, ok := s.runners[id]
	if !ok {
		msg(w, 404, "404 Runner Not Found")
	}
	return rn, ok
}

func (s *Server) getRunner(w http.ResponseWriter, r *http.Request, ref string) {
	if !s.auth(w, r, ScopeAPI, ScopeReadAPI, ScopeManageRunner) {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	rn, ok := s.runnerLocked(w, ref)
	if !ok {
		return
	}
	writeJSON(w, 200, s.runnerDetailsJSONLocked(rn))
}

// listRunnerJobs is GET /runners/:id/jobs: the jobs a runner picked,
// optionally filtered by status; order_by=id, sort=asc|desc (default desc).
// Each job carries its project, as in GitLab's response.
func (s *Server) listRunnerJobs(w http.ResponseWriter, r *http.Request, ref string) {
	if !s.auth(w, r, ScopeAPI, ScopeReadAPI, ScopeManageRunner) {
		return
	}
	q, err := readParams(r)
	if err != nil {
		msg(w, 400, "400 Bad request - "+err.Error())
		return
	}
	status, sort, orderBy, systemID := q.str("status"), q.str("sort"), q.str("order_by"), q.str("system_id")
	switch {
	case status != "" && !slices.Contains(runnerJobStatus, status):
		writeJSON(w, 400, map[string]any{"error": "status does not have a valid value"})
		return
	case sort != "" && !slices.Contains(runnerJobSorts, sort):
		writeJSON(w, 400, map[string]any{"error": "sort does not have a valid value"})
		return
	case orderBy != "" && !slices.Contains(runnerJobOrderBy, orderBy):
		writeJSON(w, 400, map[string]any{"error": "order_by does not have a valid value"})
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	rn, ok := s.runnerLocked(w, ref)
	if !ok {
		return
	}
	// system_id (GitLab 16.9+) narrows the list to one runner manager's
	// jobs; an unknown system_id matches none.
	var mgrID int64 = -1
	if q.has("system_id") {
		for _, m := range rn.managers {
			if m.systemID == systemID {
				mgrID = m.id
			}
		}
	}
	var list []*job
	for _, j := range s.jobs {
		if j.runnerID == rn.id && (status == "" || j.status == status) && (!q.has("system_id") || j.managerID == mgrID) {
			list = append(list, j)
		}
	}
	slices.SortFunc(list, func(a, b *job) int {
		if sort == "asc" {
			return cmp.Compare(a.id, b.id)
		}
		return cmp.Compare(b.id, a.id)
	})
	writePage(s, w, r, q, list, func(j *job) map[string]any {
		out := s.jobJSONLocked(j)
		p := s.projects[j.projectID]
		out["project"] = map[string]any{"id": p.id, "name": p.name, "description": "",
			"name_with_namespace": strings.ReplaceAll(p.path, "/", " / "), "path": p.path[strings.LastIndex(p.path, "/")+1:],
			"path_with_namespace": p.path}
		return out
	})
}

func (s *Server) deleteRunner(w http.ResponseWriter, r *http.Request, ref string) {
	if !s.auth(w, r, ScopeAPI, ScopeManageRunner) {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	id, _ := strconv.ParseInt(ref, 10, 64)
	if _, ok := s.runners[id]; !ok {
		msg(w, 404, "404 Runner Not Found")
		return
	}
	s.deleteRunnerLocked(id)
	w.WriteHeader(http.StatusNoContent)
}

// updateRunner is PUT /runners/:id: description, paused (or active),
// tag_list, run_untagged, locked and maximum_timeout, each only when
// given. GitLab matches jobs against the runner's tags at each job request,
// so the new tags apply to the next one.
func (s *Server) updateRunner(w http.ResponseWriter, r *http.Request, ref string) {
	if !s.auth(w, r, ScopeAPI, ScopeManageRunner) {
		return
	}
	q, err := readParams(r)
	if err != nil {
		msg(w, 400, "400 Bad request - "+err.Error())
		return
	}
	// Grape's at_least_one_of and mutually_exclusive, as GitLab declares them.
	updatable := []string{"description", "active", "paused", "tag_list", "run_untagged", "locked", "access_level", "maximum_timeout", "maintenance_note"}
	if !slices.ContainsFunc(updatable, q.has) {
		writeJSON(w, 400, map[string]any{"error": strings.Join(updatable, ", ") + " are missing, at least one parameter must be provided"})
		return
	}
	if q.has("active") && q.has("paused") {
		writeJSON(w, 400, map[string]any{"error": "active, paused are mutually exclusive"})
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	rn, ok := s.runnerLocked(w, ref)
	if !ok {
		return
	}
	next := *rn
	if q.has("active") { // deprecated: paused = !active
		active, err := q.bool("active", true)
		if err != nil {
			writeJSON(w, 400, map[string]any{"error": err.Error()})
			return
		}
		next.paused = !active
	}
	if q.has("description") {
		next.description = q.str("description")
	}
	if q.has("tag_list") {
		next.tags = normTags(q.list("tag_list"))
	}
	for _, f := range []struct {
		name string
		dst  *bool
	}{{"run_untagged", &next.runUntagged}, {"locked", &next.locked}, {"paused", &next.paused}} {
		if q.has(f.name) {
			if *f.dst, err = q.bool(f.name, *f.dst); err != nil {
				writeJSON(w, 400, map[string]any{"error": err.Error()})
				return
			}
		}
	}
	if q.has("maximum_timeout") {
		mt, _, err := q.int("maximum_timeout")
		if err != nil {
			writeJSON(w, 400, map[string]any{"error": err.Error()})
			return
		}
		if mt != 0 && mt < 600 {
			writeJSON(w, 400, map[string]any{"message": map[string][]string{"maximum_timeout": {"needs to be at least 10 minutes"}}})
			return
		}
		next.maximumTimeout = mt
	}
	if !next.runUntagged && len(next.tags) == 0 {
		writeJSON(w, 400, map[string]any{"message": map[string][]string{"tags_list": {"can not be empty when runner is not allowed to pick untagged jobs"}}})
		return
	}
	*rn = next
	s.notify()
	writeJSON(w, 200, s.runnerDetailsJSONLocked(rn))
}

// createUserRunner is POST /user/runners (GitLab 15.10+ runner creation).
func (s *Server) createUserRunner(w http.ResponseWriter, r *http.Request) {
	if !s.auth(w, r, ScopeAPI, ScopeCreateRunner) {
		return
	}
	q, err := readParams(r)
	if err != nil {
		msg(w, 400, "400 Bad request - "+err.Error())
		return
	}
	spec, perr := runnerSpecFromParams(q)
	if perr != "" {
		writeJSON(w, 400, map[string]any{"error": perr})
		return
	}
	spec.Type = q.str("runner_type")
	switch spec.Type {
	case "":
		writeJSON(w, 400, map[string]any{"error": "runner_type is missing"})
		return
	case "project_type":
		id, ok, err := q.int("project_id")
		if err != nil || !ok {
			writeJSON(w, 400, map[string]any{"error": "project_id is missing"})
			return
		}
		spec.ProjectID = id
	case "group_type":
		id, ok, err := q.int("group_id")
		if err != nil || !ok {
			writeJSON(w, 400, map[string]any{"error": "group_id is missing"})
			return
		}
		spec.GroupID = id
	case "instance_type":
	default:
		writeJSON(w, 400, map[string]any{"error": "runner_type does not have a valid value"})
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	rn, apiErr := s.createRunnerLocked(spec, "glrt-")
	if apiErr != nil {
		writeJSON(w, apiErr.status, apiErr.body)
		return
	}
	writeJSON(w, http.StatusCreated, map[string]any{"id": rn.id, "token": rn.token, "token_expires_at": nil})
}

func runnerSpecFromParams(q params) (RunnerSpec, string) {
	spec := RunnerSpec{Description: q.str("description"), Tags: q.list("tag_list")}
	var err error
	if spec.RunUntagged, err = q.bool("run_untagged", true); err != nil {
		return spec, err.Error()
	}
	if spec.Locked, err = q.bool("locked", false); err != nil {
		return spec, err.Error()
	}
	if spec.Paused, err = q.bool("paused", false); err != nil {
		return spec, err.Error()
	}
	if q.has("active") {
		active, err := q.bool("active", true)
		if err != nil {
			return spec, err.Error()
		}
		spec.Paused = !active
	}
	mt, _, err := q.int("maximum_timeout")
	if err != nil {
		return spec, err.Error()
	}
	spec.MaximumTimeout = mt
	return spec, ""
}

func managerStatus(m *manager) string {
	switch {
	case m.contactedAt.IsZero():
		return "never_contacted"
	case time.Since(m.contactedAt) < 2*time.Hour:
		return "online"
	case time.Since(m.contactedAt) > 7*24*time.Hour:
		return "stale"
	}
	return "offline"
}

// managerJSON is GitLab's API::Entities::Ci::RunnerManager.
func managerJSON(m *manager) map[string]any {
	st := managerStatus(m)
	return map[string]any{"id": m.id, "system_id": m.systemID, "version": m.version, "revision": m.revision,
		"platform": m.platform, "architecture": m.architecture, "created_at": isoTS(m.createdAt),
		"contacted_at": isoTS(m.contactedAt), "ip_address": "127.0.0.1", "status": st}
}

// listRunnerManagers is GET /runners/:id/managers: every gitlab-runner
// process (system_id) that has used the runner's token.
func (s *Server) listRunnerManagers(w http.ResponseWriter, r *http.Request, ref string) {
	if !s.auth(w, r, ScopeAPI, ScopeReadAPI, ScopeManageRunner) {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	rn, ok := s.runnerLocked(w, ref)
	if !ok {
		return
	}
	out := []map[string]any{}
	for _, m := range rn.managers {
		out = append(out, managerJSON(m))
	}
	writeJSON(w, 200, out)
}

// resetRunnerToken is POST /runners/:id/reset_authentication_token: a new
// authentication token for the runner; the old one stops working at once
// (every gitlab-runner still using it gets 403 on its next request).
func (s *Server) resetRunnerToken(w http.ResponseWriter, r *http.Request, ref string) {
	if !s.auth(w, r, ScopeAPI, ScopeManageRunner) {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	rn, ok := s.runnerLocked(w, ref)
	if !ok {
		return
	}
	prefix := "glrt-"
	if strings.HasPrefix(rn.token, "glrtr-") {
		prefix = "glrtr-"
	}
	rn.token = prefix + randomHex(10)
	rn.tokenResets++
	s.notify()
	writeJSON(w, http.StatusCreated, map[string]any{"token": rn.token, "token_expires_at": nil})
}
