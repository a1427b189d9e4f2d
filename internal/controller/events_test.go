package controller

import (
	"encoding/json"
	"strings"
	"testing"

	"github.com/firerunner/firerunner/internal/job"
)

// TestForgedEventsDoNotKillJobs: whoever sniffed the webhook secret can
// send "canceled", "success" or "running" for any job. FireRunner confirms a
// final status, and a pick by a runner that is not its own, with GitLab
// before acting: a running job keeps its VM, a waiting job keeps its VM.
func TestForgedEventsDoNotKillJobs(t *testing.T) {
	h := newHarness(t, nil)
	ja, jb := h.newJob(tag2x4), h.newJob(tag2x4)
	a, b := h.waitStarted(ja), h.waitStarted(jb)
	h.take(ja, a)
	h.waitVMState(a.ID, job.VMBusy)

	h.deliver(ja, forged(t, h.gl.hook(ja), "canceled", a.RunnerID)) // GitLab says running
	h.deliver(jb, forged(t, h.gl.hook(jb), "running", 777))         // GitLab says pending
	h.deliver(jb, forged(t, h.gl.hook(jb), "success", 777))
	h.eventually("forged events counted", func() bool {
		m := h.metricsText()
		return strings.Contains(m, `firerunner_reconcile_actions_total{action="final_event_unconfirmed"}`) &&
			strings.Contains(m, `firerunner_reconcile_actions_total{action="pick_event_unconfirmed"}`)
	})
	if j := h.job(ja); j.State != job.Running || h.vm(a.ID).State != job.VMBusy || !h.vmRunning(a.ID) {
		t.Fatalf("forged cancel killed a running job: %s, vm %s", j.State, h.vm(a.ID).State)
	}
	if j := h.job(jb); j.State != job.Queued || h.vm(b.ID).State != job.VMStarting || !h.vmRunning(b.ID) {
		t.Fatalf("forged events stranded a waiting job: %s %q, vm %s", j.State, j.Reason, h.vm(b.ID).State)
	}
	if j := h.job(jb); j.GitLabStatus != job.StatusPending {
		t.Fatalf("GitLab's word did not replace the forged one: %q", j.GitLabStatus)
	}
	// The real ends still work.
	h.end(ja, a, "success")
	h.take(jb, b)
	h.end(jb, b, "success")
	for _, id := range []int64{ja, jb} {
		if j := h.waitState(id, job.Done); j.Reason != job.ReasonSucceeded {
			t.Fatalf("job %d: %q", id, j.Reason)
		}
	}
	h.clean()
}

// forged rewrites a real Job Hook body as one with another status and
// runner, as whoever sniffed the webhook secret could send.
func forged(t *testing.T, body []byte, status string, runnerID int64) []byte {
	t.Helper()
	var m map[string]any
	if err := json.Unmarshal(body, &m); err != nil {
		t.Fatal(err)
	}
	m["build_status"] = status
	m["runner"] = map[string]any{"id": runnerID, "description": "x", "runner_type": "project_type", "active": true, "is_shared": false, "tags": []string{}}
	b, err := json.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	return b
}
