package gitlabapi

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

type harness struct {
	f      *fakeGitLab
	c      *Client
	logs   *bytes.Buffer
	mu     sync.Mutex
	sleeps []time.Duration
	errs   []string
}

func newHarness(t *testing.T, opts ...Option) *harness {
	t.Helper()
	h := &harness{f: newFake(t), logs: &bytes.Buffer{}}
	var logMu sync.Mutex
	lw := writerFunc(func(p []byte) (int, error) { logMu.Lock(); defer logMu.Unlock(); return h.logs.Write(p) })
	base := []Option{
		WithLogger(slog.New(slog.NewTextHandler(lw, &slog.HandlerOptions{Level: slog.LevelDebug}))),
		WithErrorCounter(func(op string, status int) {
			h.mu.Lock()
			h.errs = append(h.errs, op+":"+http.StatusText(status))
			h.mu.Unlock()
		}),
		WithRetries(3),
		WithBackoff(time.Millisecond, 8*time.Millisecond),
	}
	c, err := New(h.f.srv.URL, h.f.token, append(base, opts...)...)
	if err != nil {
		t.Fatal(err)
	}
	c.sleep = func(ctx context.Context, d time.Duration) error {
		h.mu.Lock()
		h.sleeps = append(h.sleeps, d)
		h.mu.Unlock()
		return ctx.Err()
	}
	h.c = c
	t.Cleanup(func() {
		// No test may leak a token into logs.
		for _, secret := range []string{h.f.token, "glrt-", "GR1348941"} {
			if strings.Contains(h.logs.String(), secret) {
				t.Errorf("secret %q found in logs:\n%s", secret, h.logs)
			}
		}
	})
	return h
}

type writerFunc func([]byte) (int, error)

func (w writerFunc) Write(p []byte) (int, error) { return w(p) }

func TestNewValidates(t *testing.T) {
	for _, u := range []string{"", "gitlab.example.com", "ftp://x", "http://", "://x"} {
		want := fmt.Sprintf("gitlab URL %q: want http(s)://host[:port][/path]", u)
		if c, err := New(u, "tok"); c != nil || err == nil || err.Error() != want {
			t.Errorf("New(%q): %v, want %q", u, err, want)
		}
	}
	if c, err := New("https://gitlab.example.com", ""); c != nil || err == nil || err.Error() != "gitlab API token is empty" {
		t.Errorf("empty token: %v", err)
	}
}

func TestGetJobReadsTags(t *testing.T) {
	h := newHarness(t)
	h.f.jobs[1977] = jobJSON(1977, 380, "pending", "firecracker-2cpu-4gb", "linux")
	j, err := h.c.GetJob(context.Background(), 380, 1977)
	if err != nil {
		t.Fatal(err)
	}
	if j.ID != 1977 || j.ProjectID != 380 || j.Status != "pending" || j.Name != "test" || j.Ref != "main" ||
		strings.Join(j.TagList, ",") != "firecracker-2cpu-4gb,linux" {
		t.Fatalf("job %+v", j)
	}
}

func TestRetry5xxThenSuccess(t *testing.T) {
	h := newHarness(t)
	h.f.jobs[5] = jobJSON(5, 1, "pending", "firecracker-1cpu-1gb")
	key := "GET /api/v4/projects/1/jobs/5"
	h.f.fail(key, fault{status: 502, body: `{"message":"502 Bad Gateway"}`}, fault{status: 503, body: `{"message":"503"}`})
	j, err := h.c.GetJob(context.Background(), 1, 5)
	if err != nil {
		t.Fatal(err)
	}
	if j.ID != 5 || h.f.count(key) != 3 {
		t.Fatalf("job %+v after %d calls", j, h.f.count(key))
	}
	if len(h.sleeps) != 2 || len(h.errs) != 2 || h.errs[0] != "get_job:Bad Gateway" {
		t.Fatalf("sleeps %v errs %v", h.sleeps, h.errs)
	}
	// Exponential with jitter: attempt n waits in [base*2^n/2, base*2^n].
	if h.sleeps[0] < 500*time.Microsecond || h.sleeps[0] > time.Millisecond || h.sleeps[1] < time.Millisecond || h.sleeps[1] > 2*time.Millisecond {
		t.Fatalf("backoff %v", h.sleeps)
	}
	if !strings.Contains(h.logs.String(), "retrying") || !strings.Contains(h.logs.String(), "job_id=5") {
		t.Fatalf("retry not logged with context: %s", h.logs)
	}
}

func TestRetryAfterRespected(t *testing.T) {
	h := newHarness(t)
	h.f.jobs[5] = jobJSON(5, 1, "pending")
	key := "GET /api/v4/projects/1/jobs/5"
	h.f.fail(key, fault{status: 429, header: map[string]string{"Retry-After": "7"}, body: `Retry later`})
	h.f.fail(key, fault{status: 503, header: map[string]string{"Retry-After": "999999"}, body: `{"message":"x"}`})
	if _, err := h.c.GetJob(context.Background(), 1, 5); err != nil {
		t.Fatal(err)
	}
	if len(h.sleeps) != 2 || h.sleeps[0] != 7*time.Second || h.sleeps[1] != MaxRetryAfter {
		t.Fatalf("sleeps %v, want [7s %v]", h.sleeps, MaxRetryAfter)
	}
}

func TestRetryAfterParsing(t *testing.T) {
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	for _, tc := range []struct {
		in   string
		want time.Duration
		ok   bool
	}{
		{"", 0, false}, {"abc", 0, false}, {"-1", 0, false}, {"0", 0, true}, {"3", 3 * time.Second, true},
		{"Thu, 01 Jan 2026 00:00:30 GMT", 30 * time.Second, true}, {"Wed, 31 Dec 2025 00:00:00 GMT", 0, true},
	} {
		got, ok := retryAfter(tc.in, now)
		if got != tc.want || ok != tc.ok {
			t.Errorf("retryAfter(%q) = %v %v, want %v %v", tc.in, got, ok, tc.want, tc.ok)
		}
	}
}

func TestRetriesExhausted(t *testing.T) {
	h := newHarness(t, WithRetries(2))
	key := "GET /api/v4/projects/1/jobs/5"
	for range 5 {
		h.f.fail(key, fault{status: 500, body: `{"message":"500 Internal Server Error"}`})
	}
	_, err := h.c.GetJob(context.Background(), 1, 5)
	var ae *APIError
	if err == nil || IsPermanent(err) || errors.As(err, &ae) || err.Error() != "gitlab get_job: giving up after 3 attempts: HTTP 500: {message: 500 Internal Server Error}" {
		t.Fatalf("err %v", err)
	}
	if h.f.count(key) != 3 {
		t.Fatalf("calls %d, want 3", h.f.count(key))
	}
}

func Test4xxPermanent(t *testing.T) {
	h := newHarness(t)
	key := "GET /api/v4/projects/1/jobs/5"
	h.f.fail(key, fault{status: 403, body: `{"message":"403 Forbidden"}`})
	_, err := h.c.GetJob(context.Background(), 1, 5)
	var ae *APIError
	if !errors.As(err, &ae) || ae.Status != 403 || ae.Op != "get_job" || !IsPermanent(err) || IsNotFound(err) {
		t.Fatalf("err %#v", err)
	}
	if !strings.Contains(ae.Message, "403 Forbidden") {
		t.Fatalf("message %q", ae.Message)
	}
	if h.f.count(key) != 1 || len(h.sleeps) != 0 {
		t.Fatal("4xx was retried")
	}
	logs := h.logs.String()
	if !strings.Contains(logs, "permanently") || !strings.Contains(logs, "job_id=5") || !strings.Contains(logs, "project_id=1") {
		t.Fatalf("4xx not logged with job context: %s", logs)
	}
}

func TestWrongTokenIs401Permanent(t *testing.T) {
	h := newHarness(t)
	c, err := New(h.f.srv.URL, "glpat-wrong", WithLogger(slog.New(slog.DiscardHandler)))
	if err != nil {
		t.Fatal(err)
	}
	_, err = c.GetJob(context.Background(), 1, 5)
	var ae *APIError
	if !errors.As(err, &ae) || ae.Status != 401 || ae.Op != "get_job" || !IsPermanent(err) || IsNotFound(err) {
		t.Fatalf("err %v", err)
	}
}

func TestNotFound(t *testing.T) {
	h := newHarness(t)
	_, err := h.c.GetJob(context.Background(), 1, 404)
	var ae *APIError
	if !IsNotFound(err) || !IsPermanent(err) || !errors.As(err, &ae) || ae.Op != "get_job" || ae.Status != 404 {
		t.Fatalf("err %v", err)
	}
}

func TestAttemptTimeoutRetried(t *testing.T) {
	h := newHarness(t, WithTimeout(50*time.Millisecond))
	h.f.jobs[5] = jobJSON(5, 1, "pending")
	key := "GET /api/v4/projects/1/jobs/5"
	h.f.fail(key, fault{block: true})
	if _, err := h.c.GetJob(context.Background(), 1, 5); err != nil {
		t.Fatal(err)
	}
	if h.f.count(key) != 2 || len(h.errs) != 1 || h.errs[0] != "get_job:" {
		t.Fatalf("calls %d errs %v", h.f.count(key), h.errs)
	}
}

func TestConnectionErrorRetriedThenGivesUp(t *testing.T) {
	h := newHarness(t, WithRetries(2))
	h.f.srv.Close()
	_, err := h.c.GetJob(context.Background(), 1, 5)
	if err == nil || IsPermanent(err) || !strings.HasPrefix(err.Error(), "gitlab get_job: giving up after 3 attempts: ") ||
		!strings.Contains(err.Error(), "connection refused") {
		t.Fatalf("err %v", err)
	}
	if len(h.errs) != 3 || len(h.sleeps) != 2 {
		t.Fatalf("errs %v sleeps %v", h.errs, h.sleeps)
	}
}

func TestContextCanceledStopsRetrying(t *testing.T) {
	h := newHarness(t)
	key := "GET /api/v4/projects/1/jobs/5"
	h.f.fail(key, fault{status: 500}, fault{status: 500}, fault{status: 500})
	ctx, cancel := context.WithCancel(context.Background())
	h.c.sleep = func(ctx context.Context, d time.Duration) error { cancel(); return sleepCtx(ctx, time.Hour) }
	_, err := h.c.GetJob(ctx, 1, 5)
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("err %v", err)
	}
	if h.f.count(key) != 1 {
		t.Fatalf("calls %d", h.f.count(key))
	}
}

func TestListPendingJobsPaginates(t *testing.T) {
	h := newHarness(t)
	for i := int64(1); i <= 250; i++ {
		h.f.jobs[i] = jobJSON(i, 7, "pending", "firecracker-1cpu-1gb")
		h.f.pending[7] = append(h.f.pending[7], i)
	}
	h.f.jobs[999] = jobJSON(999, 7, "running") // not pending: not listed
	key := "GET /api/v4/projects/7/jobs"
	h.f.fail(key) // no faults; page 2 gets a transient error below
	jobs, err := h.c.ListPendingJobs(context.Background(), 7)
	if err != nil {
		t.Fatal(err)
	}
	if len(jobs) != 250 || jobs[0].ID != 1 || jobs[249].ID != 250 || jobs[100].ProjectID != 7 {
		t.Fatalf("got %d jobs", len(jobs))
	}
	if h.f.count(key) != 3 {
		t.Fatalf("pages fetched %d, want 3", h.f.count(key))
	}
	for i, q := range h.f.queries[key] {
		if q.Get("per_page") != "100" || q.Get("page") != []string{"1", "2", "3"}[i] {
			t.Fatalf("query %d: %v", i, q)
		}
	}
}

func TestListPendingJobsRetriesAPage(t *testing.T) {
	h := newHarness(t)
	h.f.jobs[1] = jobJSON(1, 7, "pending")
	h.f.pending[7] = []int64{1}
	h.f.fail("GET /api/v4/projects/7/jobs", fault{status: 502})
	jobs, err := h.c.ListPendingJobs(context.Background(), 7)
	if err != nil || len(jobs) != 1 {
		t.Fatalf("%v %v", jobs, err)
	}
	empty, err := h.c.ListPendingJobs(context.Background(), 8)
	if err != nil || len(empty) != 0 {
		t.Fatalf("%v %v", empty, err)
	}
}

func TestListGroupProjects(t *testing.T) {
	h := newHarness(t)
	for i := int64(1); i <= 120; i++ {
		h.f.projects[3] = append(h.f.projects[3], 1000+i)
	}
	ids, err := h.c.ListGroupProjects(context.Background(), 3)
	if err != nil || len(ids) != 120 || ids[0] != 1001 || ids[119] != 1120 {
		t.Fatalf("%d ids, %v", len(ids), err)
	}
	q := h.f.queries["GET /api/v4/groups/3/projects"][0]
	if q.Get("include_subgroups") != "true" || q.Get("with_shared") != "false" || q.Get("archived") != "false" {
		t.Fatalf("query %v", q)
	}
}

func TestCreateRunner(t *testing.T) {
	h := newHarness(t)
	spec := RunnerSpec{Scope: "project", ProjectID: 380, TagList: []string{"firecracker-2cpu-4gb", "linux"},
		Description: "firerunner job 1977", MaximumTimeout: time.Hour, Locked: true}
	r, err := h.c.CreateRunner(context.Background(), spec)
	if err != nil {
		t.Fatal(err)
	}
	if r.ID == 0 || !strings.HasPrefix(r.Token, "glrt-") {
		t.Fatalf("runner %+v", r)
	}
	b := h.f.bodies["POST /api/v4/user/runners"][0]
	if b["runner_type"] != "project_type" || b["project_id"] != float64(380) || b["locked"] != true ||
		b["run_untagged"] != false || b["maximum_timeout"] != float64(3600) || b["description"] != "firerunner job 1977" {
		t.Fatalf("request body %v", b)
	}
	if tl, _ := b["tag_list"].([]any); len(tl) != 2 || tl[0] != "firecracker-2cpu-4gb" {
		t.Fatalf("tag_list %v", b["tag_list"])
	}
	if _, ok := b["group_id"]; ok {
		t.Fatal("group_id sent for a project runner")
	}

	g, err := h.c.CreateRunner(context.Background(), RunnerSpec{Scope: "group", GroupID: 9, TagList: []string{"x"}})
	if err != nil || g.ID == 0 {
		t.Fatal(err)
	}
	b = h.f.bodies["POST /api/v4/user/runners"][1]
	if b["runner_type"] != "group_type" || b["group_id"] != float64(9) || b["maximum_timeout"] != nil {
		t.Fatalf("group body %v", b)
	}
	i, err := h.c.CreateRunner(context.Background(), RunnerSpec{Scope: "instance", TagList: []string{"x"}})
	if err != nil || i.ID == 0 || h.f.bodies["POST /api/v4/user/runners"][2]["runner_type"] != "instance_type" {
		t.Fatal(err)
	}
}

func TestCreateRunnerValidatesLocally(t *testing.T) {
	h := newHarness(t)
	for name, s := range map[string]RunnerSpec{
		"timeout below 600s": {ProjectID: 1, TagList: []string{"x"}, MaximumTimeout: 599 * time.Second},
		"negative timeout":   {ProjectID: 1, TagList: []string{"x"}, MaximumTimeout: -time.Second},
		"no project":         {Scope: "project", TagList: []string{"x"}},
		"no group":           {Scope: "group", TagList: []string{"x"}},
		"bad scope":          {Scope: "global", ProjectID: 1, TagList: []string{"x"}},
		"no tags":            {ProjectID: 1},
	} {
		_, err := h.c.CreateRunner(context.Background(), s)
		if !errors.Is(err, ErrInvalidSpec) || !IsPermanent(err) {
			t.Errorf("%s: err %v", name, err)
		}
		if name == "timeout below 600s" && (!errors.Is(err, ErrMaximumTimeout) || !strings.Contains(err.Error(), "600")) {
			t.Errorf("timeout error unclear: %v", err)
		}
	}
	if n := h.f.count("POST /api/v4/user/runners"); n != 0 {
		t.Fatalf("%d requests sent for invalid specs", n)
	}
	if _, err := h.c.CreateRunner(context.Background(), RunnerSpec{ProjectID: 1, TagList: []string{"x"}, MaximumTimeout: 600 * time.Second}); err != nil {
		t.Fatalf("600s must be accepted: %v", err)
	}
}

func TestRunnerLimit(t *testing.T) {
	h := newHarness(t)
	key := "POST /api/v4/user/runners"
	h.f.fail(key, fault{status: 400, body: `{"message":{"runner_projects.base":["Maximum number of ci registered project runners (50) exceeded"]}}`})
	h.f.fail(key, fault{status: 400, body: `{"message":{"runner_namespaces.base":["Maximum number of ci registered group runners (50) exceeded"]}}`})
	for _, s := range []RunnerSpec{{ProjectID: 1, TagList: []string{"x"}}, {Scope: "group", GroupID: 2, TagList: []string{"x"}}} {
		_, err := h.c.CreateRunner(context.Background(), s)
		if !errors.Is(err, ErrRunnerLimit) || !IsPermanent(err) {
			t.Fatalf("err %v", err)
		}
		var ae *APIError
		if !errors.As(err, &ae) || ae.Status != 400 {
			t.Fatalf("APIError not wrapped: %v", err)
		}
		msg := err.Error()
		for _, want := range []string{"Maximum number of ci registered", "7 days", "pooled", "plan limit"} {
			if !strings.Contains(msg, want) {
				t.Errorf("message lacks %q: %s", want, msg)
			}
		}
	}
	if h.f.count(key) != 2 {
		t.Fatalf("runner limit was retried: %d calls", h.f.count(key))
	}
	if !strings.Contains(h.logs.String(), "runner limit") {
		t.Fatalf("not logged: %s", h.logs)
	}
}

func TestOther400IsNotRunnerLimit(t *testing.T) {
	h := newHarness(t)
	h.f.fail("POST /api/v4/user/runners", fault{status: 400, body: `{"message":{"tags_list":["is too long"]}}`})
	_, err := h.c.CreateRunner(context.Background(), RunnerSpec{ProjectID: 1, TagList: []string{"x"}})
	var ae *APIError
	if errors.Is(err, ErrRunnerLimit) || !errors.As(err, &ae) || ae.Status != 400 || ae.Message != "tags_list: is too long" {
		t.Fatalf("err %v", err)
	}
}

func TestRegisterRunnerLegacy(t *testing.T) {
	h := newHarness(t)
	r, err := h.c.RegisterRunnerLegacy(context.Background(), "GR1348941legacyRegToken",
		RunnerSpec{TagList: []string{"firecracker-1cpu-1gb"}, Description: "firerunner job 5", Locked: true, MaximumTimeout: time.Hour})
	if err != nil || r.ID == 0 || !strings.HasPrefix(r.Token, "glrt-") {
		t.Fatalf("%+v %v", r, err)
	}
	b := h.f.bodies["POST /api/v4/runners"][0]
	if b["token"] != "GR1348941legacyRegToken" || b["run_untagged"] != false || b["locked"] != true || b["maximum_timeout"] != float64(3600) {
		t.Fatalf("body %v", b)
	}
	// A bad registration token is a permanent 403.
	_, err = h.c.RegisterRunnerLegacy(context.Background(), "GR1348941wrong", RunnerSpec{TagList: []string{"x"}})
	var ae *APIError
	if !errors.As(err, &ae) || ae.Status != 403 {
		t.Fatalf("err %v", err)
	}
	if _, err := h.c.RegisterRunnerLegacy(context.Background(), "", RunnerSpec{TagList: []string{"x"}}); !errors.Is(err, ErrInvalidSpec) {
		t.Fatalf("empty token: %v", err)
	}
}

func TestDeleteRunner(t *testing.T) {
	h := newHarness(t)
	r, err := h.c.CreateRunner(context.Background(), RunnerSpec{ProjectID: 1, TagList: []string{"x"}})
	if err != nil {
		t.Fatal(err)
	}
	key := "DELETE /api/v4/runners/" + itoa(r.ID)
	h.f.fail(key, fault{status: 500, body: `{"message":"500 Internal Server Error"}`})
	if err := h.c.DeleteRunner(context.Background(), r.ID); err != nil {
		t.Fatal(err)
	}
	if _, still := h.f.runners[r.ID]; still || h.f.count(key) != 2 {
		t.Fatalf("runner not deleted after retry (calls %d)", h.f.count(key))
	}
	// Again: 404 from GitLab means already gone, which is success.
	if err := h.c.DeleteRunner(context.Background(), r.ID); err != nil {
		t.Fatalf("second delete: %v", err)
	}
	// Other 4xx are errors.
	h.f.fail("DELETE /api/v4/runners/77", fault{status: 403, body: `{"message":"403 Forbidden"}`})
	if err := h.c.DeleteRunner(context.Background(), 77); !IsPermanent(err) {
		t.Fatalf("403 delete: %v", err)
	}
}

func TestListOwnedRunners(t *testing.T) {
	h := newHarness(t)
	for i := range 130 {
		desc := "someone else's runner"
		if i%2 == 0 {
			desc = "firerunner job " + itoa(int64(i))
		}
		if _, err := h.c.CreateRunner(context.Background(), RunnerSpec{ProjectID: 1, TagList: []string{"x"}, Description: desc}); err != nil {
			t.Fatal(err)
		}
	}
	rs, err := h.c.ListOwnedRunners(context.Background(), "firerunner ")
	if err != nil {
		t.Fatal(err)
	}
	if len(rs) != 65 || h.f.count("GET /api/v4/runners") != 2 {
		t.Fatalf("%d runners over %d pages", len(rs), h.f.count("GET /api/v4/runners"))
	}
	for _, r := range rs {
		if !strings.HasPrefix(r.Description, "firerunner ") || r.ID == 0 || r.Status == "" {
			t.Fatalf("runner %+v", r)
		}
	}
	if rs, err := h.c.ListOwnedRunners(context.Background(), ""); rs != nil || err == nil || err.Error() != "gitlab list_runners: empty description prefix refused" {
		t.Fatalf("empty prefix: %v", err)
	}
	all, err := h.c.ListAllRunners(context.Background(), "firerunner ")
	if err != nil || len(all) != 65 || h.f.count("GET /api/v4/runners/all") != 2 {
		t.Fatalf("all: %d %v", len(all), err)
	}
}

func TestTokensNeverLogged(t *testing.T) {
	h := newHarness(t, WithRetries(1))
	// A hostile or buggy server echoing secrets in error bodies.
	echo := `{"message":"bad token ` + h.f.token + ` and glrt-abcDEF_123-xyz and GR1348941legacyRegToken"}`
	h.f.fail("POST /api/v4/user/runners", fault{status: 422, body: echo})
	_, err := h.c.CreateRunner(context.Background(), RunnerSpec{ProjectID: 1, TagList: []string{"x"}})
	var ae *APIError
	if !errors.As(err, &ae) || ae.Op != "create_runner" || ae.Status != 422 || ae.Message != "bad token [REDACTED] and [REDACTED] and [REDACTED]" {
		t.Fatalf("422: %#v", err)
	}
	h.f.fail("POST /api/v4/runners", fault{status: 500, body: echo}, fault{status: 400, body: echo})
	_, err2 := h.c.RegisterRunnerLegacy(context.Background(), "GR1348941legacyRegToken", RunnerSpec{TagList: []string{"x"}})
	if !errors.As(err2, &ae) || ae.Status != 400 || !IsPermanent(err2) {
		t.Fatalf("500 then 400: %#v", err2)
	}
	h.f.fail("GET /api/v4/projects/1/jobs/2", fault{status: 503, body: echo}, fault{status: 503, body: echo})
	_, err3 := h.c.GetJob(context.Background(), 1, 2)
	for _, e := range []error{err, err2, err3} {
		for _, s := range []string{h.f.token, "glrt-abc", "GR1348941legacy"} {
			if strings.Contains(e.Error(), s) {
				t.Errorf("error leaks %q: %v", s, e)
			}
		}
	}
	if !strings.Contains(h.logs.String(), "[REDACTED]") {
		t.Fatalf("expected redaction markers in logs: %s", h.logs)
	}
	// Successful creation must not log the runner token either (checked in Cleanup).
	if _, err := h.c.CreateRunner(context.Background(), RunnerSpec{ProjectID: 1, TagList: []string{"x"}}); err != nil {
		t.Fatal(err)
	}
}

func TestScrubTokens(t *testing.T) {
	c := &Client{token: "mytoken123"}
	got := c.scrub("a mytoken123 b glrt-t1_AbC.def c glpat-xyz d GR1348941abc e", []string{"extra-secret"})
	if got != "a [REDACTED] b [REDACTED] c [REDACTED] d [REDACTED] e" {
		t.Fatalf("scrub: %q", got)
	}
}

func itoa(n int64) string { return strconv.FormatInt(n, 10) }

func TestLogAttrsFromContext(t *testing.T) {
	h := newHarness(t)
	h.f.fail("DELETE /api/v4/runners/5", fault{status: 403, body: `{"message":"403 Forbidden"}`})
	ctx := WithLogAttrs(WithLogAttrs(context.Background(), "job_id", int64(4242)), "vm", "vm-4242")
	var ae *APIError
	if err := h.c.DeleteRunner(ctx, 5); !errors.As(err, &ae) || ae.Op != "delete_runner" || ae.Status != 403 || ae.Message != "403 Forbidden" {
		t.Fatalf("delete: %#v", err)
	}
	logs := h.logs.String()
	if !strings.Contains(logs, "job_id=4242") || !strings.Contains(logs, "vm=vm-4242") || !strings.Contains(logs, "runner_id=5") {
		t.Fatalf("context attrs missing: %s", logs)
	}
}

func TestLegacyRegistrationTokenScrubbedFromPermanentErrors(t *testing.T) {
	h := newHarness(t)
	// Not shaped like any known token prefix: only the per-call secret list catches it.
	const reg = "plainRegistrationToken42"
	h.f.fail("POST /api/v4/runners", fault{status: 400, body: `{"message":"token ` + reg + ` is invalid"}`})
	_, err := h.c.RegisterRunnerLegacy(context.Background(), reg, RunnerSpec{TagList: []string{"x"}})
	var ae *APIError
	if !errors.As(err, &ae) || ae.Status != 400 || ae.Message != "token [REDACTED] is invalid" || strings.Contains(h.logs.String(), reg) {
		t.Fatalf("registration token leaked: %v\n%s", err, h.logs)
	}
}

func TestBodyMessage(t *testing.T) {
	for in, want := range map[string]string{
		`{"message":"403 Forbidden"}`: "403 Forbidden",
		`{"message":{"runner_projects.base":["Maximum number of ci registered project runners (50) exceeded"]}}`: "runner_projects.base: Maximum number of ci registered project runners (50) exceeded",
		`{"message":{"b":["y"],"a":["x","z"]}}`:                             "a: x; a: z; b: y",
		`{"error":"invalid_token","error_description":"Token was revoked"}`: "invalid_token; Token was revoked",
		`{"message":["one","two"]}`:                                         "one; two",
		`not json`:                                                          "",
	} {
		if got := bodyMessage([]byte(in)); got != want {
			t.Errorf("bodyMessage(%s) = %q, want %q", in, got, want)
		}
	}
}
