package gitlabstandin

import (
	"io"
	"net/http"
	"slices"
	"strconv"
	"strings"
)

// maxArtifacts bounds an uploaded archive (GitLab's default maximum
// artifacts size is 100 MB; a test needs far less).
const maxArtifacts = 64 << 20

// artifactsJSON renders `artifacts: paths:` as the runner API's job payload
// does (Entities::Ci::JobRequest::Artifacts): one zip archive, uploaded on
// success.
func artifactsJSON(paths []string) any {
	if len(paths) == 0 {
		return nil
	}
	return []any{map[string]any{
		"name": "artifacts", "untracked": false, "paths": paths, "exclude": []string{},
		"when": "on_success", "artifact_type": "archive", "artifact_format": "zip", "expire_in": nil,
	}}
}

// dependenciesJSONLocked lists the jobs whose artifacts j downloads
// (Entities::Ci::JobRequest::Dependency): each with j's own token, as
// GitLab sends since ci_expose_running_job_token_for_artifacts, and
// artifacts_file only when the job uploaded an archive.
func (s *Server) dependenciesJSONLocked(j *job) []any {
	pl := s.pipes[j.pipelineID]
	earlier := pl.stages[:slices.Index(pl.stages, j.spec.Stage)]
	out := []any{}
	for _, id := range pl.jobIDs {
		d := s.jobs[id]
		if !slices.Contains(earlier, d.spec.Stage) {
			continue
		}
		if j.spec.Dependencies != nil && !slices.Contains(j.spec.Dependencies, d.spec.Name) {
			continue
		}
		dep := map[string]any{"id": d.id, "name": d.spec.Name, "token": j.token}
		if len(d.artifacts) > 0 {
			dep["artifacts_file"] = map[string]any{"filename": "artifacts.zip", "size": len(d.artifacts)}
		}
		out = append(out, dep)
	}
	return out
}

// uploadArtifacts is POST /jobs/:id/artifacts: a multipart form whose
// "file" part is the archive (what Workhorse hands Rails after its
// authorize step), authenticated with the running job's token. Archives of
// other artifact types (reports) are accepted and dropped.
func (s *Server) uploadArtifacts(w http.ResponseWriter, r *http.Request, idStr string) {
	r.Body = http.MaxBytesReader(w, r.Body, maxArtifacts+1<<20)
	mr, err := r.MultipartReader()
	if err != nil {
		msg(w, 400, "400 Bad request - "+err.Error())
		return
	}
	var archive []byte
	for {
		part, err := mr.NextPart()
		if err == io.EOF {
			break
		}
		if err != nil {
			msg(w, 400, "400 Bad request - "+err.Error())
			return
		}
		if part.FormName() == "file" {
			if archive, err = io.ReadAll(io.LimitReader(part, maxArtifacts+1)); err != nil {
				msg(w, 400, "400 Bad request - "+err.Error())
				return
			}
		}
		part.Close()
	}
	if archive == nil {
		msg(w, 400, "400 Bad request - file is missing")
		return
	}
	if len(archive) > maxArtifacts {
		msg(w, http.StatusRequestEntityTooLarge, "413 Request Entity Too Large")
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	j := s.jobTokenAuthLocked(w, idStr, jobToken(r))
	if j == nil {
		return
	}
	if t := r.URL.Query().Get("artifact_type"); t == "" || t == "archive" {
		j.artifacts = archive
	}
	writeJSON(w, http.StatusCreated, map[string]any{})
}

// downloadArtifacts is GET /jobs/:id/artifacts: job id's archive, for a
// running job of the same pipeline that depends on it (its token), as
// authenticate_job_via_dependent_job! allows.
func (s *Server) downloadArtifacts(w http.ResponseWriter, r *http.Request, idStr string) {
	tok := jobToken(r)
	s.mu.Lock()
	id, _ := strconv.ParseInt(idStr, 10, 64)
	var runningJob *job
	for _, j := range s.jobs {
		if tok != "" && j.token == tok && (j.status == StatusRunning || j.status == StatusCanceling) {
			runningJob = j
		}
	}
	src, ok := s.jobs[id]
	if runningJob == nil || !ok || src.pipelineID != runningJob.pipelineID {
		s.mu.Unlock()
		msg(w, 403, "403 Forbidden")
		return
	}
	archive := src.artifacts
	s.mu.Unlock()
	if len(archive) == 0 {
		msg(w, 404, "404 Not Found")
		return
	}
	w.Header().Set("Content-Type", "application/zip")
	w.Header().Set("Content-Disposition", `attachment; filename="artifacts.zip"`)
	w.Header().Set("Content-Length", strconv.Itoa(len(archive)))
	w.WriteHeader(http.StatusOK)
	_, _ = w.Write(archive)
}

// jobToken is the JOB-TOKEN header, or the token query parameter.
func jobToken(r *http.Request) string {
	if t := r.Header.Get("JOB-TOKEN"); t != "" {
		return t
	}
	return strings.TrimSpace(r.URL.Query().Get("token"))
}
