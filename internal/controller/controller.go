// Package controller is FireRunner's reconciler: events only enqueue a key
// (a job, a VM, or the plan) and one Reconcile per key takes the next step.
//
// Desired state is the store plus what GitLab says about each job (its
// status and the runner that took it); actual state is the host's VMs and
// networks and GitLab's runners. Keys go through a de-duplicating work queue
// with per-key exponential back-off, so a key is never reconciled by two
// workers at once and always again after its latest event. Every state
// change is a named operation of internal/job, persisted before the
// controller acts on it, so a restart only has to reconcile every active key.
//
//   - jobs.go:   a job's reconcile: read its tags, follow GitLab's status,
//     retry or give up, record who ran it and how it ended.
//   - vms.go:    a VM's reconcile: create its runner, start it, watch it,
//     stop it, clean up.
//   - plan.go:   the plan's reconcile: how many VMs of which tags
//     (internal/planner, pure) and carrying that out.
//   - events.go: webhook intake: persist the observation, enqueue the key.
//   - sweep.go:  periodic resync, orphans, and the backstop poll.
package controller

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/firerunner/firerunner/internal/config"
	"github.com/firerunner/firerunner/internal/gitlabapi"
	"github.com/firerunner/firerunner/internal/guestconfig"
	"github.com/firerunner/firerunner/internal/job"
	"github.com/firerunner/firerunner/internal/metrics"
	"github.com/firerunner/firerunner/internal/planner"
	"github.com/firerunner/firerunner/internal/runners"
	"github.com/firerunner/firerunner/internal/store"
	"github.com/firerunner/firerunner/internal/tags"
	"github.com/firerunner/firerunner/internal/vm"
	"github.com/firerunner/firerunner/internal/workqueue"
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
	// PauseRunner makes GitLab give the runner no new job (before an idle
	// VM is stopped); a job it took runs on.
	PauseRunner(ctx context.Context, runnerID int64) error
	// ManagerJobs lists the jobs one runner manager (a VM's system_id) of
	// a shared runner took.
	ManagerJobs(ctx context.Context, runnerID int64, systemID string) ([]gitlabapi.Job, error)
	// ResetRunnerToken rotates a runner's token (the old one dies at once).
	ResetRunnerToken(ctx context.Context, runnerID int64) (string, error)
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
	HostID   string // this host's id (runner ownership); required
	Store    *store.Store
	Driver   vm.Driver
	Image    vm.Image
	GitLab   GitLab
	Runners  runners.Provider
	Network  Network          // nil = user-mode networking
	Metrics  *metrics.Metrics // nil = a private registry
	Logger   *slog.Logger     // nil = slog.Default()
	Capacity planner.Capacity // zero = computed from Config.Capacity and the host
	Workers  int              // reconcile workers; 0 = 16
}

// kind is what a queue key names.
type kind uint8

const (
	kindJob kind = iota + 1
	kindVM
	kindPlan
)

// key is one thing to reconcile.
type key struct {
	kind kind
	job  int64
	vm   string
}

func jobKey(id int64) key { return key{kind: kindJob, job: id} }
func vmKey(id string) key { return key{kind: kindVM, vm: id} }
func (k key) String() string {
	switch k.kind {
	case kindJob:
		return fmt.Sprintf("job/%d", k.job)
	case kindVM:
		return "vm/" + k.vm
	}
	return "plan"
}

var planKey = key{kind: kindPlan}

// Controller serves jobs. It implements webhook.Sink.
type Controller struct {
	cfg      config.Config
	host     string
	store    *store.Store
	drv      vm.Driver
	img      vm.Image
	gl       GitLab
	prov     runners.Provider
	net      Network
	m        *metrics.Metrics
	log      *slog.Logger
	capacity planner.Capacity
	tagLim   tags.Limits
	workers  int
	pools    map[[2]int]config.Pool // by VCPUs, MemoryMiB
	// poolProv hands out pools' shared runners (runners.mode pooled; nil
	// otherwise), pooledSize the sizes that have one (their size tag).
	poolProv   runners.Pools
	pooledSize map[[2]int]string

	// fleet: the store is PostgreSQL, shared with other hosts (fleet.go).
	// Jobs are claimed, only this host's VMs are planned and supervised
	// here, hosts heartbeat, and the backstop poll has one leader.
	fleet     bool
	hbStop    chan struct{}
	hbWG      sync.WaitGroup
	hbOnce    sync.Once
	poked     map[int64]bool // unclaimed waiting jobs this host told the fleet about
	startedAt time.Time

	q       *workqueue.Queue[key]
	baseCtx context.Context
	cancel  context.CancelFunc

	started  atomic.Bool // initial sweep done (readiness)
	draining atomic.Bool // SIGTERM received: no new VMs
	running  sync.WaitGroup
	watchWG  sync.WaitGroup
	stopLoop chan struct{}
	stopOnce sync.Once

	mu       sync.Mutex
	watchers map[string]context.CancelFunc // VMs whose VMM is being waited for
	surplus  map[string]bool               // idle VMs the last plan found no job for
	paused   map[string]bool               // idle VMs being stopped: their runner is paused
	checked  map[int64]time.Time           // last time a job's status was read from GitLab
	waiting  int                           // jobs the last plan left waiting for capacity
	// Pooled mode: VMs this process handed a shared runner's token to, and
	// shared runners whose token this process rotated (so no VM of an
	// earlier process can take a job with it), also since the drain began.
	// pollerGrace is how long after its gitlab-runner's wait timeout a
	// pool's VM on a shared runner may take to end by itself (a job request
	// GitLab holds open, a slow guest) before the host steps in.
	pollerGrace  time.Duration
	handed       map[string]bool
	rotated      map[int64]bool
	drainRotated map[int64]bool
}

// New builds a controller; call Start to begin reconciling.
func New(o Options) (*Controller, error) {
	if o.Store == nil || o.Driver == nil || o.GitLab == nil || o.Runners == nil {
		return nil, errors.New("controller: store, driver, gitlab and runners are required")
	}
	if o.HostID == "" {
		return nil, errors.New("controller: host id is required")
	}
	c := &Controller{
		cfg: o.Config, host: o.HostID, store: o.Store, drv: o.Driver, img: o.Image, gl: o.GitLab, prov: o.Runners,
		net: o.Network, log: o.Logger, m: o.Metrics, capacity: o.Capacity, workers: o.Workers,
		tagLim:   tags.Limits{MaxVCPUs: o.Config.Capacity.MaxVCPUsPerVM, MaxMemoryGiB: o.Config.Capacity.MaxMemoryGiBPerVM},
		q:        workqueue.New[key](workqueue.Exponential(200*time.Millisecond, 30*time.Second)),
		stopLoop: make(chan struct{}), watchers: map[string]context.CancelFunc{}, surplus: map[string]bool{}, paused: map[string]bool{},
		checked: map[int64]time.Time{}, handed: map[string]bool{}, rotated: map[int64]bool{}, drainRotated: map[int64]bool{},
		pooledSize: map[[2]int]string{}, pollerGrace: time.Minute,
		fleet: o.Store.Backend() == "postgres", hbStop: make(chan struct{}), startedAt: time.Now(), poked: map[int64]bool{},
	}
	if c.log == nil {
		c.log = slog.Default()
	}
	c.pools = map[[2]int]config.Pool{}
	for _, p := range o.Config.Pools {
		size, ok, err := tags.Parse([]string{p.Size}, c.tagLim)
		if err != nil || !ok {
			return nil, fmt.Errorf("controller: pool size %q: %v", p.Size, err)
		}
		c.pools[[2]int{size.VCPUs, size.MemoryMiB()}] = p
		if pp, ok := o.Runners.(runners.Pools); ok && o.Config.Runners.Mode == "pooled" && pp.Pooled(size.Tag()) {
			c.poolProv = pp
			c.pooledSize[[2]int{size.VCPUs, size.MemoryMiB()}] = size.Tag()
		}
	}
	if pp, ok := o.Runners.(runners.Pools); ok && o.Config.Runners.Mode == "pooled" {
		c.poolProv = pp // also without pools: VMs of removed pools still need their tokens rotated
	}
	if _, ok := o.Driver.(vm.Assigner); len(c.pools) > 0 && !ok {
		return nil, fmt.Errorf("controller: driver %s cannot keep warm VMs (pools)", o.Driver.Name())
	}
	if c.workers == 0 {
		c.workers = 16
	}
	if c.capacity == (planner.Capacity{}) {
		cc := o.Config.Capacity
		var err error
		if c.capacity, err = planner.HostCapacity(cc.VCPUs, cc.MemoryMiB, cc.ReserveVCPUs, cc.ReserveMemoryMiB, cc.MaxVMs); err != nil {
			return nil, err
		}
	}
	if c.m == nil {
		c.m = metrics.New(c.Snapshot)
	}
	c.baseCtx, c.cancel = context.WithCancel(context.Background())
	return c, nil
}

// Metrics returns the collectors (for /metrics and the webhook handler).
func (c *Controller) Metrics() *metrics.Metrics { return c.m }

// Capacity is what VMs may use on this host.
func (c *Controller) Capacity() planner.Capacity { return c.capacity }

// Start prepares the runner provider, sweeps once (orphans, every active
// key enqueued: a restart is just that), starts the workers and the
// periodic sweep, and returns. Events may arrive before: they are persisted
// and wait in the queue.
func (c *Controller) Start(ctx context.Context) error {
	if err := c.prov.Init(ctx); err != nil {
		return fmt.Errorf("runner provider: %w", err)
	}
	if c.fleet {
		// Join before the first sweep: a host without a lease may not claim.
		if err := c.heartbeat(ctx); err != nil {
			return fmt.Errorf("joining the fleet: %w", err)
		}
		c.hbWG.Add(2)
		go c.fleetLoop()
		go func() {
			defer c.hbWG.Done()
			// Another host could not take a job: plan now, not at the next heartbeat.
			c.store.Listen(c.baseCtx, func() { c.q.Add(planKey) })
		}()
	}
	if err := c.sweep(ctx); err != nil {
		return fmt.Errorf("initial reconcile: %w", err)
	}
	for range c.workers {
		c.running.Add(1)
		go c.work()
	}
	c.running.Add(1)
	go c.sweepLoop()
	c.started.Store(true)
	c.log.Info("controller started", "host_id", c.host, "capacity_vcpus", c.capacity.VCPUs, "capacity_memory_mib", c.capacity.MemoryMiB,
		"max_vms", c.capacity.MaxVMs, "driver", c.drv.Name(), "runners", c.prov.Name(), "workers", c.workers)
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

// work is one reconcile worker.
func (c *Controller) work() {
	defer c.running.Done()
	for {
		k, ok := c.q.Get()
		if !ok {
			return
		}
		err := c.reconcile(k)
		switch {
		case errors.Is(err, job.ErrStale):
			c.q.Add(k) // another event moved the record first: decide again
		case err != nil && c.baseCtx.Err() == nil:
			n := c.q.Failures(k) + 1
			lvl := slog.LevelWarn
			if n > 5 {
				lvl = slog.LevelError
			}
			c.log.Log(c.baseCtx, lvl, "reconcile failed; retrying with back-off", "key", k.String(), "failures", n, "err", err)
			c.m.Reconcile.WithLabelValues("retry").Inc()
			c.q.AddRateLimited(k)
		default:
			c.q.Forget(k)
		}
		c.q.Done(k)
	}
}

func (c *Controller) reconcile(k key) error {
	ctx := c.baseCtx
	switch k.kind {
	case kindJob:
		return c.reconcileJob(ctx, k.job)
	case kindVM:
		return c.reconcileVM(ctx, k.vm)
	case kindPlan:
		return c.reconcilePlan(ctx)
	}
	return nil
}

// Snapshot feeds the metrics gauges (read at scrape time, always exact).
func (c *Controller) Snapshot() metrics.Snapshot {
	s := metrics.Snapshot{JobsByState: map[string]int{}, VMsByState: map[string]int{}, RunnersByTags: map[string]int{}, PoolIdle: map[string]int{},
		PoolPolling:   map[string]int{},
		VCPUsCapacity: c.capacity.VCPUs, MemoryMiBCap: c.capacity.MemoryMiB}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	for _, k := range job.States {
		s.JobsByState[string(k)] = 0
	}
	for _, k := range job.VMStates[:len(job.VMStates)-1] {
		s.VMsByState[string(k)] = 0
	}
	if jobs, _, err := c.store.Count(ctx); err == nil {
		for k, n := range jobs {
			s.JobsByState[string(k)] = n
		}
	}
	for _, p := range c.cfg.Pools {
		s.PoolIdle[p.Size] = 0
	}
	for _, tag := range c.pooledSize {
		s.PoolPolling[tag] = 0
	}
	shared := map[int64]bool{} // a pool's runner counts once, however many VMs use it
	if live, err := c.liveVMs(ctx); err == nil {
		for _, v := range live {
			if v.Pooled() && v.State == job.VMStarting && v.Timeline.Exited.IsZero() && len(v.Tags) > 0 {
				s.PoolPolling[v.Tags[0]]++
			}
			if v.Pooled() {
				if !shared[v.RunnerID] {
					shared[v.RunnerID] = true
					s.RunnersByTags[tags.Key(v.Tags)]++
				}
				s.VMsByState[string(v.State)]++
				s.VMsRunning++
				s.VCPUsInUse += v.VCPUs
				s.MemoryMiBInUse += v.MemoryMiB
				continue
			}
			if v.Warm() && v.State == job.VMWarm {
				s.PoolIdle[tags.Size{VCPUs: v.VCPUs, MemoryGiB: v.MemoryMiB / 1024}.Tag()]++
			}
			s.VMsByState[string(v.State)]++
			s.VMsRunning++
			s.VCPUsInUse += v.VCPUs
			s.MemoryMiBInUse += v.MemoryMiB
			if v.RunnerID != 0 && v.Timeline.RunnerDeleted.IsZero() {
				s.RunnersByTags[tags.Key(v.Tags)]++
			}
		}
	}
	c.mu.Lock()
	s.QueueDepth = c.waiting
	c.mu.Unlock()
	return s
}

// Shutdown drains: no new VMs; VMs keep running (and idle ones may still
// take their jobs) for up to limits.drain_timeout; then every VM left is
// stopped with reason shutdown and cleaned up (bounded by ctx). Webhooks
// are still accepted and persisted throughout: jobs that are still queued
// are served after the next start.
func (c *Controller) Shutdown(ctx context.Context) error {
	c.draining.Store(true)
	c.stopOnce.Do(func() { close(c.stopLoop) })
	c.q.Add(planKey)      // pending VMs are dropped, nothing new starts
	c.enqueuePollers(ctx) // VMs on shared runners stop unless they took a job
	c.log.Info("draining: waiting for running vms", "drain_timeout", c.cfg.Limits.DrainTimeout.String())
	drainCtx, cancel := context.WithTimeout(ctx, c.cfg.Limits.DrainTimeout)
	err := c.waitNoVMs(drainCtx)
	cancel()
	if err != nil {
		live, _ := c.liveVMs(context.WithoutCancel(ctx))
		c.log.Warn("drain timeout: stopping remaining vms", "vms", len(live))
		live = c.pauseIdleBeforeStop(context.WithoutCancel(ctx), live)
		for _, v := range live {
			if err := c.stopFor(context.WithoutCancel(ctx), v.ID, job.ReasonShutdown+": drain timeout reached"); err != nil {
				c.log.Error("stopping vm at shutdown failed", "vm_id", v.ID, "err", err)
			}
		}
		err = c.waitNoVMs(ctx)
	}
	c.q.ShutDown()
	c.running.Wait()
	c.cancel()
	c.watchWG.Wait()
	if perr := c.prov.Shutdown(context.WithoutCancel(ctx)); perr != nil && err == nil {
		err = perr
	}
	if c.fleet {
		c.leaveFleet(context.WithoutCancel(ctx), err == nil)
	}
	if err != nil {
		return fmt.Errorf("shutdown: cleanup not finished: %w (reconcile finishes it on next start)", err)
	}
	c.log.Info("drained: no vms left")
	return nil
}

// pauseIdleBeforeStop pauses the runners of one-off VMs that have not
// taken a job yet, then asks GitLab whether they took one: such a runner
// polls until its VM is gone, and a job handed to it in the drain's last
// instant would die with the VM unrecorded (stuck "running" in GitLab
// until its timeout). A job found is recorded on its VM, so the stop below
// fails it with reason shutdown and the records say what happened. Each
// call is bounded: GitLab being down must not hold the shutdown. It
// returns the VMs re-read after the picks.
func (c *Controller) pauseIdleBeforeStop(ctx context.Context, live []job.VM) []job.VM {
	picked := false
	for _, v := range live {
		if v.State == job.VMBusy || v.PickedJobID != 0 || v.RunnerID == 0 || v.Pooled() {
			continue
		}
		cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		if !c.isPaused(v.ID) {
			if err := c.gl.PauseRunner(cctx, v.RunnerID); err != nil && !gitlabapi.IsNotFound(err) {
				c.vmLog(v).Warn("drain timeout: cannot pause the idle vm's runner; stopping it all the same", "err", err)
			} else {
				c.setPaused(v.ID)
			}
		}
		jobs, err := c.gl.RunnerJobs(cctx, v.RunnerID)
		cancel()
		if err != nil || len(jobs) == 0 {
			continue
		}
		if err := c.pickFromGitLab(ctx, v, jobs[0]); err != nil && !errors.Is(err, job.ErrStale) {
			c.vmLog(v).Warn("drain timeout: recording the job the idle vm's runner took failed", "job_id", jobs[0].ID, "err", err)
		}
		picked = true
	}
	if !picked {
		return live
	}
	if again, err := c.liveVMs(ctx); err == nil {
		return again
	}
	return live
}

// waitNoVMs waits until the store has no live VM, or ctx ends.
func (c *Controller) waitNoVMs(ctx context.Context) error {
	t := time.NewTicker(20 * time.Millisecond)
	defer t.Stop()
	for {
		live, err := c.liveVMs(ctx)
		if err == nil && len(live) == 0 {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
		}
	}
}

// backoff is the wait before a job's next attempt after n failed ones.
func (c *Controller) backoff(n int) time.Duration {
	return workqueue.Exponential(c.cfg.Limits.RetryBackoff, 2*time.Minute)(n)
}
