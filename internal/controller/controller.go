// Package controller is FireRunner's core: it turns job webhooks into a
// one-off runner plus a VM per job and reconciles store, GitLab and host.
//
// Desired state is the store (internal/store); actual state is GitLab's
// runners and the host's VMs and networks. Every step is idempotent and
// persisted before it acts (the VM id is stored before the VM starts), so a
// crash at any point is repaired by reconcile on the next start.
package controller

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/firerunner/firerunner/internal/config"
	"github.com/firerunner/firerunner/internal/gitlabapi"
	"github.com/firerunner/firerunner/internal/guestconfig"
	"github.com/firerunner/firerunner/internal/job"
	"github.com/firerunner/firerunner/internal/metrics"
	"github.com/firerunner/firerunner/internal/runners"
	"github.com/firerunner/firerunner/internal/scheduler"
	"github.com/firerunner/firerunner/internal/store"
	"github.com/firerunner/firerunner/internal/tags"
	"github.com/firerunner/firerunner/internal/vm"
	"github.com/firerunner/firerunner/internal/webhook"
)

// Network prepares per-VM networking (tap mode, internal/netsetup). A nil
// Network means the driver's user-mode networking (QEMU dev/test only).
type Network interface {
	// Attach creates (or returns the existing) tap and address of a VM.
	Attach(ctx context.Context, vmID string) (*vm.NetAttachment, *guestconfig.Network, error)
	// Release removes the VM's network state; unknown ids are not an error.
	Release(ctx context.Context, vmID string) error
	// List returns the VM ids that have network state on the host.
	List(ctx context.Context) ([]string, error)
}

// GitLab is the part of the API client the controller reads jobs with
// (*gitlabapi.Client).
type GitLab interface {
	GetJob(ctx context.Context, projectID, jobID int64) (gitlabapi.Job, error)
	ListPendingJobs(ctx context.Context, projectID int64) ([]gitlabapi.Job, error)
	ListGroupProjects(ctx context.Context, groupID int64) ([]int64, error)
	RunnerJobs(ctx context.Context, runnerID int64) ([]gitlabapi.Job, error)
}

// APIHTTPClient is the HTTP client for the GitLab API: Go's default keeps
// only 2 idle connections per host, so concurrent jobs would re-dial GitLab
// (TCP + TLS) on the latency path.
func APIHTTPClient() *http.Client {
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.MaxIdleConns = 128
	tr.MaxIdleConnsPerHost = 64
	return &http.Client{Transport: tr}
}

// Options wires a controller.
type Options struct {
	Config   config.Config
	Store    *store.Store
	Driver   vm.Driver
	Image    vm.Image
	GitLab   GitLab
	Runners  runners.Provider
	Network  Network            // nil = user-mode networking
	Metrics  *metrics.Metrics   // nil = a private registry
	Logger   *slog.Logger       // nil = slog.Default()
	Capacity scheduler.Capacity // zero = computed from Config.Capacity and the host
}

// Controller serves jobs. It implements webhook.Sink.
type Controller struct {
	cfg     config.Config
	store   *store.Store
	drv     vm.Driver
	img     vm.Image
	gl      GitLab
	prov    runners.Provider
	net     Network
	m       *metrics.Metrics
	log     *slog.Logger
	sched   *scheduler.Scheduler
	tagLim  tags.Limits
	baseCtx context.Context
	cancel  context.CancelFunc

	mu    sync.Mutex
	tasks map[int64]*task // jobs with a live worker goroutine

	accepting atomic.Bool // intake open
	draining  atomic.Bool // SIGTERM received: no new VMs
	started   atomic.Bool // initial reconcile done (readiness)
	workers   sync.WaitGroup
	loops     sync.WaitGroup
	stopLoop  chan struct{}
	stopOnce  sync.Once

	reapMu      sync.Mutex         // one idle-runner count at a time
	ended       map[int64]endedJob // jobs GitLab reported finished (or no longer pending)
	endedPruned time.Time          // entries older than displacedWindow last dropped

	reconcileMu sync.Mutex     // one reconcile pass at a time
	recheck     map[int64]bool // queued jobs resumed from the store: re-check GitLab when admitted
}

// task is the in-memory handle of a job's worker.
type task struct {
	jobID   int64
	resumed bool // from the store after a restart (re-check GitLab first)
	stop    chan struct{}
	picked  chan struct{}
	once    sync.Once
	pOnce   sync.Once
	outcome job.State
	reason  string
}

func newTask(id int64, resumed bool) *task {
	return &task{jobID: id, resumed: resumed, stop: make(chan struct{}), picked: make(chan struct{})}
}

// requestStop asks the worker to tear the job down with this outcome; the
// first request wins.
func (t *task) requestStop(outcome job.State, reason string) {
	t.once.Do(func() {
		t.outcome, t.reason = outcome, reason
		close(t.stop)
	})
}

func (t *task) markPicked() { t.pOnce.Do(func() { close(t.picked) }) }

// New builds a controller; call Start before serving webhooks.
func New(o Options) (*Controller, error) {
	if o.Store == nil || o.Driver == nil || o.GitLab == nil || o.Runners == nil {
		return nil, errors.New("controller: store, driver, gitlab and runners are required")
	}
	c := &Controller{
		cfg: o.Config, store: o.Store, drv: o.Driver, img: o.Image, gl: o.GitLab, prov: o.Runners,
		net: o.Network, log: o.Logger, tasks: map[int64]*task{}, ended: map[int64]endedJob{}, stopLoop: make(chan struct{}),
		tagLim: tags.Limits{MaxVCPUs: o.Config.Capacity.MaxVCPUsPerVM, MaxMemoryGiB: o.Config.Capacity.MaxMemoryGiBPerVM},
	}
	if c.log == nil {
		c.log = slog.Default()
	}
	capacity := o.Capacity
	if capacity == (scheduler.Capacity{}) {
		cc := o.Config.Capacity
		var err error
		if capacity, err = scheduler.HostCapacity(cc.VCPUs, cc.MemoryMiB, cc.ReserveVCPUs, cc.ReserveMemoryMiB, cc.MaxVMs); err != nil {
			return nil, err
		}
	}
	c.sched = scheduler.New(capacity, c.admit)
	c.m = o.Metrics
	if c.m == nil {
		c.m = metrics.New(c.Snapshot)
	}
	c.baseCtx, c.cancel = context.WithCancel(context.Background())
	return c, nil
}

// Metrics returns the collectors (for /metrics and the webhook handler).
func (c *Controller) Metrics() *metrics.Metrics { return c.m }

// Capacity returns the scheduler's capacity.
func (c *Controller) Capacity() scheduler.Capacity { return c.sched.Stats().Capacity }

// Start resumes the jobs the store has in flight, reconciles once, opens
// intake and starts the periodic reconcile loop.
func (c *Controller) Start(ctx context.Context) error {
	if err := c.resume(ctx); err != nil {
		return fmt.Errorf("resume jobs: %w", err)
	}
	c.ReconcileOnce(ctx)
	c.accepting.Store(true)
	c.started.Store(true)
	c.loops.Add(1)
	go c.reconcileLoop()
	c.log.Info("controller started", "capacity_vcpus", c.Capacity().VCPUs, "capacity_memory_mib", c.Capacity().MemoryMiB,
		"max_vms", c.Capacity().MaxVMs, "driver", c.drv.Name(), "runners", c.prov.Name())
	return nil
}

// Ready is the /readyz check.
func (c *Controller) Ready(ctx context.Context) error {
	switch {
	case !c.started.Load():
		return errors.New("starting (initial reconcile not done)")
	case c.draining.Load():
		return errors.New("draining for shutdown")
	}
	return c.store.Ping(ctx)
}

// Snapshot feeds the metrics gauges.
func (c *Controller) Snapshot() metrics.Snapshot {
	st := c.sched.Stats()
	s := metrics.Snapshot{
		JobsByState: map[string]int{}, RunnersByTags: map[string]int{},
		QueueDepth: st.Queued, VMsRunning: st.VMs, VCPUsInUse: st.VCPUsUsed, VCPUsCapacity: st.Capacity.VCPUs,
		MemoryMiBInUse: st.MemoryMiBUsed, MemoryMiBCap: st.Capacity.MemoryMiB,
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	for _, k := range job.States {
		s.JobsByState[string(k)] = 0
	}
	if counts, err := c.store.CountByState(ctx); err == nil {
		for k, n := range counts {
			s.JobsByState[string(k)] = n
		}
	}
	if act, err := c.store.List(ctx, store.Filter{ActiveOnly: true}); err == nil {
		for _, j := range act {
			if j.RunnerID != 0 {
				s.RunnersByTags[runners.TagSetKey(j.Tags)]++
			}
		}
	}
	return s
}

// jobLog returns the logger every line about a job uses.
func (c *Controller) jobLog(j job.Job) *slog.Logger {
	return c.log.With("job_id", j.ID, "project", j.ProjectPath, "project_id", j.ProjectID, "vm_id", j.VMID)
}

// HandleJobEvent implements webhook.Sink. Returning an error makes GitLab
// redeliver, so it only does so for transient problems.
func (c *Controller) HandleJobEvent(ctx context.Context, ev webhook.JobEvent) error {
	switch ev.Status {
	case "pending":
		return c.onPending(ctx, ev)
	case "running":
		c.onRunning(ctx, ev)
	case "success", "failed", "canceled":
		c.onFinished(ctx, ev)
	}
	return nil
}

var errShuttingDown = errors.New("firerunner is shutting down; redeliver later")

func (c *Controller) onPending(ctx context.Context, ev webhook.JobEvent) error {
	if _, err := c.store.Get(ctx, ev.JobID); err == nil {
		return nil // duplicate delivery or a job we already served: one VM per job id
	} else if !errors.Is(err, store.ErrNotFound) {
		return err
	}
	if !c.accepting.Load() {
		return errShuttingDown
	}
	log := c.log.With("job_id", ev.JobID, "project", ev.ProjectPath, "project_id", ev.ProjectID)
	// The Job Hook does not carry the job's tags (runner.tags are the
	// runner's), so read them from the API.
	gj, err := c.gl.GetJob(ctx, ev.ProjectID, ev.JobID)
	if err != nil {
		if gitlabapi.IsNotFound(err) || gitlabapi.IsPermanent(err) {
			log.Error("cannot read job tags; job ignored", "err", err)
			return nil // retrying the delivery cannot help
		}
		log.Warn("reading job tags failed; asking GitLab to redeliver", "err", err)
		return err
	}
	if gj.Status != "" && gj.Status != "pending" {
		log.Debug("job no longer pending; ignored", "status", gj.Status)
		return nil
	}
	received := ev.ReceivedAt
	if received.IsZero() {
		received = time.Now()
	}
	c.intake(ctx, log, gj, ev.ProjectPath, ev.PipelineID, "webhook", received)
	return nil
}

// intake parses the tags and queues the job if it is ours; it reports
// whether a new job record was created.
func (c *Controller) intake(ctx context.Context, log *slog.Logger, gj gitlabapi.Job, projectPath string, pipelineID int64, source string, received time.Time) bool {
	tagsAt := time.Now()
	size, ok, err := tags.Parse(gj.TagList, c.tagLim)
	if err != nil {
		reason := "invalid"
		var te *tags.Error
		if errors.As(err, &te) {
			reason = te.Reason
		}
		c.m.TagRejects.WithLabelValues(reason).Inc()
		log.Warn("impossible firecracker size tag: no VM, job left for other runners", "tags", gj.TagList, "err", err)
		return false
	}
	if !ok {
		log.Debug("job has no firecracker size tag; not ours", "tags", gj.TagList)
		return false
	}
	j := job.Job{
		ID: gj.ID, ProjectID: gj.ProjectID, ProjectPath: projectPath, PipelineID: pipelineID, Name: gj.Name, Ref: gj.Ref,
		Tags: gj.TagList, SizeTag: size.Tag(), VCPUs: size.VCPUs, MemoryMiB: size.MemoryMiB(), Source: source, State: job.Queued,
		Timeline: job.Timeline{WebhookReceived: received, TagsFetched: tagsAt},
	}
	if j.ID == 0 {
		return false
	}
	j, created, err := c.store.Create(ctx, j)
	if err != nil {
		log.Error("storing job failed", "err", err)
		return false
	}
	if !created {
		return false // raced with another delivery or the poll
	}
	c.jobLog(j).Info("job queued", "size", j.SizeTag, "source", source)
	c.enqueue(ctx, j)
	return true
}

func (c *Controller) enqueue(ctx context.Context, j job.Job) {
	err := c.sched.Enqueue(scheduler.Request{ID: j.ID, VCPUs: j.VCPUs, MemoryMiB: j.MemoryMiB})
	switch {
	case err == nil, errors.Is(err, scheduler.ErrDuplicate), errors.Is(err, scheduler.ErrClosed):
	case errors.Is(err, scheduler.ErrTooBig):
		c.finishWithoutResources(ctx, j.ID, job.Failed, job.ReasonTooBig+": "+err.Error())
	default:
		c.jobLog(j).Error("enqueue failed", "err", err)
	}
}

// finishWithoutResources ends a queued job that never got a runner or VM.
func (c *Controller) finishWithoutResources(ctx context.Context, id int64, outcome job.State, reason string) {
	j, err := c.store.Update(ctx, id, func(j *job.Job) error {
		if j.State != job.Queued {
			return errNotQueued
		}
		j.State, j.Outcome, j.Reason = outcome, outcome, reason
		return nil
	})
	if err != nil {
		if !errors.Is(err, errNotQueued) {
			c.log.Error("finishing queued job failed", "job_id", id, "err", err)
		}
		return
	}
	c.finished(j)
}

var errNotQueued = errors.New("not queued")

// onRunning records that a runner picked a job; the event's runner id tells
// which of our VMs runs it (not necessarily the one created for this job).
func (c *Controller) onRunning(ctx context.Context, ev webhook.JobEvent) {
	if ev.RunnerID == 0 {
		return
	}
	j, err := c.store.FindByRunner(ctx, ev.RunnerID)
	if err != nil || j.State.Terminal() {
		return
	}
	j, err = c.store.Update(ctx, j.ID, func(r *job.Job) error {
		if r.PickedJobID == 0 {
			r.PickedJobID = ev.JobID
			r.Timeline.JobPicked = time.Now()
		}
		if r.State == job.VMStarting {
			r.State = job.Running
			r.Reason = ""
		}
		return nil
	})
	if err != nil {
		return
	}
	if ev.JobID != j.ID {
		c.jobLog(j).Info("runner picked a different job with the same tags", "picked_job_id", ev.JobID, "runner_id", ev.RunnerID)
	}
	if t := c.task(j.ID); t != nil {
		t.markPicked()
	}
}

// onFinished tears down the VM that ran the job, and any VM (or queued job)
// whose runner has nothing left to run.
func (c *Controller) onFinished(ctx context.Context, ev webhook.JobEvent) {
	outcome, reason := outcomeOf(ev.Status)
	// The VM that ran the job: found by the runner that ran it.
	if ev.RunnerID != 0 {
		if j, err := c.store.FindByRunner(ctx, ev.RunnerID); err == nil && j.State.Active() {
			c.stopJob(ctx, j, outcome, reason, ev.JobID)
		}
	}
	own, err := c.store.Get(ctx, ev.JobID)
	if err != nil {
		return // not ours
	}
	if own.State.Terminal() && (own.PickedJobID == 0 || own.PickedJobID == own.ID) {
		return // already over; a displaced job that ended may free a spare runner below
	}
	c.reapIdle(ctx, own, outcome, reason)
}

// displacedWindow bounds how long a displaced job is looked for: GitLab
// fails jobs left pending this long ("stuck").
const displacedWindow = 24 * time.Hour

// endedJob is a job GitLab reported finished, remembered for displacedWindow.
type endedJob struct {
	at      time.Time
	outcome job.State
	reason  string
}

// reapIdle keeps one runner for every job still waiting for one, per tag
// set, and stops the rest. A runner made for job A may run job B with the
// same tags, so runners are counted per tag set:
//   - waiting: a job whose own VM runs (or ran) another job and that no VM
//     of ours picked: its own VM's cleanup, or a displaced record GitLab
//     still holds pending;
//   - spare: an idle VM whose own job ended or ran elsewhere, and a queued
//     job that ended before it got a VM (its runner would still serve a
//     waiting job).
//
// Spares beyond the waiting jobs go: queued ones first (they hold no
// runner yet), then idle VMs, the ended job's own first, then the newest.
func (c *Controller) reapIdle(ctx context.Context, ended job.Job, outcome job.State, reason string) {
	c.reapMu.Lock()
	defer c.reapMu.Unlock()
	now := time.Now()
	c.ended[ended.ID] = endedJob{at: now, outcome: outcome, reason: reason}
	if now.Sub(c.endedPruned) > time.Minute {
		c.endedPruned = now
		for id, e := range c.ended {
			if now.Sub(e.at) > displacedWindow {
				delete(c.ended, id)
			}
		}
	}
	active, err := c.store.List(ctx, store.Filter{ActiveOnly: true})
	if err != nil {
		c.log.Error("listing jobs to find idle runners failed", "err", err)
		return
	}
	displaced, err := c.store.Displaced(ctx, now.Add(-displacedWindow))
	if err != nil {
		c.log.Error("listing displaced jobs failed", "err", err)
		return
	}
	picked := map[int64]bool{}
	for _, r := range active {
		if r.PickedJobID != 0 {
			picked[r.PickedJobID] = true
		}
	}
	served := func(id int64) bool {
		_, over := c.ended[id]
		return over || picked[id]
	}
	var spares []job.Job
	waiting := 0
	seen := map[int64]bool{}
	for _, r := range active {
		seen[r.ID] = true
		if !sameTagSet(r.Tags, ended.Tags) {
			continue
		}
		_, over := c.ended[r.ID]
		switch {
		case r.State == job.Queued:
			if over {
				spares = append(spares, r)
			} // else it brings its own runner when admitted
		case r.State == job.VMStarting && r.PickedJobID == 0 && !c.stopping(r.ID):
			if served(r.ID) {
				spares = append(spares, r)
			}
		case r.PickedJobID != 0 && r.PickedJobID != r.ID && !served(r.ID):
			waiting++ // its own VM runs another job (or is being torn down)
		}
	}
	for _, r := range displaced {
		// seen: counted above, finished between the two reads.
		if !seen[r.ID] && sameTagSet(r.Tags, ended.Tags) && !served(r.ID) && c.stillPending(ctx, r) {
			waiting++
		}
	}
	slices.SortStableFunc(spares, func(a, b job.Job) int {
		aq, bq := a.State == job.Queued, b.State == job.Queued
		switch {
		case aq && !bq:
			return -1
		case bq && !aq:
			return 1
		case a.ID == ended.ID:
			return -1
		case b.ID == ended.ID:
			return 1
		}
		return b.CreatedAt.Compare(a.CreatedAt)
	})
	for i := 0; i < len(spares)-waiting; i++ {
		r := spares[i]
		switch {
		case r.ID == ended.ID:
			c.stopJob(ctx, r, outcome, reason, ended.ID)
		case r.State == job.Queued:
			e := c.ended[r.ID]
			c.stopJob(ctx, r, e.outcome, e.reason, ended.ID)
		default:
			c.jobLog(r).Info("runner idle: its job ran on another of our VMs and no job with its tags is waiting", "ended_job_id", ended.ID)
			c.stopJob(ctx, r, job.Done, job.ReasonIdleRunner, ended.ID)
		}
	}
	if n := min(waiting, len(spares)); n > 0 {
		c.log.Debug("runners kept for jobs whose own VM ran another job", "tags", ended.Tags, "waiting", waiting, "kept", n)
	}
}

// stillPending asks GitLab whether a displaced job still waits for a
// runner; a job that does not is remembered as over. When GitLab cannot
// answer, the job counts as waiting: an idle VM costs less than a lost job.
func (c *Controller) stillPending(ctx context.Context, r job.Job) bool {
	gj, err := c.gl.GetJob(ctx, r.ProjectID, r.ID)
	switch {
	case err == nil && gj.Status == "pending":
		return true
	case err == nil || c.gone(err):
		outcome, reason := outcomeOf(gj.Status)
		c.ended[r.ID] = endedJob{at: time.Now(), outcome: outcome, reason: reason}
		return false
	}
	c.log.Warn("cannot tell whether a displaced job still waits; keeping a runner for it", "job_id", r.ID, "err", err)
	return true
}

// stopping reports whether the job's worker was already asked to stop.
func (c *Controller) stopping(id int64) bool {
	t := c.task(id)
	if t == nil {
		return false
	}
	select {
	case <-t.stop:
		return true
	default:
		return false
	}
}

// sameTagSet compares tag lists as sets (runners get the job's exact tags).
func sameTagSet(a, b []string) bool {
	x, y := slices.Clone(a), slices.Clone(b)
	slices.Sort(x)
	slices.Sort(y)
	return slices.Equal(slices.Compact(x), slices.Compact(y))
}

// outcomeOf maps a finished GitLab job status to our outcome.
func outcomeOf(status string) (job.State, string) {
	switch status {
	case "failed":
		return job.Failed, job.ReasonJobFailed
	case "canceled":
		return job.Canceled, job.ReasonJobCanceled
	}
	return job.Done, job.ReasonJobSucceeded
}

func (c *Controller) stopJob(ctx context.Context, j job.Job, outcome job.State, reason string, eventJobID int64) {
	if j.State == job.Queued && c.sched.Remove(j.ID) {
		c.finishWithoutResources(ctx, j.ID, outcome, reason)
		return
	}
	if t := c.task(j.ID); t != nil {
		c.jobLog(j).Info("job ended in GitLab; tearing VM down", "status_job_id", eventJobID, "outcome", outcome)
		t.requestStop(outcome, reason)
	}
}

func (c *Controller) task(id int64) *task {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.tasks[id]
}

// admit is the scheduler's callback: the job got capacity, run it.
func (c *Controller) admit(r scheduler.Request) {
	c.spawn(r.ID, false)
}

func (c *Controller) spawn(id int64, resumed bool) {
	c.mu.Lock()
	if _, ok := c.tasks[id]; ok {
		c.mu.Unlock()
		return
	}
	t := newTask(id, resumed || c.recheck[id])
	delete(c.recheck, id)
	c.tasks[id] = t
	c.workers.Add(1)
	c.mu.Unlock()
	go c.runJob(t)
}

// newEntropy returns a seed for the guest RNG.
func newEntropy() []byte {
	b := make([]byte, 32)
	_, _ = rand.Read(b)
	return b
}
