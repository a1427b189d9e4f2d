package webhook

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

const secret = "s3cr3t-webhook-value"

type recSink struct {
	mu     sync.Mutex
	events []JobEvent
	err    error
}

func (s *recSink) HandleJobEvent(_ context.Context, ev JobEvent) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.events = append(s.events, ev)
	return s.err
}

type rig struct {
	sink    *recSink
	h       *Handler
	logs    *bytes.Buffer
	rejects map[string]int
	events  map[string]int
}

func newRig(t *testing.T, opts ...Option) *rig {
	t.Helper()
	r := &rig{sink: &recSink{}, logs: &bytes.Buffer{}, rejects: map[string]int{}, events: map[string]int{}}
	var mu sync.Mutex
	base := []Option{
		WithLogger(slog.New(slog.NewTextHandler(r.logs, &slog.HandlerOptions{Level: slog.LevelDebug}))),
		WithRejectCounter(func(reason string) { mu.Lock(); r.rejects[reason]++; mu.Unlock() }),
		WithEventCounter(func(ev, st string) { mu.Lock(); r.events[ev+"/"+st]++; mu.Unlock() }),
	}
	r.h = NewHandler(secret, r.sink, append(base, opts...)...)
	return r
}

func (r *rig) do(method string, hdr map[string]string, body []byte) *httptest.ResponseRecorder {
	req := httptest.NewRequest(method, "/webhook", bytes.NewReader(body))
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	w := httptest.NewRecorder()
	r.h.ServeHTTP(w, req)
	return w
}

func readTestdata(t *testing.T, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("testdata", name))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func jobHdr(token string) map[string]string {
	h := map[string]string{"X-Gitlab-Event": JobHookEvent, "Content-Type": "application/json"}
	if token != "" {
		h["X-Gitlab-Token"] = token
	}
	return h
}

func TestAuth(t *testing.T) {
	body := readTestdata(t, "job_pending.json")
	for _, tc := range []struct {
		name, token string
		want        int
	}{
		{"missing", "", http.StatusUnauthorized},
		{"wrong", "wrong-secret", http.StatusUnauthorized},
		{"prefix of secret", secret[:5], http.StatusUnauthorized},
		{"secret plus suffix", secret + "x", http.StatusUnauthorized},
		{"right", secret, http.StatusOK},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := newRig(t)
			w := r.do(http.MethodPost, jobHdr(tc.token), body)
			if w.Code != tc.want {
				t.Fatalf("status %d, want %d (%s)", w.Code, tc.want, w.Body)
			}
			if tc.want == http.StatusUnauthorized {
				if len(r.sink.events) != 0 {
					t.Fatalf("unauthorized delivery reached the sink: %+v", r.sink.events)
				}
				if r.rejects[ReasonUnauthorized] != 1 {
					t.Fatalf("reject counter: %v", r.rejects)
				}
				if !strings.Contains(r.logs.String(), "reason=unauthorized") {
					t.Fatalf("rejection not logged: %s", r.logs)
				}
			} else if len(r.sink.events) != 1 {
				t.Fatalf("sink got %d events, want 1", len(r.sink.events))
			}
			if tc.token != "" && strings.Contains(r.logs.String(), tc.token) || strings.Contains(r.logs.String(), secret) {
				t.Fatalf("token in logs: %s", r.logs)
			}
		})
	}
}

func TestEmptySecretRejectsEverything(t *testing.T) {
	sink := &recSink{}
	h := NewHandler("", sink, WithLogger(slog.New(slog.DiscardHandler)))
	for _, tok := range []string{"", "x"} {
		req := httptest.NewRequest(http.MethodPost, "/webhook", bytes.NewReader(readTestdata(t, "job_pending.json")))
		for k, v := range jobHdr(tok) {
			req.Header.Set(k, v)
		}
		w := httptest.NewRecorder()
		h.ServeHTTP(w, req)
		if w.Code != http.StatusUnauthorized || len(sink.events) != 0 {
			t.Fatalf("token %q: status %d, events %d", tok, w.Code, len(sink.events))
		}
	}
}

func TestParsesRealPayloads(t *testing.T) {
	utc := func(s string) time.Time { v, _ := time.Parse(time.RFC3339, s); return v }
	for _, tc := range []struct {
		file string
		want JobEvent
	}{
		{"job_pending.json", JobEvent{JobID: 1977, ProjectID: 380, PipelineID: 2366, ProjectPath: "gitlab-org/gitlab-test",
			JobName: "test", Ref: "main", Status: "pending", CreatedAt: utc("2025-05-21T16:06:01Z")}},
		{"job_running.json", JobEvent{JobID: 1977, ProjectID: 380, PipelineID: 2366, RunnerID: 380987, ProjectPath: "gitlab-org/gitlab-test",
			JobName: "test", Ref: "main", Status: "running", CreatedAt: utc("2025-05-21T16:06:01Z"), StartedAt: utc("2025-05-21T16:06:02Z")}},
		{"job_canceled.json", JobEvent{JobID: 1977, ProjectID: 380, PipelineID: 2366, RunnerID: 380987, ProjectPath: "gitlab-org/gitlab-test",
			JobName: "test", Ref: "main", Status: "canceled", CreatedAt: utc("2025-05-21T16:06:01Z"), StartedAt: utc("2025-05-21T16:06:02Z"),
			FinishedAt: utc("2025-05-21T16:07:30Z")}},
		{"job_success_legacy.json", JobEvent{JobID: 3580121225, ProjectID: 31537070, PipelineID: 743121198, RunnerID: 12270837,
			ProjectPath: "Some Group / release-tools", JobName: "unit tests", Ref: "feature/x", Status: "success",
			CreatedAt: utc("2023-01-10T13:50:02Z"), StartedAt: utc("2023-01-10T13:50:05Z"), FinishedAt: utc("2023-01-10T13:50:54Z")}},
	} {
		t.Run(tc.file, func(t *testing.T) {
			got, err := ParseJobEvent(readTestdata(t, tc.file))
			if err != nil {
				t.Fatal(err)
			}
			if !got.CreatedAt.Equal(tc.want.CreatedAt) || !got.StartedAt.Equal(tc.want.StartedAt) || !got.FinishedAt.Equal(tc.want.FinishedAt) {
				t.Fatalf("times: got %v/%v/%v want %v/%v/%v", got.CreatedAt, got.StartedAt, got.FinishedAt,
					tc.want.CreatedAt, tc.want.StartedAt, tc.want.FinishedAt)
			}
			got.CreatedAt, got.StartedAt, got.FinishedAt = time.Time{}, time.Time{}, time.Time{}
			tc.want.CreatedAt, tc.want.StartedAt, tc.want.FinishedAt = time.Time{}, time.Time{}, time.Time{}
			if got != tc.want {
				t.Fatalf("got  %+v\nwant %+v", got, tc.want)
			}
		})
	}
}

func TestHandlerDeliversEvent(t *testing.T) {
	r := newRig(t)
	fixed := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	r.h.now = func() time.Time { return fixed }
	hdr := jobHdr(secret)
	hdr["X-Gitlab-Event-UUID"] = "13792a34-cac6-4fda-95a8-c58e00a3954e"
	w := r.do(http.MethodPost, hdr, readTestdata(t, "job_running.json"))
	if w.Code != http.StatusOK {
		t.Fatalf("status %d: %s", w.Code, w.Body)
	}
	if len(r.sink.events) != 1 {
		t.Fatalf("events: %d", len(r.sink.events))
	}
	ev := r.sink.events[0]
	if ev.JobID != 1977 || ev.Status != "running" || ev.RunnerID != 380987 || !ev.ReceivedAt.Equal(fixed) ||
		ev.DeliveryID != "13792a34-cac6-4fda-95a8-c58e00a3954e" || ev.Terminal() {
		t.Fatalf("event %+v", ev)
	}
	if r.events["job/running"] != 1 {
		t.Fatalf("event counter %v", r.events)
	}
}

func TestBadRequests(t *testing.T) {
	big := append([]byte(`{"object_kind":"build","build_id":1,"project_id":2,"build_status":"pending","pad":"`),
		bytes.Repeat([]byte("a"), 2048)...)
	big = append(big, `"}`...)
	for _, tc := range []struct {
		name   string
		method string
		body   []byte
		want   int
		reason string
		inBody string
	}{
		{"GET", http.MethodGet, nil, http.StatusMethodNotAllowed, ReasonMethod, "POST"},
		{"PUT", http.MethodPut, readTestdata(t, "job_pending.json"), http.StatusMethodNotAllowed, ReasonMethod, "POST"},
		{"not json", http.MethodPost, []byte("hello"), http.StatusBadRequest, ReasonMalformed, "invalid JSON"},
		{"truncated", http.MethodPost, []byte(`{"object_kind":"build","build_id":1`), http.StatusBadRequest, ReasonMalformed, "invalid JSON"},
		{"empty", http.MethodPost, nil, http.StatusBadRequest, ReasonMalformed, "invalid JSON"},
		{"array", http.MethodPost, []byte(`[1,2]`), http.StatusBadRequest, ReasonMalformed, "wrong type"},
		{"wrong kind", http.MethodPost, readTestdata(t, "push_hook.json"), http.StatusBadRequest, ReasonMalformed, "object_kind"},
		{"no build id", http.MethodPost, []byte(`{"object_kind":"build","project_id":2,"build_status":"pending"}`), http.StatusBadRequest, ReasonMalformed, "build_id"},
		{"negative build id", http.MethodPost, []byte(`{"object_kind":"build","build_id":-5,"project_id":2,"build_status":"pending"}`), http.StatusBadRequest, ReasonMalformed, "build_id"},
		{"string build id", http.MethodPost, []byte(`{"object_kind":"build","build_id":"7","project_id":2,"build_status":"pending"}`), http.StatusBadRequest, ReasonMalformed, "build_id"},
		{"no project", http.MethodPost, []byte(`{"object_kind":"build","build_id":1,"build_status":"pending"}`), http.StatusBadRequest, ReasonMalformed, "project_id"},
		{"no status", http.MethodPost, []byte(`{"object_kind":"build","build_id":1,"project_id":2}`), http.StatusBadRequest, ReasonMalformed, "build_status"},
		{"oversize", http.MethodPost, big, http.StatusRequestEntityTooLarge, ReasonTooLarge, "1024"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := newRig(t, WithMaxBody(1024))
			w := r.do(tc.method, jobHdr(secret), tc.body)
			if w.Code != tc.want {
				t.Fatalf("status %d, want %d (%s)", w.Code, tc.want, w.Body)
			}
			if !strings.Contains(w.Body.String(), tc.inBody) {
				t.Fatalf("body %q lacks %q", w.Body, tc.inBody)
			}
			if len(r.sink.events) != 0 {
				t.Fatal("bad request reached the sink")
			}
			if r.rejects[tc.reason] != 1 || len(r.rejects) != 1 {
				t.Fatalf("rejects %v, want %s", r.rejects, tc.reason)
			}
			if !strings.Contains(r.logs.String(), "reason="+tc.reason) {
				t.Fatalf("not logged: %s", r.logs)
			}
			if strings.Contains(r.logs.String(), secret) {
				t.Fatal("secret logged")
			}
		})
	}
}

func TestDefaultMaxBody(t *testing.T) {
	r := newRig(t)
	body := append([]byte(`{"pad":"`), bytes.Repeat([]byte("a"), DefaultMaxBody)...)
	body = append(body, `"}`...)
	if w := r.do(http.MethodPost, jobHdr(secret), body); w.Code != http.StatusRequestEntityTooLarge || r.rejects[ReasonTooLarge] != 1 ||
		!strings.Contains(w.Body.String(), "1048576") {
		t.Fatalf("status %d, rejects %v: %s", w.Code, r.rejects, w.Body)
	}
	// Just under the limit is read (and then rejected only as not a job).
	small := append([]byte(`{"object_kind":"build","build_id":1,"project_id":2,"build_status":"pending","pad":"`),
		bytes.Repeat([]byte("a"), DefaultMaxBody-200)...)
	small = append(small, `"}`...)
	if w := r.do(http.MethodPost, jobHdr(secret), small); w.Code != http.StatusOK {
		t.Fatalf("status %d: %s", w.Code, w.Body)
	}
}

func TestOtherEventsIgnored(t *testing.T) {
	for _, ev := range []string{"Push Hook", "Pipeline Hook", "job hook", ""} {
		t.Run(ev, func(t *testing.T) {
			r := newRig(t)
			h := jobHdr(secret)
			h["X-Gitlab-Event"] = ev
			w := r.do(http.MethodPost, h, readTestdata(t, "push_hook.json"))
			if w.Code < 200 || w.Code > 299 {
				t.Fatalf("status %d", w.Code)
			}
			if len(r.sink.events) != 0 || len(r.rejects) != 0 {
				t.Fatalf("events %v rejects %v", r.sink.events, r.rejects)
			}
			if r.events["other/ignored"] != 1 {
				t.Fatalf("event counter %v", r.events)
			}
		})
	}
	// Other events still need the token.
	r := newRig(t)
	h := jobHdr("nope")
	h["X-Gitlab-Event"] = "Push Hook"
	if w := r.do(http.MethodPost, h, nil); w.Code != http.StatusUnauthorized || r.rejects[ReasonUnauthorized] != 1 || len(r.rejects) != 1 {
		t.Fatalf("status %d, rejects %v", w.Code, r.rejects)
	}
}

func TestSinkErrorIs500(t *testing.T) {
	r := newRig(t)
	r.sink.err = errors.New("store unavailable")
	w := r.do(http.MethodPost, jobHdr(secret), readTestdata(t, "job_pending.json"))
	if w.Code != http.StatusInternalServerError {
		t.Fatalf("status %d", w.Code)
	}
	if r.rejects[ReasonSinkError] != 1 {
		t.Fatalf("rejects %v", r.rejects)
	}
	if strings.Contains(w.Body.String(), "store unavailable") {
		t.Fatal("internal error detail leaked to the client")
	}
	if !strings.Contains(r.logs.String(), "store unavailable") || !strings.Contains(r.logs.String(), "job_id=1977") {
		t.Fatalf("sink error not logged with job id: %s", r.logs)
	}
}

func TestUnknownStatusBoundedLabel(t *testing.T) {
	r := newRig(t)
	body := []byte(`{"object_kind":"build","build_id":1,"project_id":2,"build_status":"weird-new-status"}`)
	if w := r.do(http.MethodPost, jobHdr(secret), body); w.Code != http.StatusOK {
		t.Fatalf("status %d", w.Code)
	}
	if r.events["job/other"] != 1 {
		t.Fatalf("event counter %v", r.events)
	}
	if r.sink.events[0].Status != "weird-new-status" {
		t.Fatal("sink must see the raw status")
	}
}

func TestTimestampsLenient(t *testing.T) {
	for _, body := range []string{
		`{"object_kind":"build","build_id":1,"project_id":2,"build_status":"pending","build_started_at":"yesterday"}`,
		`{"object_kind":"build","build_id":1,"project_id":2,"build_status":"pending","build_started_at":12345}`,
		`{"object_kind":"build","build_id":1,"project_id":2,"build_status":"pending","build_started_at":null}`,
	} {
		ev, err := ParseJobEvent([]byte(body))
		if err != nil || !ev.StartedAt.IsZero() {
			t.Fatalf("%s: %v %v", body, ev.StartedAt, err)
		}
	}
	ev, err := ParseJobEvent([]byte(`{"object_kind":"build","build_id":1,"project_id":2,"build_status":"pending","build_started_at":"2025-05-21 16:06:02 UTC"}`))
	if err != nil || !ev.StartedAt.Equal(time.Date(2025, 5, 21, 16, 6, 2, 0, time.UTC)) {
		t.Fatalf("%v %v", ev.StartedAt, err)
	}
}

func TestTerminal(t *testing.T) {
	for st, want := range map[string]bool{"success": true, "failed": true, "canceled": true, "skipped": true,
		"pending": false, "running": false, "created": false, "canceling": false, "": false} {
		if (JobEvent{Status: st}).Terminal() != want {
			t.Errorf("%q: want %v", st, want)
		}
	}
}
