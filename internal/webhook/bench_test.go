package webhook

import (
	"bytes"
	"context"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"testing"
)

type nopSink struct{}

func (nopSink) HandleJobEvent(context.Context, JobEvent) error { return nil }

// BenchmarkHandler measures the intake's own cost per delivery: auth, body
// limit, parse, hand-off to a sink that does nothing.
func BenchmarkHandler(b *testing.B) {
	body, err := os.ReadFile("testdata/job_pending.json")
	if err != nil {
		b.Fatal(err)
	}
	h := NewHandler(secret, nopSink{}, WithLogger(slog.New(slog.DiscardHandler)))
	b.ReportAllocs()
	b.SetBytes(int64(len(body)))
	for b.Loop() {
		req := httptest.NewRequest(http.MethodPost, "/webhook", bytes.NewReader(body))
		req.Header.Set("X-Gitlab-Token", secret)
		req.Header.Set("X-Gitlab-Event", JobHookEvent)
		w := httptest.NewRecorder()
		h.ServeHTTP(w, req)
		if w.Code != http.StatusOK {
			b.Fatal(w.Code)
		}
	}
}
