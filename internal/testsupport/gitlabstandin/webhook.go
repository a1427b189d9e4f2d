package gitlabstandin

import (
	"bytes"
	"context"
	"encoding/json"
	"log/slog"
	"net/http"
	"sync"
	"time"
)

// hookTime is GitLab's webhook timestamp format; only *_iso fields are ISO 8601.
const hookTime = "2006-01-02 15:04:05 UTC"

func hookTS(t time.Time) any {
	if t.IsZero() {
		return nil
	}
	return t.UTC().Format(hookTime)
}

func isoTS(t time.Time) any {
	if t.IsZero() {
		return nil
	}
	return t.UTC().Format("2006-01-02T15:04:05.000Z")
}

// Delivery is one Job Hook delivery attempt (or a dropped one).
type Delivery struct {
	Time        time.Time
	JobID       int64
	BuildStatus string
	Dropped     bool   // suppressed by DropWebhooks
	StatusCode  int    // receiver's answer; 0 on transport error or drop
	Err         string // transport error
}

type hookMsg struct {
	jobID  int64
	status string
	body   []byte
}

type hookSender struct {
	ctx    context.Context
	log    *slog.Logger
	client *http.Client

	mu         sync.Mutex
	url        string
	secret     string
	drop       bool
	duplicates int
	queue      []hookMsg
	wake       chan struct{}
	deliveries []Delivery
	done       chan struct{}
}

func newHookSender(ctx context.Context, log *slog.Logger, url, secret string) *hookSender {
	h := &hookSender{ctx: ctx, log: log, url: url, secret: secret,
		client: &http.Client{Timeout: 10 * time.Second},
		wake:   make(chan struct{}, 1), done: make(chan struct{})}
	go h.run()
	return h
}

func (h *hookSender) wait() { <-h.done }

func (h *hookSender) enqueue(m hookMsg) {
	h.mu.Lock()
	if h.url == "" {
		h.mu.Unlock()
		return
	}
	if h.drop {
		h.deliveries = append(h.deliveries, Delivery{Time: time.Now(), JobID: m.jobID, BuildStatus: m.status, Dropped: true})
		h.mu.Unlock()
		return
	}
	for i := 0; i <= h.duplicates; i++ {
		h.queue = append(h.queue, m)
	}
	h.mu.Unlock()
	select {
	case h.wake <- struct{}{}:
	default:
	}
}

// run delivers in order, one at a time, like a single Sidekiq queue; GitLab
// does not retry failed deliveries.
func (h *hookSender) run() {
	defer close(h.done)
	for {
		h.mu.Lock()
		var m hookMsg
		ok := len(h.queue) > 0
		if ok {
			m, h.queue = h.queue[0], h.queue[1:]
		}
		url, secret := h.url, h.secret
		h.mu.Unlock()
		if !ok {
			select {
			case <-h.ctx.Done():
				return
			case <-h.wake:
				continue
			}
		}
		d := Delivery{Time: time.Now(), JobID: m.jobID, BuildStatus: m.status}
		req, err := http.NewRequestWithContext(h.ctx, http.MethodPost, url, bytes.NewReader(m.body))
		if err == nil {
			req.Header.Set("Content-Type", "application/json")
			req.Header.Set("User-Agent", "GitLab/"+Version)
			req.Header.Set("X-Gitlab-Event", "Job Hook")
			req.Header.Set("X-Gitlab-Event-UUID", uuid())
			req.Header.Set("X-Gitlab-Webhook-UUID", "5a1e7c2b-0f1d-4a57-9d3f-6f3b1f7a2c10")
			req.Header.Set("X-Gitlab-Instance", "gitlab-standin")
			if secret != "" {
				req.Header.Set("X-Gitlab-Token", secret)
			}
			var resp *http.Response
			resp, err = h.client.Do(req)
			if err == nil {
				d.StatusCode = resp.StatusCode
				resp.Body.Close()
			}
		}
		if err != nil {
			d.Err = err.Error()
		}
		h.log.Debug("job hook delivered", "job", m.jobID, "build_status", m.status, "code", d.StatusCode, "err", d.Err)
		h.mu.Lock()
		h.deliveries = append(h.deliveries, d)
		h.mu.Unlock()
	}
}

func uuid() string {
	h := randomHex(16)
	return h[0:8] + "-" + h[8:12] + "-4" + h[13:16] + "-a" + h[17:20] + "-" + h[20:32]
}

// SetWebhook sets (or with url "" removes) the Job Hook receiver.
func (s *Server) SetWebhook(url, secret string) {
	s.hooks.mu.Lock()
	defer s.hooks.mu.Unlock()
	s.hooks.url, s.hooks.secret = url, secret
}

// DropWebhooks suppresses (true) or resumes (false) deliveries; dropped ones
// are recorded in Deliveries (e.g. to test a backstop poll).
func (s *Server) DropWebhooks(drop bool) {
	s.hooks.mu.Lock()
	defer s.hooks.mu.Unlock()
	s.hooks.drop = drop
}

// DuplicateWebhooks makes every later delivery be sent 1+n times.
func (s *Server) DuplicateWebhooks(n int) {
	s.hooks.mu.Lock()
	defer s.hooks.mu.Unlock()
	s.hooks.duplicates = n
}

// Deliveries returns the Job Hook deliveries so far.
func (s *Server) Deliveries() []Delivery {
	s.hooks.mu.Lock()
	defer s.hooks.mu.Unlock()
	return append([]Delivery(nil), s.hooks.deliveries...)
}

// JobHook returns the Job Hook body GitLab sends for the job's current
// state (Gitlab::DataBuilder::Build), for tests that deliver hooks
// themselves: when, how often, or not at all.
func (s *Server) JobHook(jobID int64) ([]byte, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	j, ok := s.jobs[jobID]
	if !ok {
		return nil, ErrNotFound
	}
	return json.Marshal(s.jobHookPayloadLocked(j))
}

// Redeliver sends a Job Hook for the job's current state again.
func (s *Server) Redeliver(jobID int64) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	j, ok := s.jobs[jobID]
	if !ok {
		return ErrNotFound
	}
	s.hookLocked(j)
	return nil
}

// hookLocked queues a Job Hook for j's current state. Caller holds s.mu.
func (s *Server) hookLocked(j *job) {
	body, err := json.Marshal(s.jobHookPayloadLocked(j))
	if err != nil {
		s.log.Error("job hook payload", "err", err)
		return
	}
	s.hooks.enqueue(hookMsg{jobID: j.id, status: j.status, body: body})
}

// jobHookPayloadLocked follows GitLab's Job Hook payload (Gitlab::DataBuilder::Build):
// no job tags; runner is the runner's own data or null.
func (s *Server) jobHookPayloadLocked(j *job) map[string]any {
	p := s.projects[j.projectID]
	pl := s.pipes[j.pipelineID]
	var runnerObj any
	if r, ok := s.runners[j.runnerID]; ok && j.runnerID != 0 {
		runnerObj = map[string]any{
			"id": r.id, "description": r.description, "runner_type": r.runnerType,
			"active": !r.paused, "is_shared": r.runnerType == "instance_type", "tags": nonNil(r.tags),
		}
	}
	duration, queued := j.durations()
	var failure any
	if j.failureReason != "" {
		failure = j.failureReason
	}
	g := s.groups[p.groupID]
	return map[string]any{
		"object_kind":           "build",
		"ref":                   pl.ref,
		"tag":                   false,
		"before_sha":            pl.beforeSHA,
		"sha":                   pl.sha,
		"retries_count":         0,
		"build_id":              j.id,
		"build_name":            j.spec.Name,
		"build_stage":           j.spec.Stage,
		"build_status":          j.status,
		"build_created_at":      hookTS(j.createdAt),
		"build_started_at":      hookTS(j.startedAt),
		"build_finished_at":     hookTS(j.finishedAt),
		"build_created_at_iso":  isoTS(j.createdAt),
		"build_started_at_iso":  isoTS(j.startedAt),
		"build_finished_at_iso": isoTS(j.finishedAt),
		"build_duration":        duration,
		"build_queued_duration": queued,
		"build_allow_failure":   j.spec.AllowFailure,
		"build_failure_reason":  failure,
		"pipeline_id":           pl.id,
		"runner":                runnerObj,
		"project_id":            p.id,
		"project_name":          "Administrator / " + p.name,
		"user": map[string]any{
			"id": 1, "name": "Administrator", "username": "root",
			"avatar_url": "", "email": "[REDACTED]",
		},
		"commit": map[string]any{
			"id": pl.id, "name": nil, "sha": pl.sha, "message": p.headMessage,
			"author_name": "Administrator", "author_email": "admin@example.com",
			"author_url": "mailto:admin@example.com", "status": s.pipelineStatusLocked(pl),
			"duration": nil, "started_at": hookTS(pl.startedAt), "finished_at": hookTS(pl.finishedAt),
			"started_at_iso": isoTS(pl.startedAt), "finished_at_iso": isoTS(pl.finishedAt),
		},
		"repository": map[string]any{
			"name": p.name, "url": s.baseURL + "/" + p.path + ".git", "description": "",
			"homepage": s.baseURL + "/" + p.path, "git_http_url": s.baseURL + "/" + p.path + ".git",
			"git_ssh_url": "git@" + hostOf(s.baseURL) + ":" + p.path + ".git", "visibility_level": 0,
		},
		"project": map[string]any{
			"id": p.id, "name": p.name, "description": "", "web_url": s.baseURL + "/" + p.path,
			"avatar_url": nil, "git_ssh_url": "git@" + hostOf(s.baseURL) + ":" + p.path + ".git",
			"git_http_url": s.baseURL + "/" + p.path + ".git", "namespace": g.name,
			"visibility_level": 0, "path_with_namespace": p.path, "default_branch": p.defaultBranch,
			"ci_config_path": "",
		},
		"environment": nil,
	}
}

func nonNil(s []string) []string {
	if s == nil {
		return []string{}
	}
	return s
}

// pipelineStatusLocked aggregates job statuses roughly like GitLab.
func (s *Server) pipelineStatusLocked(pl *pipeline) string {
	counts := map[string]int{}
	for _, id := range pl.jobIDs {
		counts[s.jobs[id].status]++
	}
	switch {
	case counts[StatusRunning]+counts[StatusCanceling] > 0:
		return StatusRunning
	case counts[StatusPending] > 0:
		return StatusPending
	case counts[StatusCreated] > 0:
		return StatusCreated
	case counts[StatusFailed] > 0:
		return StatusFailed
	case counts[StatusCanceled] > 0:
		return StatusCanceled
	}
	return StatusSuccess
}
