package controller

import (
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
	for _, id := range []int64{2001, 2002} {
		h.gl.addJob(stubJob{ID: id, ProjectID: 5, Tags: []string{tag2x4}})
		h.event(id, 5, "pending", 0)
	}
	a, b := h.waitStarted(2001), h.waitStarted(2002)
	h.take(2001, a)
	h.waitVMState(a.ID, job.VMBusy)

	h.event(2001, 5, "canceled", a.RunnerID) // forged: GitLab says running
	h.event(2002, 5, "running", 777)         // forged: GitLab says pending
	h.event(2002, 5, "success", 777)         // forged
	h.eventually("forged events counted", func() bool {
		m := h.metricsText()
		return strings.Contains(m, `firerunner_reconcile_actions_total{action="final_event_unconfirmed"}`) &&
			strings.Contains(m, `firerunner_reconcile_actions_total{action="pick_event_unconfirmed"}`)
	})
	if j := h.job(2001); j.State != job.Running || h.vm(a.ID).State != job.VMBusy || !h.vmRunning(a.ID) {
		t.Fatalf("forged cancel killed a running job: %s, vm %s", j.State, h.vm(a.ID).State)
	}
	if j := h.job(2002); j.State != job.Queued || h.vm(b.ID).State != job.VMStarting || !h.vmRunning(b.ID) {
		t.Fatalf("forged events stranded a waiting job: %s %q, vm %s", j.State, j.Reason, h.vm(b.ID).State)
	}
	if j := h.job(2002); j.GitLabStatus != job.StatusPending {
		t.Fatalf("GitLab's word did not replace the forged one: %q", j.GitLabStatus)
	}
	// The real ends still work.
	h.end(2001, a, "success")
	h.take(2002, b)
	h.end(2002, b, "success")
	for _, id := range []int64{2001, 2002} {
		if j := h.waitState(id, job.Done); j.Reason != job.ReasonSucceeded {
			t.Fatalf("job %d: %q", id, j.Reason)
		}
	}
	h.clean()
}
