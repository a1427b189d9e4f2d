package demo

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/firerunner/firerunner/internal/daemon"
	"github.com/firerunner/firerunner/internal/job"
	"github.com/firerunner/firerunner/internal/store"
	"github.com/firerunner/firerunner/internal/testenv"
	"github.com/firerunner/firerunner/internal/testsupport/gitlabstandin"
	"github.com/firerunner/firerunner/internal/testsupport/pgtest"
)

func TestMain(m *testing.M) { os.Exit(pgtest.Main(m)) }

// TestFleetRealVMs: two FireRunner hosts (real QEMU VMs, the real
// gitlab-runner in each) sharing one PostgreSQL database, with room for one
// VM each. GitLab sends every webhook to host A only; host B finds the jobs
// A has no room for. Four jobs: each succeeds once, both hosts serve some,
// each job's record names the VM (and host) that ran it, nothing is left.
func TestFleetRealVMs(t *testing.T) {
	testenv.RequireRoot(t)
	testenv.QEMU(t)
	dir := testenv.ImageDir(t)
	requireRunnerImage(t, dir)
	dsnFile := pgtest.DSNFile(t, t.TempDir(), pgtest.NewDatabase(t))
	logs := &testenv.Buffer{}
	log := slog.New(slog.NewJSONHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	work := t.TempDir()
	gl, err := gitlabstandin.New(gitlabstandin.Options{Addr: "127.0.0.1:0", ExternalHost: "10.0.2.2",
		Dir: filepath.Join(work, "gitlab"), Logger: log.With("component", "gitlab-standin")})
	if err != nil {
		t.Fatal(err)
	}
	defer gl.Close()
	apiTok, secret := "glpat-"+randHex(10), randHex(16)
	gl.AddToken(apiTok, gitlabstandin.ScopeAPI)
	proj, err := gl.AddProject(gitlabstandin.ProjectSpec{Path: "demo/app", Files: Files})
	if err != nil {
		t.Fatal(err)
	}
	_, port, _ := net.SplitHostPort(gl.Addr())
	var hosts []*daemon.Daemon
	for _, id := range []string{"fleet-a", "fleet-b"} {
		o := Options{ImageDir: dir, WorkDir: filepath.Join(work, id), VCPUs: 3, MemoryMiB: 3072}
		cfg, err := Config(o, "http://127.0.0.1:"+port, gl.URL(), apiTok, secret)
		if err != nil {
			t.Fatal(err)
		}
		cfg.HostID = id
		cfg.Capacity.MaxVMs = 1
		cfg.Reconcile.Interval = 2 * time.Second
		cfg.Limits.DrainTimeout = 3 * time.Second
		cfg.State.Backend, cfg.State.PostgresDSNFile = "postgres", dsnFile
		cfg.State.HeartbeatInterval, cfg.State.HostLease = 500*time.Millisecond, 5*time.Second
		if err := cfg.Validate(daemon.Drivers()); err != nil {
			t.Fatal(err)
		}
		d, err := daemon.Start(context.Background(), cfg, log.With("host", id))
		if err != nil {
			t.Fatal(err)
		}
		hosts = append(hosts, d)
		defer func() {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			if err := d.Shutdown(ctx); err != nil {
				t.Errorf("shutdown %s: %v", id, err)
			}
		}()
	}
	gl.SetWebhook("http://"+hosts[0].Addr()+"/webhook", secret)
	s := "firecracker-1cpu-1gb"
	var specs []gitlabstandin.JobSpec
	for i := 1; i <= 4; i++ {
		name := fmt.Sprintf("job-%d", i)
		specs = append(specs, gitlabstandin.JobSpec{Name: name, Tags: []string{s}, Script: []string{fmt.Sprintf(`echo "%s ran on $(hostname)"`, name)}})
	}
	pl, err := gl.CreatePipeline(proj.ID, specs...)
	if err != nil {
		t.Fatal(err)
	}
	st := hosts[0].Store
	ctx := context.Background()
	deadline := time.Now().Add(8 * time.Minute)
	byHost := map[string]int{}
	for _, id := range pl.JobIDs {
		var js gitlabstandin.JobState
		var rec job.Job
		for {
			js, _ = gl.Job(id)
			rec, _ = st.GetJob(ctx, id)
			if job.StatusFinal(js.Status) && rec.State.Terminal() {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("job %d: GitLab %s, record %s\n%s", id, js.Status, rec.State, tail(logs.String(), 40))
			}
			time.Sleep(100 * time.Millisecond)
		}
		if js.Status != "success" || rec.State != job.Done || rec.RunnerID != js.RunnerID || rec.VMID == "" {
			t.Fatalf("job %d: GitLab %s runner %d; record %s %q runner %d vm %q\n%s", id, js.Status, js.RunnerID, rec.State, rec.Reason,
				rec.RunnerID, rec.VMID, CleanTrace(js.Trace))
		}
		v, err := st.GetVM(ctx, rec.VMID)
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(js.Trace, fmt.Sprintf("ran on %s", v.ID)) {
			t.Errorf("job %d: its trace does not name VM %s:\n%s", id, v.ID, CleanTrace(js.Trace))
		}
		byHost[v.HostID]++
	}
	t.Logf("jobs served per host: %v", byHost)
	if byHost["fleet-a"] == 0 || byHost["fleet-b"] == 0 {
		t.Fatalf("both hosts must serve: %v", byHost)
	}
	for _, d := range hosts {
		d := d
		waitUntil(t, time.Minute, "nothing left on "+d.Config.HostID, func() bool {
			insts, _ := d.Driver.List(ctx)
			return len(insts) == 0
		})
	}
	waitUntil(t, time.Minute, "no live record, no runner", func() bool {
		live, _ := st.ListVMs(ctx, true, 0)
		act, _ := st.ListJobs(ctx, store.Filter{ActiveOnly: true})
		return len(live) == 0 && len(act) == 0 && len(gl.Runners()) == 0
	})
	if findToken(logs.String()) {
		t.Error("a runner token reached the logs")
	}
}

func waitUntil(t *testing.T, limit time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(limit)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
