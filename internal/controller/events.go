package controller

import (
	"context"
	"errors"
	"time"

	"github.com/firerunner/firerunner/internal/job"
	"github.com/firerunner/firerunner/internal/store"
	"github.com/firerunner/firerunner/internal/webhook"
)

// HandleJobEvent implements webhook.Sink. It only persists what GitLab said
// and enqueues the job: one indexed write, no GitLab call, so GitLab gets
// its answer in milliseconds during start-up and drain alike (GitLab waits
// 10 s at most, may not redeliver, and disables a hook that keeps failing).
// It fails only when the store cannot take the event.
func (c *Controller) HandleJobEvent(ctx context.Context, ev webhook.JobEvent) error {
	at := ev.ReceivedAt
	if at.IsZero() {
		at = time.Now()
	}
	o := store.Observation{JobID: ev.JobID, ProjectID: ev.ProjectID, PipelineID: ev.PipelineID, ProjectPath: ev.ProjectPath,
		Name: ev.JobName, Ref: ev.Ref, Status: ev.Status, RunnerID: ev.RunnerID, Source: "webhook", At: at}
	switch {
	case ev.JobID == 0 || ev.ProjectID == 0:
		return nil
	case ev.Status == job.StatusPending:
		o.Create = true
	case ev.RunnerID != 0 && job.StatusRank(ev.Status) >= 2:
		// A runner of ours took a job we never saw pending (its hook was
		// lost, or its tags are a subset of ours without a size tag): the
		// record of what ran on our VM must exist.
		v, err := c.store.VMByRunner(ctx, ev.RunnerID)
		if err != nil && !errors.Is(err, store.ErrNotFound) {
			return err
		}
		o.Create = err == nil && (v.HostID == c.host || c.fleet) // in a fleet, any host's VM is the fleet's
	}
	known, changed, err := c.store.Observe(ctx, o)
	if err != nil {
		return err
	}
	if known && changed {
		c.q.Add(jobKey(ev.JobID))
	}
	return nil
}
