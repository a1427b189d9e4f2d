// Package webhook serves POST /webhook: it authenticates GitLab deliveries,
// bounds and parses Job Hook payloads, and hands job events to a Sink.
package webhook

import (
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"strings"
	"time"
)

// DefaultMaxBody is the default body limit; real Job Hook payloads are a few KiB.
const DefaultMaxBody = 1 << 20

// JobHookEvent is the X-Gitlab-Event value of job events.
const JobHookEvent = "Job Hook"

// Reject reasons passed to the reject counter (fixed metric labels).
const (
	ReasonMethod       = "method"
	ReasonUnauthorized = "unauthorized"
	ReasonTooLarge     = "too_large"
	ReasonMalformed    = "malformed"
	ReasonSinkError    = "sink_error"
	ReasonReadError    = "read_error"
)

// JobEvent is the part of a Job Hook delivery FireRunner acts on.
type JobEvent struct {
	JobID, ProjectID, PipelineID, RunnerID int64     // RunnerID = payload runner.id, 0 if none
	ProjectPath, JobName, Ref, Status      string    // Status = build_status
	ReceivedAt                             time.Time // when the handler received it
	// Job timestamps from the payload; zero when GitLab sent null or a
	// value in neither of its two formats (they are informational only).
	CreatedAt, StartedAt, FinishedAt time.Time
	// DeliveryID is GitLab's X-Gitlab-Event-UUID header, for log correlation
	// only (GitLab reuses it when it redelivers); "" when absent.
	DeliveryID string
}

// Terminal reports whether Status is final for the job (success, failed,
// canceled, skipped): a VM serving it should be torn down.
func (ev JobEvent) Terminal() bool {
	switch ev.Status {
	case "success", "failed", "canceled", "skipped":
		return true
	}
	return false
}

// Sink receives authenticated, parsed job events. An error makes the handler
// answer 500 so that GitLab redelivers; so HandleJobEvent must be idempotent.
type Sink interface {
	HandleJobEvent(ctx context.Context, ev JobEvent) error
}

// Handler is the http.Handler for POST /webhook. Answers, in check order:
//
//	405 not POST · 401 X-Gitlab-Token missing or wrong (constant-time check;
//	nothing reaches the Sink) · 204 authenticated but not "Job Hook" (ignored)
//	· 413 body over the limit · 400 not a valid Job Hook payload (reason in
//	the body) · 500 the Sink failed (GitLab redelivers) · 200 handed over.
//
// Every rejection is logged with its reason (never the token) and counted.
// GitLab waits at most 10 s for an answer, so the Sink must be quick.
type Handler struct {
	secret  []byte
	sink    Sink
	maxBody int64
	log     *slog.Logger
	reject  func(reason string)
	event   func(event, status string)
	now     func() time.Time
}

// Option configures a Handler.
type Option func(*Handler)

// WithMaxBody sets the body limit in bytes (default DefaultMaxBody).
func WithMaxBody(n int64) Option {
	return func(h *Handler) {
		if n > 0 {
			h.maxBody = n
		}
	}
}

// WithLogger sets the logger (default slog.Default()).
func WithLogger(l *slog.Logger) Option {
	return func(h *Handler) {
		if l != nil {
			h.log = l
		}
	}
}

// WithRejectCounter is called once per rejected request with a Reason* label.
func WithRejectCounter(f func(reason string)) Option {
	return func(h *Handler) {
		if f != nil {
			h.reject = f
		}
	}
}

// WithEventCounter is called once per authenticated delivery. event is "job"
// or "other"; status is the normalized build_status for jobs ("ignored" for
// other events). Both are bounded sets, safe as metric labels.
func WithEventCounter(f func(event, status string)) Option {
	return func(h *Handler) {
		if f != nil {
			h.event = f
		}
	}
}

// NewHandler builds the webhook handler. An empty secret rejects every
// delivery: an unauthenticated webhook endpoint is never what was meant.
func NewHandler(secret string, sink Sink, opts ...Option) *Handler {
	h := &Handler{
		secret:  []byte(secret),
		sink:    sink,
		maxBody: DefaultMaxBody,
		log:     slog.Default(),
		reject:  func(string) {},
		event:   func(string, string) {},
		now:     time.Now,
	}
	for _, o := range opts {
		o(h)
	}
	return h
}

func (h *Handler) fail(w http.ResponseWriter, r *http.Request, code int, reason, detail string) {
	h.reject(reason)
	// Never log headers: X-Gitlab-Token is the secret.
	h.log.Warn("webhook rejected", "reason", reason, "status", code, "detail", detail,
		"remote", r.RemoteAddr, "event", clip(r.Header.Get("X-Gitlab-Event"), 64))
	http.Error(w, reason+": "+detail, code)
}

// ServeHTTP implements http.Handler.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	received := h.now()
	if r.Method != http.MethodPost {
		w.Header().Set("Allow", http.MethodPost)
		h.fail(w, r, http.StatusMethodNotAllowed, ReasonMethod, "only POST is accepted")
		return
	}
	if !h.authorized(r.Header.Get("X-Gitlab-Token")) {
		h.fail(w, r, http.StatusUnauthorized, ReasonUnauthorized, "missing or wrong X-Gitlab-Token")
		return
	}
	if r.Header.Get("X-Gitlab-Event") != JobHookEvent {
		// Other events are acknowledged so GitLab does not retry or disable the hook.
		h.event("other", "ignored")
		h.log.Debug("webhook event ignored", "event", clip(r.Header.Get("X-Gitlab-Event"), 64))
		w.WriteHeader(http.StatusNoContent)
		return
	}
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, h.maxBody))
	if err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			h.fail(w, r, http.StatusRequestEntityTooLarge, ReasonTooLarge, fmt.Sprintf("body exceeds %d bytes", h.maxBody))
			return
		}
		h.fail(w, r, http.StatusBadRequest, ReasonReadError, "reading body failed")
		return
	}
	ev, err := ParseJobEvent(body)
	if err != nil {
		h.fail(w, r, http.StatusBadRequest, ReasonMalformed, err.Error())
		return
	}
	ev.ReceivedAt = received
	ev.DeliveryID = clip(r.Header.Get("X-Gitlab-Event-UUID"), 64)
	h.event("job", normalizeStatus(ev.Status))
	if err := h.sink.HandleJobEvent(r.Context(), ev); err != nil {
		h.reject(ReasonSinkError)
		h.log.Error("webhook sink failed; GitLab will redeliver", "job_id", ev.JobID,
			"project_id", ev.ProjectID, "status", ev.Status, "delivery", ev.DeliveryID, "err", err)
		http.Error(w, "internal error", http.StatusInternalServerError)
		return
	}
	w.WriteHeader(http.StatusOK)
}

func (h *Handler) authorized(got string) bool {
	if len(h.secret) == 0 {
		return false
	}
	// Hashing first makes the comparison constant-time in the length too.
	g, w := sha256.Sum256([]byte(got)), sha256.Sum256(h.secret)
	return subtle.ConstantTimeCompare(g[:], w[:]) == 1
}

// jobStatuses are the build_status values GitLab sends; others map to "other"
// so a metric label set stays bounded.
var jobStatuses = map[string]bool{
	"created": true, "pending": true, "running": true, "success": true, "failed": true,
	"canceled": true, "canceling": true, "skipped": true, "manual": true, "scheduled": true,
	"waiting_for_resource": true, "preparing": true,
}

func normalizeStatus(s string) string {
	if jobStatuses[s] {
		return s
	}
	return "other"
}

// payload mirrors the Job Hook fields FireRunner reads. Pointers/omitted
// fields tolerate null, which GitLab sends for e.g. runner on pending jobs.
type payload struct {
	ObjectKind    string     `json:"object_kind"`
	BuildID       int64      `json:"build_id"`
	BuildName     string     `json:"build_name"`
	BuildStatus   string     `json:"build_status"`
	Ref           string     `json:"ref"`
	PipelineID    int64      `json:"pipeline_id"`
	ProjectID     int64      `json:"project_id"`
	ProjectName   string     `json:"project_name"`
	CreatedAt     gitlabTime `json:"build_created_at"`
	StartedAt     gitlabTime `json:"build_started_at"`
	FinishedAt    gitlabTime `json:"build_finished_at"`
	CreatedAtISO  gitlabTime `json:"build_created_at_iso"`
	StartedAtISO  gitlabTime `json:"build_started_at_iso"`
	FinishedAtISO gitlabTime `json:"build_finished_at_iso"`
	Runner        *struct {
		ID int64 `json:"id"`
	} `json:"runner"`
	Project *struct {
		ID                int64  `json:"id"`
		PathWithNamespace string `json:"path_with_namespace"`
	} `json:"project"`
}

// ParseJobEvent parses a Job Hook body. It rejects anything that is not a
// job event with positive build_id and project_id and a build_status.
func ParseJobEvent(body []byte) (JobEvent, error) {
	var p payload
	if err := json.Unmarshal(body, &p); err != nil {
		return JobEvent{}, fmt.Errorf("invalid JSON: %s", jsonReason(err))
	}
	if p.ObjectKind != "build" {
		return JobEvent{}, fmt.Errorf("object_kind is %q, want \"build\"", clip(p.ObjectKind, 32))
	}
	if p.BuildID <= 0 {
		return JobEvent{}, errors.New("build_id missing or not positive")
	}
	if p.ProjectID <= 0 && p.Project != nil {
		p.ProjectID = p.Project.ID
	}
	if p.ProjectID <= 0 {
		return JobEvent{}, errors.New("project_id missing or not positive")
	}
	if p.BuildStatus == "" {
		return JobEvent{}, errors.New("build_status missing")
	}
	ev := JobEvent{
		JobID:       p.BuildID,
		ProjectID:   p.ProjectID,
		PipelineID:  p.PipelineID,
		ProjectPath: p.ProjectName,
		JobName:     p.BuildName,
		Ref:         p.Ref,
		Status:      p.BuildStatus,
	}
	if p.Project != nil && p.Project.PathWithNamespace != "" {
		ev.ProjectPath = p.Project.PathWithNamespace
	}
	if p.Runner != nil {
		ev.RunnerID = p.Runner.ID
	}
	ev.CreatedAt = firstTime(p.CreatedAtISO, p.CreatedAt)
	ev.StartedAt = firstTime(p.StartedAtISO, p.StartedAt)
	ev.FinishedAt = firstTime(p.FinishedAtISO, p.FinishedAt)
	return ev, nil
}

// gitlabTime accepts GitLab's webhook time formats: "2025-05-21 16:06:02 UTC"
// (build_*_at) and ISO 8601 (build_*_at_iso), or null. Anything else becomes
// the zero time instead of rejecting the delivery: no decision rests on it.
type gitlabTime struct{ time.Time }

var timeLayouts = []string{"2006-01-02 15:04:05 MST", "2006-01-02 15:04:05 -0700", time.RFC3339Nano}

func (t *gitlabTime) UnmarshalJSON(b []byte) error {
	var s string
	if json.Unmarshal(b, &s) != nil || s == "" {
		return nil
	}
	for _, l := range timeLayouts {
		if v, err := time.Parse(l, s); err == nil {
			t.Time = v.UTC()
			return nil
		}
	}
	return nil
}

func firstTime(ts ...gitlabTime) time.Time {
	for _, t := range ts {
		if !t.IsZero() {
			return t.Time
		}
	}
	return time.Time{}
}

// jsonReason gives a short cause without echoing large parts of the body.
func jsonReason(err error) string {
	var se *json.SyntaxError
	var te *json.UnmarshalTypeError
	switch {
	case errors.As(err, &se):
		return fmt.Sprintf("syntax error at byte %d", se.Offset)
	case errors.As(err, &te):
		return fmt.Sprintf("field %q has wrong type %s", clip(te.Field, 64), te.Value)
	}
	return clip(err.Error(), 120)
}

func clip(s string, n int) string {
	s = strings.ToValidUTF8(s, "?")
	if len(s) > n {
		return s[:n] + "..."
	}
	return s
}
