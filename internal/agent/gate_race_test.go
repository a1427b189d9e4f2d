package agent

import (
	"bytes"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
)

// TestJobGateAnswerBeforeBodyEOF: when GitLab's answer reaches the gate
// while the gate's transport is still reading the request body (here the
// upstream answers before reading it; in VMs under TCG, the transport's
// last read, the one that sees EOF, came after the stand-in's quick
// answer), every answer must reach the client whole. Without full duplex
// net/http's server closed the request body at the answer's header, and
// the transport tore down the upstream connection mid-answer ("use of
// closed network connection"): gitlab-runner got a cut job payload while
// GitLab had marked the job running.
func TestJobGateAnswerBeforeBodyEOF(t *testing.T) {
	payload := bytes.Repeat([]byte("x"), 64<<10)
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		// Answer first, then read the rest of the body: the gate's
		// transport is then surely still sending (and reading) the body
		// when the answer's header reaches the gate.
		_ = http.NewResponseController(w).EnableFullDuplex()
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusOK)
		for i := 0; i < len(payload); i += 4096 {
			_, _ = w.Write(payload[i : i+4096])
			w.(http.Flusher).Flush()
		}
		_, _ = io.Copy(io.Discard, r.Body)
	}))
	defer up.Close()
	g, err := NewJobGate()
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	if err := g.SetTarget(up.URL); err != nil {
		t.Fatal(err)
	}
	body, _ := json.Marshal(map[string]any{"token": "t", "info": map[string]any{"name": strings.Repeat("n", 4<<20)}})
	cut := 0
	for i := 0; i < 20; i++ {
		resp, err := http.Post(g.URL()+"/api/v4/runners/verify", "application/json", bytes.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		got, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		if err != nil || len(got) != len(payload) {
			cut++
			if cut == 1 {
				t.Logf("request %d: %d of %d bytes, %v", i, len(got), len(payload), err)
			}
		}
	}
	if cut > 0 {
		t.Fatalf("%d of 20 answers were cut short", cut)
	}
}
