// Package metrics holds FireRunner's Prometheus collectors and the /healthz
// and /readyz handlers.
package metrics

import (
	"context"
	"net/http"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

const ns = "firerunner"

// Snapshot is the gauge state read at scrape time from the controller, so
// gauges are always exact (and correct after a restart) without bookkeeping.
type Snapshot struct {
	JobsByState    map[string]int
	VMsByState     map[string]int // live VMs only
	PoolIdle       map[string]int // warm VMs ready, per pool size tag
	QueueDepth     int
	VMsRunning     int
	VCPUsInUse     int
	VCPUsCapacity  int
	MemoryMiBInUse int
	MemoryMiBCap   int
	RunnersByTags  map[string]int // live runners per canonical tag set
	PoolPolling    map[string]int // VMs polling GitLab on a pool's shared runner, per size tag
}

// Metrics are the collectors the controller, webhook handler and API client feed.
type Metrics struct {
	Registry *prometheus.Registry

	WebhookRejects  *prometheus.CounterVec // reason
	WebhookEvents   *prometheus.CounterVec // event, status
	APIErrors       *prometheus.CounterVec // op, status
	TagRejects      *prometheus.CounterVec // reason (impossible size tags)
	JobsFinished    *prometheus.CounterVec // outcome, reason
	RunnerLimitHits prometheus.Counter
	Reconcile       *prometheus.CounterVec // action
	StageDuration   *prometheus.HistogramVec
	Attempts        *prometheus.CounterVec // reason: failed attempts to get a job a VM
	VMsFinished     *prometheus.CounterVec // reason
	WebhookLatency  prometheus.Histogram   // time to answer POST /webhook
	PoolJobs        *prometheus.CounterVec // size, result (hit|miss)
	PoolHandovers   *prometheus.CounterVec // size: warm VMs given their pool's shared runner
	TokenRotations  prometheus.Counter     // shared runners' tokens rotated (restart, drain, pool removed)
	// A fleet on one PostgreSQL store: the host label tells the hosts'
	// series apart where Prometheus scrapes them all into one view.
	HostInfo *prometheus.GaugeVec   // host, backend: 1
	Fleet    *prometheus.CounterVec // host, event
}

// New registers all collectors on a fresh registry (plus Go/process
// collectors); snap is called at each scrape for the gauges.
func New(snap func() Snapshot) *Metrics {
	reg := prometheus.NewRegistry()
	m := &Metrics{
		Registry: reg,
		WebhookRejects: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Name: "webhook_rejects_total",
			Help: "Webhook deliveries rejected, by reason."}, []string{"reason"}),
		WebhookEvents: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Name: "webhook_events_total",
			Help: "Authenticated webhook deliveries, by event and job status."}, []string{"event", "status"}),
		APIErrors: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Name: "gitlab_api_errors_total",
			Help: "GitLab API errors (including retried ones), by operation and HTTP status (0 = transport)."}, []string{"op", "status"}),
		TagRejects: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Name: "tag_rejects_total",
			Help: "Jobs with an impossible firecracker size tag (left for other runners), by reason."}, []string{"reason"}),
		JobsFinished: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Name: "jobs_finished_total",
			Help: "Jobs that reached a terminal state, by outcome and reason."}, []string{"outcome", "reason"}),
		RunnerLimitHits: prometheus.NewCounter(prometheus.CounterOpts{Namespace: ns, Name: "runner_limit_errors_total",
			Help: "Runner creations refused because GitLab's runner cap was reached."}),
		Reconcile: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Name: "reconcile_actions_total",
			Help: "Corrections made by reconciliation, by action."}, []string{"action"}),
		StageDuration: prometheus.NewHistogramVec(prometheus.HistogramOpts{Namespace: ns, Name: "job_stage_duration_seconds",
			Help:    "Duration of each job lifecycle stage.",
			Buckets: []float64{.001, .005, .02, .1, .5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 14400}}, []string{"stage"}),
		Attempts: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Name: "job_attempts_failed_total",
			Help: "Failed attempts to get a job a VM whose runner takes it (the job is retried with back-off, then failed), by reason."}, []string{"reason"}),
		VMsFinished: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Name: "vms_finished_total",
			Help: "VMs torn down, by reason (ran_job, idle_runner, start_timeout, ...)."}, []string{"reason"}),
		WebhookLatency: prometheus.NewHistogram(prometheus.HistogramOpts{Namespace: ns, Name: "webhook_duration_seconds",
			Help:    "Time to answer a POST /webhook (GitLab waits 10 s at most).",
			Buckets: []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, 1, 5, 10}}),
		PoolJobs: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Name: "pool_jobs_total",
			Help: "Jobs of a pooled size: hit = took a warm VM, miss = booted cold (pool empty)."}, []string{"size", "result"}),
		PoolHandovers: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Name: "pool_handovers_total",
			Help: "Warm VMs handed their pool's shared runner (runners.mode pooled), by size."}, []string{"size"}),
		TokenRotations: prometheus.NewCounter(prometheus.CounterOpts{Namespace: ns, Name: "runner_token_rotations_total",
			Help: "Shared runners' tokens rotated so that no VM holding the old token can take a job (restart, drain, pool removed)."}),
		HostInfo: prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: ns, Name: "host_info",
			Help: "Always 1: this FireRunner's host id and store backend (sqlite, postgres), to join other series by host."}, []string{"host", "backend"}),
		Fleet: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Name: "fleet_events_total",
			Help: "Fleet coordination on a shared PostgreSQL store, by host and event (claimed, claim_lost, heartbeat_failed, reaped_host, job_requeued, job_host_lost, runner_deleted, was_reaped)."}, []string{"host", "event"}),
	}
	reg.MustRegister(m.WebhookRejects, m.WebhookEvents, m.APIErrors, m.TagRejects, m.JobsFinished,
		m.RunnerLimitHits, m.Reconcile, m.StageDuration, m.Attempts, m.VMsFinished, m.WebhookLatency, m.PoolJobs, m.PoolHandovers, m.TokenRotations, m.HostInfo, m.Fleet, &snapshotCollector{snap: snap},
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// APIErrorCounter adapts APIErrors to gitlabapi.WithErrorCounter.
func (m *Metrics) APIErrorCounter(op string, status int) {
	m.APIErrors.WithLabelValues(op, strconv.Itoa(status)).Inc()
}

// Handler serves /metrics.
func (m *Metrics) Handler() http.Handler {
	return promhttp.HandlerFor(m.Registry, promhttp.HandlerOpts{Registry: m.Registry})
}

var (
	descJobs    = prometheus.NewDesc(ns+"_jobs", "Jobs in the store, by state.", []string{"state"}, nil)
	descVMState = prometheus.NewDesc(ns+"_vms", "Live VMs, by state (pending, warm, starting, busy, stopping).", []string{"state"}, nil)
	descPool    = prometheus.NewDesc(ns+"_pool_idle_vms", "Warm VMs ready for a job, per pool size (they hold their vCPUs and memory).", []string{"size"}, nil)
	descQueue   = prometheus.NewDesc(ns+"_queue_depth", "Waiting jobs without a VM: no capacity yet, or backing off after a failed attempt.", nil, nil)
	descVMs     = prometheus.NewDesc(ns+"_vms_running", "VMs holding capacity.", nil, nil)
	descVCPU    = prometheus.NewDesc(ns+"_vcpus_in_use", "vCPUs handed to VMs.", nil, nil)
	descVCPUCap = prometheus.NewDesc(ns+"_vcpus_capacity", "vCPUs FireRunner may hand out.", nil, nil)
	descMem     = prometheus.NewDesc(ns+"_memory_mib_in_use", "Memory (MiB) handed to VMs.", nil, nil)
	descMemCap  = prometheus.NewDesc(ns+"_memory_mib_capacity", "Memory (MiB) FireRunner may hand out.", nil, nil)
	descRunners = prometheus.NewDesc(ns+"_runners", "Live GitLab runners FireRunner created, by tag set (a runner may run any job with these tags).", []string{"tags"}, nil)
	descPolling = prometheus.NewDesc(ns+"_pool_polling_vms", "VMs asking GitLab for a job on their pool's shared runner (runners.mode pooled), per size; they share its 2,000 job requests per minute.", []string{"size"}, nil)
)

type snapshotCollector struct{ snap func() Snapshot }

func (c *snapshotCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descJobs, descVMState, descPool, descQueue, descVMs, descVCPU, descVCPUCap, descMem, descMemCap, descRunners, descPolling} {
		ch <- d
	}
}

func (c *snapshotCollector) Collect(ch chan<- prometheus.Metric) {
	if c.snap == nil {
		return
	}
	s := c.snap()
	for st, n := range s.JobsByState {
		ch <- prometheus.MustNewConstMetric(descJobs, prometheus.GaugeValue, float64(n), st)
	}
	for st, n := range s.VMsByState {
		ch <- prometheus.MustNewConstMetric(descVMState, prometheus.GaugeValue, float64(n), st)
	}
	for size, n := range s.PoolIdle {
		ch <- prometheus.MustNewConstMetric(descPool, prometheus.GaugeValue, float64(n), size)
	}
	g := func(d *prometheus.Desc, v int) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, float64(v))
	}
	g(descQueue, s.QueueDepth)
	g(descVMs, s.VMsRunning)
	g(descVCPU, s.VCPUsInUse)
	g(descVCPUCap, s.VCPUsCapacity)
	g(descMem, s.MemoryMiBInUse)
	g(descMemCap, s.MemoryMiBCap)
	for t, n := range s.RunnersByTags {
		ch <- prometheus.MustNewConstMetric(descRunners, prometheus.GaugeValue, float64(n), t)
	}
	for size, n := range s.PoolPolling {
		ch <- prometheus.MustNewConstMetric(descPolling, prometheus.GaugeValue, float64(n), size)
	}
}

// Timed observes how long h takes to answer into hist.
func Timed(h http.Handler, hist prometheus.Observer) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		h.ServeHTTP(w, r)
		hist.Observe(time.Since(start).Seconds())
	})
}

// Healthz answers 200 while the process serves HTTP (liveness).
func Healthz() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		_, _ = w.Write([]byte("ok\n"))
	})
}

// Readyz answers 200 when check passes (store reachable, initial reconcile
// done, not draining), else 503 with the reason.
func Readyz(check func(ctx context.Context) error) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), 2*time.Second)
		defer cancel()
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		if err := check(ctx); err != nil {
			w.WriteHeader(http.StatusServiceUnavailable)
			_, _ = w.Write([]byte("not ready: " + err.Error() + "\n"))
			return
		}
		_, _ = w.Write([]byte("ready\n"))
	})
}
