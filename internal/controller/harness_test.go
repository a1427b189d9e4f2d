package controller

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/firerunner/firerunner/internal/config"
	"github.com/firerunner/firerunner/internal/gitlabapi"
	"github.com/firerunner/firerunner/internal/job"
	"github.com/firerunner/firerunner/internal/metrics"
	"github.com/firerunner/firerunner/internal/planner"
	"github.com/firerunner/firerunner/internal/runners"
	"github.com/firerunner/firerunner/internal/store"
	"github.com/firerunner/firerunner/internal/tags"
	"github.com/firerunner/firerunner/internal/testenv"
	fake "github.com/firerunner/firerunner/internal/testsupport/fakevm"
	"github.com/firerunner/firerunner/internal/testsupport/pgtest"
	"github.com/firerunner/firerunner/internal/vm"
	"github.com/firerunner/firerunner/internal/webhook"
)

const (
	testSecret = "webhook-secret-for-tests"
	testHost   = "test-host"
)

// harness is one FireRunner controller wired like serve.go does, against
// the GitLab stand-in, the fake driver and a real SQLite store.
type harness struct {
	t   *testing.T
	gl  *gitLab
	drv *fake.Driver
	// driver, when set, is what the controller gets instead of drv (a
	// wrapper around it); drv stays the fake host the tests look at.
	driver vm.Driver
	dir    string
	cfg    config.Config
	capa   planner.Capacity
	net    Network // nil: user-mode networking
	pid    int64   // the project new jobs are added to
	st     *store.Store
	// beforeStart runs after the webhook server is up, before Start.
	beforeStart func(h *harness)
	c           *Controller
	web         *httptest.Server
	logs        *testenv.Buffer
	api         *gitlabapi.Client
	stopd       bool
	pollerGrace time.Duration // pooled mode: Controller.pollerGrace (0: its default)
	// dsn, when set, puts the store in that PostgreSQL database (fleet
	// mode) instead of SQLite in dir; host is the host id ("" = testHost).
	dsn  string
	host string
}

// onPostgres makes newHarness put its store in a fresh PostgreSQL database
// (TestOnPostgres runs existing tests that way).
var onPostgres bool

func (h *harness) hostID() string {
	if h.host != "" {
		return h.host
	}
	return testHost
}

func testConfig(glURL string) config.Config {
	cfg := config.Default()
	cfg.GitLab.URL = glURL
	cfg.GitLab.GuestURL = "http://10.0.2.2:8929"
	cfg.Limits.JobMaxDuration = time.Hour
	cfg.Limits.VMStartTimeout = time.Hour
	cfg.Limits.DrainTimeout = 300 * time.Millisecond
	cfg.Reconcile.Interval = time.Hour // tests call ReconcileOnce explicitly
	cfg.VM.Driver = "fake"
	cfg.Network.Mode = "user"
	return cfg
}

func newHarness(t *testing.T, mod func(h *harness)) *harness {
	t.Helper()
	h := &harness{t: t, gl: newGitLab(t), drv: fake.New(fake.Options{}), dir: t.TempDir(), logs: &testenv.Buffer{},
		capa: planner.Capacity{VCPUs: 16, MemoryMiB: 64 * 1024, MaxVMs: 8}}
	h.pid = h.gl.proj.ID
	h.cfg = testConfig(h.gl.URL())
	if onPostgres {
		h.dsn = pgtest.NewDatabase(t)
	}
	if mod != nil {
		mod(h)
	}
	h.start()
	return h
}

// start (re)creates the controller on the harness's store dir and driver.
func (h *harness) start() {
	t := h.t
	t.Helper()
	ctx := context.Background()
	var st *store.Store
	var err error
	if h.dsn != "" {
		h.cfg.State.Backend = "postgres"
		st, err = store.OpenPostgres(ctx, h.dsn)
	} else {
		st, err = store.Open(ctx, h.dir)
	}
	if err != nil {
		t.Fatal(err)
	}
	h.st = st
	log := slog.New(slog.NewTextHandler(h.logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	var c *Controller
	m := metrics.New(func() metrics.Snapshot { return c.Snapshot() })
	api, err := gitlabapi.New(h.cfg.GitLab.URL, h.gl.token, gitlabapi.WithRetries(3), gitlabapi.WithBackoff(time.Millisecond, 5*time.Millisecond),
		gitlabapi.WithLogger(log), gitlabapi.WithErrorCounter(m.APIErrorCounter), gitlabapi.WithTimeout(5*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	h.api = api
	oc := runners.OneOffConfig{Scope: h.cfg.Runners.Scope, GroupID: h.cfg.Runners.GroupID,
		MaximumTimeout: h.cfg.Runners.MaximumTimeout, DescriptionPrefix: h.cfg.Runners.DescriptionPrefix, HostID: h.hostID()}
	var prov runners.Provider
	if h.cfg.Runners.Mode == "pooled" {
		pc := runners.PooledConfig{OneOffConfig: oc}
		for _, p := range h.cfg.Pools {
			pc.Pools = append(pc.Pools, sizeOf(t, p.Size).Tag())
		}
		prov, err = runners.NewPooled(api, pc)
	} else {
		prov, err = runners.NewOneOff(api, oc)
	}
	if err != nil {
		t.Fatal(err)
	}
	var drv vm.Driver = h.drv
	if h.driver != nil {
		drv = h.driver
	}
	c, err = New(Options{Config: h.cfg, HostID: h.hostID(), Store: st, Driver: drv, GitLab: api, Runners: prov, Metrics: m, Logger: log,
		Capacity: h.capa, Network: h.net, Image: vm.Image{Kernel: "/img/vmlinux", Initrd: "/img/initrd.img", Rootfs: "/img/rootfs.ext4"}})
	if err != nil {
		t.Fatal(err)
	}
	if h.pollerGrace != 0 {
		c.pollerGrace = h.pollerGrace
	}
	h.c = c
	// Serving first, like the daemon: hooks that come during start-up are
	// persisted and wait in the queue.
	mux := http.NewServeMux()
	mux.Handle("/webhook", metrics.Timed(webhook.NewHandler(testSecret, c, webhook.WithLogger(log),
		webhook.WithRejectCounter(func(r string) { m.WebhookRejects.WithLabelValues(r).Inc() }),
		webhook.WithEventCounter(func(e, s string) { m.WebhookEvents.WithLabelValues(e, s).Inc() })), m.WebhookLatency))
	mux.Handle("/metrics", m.Handler())
	h.web = httptest.NewServer(mux)
	h.stopd = false
	t.Cleanup(h.stop)
	if h.beforeStart != nil {
		h.beforeStart(h)
	}
	if err := c.Start(ctx); err != nil {
		t.Fatal(err)
	}
}

// crash leaves the store, the fake host and GitLab as kill -9 would: the
// controller's goroutines stop and nothing is cleaned up.
func (h *harness) crash() {
	h.stopd = true
	h.web.Close()
	h.c.stopOnce.Do(func() { close(h.c.stopLoop) })
	h.c.q.ShutDown()
	h.c.running.Wait()
	h.c.cancel()
	h.c.watchWG.Wait()
	h.c.hbOnce.Do(func() { close(h.c.hbStop) })
	h.c.hbWG.Wait()
	h.st.Close()
}

// stop shuts the controller down gracefully (idempotent).
func (h *harness) stop() {
	if h.stopd {
		return
	}
	h.stopd = true
	h.web.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := h.c.Shutdown(ctx); err != nil {
		h.t.Errorf("shutdown: %v", err)
	}
	h.st.Close()
	if strings.Contains(h.logs.String(), "glrt-") || strings.Contains(h.logs.String(), h.gl.token) || strings.Contains(h.logs.String(), testSecret) {
		h.t.Errorf("a secret reached the logs:\n%s", h.logs.String())
	}
}

// post delivers a webhook like GitLab does.
func (h *harness) post(body []byte, token, event string) int {
	h.t.Helper()
	req, _ := http.NewRequest(http.MethodPost, h.web.URL+"/webhook", bytes.NewReader(body))
	if token != "" {
		req.Header.Set("X-Gitlab-Token", token)
	}
	req.Header.Set("X-Gitlab-Event", event)
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		h.t.Fatal(err)
	}
	resp.Body.Close()
	return resp.StatusCode
}

// newJob adds a pending job with tags to GitLab (project h.pid) and sends
// its "pending" hook; it returns the job's id.
func (h *harness) newJob(tags ...string) int64 {
	h.t.Helper()
	id := h.gl.newJob(h.pid, tags...)
	h.event(id)
	return id
}

// event delivers the Job Hook GitLab sends for job id's current state.
func (h *harness) event(id int64) {
	h.t.Helper()
	h.deliver(id, h.gl.hook(id))
}

// deliver posts a Job Hook body (maybe an old one: a redelivery).
func (h *harness) deliver(id int64, body []byte) {
	h.t.Helper()
	if code := h.post(body, testSecret, "Job Hook"); code != http.StatusOK {
		h.t.Fatalf("webhook for job %d: HTTP %d", id, code)
	}
}

// eventually polls cond (no timing assertion: the deadline only bounds a hang).
func (h *harness) eventually(what string, cond func() bool) {
	h.t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			h.t.Fatalf("timed out waiting for %s\nlogs:\n%s", what, h.logs.String())
		}
		time.Sleep(2 * time.Millisecond)
	}
}

func (h *harness) job(id int64) job.Job {
	h.t.Helper()
	j, err := h.st.GetJob(context.Background(), id)
	if err != nil {
		h.t.Fatalf("job %d: %v", id, err)
	}
	return j
}

func (h *harness) waitState(id int64, want job.State) job.Job {
	h.t.Helper()
	var j job.Job
	h.eventually(fmt.Sprintf("job %d in state %s", id, want), func() bool {
		var err error
		j, err = h.st.GetJob(context.Background(), id)
		return err == nil && j.State == want
	})
	return j
}

// vms returns the VM records of a job: started for it or that ran it.
func (h *harness) vms(jobID int64) []job.VM {
	h.t.Helper()
	vs, err := h.st.ListVMs(context.Background(), false, jobID)
	if err != nil {
		h.t.Fatal(err)
	}
	return vs
}

// waitStarted waits until a VM started for the job runs on the fake host
// with its runner, and returns it.
func (h *harness) waitStarted(jobID int64) job.VM {
	h.t.Helper()
	var v job.VM
	h.eventually(fmt.Sprintf("a vm for job %d started", jobID), func() bool {
		for _, x := range h.vms(jobID) {
			if x.ForJob == jobID && (x.State == job.VMStarting || x.State == job.VMBusy) && !x.Timeline.Started.IsZero() && h.vmRunning(x.ID) {
				v = x
				return true
			}
		}
		return false
	})
	return v
}

func (h *harness) vm(id string) job.VM {
	h.t.Helper()
	v, err := h.st.GetVM(context.Background(), id)
	if err != nil {
		h.t.Fatalf("vm %s: %v", id, err)
	}
	return v
}

func (h *harness) waitVMState(id string, want job.VMState) job.VM {
	h.t.Helper()
	var v job.VM
	h.eventually(fmt.Sprintf("vm %s in state %s", id, want), func() bool {
		var err error
		v, err = h.st.GetVM(context.Background(), id)
		return err == nil && v.State == want
	})
	return v
}

func (h *harness) vmRunning(vmID string) bool {
	list, _ := h.drv.List(context.Background())
	for _, in := range list {
		if in.ID == vmID {
			return true
		}
	}
	return false
}

// clean asserts nothing is left: no VM on the host, no live VM record, no
// runner in GitLab (but keep), no active runner record.
func (h *harness) clean(keep ...int64) {
	h.t.Helper()
	h.eventually("nothing left", func() bool {
		list, _ := h.drv.List(context.Background())
		live, _ := h.st.ListVMs(context.Background(), true, 0)
		rs, _ := h.st.ListRunners(context.Background(), true)
		n := 0
		for _, r := range h.gl.runnerList() {
			if !slices.Contains(keep, r.ID) && r.Description != "someone else's runner" {
				n++
			}
		}
		return len(list) == 0 && len(live) == 0 && len(rs) == 0 && n == 0
	})
}

func (h *harness) metricsText() string {
	resp, err := http.Get(h.web.URL + "/metrics")
	if err != nil {
		h.t.Fatal(err)
	}
	defer resp.Body.Close()
	var b bytes.Buffer
	_, _ = b.ReadFrom(resp.Body)
	return b.String()
}

func (h *harness) jobCount() int {
	all, err := h.st.ListJobs(context.Background(), store.Filter{})
	if err != nil {
		h.t.Fatal(err)
	}
	return len(all)
}

func sizeOf(t *testing.T, tag string) tags.Size {
	t.Helper()
	s, ok, err := tags.Parse([]string{tag}, tags.Limits{})
	if !ok || err != nil {
		t.Fatalf("size tag %q: %v", tag, err)
	}
	return s
}
