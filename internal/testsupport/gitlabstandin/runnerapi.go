package gitlabstandin

import (
	"crypto/subtle"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"
)

// runnerInfo is the part of gitlab-runner's request "info" the stand-in uses.
type runnerInfo struct {
	Name         string `json:"name"`
	Version      string `json:"version"`
	Revision     string `json:"revision"`
	Platform     string `json:"platform"`
	Architecture string `json:"architecture"`
	Executor     string `json:"executor"`
	Features     struct {
		CancelGracefully bool `json:"cancel_gracefully"`
	} `json:"features"`
}

// runnerBody is common/network.go's JobRequest / VerifyRunnerRequest.
type runnerBody struct {
	Info       runnerInfo `json:"info"`
	Token      string     `json:"token"`
	SystemID   string     `json:"system_id"`
	LastUpdate string     `json:"last_update"`
}

func decodeBody(r *http.Request, v any) error {
	body, err := io.ReadAll(io.LimitReader(r.Body, 1<<20))
	if err != nil {
		return err
	}
	if len(body) == 0 {
		return nil
	}
	return json.Unmarshal(body, v)
}

// runnerByTokenLocked finds a runner by its authentication token.
func (s *Server) runnerByTokenLocked(tok string) *runner {
	if tok == "" {
		return nil
	}
	for _, rn := range s.runners {
		if subtle.ConstantTimeCompare([]byte(rn.token), []byte(tok)) == 1 {
			return rn
		}
	}
	return nil
}

func (s *Server) runnerVerify(w http.ResponseWriter, r *http.Request) {
	var b runnerBody
	if err := decodeBody(r, &b); err != nil {
		msg(w, 400, "400 Bad request - "+err.Error())
		return
	}
	if b.Token == "" {
		b.Token = r.Header.Get("RUNNER-TOKEN")
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	rn := s.runnerByTokenLocked(b.Token)
	if rn == nil {
		msg(w, 403, "403 Forbidden")
		return
	}
	rn.contactedAt = time.Now().UTC()
	rn.version = b.Info.Version
	if b.SystemID != "" {
		s.managerLocked(rn, b.SystemID, b.Info)
	}
	writeJSON(w, 200, map[string]any{"id": rn.id, "token": rn.token, "token_expires_at": nil})
}

// runnerRegister is the legacy POST /runners with a registration token.
func (s *Server) runnerRegister(w http.ResponseWriter, r *http.Request) {
	q, err := readParams(r)
	if err != nil {
		msg(w, 400, "400 Bad request - "+err.Error())
		return
	}
	if q.str("token") == "" {
		writeJSON(w, 400, map[string]any{"error": "token is missing"})
		return
	}
	spec, perr := runnerSpecFromParams(q)
	if perr != "" {
		writeJSON(w, 400, map[string]any{"error": perr})
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	tok := q.str("token")
	for _, p := range s.projects {
		if p.runnersToken == tok {
			spec.Type, spec.ProjectID = "project_type", p.id
		}
	}
	for _, g := range s.groups {
		if g.runnersToken == tok {
			spec.Type, spec.GroupID = "group_type", g.id
		}
	}
	if spec.Type == "" {
		msg(w, 403, "403 Forbidden")
		return
	}
	rn, apiErr := s.createRunnerLocked(spec, "glrtr-")
	if apiErr != nil {
		writeJSON(w, apiErr.status, apiErr.body)
		return
	}
	writeJSON(w, http.StatusCreated, map[string]any{"id": rn.id, "token": rn.token, "token_expires_at": nil})
}

// runnerUnregister is DELETE /runners and /runners/managers by runner token.
func (s *Server) runnerUnregister(w http.ResponseWriter, r *http.Request) {
	q, err := readParams(r)
	if err != nil {
		msg(w, 400, "400 Bad request - "+err.Error())
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	rn := s.runnerByTokenLocked(q.str("token"))
	if rn == nil {
		msg(w, 403, "403 Forbidden")
		return
	}
	if !strings.HasSuffix(r.URL.Path, "/managers") {
		s.deleteRunnerLocked(rn.id)
	}
	w.WriteHeader(http.StatusNoContent)
}

// jobsRequest is POST /jobs/request: hand the oldest pending job the runner
// may run to it (201 + payload), else long-poll and answer 204.
func (s *Server) jobsRequest(w http.ResponseWriter, r *http.Request) {
	var b runnerBody
	if err := decodeBody(r, &b); err != nil {
		msg(w, 400, "400 Bad request - "+err.Error())
		return
	}
	if b.Token == "" {
		b.Token = r.Header.Get("RUNNER-TOKEN")
	}
	deadline := time.Now().Add(s.opts.LongPoll)
	for {
		s.mu.Lock()
		rn := s.runnerByTokenLocked(b.Token)
		if rn == nil {
			s.mu.Unlock()
			msg(w, 403, "403 Forbidden")
			return
		}
		rn.contactedAt = time.Now().UTC()
		rn.version = b.Info.Version
		var mgr *manager
		if b.SystemID != "" {
			mgr = s.managerLocked(rn, b.SystemID, b.Info)
		}
		if rn.firstRequestAt.IsZero() {
			rn.firstRequestAt = rn.contactedAt
			s.notify()
		}
		if j := s.pickLocked(rn); j != nil {
			j.runnerID = rn.id
			if mgr != nil {
				j.managerID = mgr.id
			}
			j.runnerGraceful = b.Info.Features.CancelGracefully
			j.token = "glcbt-" + randomHex(12)
			rn.jobIDs = append(rn.jobIDs, j.id)
			s.setStatusLocked(j, StatusRunning)
			payload := s.jobPayloadLocked(j, rn)
			s.mu.Unlock()
			writeJSON(w, http.StatusCreated, payload)
			return
		}
		ch, paused := s.changed, rn.paused
		s.mu.Unlock()
		wait := time.Until(deadline)
		if wait <= 0 || paused {
			w.Header().Set("X-GitLab-Last-Update", strconv.FormatInt(time.Now().UnixNano(), 36))
			w.WriteHeader(http.StatusNoContent)
			return
		}
		t := time.NewTimer(wait)
		select {
		case <-ch:
		case <-t.C:
		case <-r.Context().Done():
		case <-s.ctx.Done():
			deadline = time.Now()
		}
		t.Stop()
		if r.Context().Err() != nil {
			return
		}
	}
}

// pickLocked returns the oldest pending job runner rn may run.
func (s *Server) pickLocked(rn *runner) *job {
	if s.hold != nil && s.hold(rn.state()) {
		return nil
	}
	var best *job
	for _, j := range s.jobs {
		if j.status == StatusPending && s.canPickLocked(rn, j) && (best == nil || j.id < best.id) {
			best = j
		}
	}
	return best
}

// jobTokenAuthLocked authenticates a job by id and its token (JOB-TOKEN header
// or "token" in the body). GitLab answers 403 (never 404) so the runner stops.
func (s *Server) jobTokenAuthLocked(w http.ResponseWriter, idStr, tok string) *job {
	id, _ := strconv.ParseInt(idStr, 10, 64)
	j, ok := s.jobs[id]
	if !ok || j.token == "" || subtle.ConstantTimeCompare([]byte(j.token), []byte(tok)) != 1 {
		msg(w, 403, "403 Forbidden")
		return nil
	}
	if j.status != StatusRunning && j.status != StatusCanceling {
		w.Header().Set("Job-Status", j.status)
		msg(w, 403, "403 Forbidden - Job is not processing on runner")
		return nil
	}
	return j
}

// updateBody is common/network.go's UpdateJobRequest.
type updateBody struct {
	Token         string `json:"token"`
	State         string `json:"state"`
	FailureReason string `json:"failure_reason"`
	ExitCode      int    `json:"exit_code"`
	Output        struct {
		Checksum string `json:"checksum"`
		Bytesize int    `json:"bytesize"`
	} `json:"output"`
}

// jobUpdate is PUT /jobs/:id (state running, success or failed).
func (s *Server) jobUpdate(w http.ResponseWriter, r *http.Request, idStr string) {
	var b updateBody
	if err := decodeBody(r, &b); err != nil {
		msg(w, 400, "400 Bad request - "+err.Error())
		return
	}
	tok := r.Header.Get("JOB-TOKEN")
	if tok == "" {
		tok = b.Token
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	j := s.jobTokenAuthLocked(w, idStr, tok)
	if j == nil {
		return
	}
	if rn, ok := s.runners[j.runnerID]; ok {
		rn.contactedAt = time.Now().UTC()
	}
	w.Header().Set("X-GitLab-Trace-Update-Interval", strconv.Itoa(int(s.opts.TraceUpdateInterval.Seconds())))
	switch b.State {
	case "", "running", "pending":
		// Heartbeat; Job-Status tells the runner about a cancellation.
	case StatusSuccess, StatusFailed:
		j.exitCode = b.ExitCode
		switch {
		case j.status == StatusCanceling:
			s.setStatusLocked(j, StatusCanceled)
		case b.State == StatusSuccess:
			s.setStatusLocked(j, StatusSuccess)
		default:
			j.failureReason = b.FailureReason
			if j.failureReason == "" {
				j.failureReason = "unknown_failure"
			}
			s.setStatusLocked(j, StatusFailed)
		}
	default:
		writeJSON(w, 400, map[string]any{"error": "state does not have a valid value"})
		return
	}
	w.Header().Set("Job-Status", j.status)
	w.Header().Set("Content-Type", "text/plain")
	w.WriteHeader(http.StatusOK)
	_, _ = io.WriteString(w, "200")
}

var contentRangeRE = regexp.MustCompile(`^(\d+)-(\d+)$`)

// jobTrace is PATCH /jobs/:id/trace: append at the offset given by
// Content-Range; 416 + Range on a gap.
func (s *Server) jobTrace(w http.ResponseWriter, r *http.Request, idStr string) {
	body, err := io.ReadAll(io.LimitReader(r.Body, 64<<20))
	if err != nil {
		msg(w, 400, "400 Bad request")
		return
	}
	tok := r.Header.Get("JOB-TOKEN")
	if tok == "" {
		tok = r.URL.Query().Get("token")
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	j := s.jobTokenAuthLocked(w, idStr, tok)
	if j == nil {
		return
	}
	cr := r.Header.Get("Content-Range")
	if cr == "" {
		msg(w, 400, "400 Missing header Content-Range")
		return
	}
	m := contentRangeRE.FindStringSubmatch(cr)
	if m == nil {
		msg(w, 400, "400 Bad request - invalid Content-Range")
		return
	}
	// Like Gitlab::Ci::Trace#append: a gap is refused, an overlap rewrites
	// the trace from the given offset.
	start, _ := strconv.Atoi(m[1])
	if start > len(j.trace) {
		w.Header().Set("Range", fmt.Sprintf("0-%d", len(j.trace)))
		msg(w, http.StatusRequestedRangeNotSatisfiable, "416 Range Not Satisfiable")
		return
	}
	j.trace = append(j.trace[:start], body...)
	s.notify()
	w.Header().Set("Job-Status", j.status)
	w.Header().Set("Range", fmt.Sprintf("0-%d", len(j.trace)))
	w.Header().Set("X-GitLab-Trace-Update-Interval", strconv.Itoa(int(s.opts.TraceUpdateInterval.Seconds())))
	w.WriteHeader(http.StatusAccepted)
}

var nonSlugRE = regexp.MustCompile(`[^a-z0-9]`)

// slug is GitLab's *_SLUG form: lowercased, [^a-z0-9] to "-", max 63 chars.
func slug(s string) string {
	s = nonSlugRE.ReplaceAllString(strings.ToLower(s), "-")
	if len(s) > 63 {
		s = s[:63]
	}
	return strings.Trim(s, "-")
}

type varJSON struct {
	Key    string `json:"key"`
	Value  string `json:"value"`
	Public bool   `json:"public"`
	File   bool   `json:"file"`
	Masked bool   `json:"masked"`
	Raw    bool   `json:"raw,omitempty"`
}

// jobPayloadLocked builds the 201 body of POST /jobs/request: the fields of
// gitlab-runner's spec.Job that GitLab fills for a script job.
func (s *Server) jobPayloadLocked(j *job, rn *runner) map[string]any {
	p := s.projects[j.projectID]
	pl := s.pipes[j.pipelineID]
	g := s.groups[p.groupID]
	root := g
	for root.parentID != 0 {
		root = s.groups[root.parentID]
	}
	timeout := int64(j.spec.Timeout.Seconds())
	if rn.maximumTimeout > 0 && rn.maximumTimeout < timeout {
		timeout = rn.maximumTimeout
	}
	repoURL := s.baseURL + "/" + p.path + ".git"
	cloneURL := strings.Replace(repoURL, "://", "://gitlab-ci-token:"+j.token+"@", 1)
	base, _ := url.Parse(s.baseURL)
	host, port, proto := base.Hostname(), base.Port(), base.Scheme
	if port == "" {
		port = map[string]string{"http": "80", "https": "443"}[proto]
	}
	short := pl.sha[:8]
	pub := func(k, v string) varJSON { return varJSON{Key: k, Value: v, Public: true} }
	vars := []varJSON{
		pub("CI_PIPELINE_ID", strconv.FormatInt(pl.id, 10)),
		pub("CI_PIPELINE_URL", fmt.Sprintf("%s/%s/-/pipelines/%d", s.baseURL, p.path, pl.id)),
		pub("CI_JOB_ID", strconv.FormatInt(j.id, 10)),
		pub("CI_JOB_URL", fmt.Sprintf("%s/%s/-/jobs/%d", s.baseURL, p.path, j.id)),
		{Key: "CI_JOB_TOKEN", Value: j.token, Masked: true},
		pub("CI_JOB_STARTED_AT", j.startedAt.Format(time.RFC3339)),
		pub("CI_JOB_NAME", j.spec.Name),
		pub("CI_JOB_NAME_SLUG", slug(j.spec.Name)),
		pub("CI_JOB_STAGE", j.spec.Stage),
		pub("CI_JOB_TIMEOUT", strconv.FormatInt(timeout, 10)),
		pub("CI_NODE_TOTAL", "1"),
		{Key: "CI_REPOSITORY_URL", Value: cloneURL},
		pub("CI_COMMIT_SHA", pl.sha),
		pub("CI_COMMIT_SHORT_SHA", short),
		pub("CI_COMMIT_BEFORE_SHA", pl.beforeSHA),
		pub("CI_COMMIT_REF_NAME", pl.ref),
		pub("CI_COMMIT_REF_SLUG", slug(pl.ref)),
		pub("CI_COMMIT_BRANCH", pl.ref),
		pub("CI_COMMIT_REF_PROTECTED", "false"),
		pub("CI_COMMIT_MESSAGE", p.headMessage),
		pub("CI_COMMIT_TITLE", p.headMessage),
		pub("CI_COMMIT_AUTHOR", "Administrator <admin@example.com>"),
		pub("CI_DEFAULT_BRANCH", p.defaultBranch),
		pub("CI_PIPELINE_IID", strconv.FormatInt(pl.id, 10)),
		pub("CI_PIPELINE_SOURCE", "push"),
		pub("CI_PIPELINE_CREATED_AT", pl.createdAt.Format(time.RFC3339)),
		pub("CI_CONFIG_PATH", ".gitlab-ci.yml"),
		pub("CI_PROJECT_ID", strconv.FormatInt(p.id, 10)),
		pub("CI_PROJECT_NAME", p.name),
		pub("CI_PROJECT_TITLE", p.name),
		pub("CI_PROJECT_PATH", p.path),
		pub("CI_PROJECT_PATH_SLUG", slug(p.path)),
		pub("CI_PROJECT_NAMESPACE", g.path),
		pub("CI_PROJECT_NAMESPACE_ID", strconv.FormatInt(g.id, 10)),
		pub("CI_PROJECT_ROOT_NAMESPACE", root.path),
		pub("CI_PROJECT_URL", s.baseURL+"/"+p.path),
		pub("CI_PROJECT_VISIBILITY", "private"),
		pub("CI_PROJECT_REPOSITORY_LANGUAGES", ""),
		pub("CI_SERVER", "yes"),
		pub("CI_SERVER_URL", s.baseURL),
		pub("CI_SERVER_HOST", host),
		pub("CI_SERVER_PORT", port),
		pub("CI_SERVER_PROTOCOL", proto),
		pub("CI_SERVER_FQDN", base.Host),
		pub("CI_SERVER_NAME", "GitLab"),
		pub("CI_SERVER_VERSION", Version),
		pub("CI_SERVER_VERSION_MAJOR", strings.Split(Version, ".")[0]),
		pub("CI_SERVER_VERSION_MINOR", strings.Split(Version, ".")[1]),
		pub("CI_SERVER_VERSION_PATCH", strings.Split(Version, ".")[2]),
		pub("CI_SERVER_REVISION", "standin"),
		pub("CI_API_V4_URL", s.baseURL+"/api/v4"),
		pub("CI_API_GRAPHQL_URL", s.baseURL+"/api/graphql"),
		pub("CI_RUNNER_ID", strconv.FormatInt(rn.id, 10)),
		pub("CI_RUNNER_DESCRIPTION", rn.description),
		pub("CI_RUNNER_TAGS", tagsJSON(rn.tags)),
		pub("GITLAB_CI", "true"),
		pub("GITLAB_FEATURES", ""),
		pub("GITLAB_USER_ID", "1"),
		pub("GITLAB_USER_LOGIN", "root"),
		pub("GITLAB_USER_NAME", "Administrator"),
		pub("GITLAB_USER_EMAIL", "admin@example.com"),
		pub("CI", "true"),
	}
	for _, v := range append(slices.Clone(p.vars), j.spec.Variables...) {
		vars = append(vars, varJSON{Key: v.Key, Value: v.Value, Public: !v.Masked, File: v.File, Masked: v.Masked, Raw: v.Raw})
	}
	steps := []map[string]any{{
		"name": "script", "script": j.spec.Script, "timeout": timeout,
		"when": "on_success", "allow_failure": false,
	}}
	if len(j.spec.AfterScript) > 0 {
		steps = append(steps, map[string]any{
			"name": "after_script", "script": j.spec.AfterScript, "timeout": timeout,
			"when": "always", "allow_failure": true,
		})
	}
	now := time.Now()
	return map[string]any{
		"id":              j.id,
		"token":           j.token,
		"allow_git_fetch": true,
		"job_info": map[string]any{
			"id": j.id, "name": j.spec.Name, "stage": j.spec.Stage,
			"project_id": p.id, "project_name": p.name, "project_full_path": p.path,
			"pipeline_id": pl.id, "namespace_id": g.id, "root_namespace_id": root.id,
			"organization_id": 1, "user_id": 1, "instance_id": "gitlab-standin",
			"time_in_queue_seconds":                          now.Sub(j.queuedAt).Seconds(),
			"project_jobs_running_on_instance_runners_count": "0",
			"queue_size": 0, "queue_depth": 0,
		},
		"git_info": map[string]any{
			"repo_url": cloneURL, "repo_object_format": "sha1",
			"ref": pl.ref, "sha": pl.sha, "before_sha": pl.beforeSHA, "ref_type": "branch",
			"refspecs": []string{
				fmt.Sprintf("+refs/pipelines/%d:refs/pipelines/%d", pl.id, pl.id),
				fmt.Sprintf("+refs/heads/%s:refs/remotes/origin/%s", pl.ref, pl.ref),
			},
			"depth": 20, "protected": false,
		},
		"runner_info":  map[string]any{"timeout": timeout, "uuid": rn.uuid, "runner_session_url": nil},
		"variables":    vars,
		"steps":        steps,
		"image":        imageJSON(j.spec.Image),
		"services":     servicesJSON(j.spec.Services),
		"artifacts":    artifactsJSON(j.spec.Artifacts),
		"cache":        []any{},
		"credentials":  []any{},
		"dependencies": s.dependenciesJSONLocked(j),
		"features": map[string]any{
			"trace_sections": true,
			"token_mask_prefixes": []string{"glpat-", "gloas-", "gldt-", "glrt-", "glrtr-", "glcbt-",
				"glptt-", "glft-", "glimt-", "glagent-", "glsoat-", "glffct-", "gltst-"},
			"failure_reasons": []string{"unknown_failure", "script_failure", "api_failure",
				"stuck_or_timeout_failure", "runner_system_failure", "missing_dependency_failure",
				"runner_unsupported", "stale_schedule", "job_execution_timeout", "archived_failure",
				"unmet_prerequisites", "scheduler_failure", "data_integrity_failure", "forward_deployment_failure",
				"user_blocked", "project_deleted", "ci_quota_exceeded", "pipeline_loop_detected",
				"no_matching_runner", "trace_size_exceeded", "builds_disabled", "environment_creation_failure",
				"deployment_rejected", "failed_outdated_deployment_job", "protected_environment_failure",
				"insufficient_bridge_permissions", "downstream_bridge_project_not_found", "invalid_bridge_trigger",
				"upstream_bridge_project_not_found", "insufficient_upstream_permissions", "bridge_pipeline_is_child_pipeline",
				"downstream_pipeline_creation_failed", "secrets_provider_not_found", "reached_max_descendant_pipelines_depth",
				"ip_restriction_failure", "reached_max_pipeline_hierarchy_size", "reached_downstream_pipeline_trigger_rate_limit",
				"image_pull_failure", "runner_external_dependency_failure", "runner_interrupted"},
		},
	}
}

// imageJSON renders an image as the runner API does (gitlab-runner
// common/spec Image): name, alias, entrypoint, command, ports, pull_policy.
func imageJSON(im *ImageSpec) any {
	if im == nil {
		return nil
	}
	m := map[string]any{"name": im.Name, "ports": []any{}, "executor_opts": map[string]any{}}
	if im.Alias != "" {
		m["alias"] = im.Alias
	}
	if len(im.Entrypoint) > 0 {
		m["entrypoint"] = im.Entrypoint
	}
	if len(im.Command) > 0 {
		m["command"] = im.Command
	}
	return m
}

func servicesJSON(ss []ImageSpec) []any {
	out := []any{}
	for i := range ss {
		out = append(out, imageJSON(&ss[i]))
	}
	return out
}

func tagsJSON(tags []string) string {
	b, _ := json.Marshal(nonNil(slices.Clone(tags)))
	return string(b)
}
