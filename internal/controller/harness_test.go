package controller

import (
	"bytes"
	"context"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/firerunner/firerunner/internal/config"
	"github.com/firerunner/firerunner/internal/gitlabapi"
	"github.com/firerunner/firerunner/internal/job"
	"github.com/firerunner/firerunner/internal/metrics"
	"github.com/firerunner/firerunner/internal/runners"
	"github.com/firerunner/firerunner/internal/scheduler"
	"github.com/firerunner/firerunner/internal/store"
	"github.com/firerunner/firerunner/internal/testenv"
	fake "github.com/firerunner/firerunner/internal/testsupport/fakevm"
	"github.com/firerunner/firerunner/internal/vm"
	"github.com/firerunner/firerunner/internal/webhook"
)

const testSecret = "webhook-secret-for-tests"

// harness is one FireRunner controller wired like serve.go does, against
// the GitLab stub, the fake driver and a real SQLite store.
type harness struct {
	t     *testing.T
	gl    *gitLabStub
	drv   *fake.Driver
	dir   string
	cfg   config.Config
	capa  scheduler.Capacity
	st    *store.Store
	c     *Controller
	web   *httptest.Server
	logs  *testenv.Buffer
	api   *gitlabapi.Client
	stopd bool
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
	h := &harness{t: t, gl: newGitLabStub(t), drv: fake.New(fake.Options{}), dir: t.TempDir(), logs: &testenv.Buffer{},
		capa: scheduler.Capacity{VCPUs: 16, MemoryMiB: 64 * 1024, MaxVMs: 8}}
	h.cfg = testConfig(h.gl.URL())
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
	st, err := store.Open(ctx, h.dir)
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
	prov, err := runners.NewOneOff(api, runners.OneOffConfig{Scope: h.cfg.Runners.Scope, GroupID: h.cfg.Runners.GroupID,
		MaximumTimeout: h.cfg.Runners.MaximumTimeout, DescriptionPrefix: h.cfg.Runners.DescriptionPrefix})
	if err != nil {
		t.Fatal(err)
	}
	c, err = New(Options{Config: h.cfg, Store: st, Driver: h.drv, GitLab: api, Runners: prov, Metrics: m, Logger: log,
		Capacity: h.capa, Image: vm.Image{Kernel: "/img/vmlinux", Initrd: "/img/initrd.img", Rootfs: "/img/rootfs.ext4"}})
	if err != nil {
		t.Fatal(err)
	}
	h.c = c
	if err := c.Start(ctx); err != nil {
		t.Fatal(err)
	}
	mux := http.NewServeMux()
	mux.Handle("/webhook", webhook.NewHandler(testSecret, c, webhook.WithLogger(log),
		webhook.WithRejectCounter(func(r string) { m.WebhookRejects.WithLabelValues(r).Inc() }),
		webhook.WithEventCounter(func(e, s string) { m.WebhookEvents.WithLabelValues(e, s).Inc() })))
	mux.Handle("/metrics", m.Handler())
	h.web = httptest.NewServer(mux)
	h.stopd = false
	t.Cleanup(h.stop)
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

func (h *harness) event(jobID, projectID int64, status string, runnerID int64) {
	h.t.Helper()
	if code := h.post(jobHook(jobID, projectID, status, runnerID), testSecret, "Job Hook"); code != http.StatusOK {
		h.t.Fatalf("webhook %s for job %d: HTTP %d", status, jobID, code)
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
	j, err := h.st.Get(context.Background(), id)
	if err != nil {
		h.t.Fatalf("job %d: %v", id, err)
	}
	return j
}

func (h *harness) waitState(id int64, want job.State) job.Job {
	h.t.Helper()
	var j job.Job
	h.eventually("job "+job.VMIDFor(id)+" in state "+string(want), func() bool {
		var err error
		j, err = h.st.Get(context.Background(), id)
		return err == nil && j.State == want
	})
	return j
}

// waitStarted waits until the job's VM has been started by the driver.
func (h *harness) waitStarted(id int64) job.Job {
	h.t.Helper()
	var j job.Job
	h.eventually("vm of job "+job.VMIDFor(id)+" started", func() bool {
		var err error
		j, err = h.st.Get(context.Background(), id)
		return err == nil && (j.State == job.VMStarting || j.State == job.Running) && h.vmRunning(job.VMIDFor(id))
	})
	return j
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
	all, err := h.st.List(context.Background(), store.Filter{})
	if err != nil {
		h.t.Fatal(err)
	}
	return len(all)
}
