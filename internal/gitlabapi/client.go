package gitlabapi

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"net/url"
	"sort"
	"strconv"
	"strings"
	"time"

	gitlab "gitlab.com/gitlab-org/api/client-go"
)

// Defaults for Options.
const (
	DefaultRetries    = 4
	DefaultTimeout    = 30 * time.Second
	DefaultBackoffMin = 200 * time.Millisecond
	DefaultBackoffMax = 10 * time.Second
	// MaxRetryAfter caps a server's Retry-After so one header cannot stall a
	// call for hours.
	MaxRetryAfter = 2 * time.Minute
	// MinMaximumTimeout is GitLab's lower bound for a runner's maximum_timeout.
	MinMaximumTimeout = 600 * time.Second
	perPage           = 100
	maxPages          = 1000 // 100k items: far beyond any sane pending-job list
)

// Client talks to one GitLab instance with one token. It is safe for
// concurrent use.
type Client struct {
	gl    *gitlab.Client
	opts  options
	log   *slog.Logger
	token string // kept only to scrub it from any message
	// sleep waits between attempts; tests replace it to observe delays.
	sleep func(ctx context.Context, d time.Duration) error
}

// New returns a client for baseURL (e.g. https://gitlab.example.com; "/api/v4"
// is appended when missing) using token as PRIVATE-TOKEN. client-go's own
// retries are disabled: this package owns the one retry policy.
func New(baseURL, token string, opts ...Option) (*Client, error) {
	o := options{
		retries:    DefaultRetries,
		timeout:    DefaultTimeout,
		backoffMin: DefaultBackoffMin,
		backoffMax: DefaultBackoffMax,
	}
	for _, fn := range opts {
		fn(&o)
	}
	if o.log == nil {
		o.log = slog.Default()
	}
	if o.errCounter == nil {
		o.errCounter = func(string, int) {}
	}
	if o.backoffMin <= 0 {
		o.backoffMin = DefaultBackoffMin
	}
	if o.backoffMax < o.backoffMin {
		o.backoffMax = o.backoffMin
	}
	if o.httpClient == nil {
		// No client-wide Timeout: each attempt gets its own context deadline.
		o.httpClient = &http.Client{Transport: http.DefaultTransport.(*http.Transport).Clone()}
	}
	u, err := url.Parse(baseURL)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return nil, fmt.Errorf("gitlab URL %q: want http(s)://host[:port][/path]", baseURL)
	}
	if token == "" {
		return nil, errors.New("gitlab API token is empty")
	}
	gl, err := gitlab.NewClient(token,
		gitlab.WithBaseURL(baseURL),
		gitlab.WithHTTPClient(o.httpClient),
		gitlab.WithoutRetries(),
		gitlab.WithURLWarningLogger(o.log),
		gitlab.WithUserAgent("firerunner"),
	)
	if err != nil {
		return nil, fmt.Errorf("gitlab client: %w", err)
	}
	return &Client{gl: gl, opts: o, log: o.log, token: token, sleep: sleepCtx}, nil
}

func sleepCtx(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

// attemptFunc performs one HTTP attempt with the request options given.
type attemptFunc func(ro ...gitlab.RequestOptionFunc) (*gitlab.Response, error)

// call runs one operation under the retry policy: 5xx, 429, per-attempt
// timeouts and transport errors are retried up to opts.retries times with
// exponential backoff and jitter (or the server's Retry-After); other HTTP
// errors are permanent *APIError. secrets are extra strings to scrub from
// messages (e.g. a registration token). attrs are log context (job id...).
func (c *Client) call(ctx context.Context, op string, secrets []string, attrs []any, f attemptFunc) error {
	attrs = append(attrs, ctxAttrs(ctx)...)
	for attempt := 0; ; attempt++ {
		actx, cancel := ctx, context.CancelFunc(func() {})
		if c.opts.timeout > 0 {
			actx, cancel = context.WithTimeout(ctx, c.opts.timeout)
		}
		resp, err := f(gitlab.WithContext(actx))
		cancel()
		if err == nil {
			return nil
		}
		status := 0
		if resp != nil && resp.Response != nil {
			status = resp.StatusCode
		}
		c.opts.errCounter(op, status)
		if ctx.Err() != nil {
			return fmt.Errorf("gitlab %s: %w", op, ctx.Err())
		}
		msg := c.scrub(errMessage(err), secrets)
		retryable := status == http.StatusTooManyRequests || status >= 500 || (status == 0 && isTransport(err))
		if !retryable {
			if status >= 300 {
				return c.permanent(op, status, msg, err, secrets, attrs)
			}
			// A 2xx whose body did not decode, or a local request error: do not
			// repeat it (a POST may have taken effect), do not call it permanent.
			c.log.Error("gitlab call failed", append([]any{"op", op, "status", status, "err", msg}, attrs...)...)
			return fmt.Errorf("gitlab %s: %s", op, msg)
		}
		if attempt >= c.opts.retries {
			c.log.Error("gitlab call failed, retries exhausted",
				append([]any{"op", op, "status", status, "attempts", attempt + 1, "err", msg}, attrs...)...)
			return fmt.Errorf("gitlab %s: giving up after %d attempts: %s", op, attempt+1, msg)
		}
		wait, fromHeader := c.backoff(attempt), false
		if resp != nil && resp.Response != nil {
			if ra, ok := retryAfter(resp.Header.Get("Retry-After"), time.Now()); ok {
				wait, fromHeader = ra, true
			}
		}
		c.log.Warn("gitlab call failed, retrying", append([]any{"op", op, "status", status,
			"attempt", attempt + 1, "wait", wait, "retry_after", fromHeader, "err", msg}, attrs...)...)
		if err := c.sleep(ctx, wait); err != nil {
			return fmt.Errorf("gitlab %s: %w (last error: %s)", op, err, msg)
		}
	}
}

// permanent builds, logs and returns the error of a non-retryable HTTP failure.
func (c *Client) permanent(op string, status int, msg string, err error, secrets []string, attrs []any) error {
	var er *gitlab.ErrorResponse
	if errors.As(err, &er) {
		if m := bodyMessage(er.Body); m != "" {
			msg = m
		} else if er.Message != "" {
			msg = er.Message
		}
		msg = c.scrub(msg, secrets)
	}
	ae := &APIError{Op: op, Status: status, Message: clip(msg, 500)}
	if status == http.StatusNotFound {
		// Callers decide whether a 404 is expected (DeleteRunner: already gone).
		c.log.Debug("gitlab: not found", append([]any{"op", op, "err", ae.Message}, attrs...)...)
		return ae
	}
	if status == http.StatusBadRequest && er != nil && isRunnerLimit(string(er.Body)) {
		c.log.Error("gitlab runner limit reached", append([]any{"op", op, "status", status, "err", ae.Message}, attrs...)...)
		return &runnerLimitError{api: ae}
	}
	c.log.Error("gitlab call failed permanently", append([]any{"op", op, "status", status, "err", ae.Message}, attrs...)...)
	return ae
}

// runnerLimitError is both ErrRunnerLimit and the *APIError behind it.
type runnerLimitError struct{ api *APIError }

func (e *runnerLimitError) Unwrap() []error { return []error{ErrRunnerLimit, e.api} }

func (e *runnerLimitError) Error() string {
	return e.api.Error() + ". GitLab caps the runners of a project or group that were created or " +
		"active in the past 7 days (GitLab.com Free: 50); only runners that still exist count, and " +
		"one-off mode has one per running or waiting VM. Run fewer of the project's jobs at once, " +
		"use the pooled runner mode so runners are reused across jobs, or raise the plan limit " +
		"ci_registered_project_runners / ci_registered_group_runners on self-managed GitLab"
}

// bodyMessage flattens GitLab's error bodies: {"message": "..."},
// {"message": {"field": ["..."]}}, {"error": "..."}; "" if none of those.
func bodyMessage(body []byte) string {
	var v struct {
		Message any    `json:"message"`
		Error   string `json:"error"`
		Desc    string `json:"error_description"`
	}
	if json.Unmarshal(body, &v) != nil {
		return ""
	}
	var parts []string
	var walk func(prefix string, x any)
	walk = func(prefix string, x any) {
		switch x := x.(type) {
		case string:
			if prefix != "" {
				x = prefix + ": " + x
			}
			parts = append(parts, x)
		case []any:
			for _, e := range x {
				walk(prefix, e)
			}
		case map[string]any:
			keys := make([]string, 0, len(x))
			for k := range x {
				keys = append(keys, k)
			}
			sort.Strings(keys)
			for _, k := range keys {
				walk(k, x[k])
			}
		}
	}
	walk("", v.Message)
	if v.Error != "" {
		parts = append(parts, v.Error)
	}
	if v.Desc != "" {
		parts = append(parts, v.Desc)
	}
	return strings.Join(parts, "; ")
}

func isRunnerLimit(body string) bool {
	return strings.Contains(body, "runner_projects.base") || strings.Contains(body, "runner_namespaces.base") ||
		(strings.Contains(body, "Maximum number of") && strings.Contains(body, "runners") && strings.Contains(body, "exceeded"))
}

// backoff is exponential with "equal jitter": half fixed, half random, so
// concurrent callers spread out but never retry immediately.
func (c *Client) backoff(attempt int) time.Duration {
	d := c.opts.backoffMin
	for i := 0; i < attempt && d < c.opts.backoffMax; i++ {
		d *= 2
	}
	d = min(d, c.opts.backoffMax)
	half := d / 2
	return half + rand.N(half+1)
}

// retryAfter parses Retry-After (delta seconds or HTTP date), capped.
func retryAfter(v string, now time.Time) (time.Duration, bool) {
	v = strings.TrimSpace(v)
	if v == "" {
		return 0, false
	}
	var d time.Duration
	if s, err := strconv.Atoi(v); err == nil {
		if s < 0 {
			return 0, false
		}
		d = time.Duration(min(s, int(MaxRetryAfter/time.Second))) * time.Second
	} else if t, err := http.ParseTime(v); err == nil {
		d = max(t.Sub(now), 0)
	} else {
		return 0, false
	}
	return min(d, MaxRetryAfter), true
}

// isTransport reports errors worth retrying that carry no HTTP status:
// connection failures and attempt timeouts.
func isTransport(err error) bool {
	var ue *url.Error
	return errors.As(err, &ue) || errors.Is(err, context.DeadlineExceeded)
}

// errMessage renders err without request bodies: url.Error carries only the
// method, URL (no secrets: the token travels in a header) and the cause.
func errMessage(err error) string {
	var er *gitlab.ErrorResponse
	if errors.As(err, &er) && er.Response != nil {
		return fmt.Sprintf("HTTP %d: %s", er.Response.StatusCode, er.Message)
	}
	return err.Error()
}

// scrub removes the API token, extra secrets and anything shaped like a
// GitLab token from s, so no message can leak one into logs.
func (c *Client) scrub(s string, extra []string) string {
	for _, sec := range append([]string{c.token}, extra...) {
		if len(sec) >= 4 {
			s = strings.ReplaceAll(s, sec, "[REDACTED]")
		}
	}
	return scrubTokens(s)
}

// tokenPrefixes are GitLab's token prefixes (runner auth, PAT, registration, ...).
var tokenPrefixes = []string{"glrt-", "glpat-", "GR1348941", "glrtr-", "gloas-", "gldt-", "glptt-", "glcbt-", "glimt-", "glsoat-"}

func scrubTokens(s string) string {
	for _, p := range tokenPrefixes {
		for {
			i := strings.Index(s, p)
			if i < 0 {
				break
			}
			j := i + len(p)
			for j < len(s) && isTokenChar(s[j]) {
				j++
			}
			s = s[:i] + "[REDACTED]" + s[j:]
		}
	}
	return s
}

func isTokenChar(b byte) bool {
	return b == '-' || b == '_' || b == '.' || (b >= '0' && b <= '9') || (b >= 'a' && b <= 'z') || (b >= 'A' && b <= 'Z')
}

func clip(s string, n int) string {
	if len(s) > n {
		return s[:n] + "..."
	}
	return s
}
