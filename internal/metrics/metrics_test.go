package metrics

import (
	"context"
	"errors"
	"io"
	"net/http/httptest"
	"strings"
	"testing"
)

func TestHandlers(t *testing.T) {
	m := New(func() Snapshot {
		return Snapshot{JobsByState: map[string]int{"queued": 3}, QueueDepth: 3, VCPUsCapacity: 8, RunnersByTags: map[string]int{"firecracker-2cpu-4gb": 2}}
	})
	m.APIErrorCounter("create_runner", 503)
	m.WebhookRejects.WithLabelValues("unauthorized").Inc()
	rec := httptest.NewRecorder()
	m.Handler().ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	body, _ := io.ReadAll(rec.Body)
	for _, want := range []string{`firerunner_jobs{state="queued"} 3`, "firerunner_queue_depth 3", "firerunner_vcpus_capacity 8",
		`firerunner_runners{tags="firecracker-2cpu-4gb"} 2`, `firerunner_gitlab_api_errors_total{op="create_runner",status="503"} 1`,
		`firerunner_webhook_rejects_total{reason="unauthorized"} 1`} {
		if !strings.Contains(string(body), want) {
			t.Errorf("missing %s", want)
		}
	}
	rec = httptest.NewRecorder()
	Healthz().ServeHTTP(rec, httptest.NewRequest("GET", "/healthz", nil))
	if rec.Code != 200 {
		t.Fatal(rec.Code)
	}
	ready := errors.New("draining")
	h := Readyz(func(context.Context) error { return ready })
	rec = httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest("GET", "/readyz", nil))
	if rec.Code != 503 || !strings.Contains(rec.Body.String(), "draining") {
		t.Fatalf("readyz while draining: %d %s", rec.Code, rec.Body.String())
	}
	ready = nil
	rec = httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest("GET", "/readyz", nil))
	if rec.Code != 200 {
		t.Fatalf("readyz: %d", rec.Code)
	}
}
