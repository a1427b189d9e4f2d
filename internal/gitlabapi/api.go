// Package gitlabapi is the small set of GitLab REST calls FireRunner makes,
// on the official client-go, with one retry policy and clear, token-free errors.
package gitlabapi

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"time"
)

// ErrRunnerLimit is wrapped when GitLab refuses a runner because its cap on
// runners created per project/group (per 7 days) is reached.
var ErrRunnerLimit = errors.New("gitlab runner limit reached")

// ErrMaximumTimeout is returned (wrapped) when a RunnerSpec's MaximumTimeout is
// set below GitLab's 600 s minimum; GitLab would answer 400.
var ErrMaximumTimeout = errors.New("maximum_timeout must be at least 600s")

// APIError is a permanent (4xx) failure. Message is GitLab's message with
// anything token-like removed; safe to log.
type APIError struct {
	Op      string
	Status  int
	Message string
}

func (e *APIError) Error() string {
	return fmt.Sprintf("gitlab %s: HTTP %d: %s", e.Op, e.Status, e.Message)
}

// IsPermanent reports whether retrying err cannot help: a 4xx (*APIError), a
// local validation error (ErrInvalidSpec) or the runner limit.
func IsPermanent(err error) bool {
	var ae *APIError
	return errors.As(err, &ae) || errors.Is(err, ErrRunnerLimit) || errors.Is(err, ErrMaximumTimeout) ||
		errors.Is(err, ErrInvalidSpec)
}

// IsNotFound reports whether err is a 404 from GitLab.
func IsNotFound(err error) bool {
	var ae *APIError
	return errors.As(err, &ae) && ae.Status == http.StatusNotFound
}

type options struct {
	httpClient *http.Client
	retries    int
	timeout    time.Duration
	log        *slog.Logger
	errCounter func(op string, status int)
	backoffMin time.Duration
	backoffMax time.Duration
}

// Option configures a Client.
type Option func(*options)

// WithHTTPClient sets the HTTP client (default: a fresh client).
func WithHTTPClient(c *http.Client) Option { return func(o *options) { o.httpClient = c } }

// WithRetries bounds retries per call on 5xx, 429, timeouts and connection errors (default 4).
func WithRetries(n int) Option { return func(o *options) { o.retries = max(n, 0) } }

// WithTimeout bounds one HTTP attempt (default 30s).
func WithTimeout(d time.Duration) Option { return func(o *options) { o.timeout = d } }

// WithLogger sets the logger (default slog.Default()).
func WithLogger(l *slog.Logger) Option { return func(o *options) { o.log = l } }

// WithErrorCounter is called once per failed attempt with the operation name
// and the HTTP status (0 for transport errors).
func WithErrorCounter(f func(op string, status int)) Option {
	return func(o *options) { o.errCounter = f }
}

// WithBackoff sets the exponential backoff's base and cap (default 200ms, 10s).
func WithBackoff(base, max time.Duration) Option {
	return func(o *options) { o.backoffMin, o.backoffMax = base, max }
}

type logAttrsKey struct{}

// WithLogAttrs returns a context whose slog attributes (e.g. "job_id", 42,
// "vm", "vm-42") are added to every log line this package writes for calls
// made with it, so API failures carry the job they belong to.
func WithLogAttrs(ctx context.Context, attrs ...any) context.Context {
	prev, _ := ctx.Value(logAttrsKey{}).([]any)
	return context.WithValue(ctx, logAttrsKey{}, append(append([]any(nil), prev...), attrs...))
}

func ctxAttrs(ctx context.Context) []any {
	a, _ := ctx.Value(logAttrsKey{}).([]any)
	return a
}

// Job is a CI job as FireRunner needs it.
type Job struct {
	ID, ProjectID, PipelineID int64
	Name, Ref, Status         string
	TagList                   []string
	RunnerID                  int64 // the runner that took it (0: none yet)
	// RunnerSystemID is the system_id of the runner manager that took it
	// (the job API's runner_manager, GitLab 16+): which of the processes
	// sharing one runner's token ran it. "" when unknown.
	RunnerSystemID string
}

// RunnerSpec describes a runner to create.
type RunnerSpec struct {
	Scope          string // project|group|instance
	ProjectID      int64
	GroupID        int64
	TagList        []string
	Description    string
	MaximumTimeout time.Duration // 0 = GitLab default (none); else >= 600s
	Locked         bool
	RunUntagged    bool
	// JobID is log context only (never sent to GitLab); 0 = none.
	JobID int64
}

// Runner is a created runner. Token is the glrt- (or legacy) authentication
// token: a secret, never log it.
type Runner struct {
	ID    int64
	Token string
}

// RunnerInfo is a runner as listed by GitLab.
type RunnerInfo struct {
	ID          int64
	Description string
	Status      string
	TagList     []string
}
