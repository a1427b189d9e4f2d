package demo

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/firerunner/firerunner/internal/config"
	"github.com/firerunner/firerunner/internal/daemon"
	"github.com/firerunner/firerunner/internal/guestconfig"
	"github.com/firerunner/firerunner/internal/job"
	"github.com/firerunner/firerunner/internal/netsetup"
	"github.com/firerunner/firerunner/internal/store"
	"github.com/firerunner/firerunner/internal/testenv"
	"github.com/firerunner/firerunner/internal/testsupport/gitlabstandin"
	"github.com/firerunner/firerunner/internal/vm"
	"github.com/firerunner/firerunner/internal/vm/qemu"
)

// The test binary re-executes itself as the FireRunner daemon when these are set.
const (
	crashDaemonConfigEnv = "FIRERUNNER_CRASHTEST_CONFIG"
	crashDaemonLogEnv    = "FIRERUNNER_CRASHTEST_LOG"
)

// TestCrashRecovery kills a real FireRunner process with SIGKILL at the
// moments that matter (a job running in its VM; webhooks missed while down;
// right after a runner was created) and restarts it on the same state dir,
// with real QEMU microVMs and the official gitlab-runner inside. After each
// restart the job must end as the controller's resume rules say, and nothing
// may be left: no VMM, no per-VM dir, no runner in GitLab, no active job,
// no orphaned process.
func TestCrashRecovery(t *testing.T) {
	if cfgPath := os.Getenv(crashDaemonConfigEnv); cfgPath != "" {
		runCrashDaemon(cfgPath, os.Getenv(crashDaemonLogEnv)) // never returns
		return
	}
	testenv.RequireRoot(t)
	testenv.QEMU(t)
	dir := testenv.ImageDir(t)
	requireRunnerImage(t, dir)
	h := newCrashHarness(t, dir, "", "user")

	tags := []string{"firecracker-1cpu-1gb"}
	t.Run("KillWhileJobRuns", func(t *testing.T) {
		h.scenario = "1 kill -9 mid-job"
		h.start(t)
		id := h.pipeline(t, gitlabstandin.JobSpec{Name: "long", Tags: tags,
			Script: []string{"echo started", "sleep 20", "echo finished"}})
		h.waitGitLab(t, id, 3*time.Minute, "running with 'started' in its trace", func(js gitlabstandin.JobState) bool {
			return js.Status == "running" && strings.Contains(js.Trace, "started")
		})
		rec := h.record(t, id)
		h.say("store before kill: job %d %s, vm %s, runner #%d", id, rec.State, rec.VMID, rec.RunnerID)
		h.kill(t)
		vmms := vm.FindProcs(h.vmDir(rec.VMID))
		orphans := h.orphans()
		h.say("after kill: %d VMM(s) for %s alive, orphans of the dead FireRunner: %v", len(vmms), rec.VMID, orphans)
		if len(vmms) == 0 {
			t.Fatalf("the VM of job %d did not survive FireRunner's death (it must: VMMs run in their own session)", id)
		}
		// The orphan detector sees it: "no orphans" later means something.
		if !slices.Contains(h.ourChildren(false), vmms[0].PID) {
			t.Fatalf("the orphaned VMM (pid %d) is not among the processes the dead FireRunner left: %v", vmms[0].PID, orphans)
		}
		if js, _ := h.gl.Job(id); js.Status != "running" {
			t.Fatalf("job %d is %s in GitLab right after the kill, want running", id, js.Status)
		}
		// Resume rule: vm_starting/running with the VM still on the host →
		// supervise it again; the job finishes in its VM.
		h.start(t)
		js := h.waitDone(t, id, 3*time.Minute)
		rec = h.record(t, id)
		if js.Status != "success" || !strings.Contains(CleanTrace(js.Trace), "finished") {
			t.Errorf("job %d: GitLab %s, want success with 'finished' in the trace:\n%s", id, js.Status, CleanTrace(js.Trace))
		}
		if rec.State != job.Done || rec.Reason != job.ReasonSucceeded {
			t.Errorf("job %d: record %s (%s), want done (job_succeeded): the adopted VM was not supervised to its end", id, rec.State, rec.Reason)
		}
		h.waitClean(t, time.Minute) // the runner is deleted after the record ends
		h.checkRunnerDeleted(t, rec)
	})

	t.Run("KillWhileWebhooksMissed", func(t *testing.T) {
		h.scenario = "2 webhooks missed while down"
		h.ensureRunning(t)
		h.kill(t)
		id := h.pipeline(t, gitlabstandin.JobSpec{Name: "missed", Tags: tags,
			Script: []string{`echo "ran although its webhook was lost"`}})
		// GitLab does not retry failed deliveries: this job's webhook is gone.
		var failed gitlabstandin.Delivery
		h.waitFor(t, 30*time.Second, "the pending webhook delivery to fail", func() bool {
			for _, d := range h.gl.Deliveries() {
				if d.JobID == id && d.BuildStatus == "pending" && d.StatusCode == 0 && d.Err != "" {
					failed = d
					return true
				}
			}
			return false
		})
		h.say("webhook for job %d failed while FireRunner was down: %s", id, failed.Err)
		h.start(t)
		js := h.waitDone(t, id, 3*time.Minute)
		rec := h.record(t, id)
		if js.Status != "success" || !strings.Contains(CleanTrace(js.Trace), "ran although its webhook was lost") {
			t.Errorf("job %d: GitLab %s, want success:\n%s", id, js.Status, CleanTrace(js.Trace))
		}
		if rec.Source != "poll" || rec.State != job.Done {
			t.Errorf("job %d: record source %q state %s (%s), want found by poll, done", id, rec.Source, rec.State, rec.Reason)
		}
		h.waitClean(t, time.Minute) // the runner is deleted after the record ends
		h.checkRunnerDeleted(t, rec)
	})

	// The window between runner creation and a running VMM, hit at two
	// points: as soon as the runner exists in GitLab, and as soon as the
	// VM's state dir exists (config drive written, VMM about to start).
	t.Run("KillRightAfterRunnerCreated", func(t *testing.T) {
		h.scenario = "3a kill -9 at runner creation"
		h.killBeforeVM(t, tags, "the job's runner in GitLab", func(int64) bool { return len(h.gl.Runners()) > 0 })
	})
	t.Run("KillWhileVMStarts", func(t *testing.T) {
		h.scenario = "3b kill -9 at VM start"
		h.killBeforeVM(t, tags, "the job's per-VM dir", func(id int64) bool {
			v, ok := h.vmOf(id)
			if !ok {
				return false
			}
			_, err := os.Stat(h.vmDir(v.ID))
			return err == nil
		})
		h.stop(t)
		h.waitClean(t, 30*time.Second)
	})
	// A pool's warm VM (booted, no runner yet) when FireRunner dies; the
	// next FireRunner runs without the pool: the VM is found and removed.
	t.Run("KillWithWarmVMs", func(t *testing.T) {
		h.scenario = "4 kill -9 with warm VMs"
		h.setPools(t, []config.Pool{{Size: "firecracker-1cpu-1gb", MinIdle: 1}})
		h.start(t)
		var w job.VM
		h.waitFor(t, 3*time.Minute, "a warm VM with gitlab-runner waiting", func() bool {
			var ok bool
			w, ok = h.warmVM()
			return ok
		})
		h.kill(t)
		if vmms := vm.FindProcs(h.vmDir(w.ID)); len(vmms) == 0 {
			t.Fatalf("the warm VM %s did not survive FireRunner's death", w.ID)
		}
		h.say("killed with warm VM %s alive, gitlab-runner waiting in it; restarting without the pool", w.ID)
		h.setPools(t, nil)
		h.start(t)
		h.waitFor(t, time.Minute, "the warm VM removed", func() bool {
			var v job.VM
			_ = h.withStore(func(s *store.Store) (err error) { v, err = s.GetVM(context.Background(), w.ID); return err })
			return v.State == job.VMGone
		})
		h.stop(t)
		h.waitClean(t, 30*time.Second)
		if n := len(h.gl.Runners()); n != 0 {
			t.Fatalf("%d runners: a warm VM must never have one", n)
		}
	})
	h.printTimeline()
}

// setPools rewrites the config the next FireRunner process reads.
func (h *crashHarness) setPools(t *testing.T, pools []config.Pool) {
	t.Helper()
	b, err := os.ReadFile(h.cfgPath)
	if err != nil {
		t.Fatal(err)
	}
	var cfg config.Config
	if err := json.Unmarshal(b, &cfg); err != nil {
		t.Fatal(err)
	}
	cfg.Pools = pools
	if b, err = json.Marshal(cfg); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(h.cfgPath, b, 0o600); err != nil {
		t.Fatal(err)
	}
}

// warmVM returns a pool's VM whose guest reported gitlab-runner waiting.
func (h *crashHarness) warmVM() (job.VM, bool) {
	var live []job.VM
	_ = h.withStore(func(s *store.Store) (err error) { live, err = s.ListVMs(context.Background(), true, 0); return err })
	for _, v := range live {
		if v.State != job.VMWarm {
			continue
		}
		b, err := os.ReadFile(filepath.Join(h.vmDir(v.ID), vm.ConsoleFile))
		if err == nil && strings.Contains(string(b), guestconfig.MarkerWarm) {
			return v, true
		}
	}
	return job.VM{}, false
}

// killBeforeVM restarts FireRunner (a fresh process: its first VM start also
// runs the KVM boot probe), queues a job, kills FireRunner the moment
// trigger holds, restarts it, and checks the outcome against the
// controller's documented resume rules (internal/controller resume):
//   - queued (runner created, not yet recorded): re-queued; the stray runner
//     is found by its description and deleted by reconcile;
//   - runner_created: runner deleted, job re-queued;
//   - vm_starting/running with the VMM alive: supervised to its end;
//   - vm_starting with no VMM: leftovers and runner removed, re-queued.
//
// Every case ends with the job run to success in a fresh VM.
func (h *crashHarness) killBeforeVM(t *testing.T, tags []string, what string, trigger func(id int64) bool) {
	h.ensureRunning(t)
	h.kill(t)
	h.start(t)
	id := h.pipeline(t, gitlabstandin.JobSpec{Name: "early", Tags: tags, Script: []string{`echo "early job ran"`}})
	h.waitForEvery(t, 2*time.Minute, time.Millisecond, what, func() bool { return trigger(id) })
	h.kill(t)
	var runners []string
	for _, r := range h.gl.Runners() {
		runners = append(runners, fmt.Sprintf("#%d (%s)", r.ID, r.Description))
	}
	rec := h.record(t, id)
	v, haveVM := h.vmOf(id)
	vmms := vm.FindProcs(h.vmDir(v.ID))
	_, dirErr := os.Stat(h.vmDir(v.ID))
	h.say("at the kill (%s seen): job record %s; vm record %s (%s) runner #%d; runners in GitLab %v; per-VM dir: %v; VMMs alive: %d; orphans: %v",
		what, rec.State, v.ID, v.State, v.RunnerID, runners, dirErr == nil, len(vmms), h.orphans())
	// The kill hit the window it aims at: the job still waiting, its VM
	// record written before anything of the VM exists, not yet picked.
	if rec.State != job.Queued || !haveVM || (v.State != job.VMPending && v.State != job.VMStarting) || len(runners) == 0 {
		t.Fatalf("killed outside the window: job %s, vm record %v %s, runners %v", rec.State, haveVM, v.State, runners)
	}

	h.start(t)
	var final job.Job
	h.waitFor(t, 3*time.Minute, "the job's record to end", func() bool {
		final = h.record(t, id)
		return final.State.Terminal()
	})
	js, _ := h.gl.Job(id)
	h.say("after restart: record %s (%s); GitLab %s; states: %s", final.State, final.Reason, js.Status, h.transitions(id))
	if final.State == job.Done {
		js = h.waitDone(t, id, 3*time.Minute)
	}
	if js.Status != "success" || final.State != job.Done {
		t.Errorf("job %d: GitLab %s, record %s (%s); want success/done (it was %s with %d VMM at the kill)",
			id, js.Status, final.State, final.Reason, rec.State, len(vmms))
		h.dumpJob(t, id)
	}
	if js.Status == "pending" {
		_ = h.gl.Cancel(id) // FireRunner gave up a job GitLab still has pending
	}
	h.waitClean(t, time.Minute)
}

// runCrashDaemon is the child process: FireRunner from a config file, until killed.
func runCrashDaemon(cfgPath, logPath string) {
	fail := func(err error) {
		fmt.Fprintln(os.Stderr, "crash daemon:", err)
		os.Exit(3)
	}
	b, err := os.ReadFile(cfgPath)
	if err != nil {
		fail(err)
	}
	var cfg config.Config
	if err := json.Unmarshal(b, &cfg); err != nil {
		fail(err)
	}
	if err := cfg.Validate(daemon.Drivers()); err != nil {
		fail(err)
	}
	f, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		fail(err)
	}
	log := slog.New(slog.NewJSONHandler(f, &slog.HandlerOptions{Level: slog.LevelDebug}))
	d, err := daemon.Start(context.Background(), cfg, log)
	if err != nil {
		fail(err)
	}
	// Until SIGKILL; SIGTERM is the graceful shutdown `firerunner serve` does.
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM)
	<-sig
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if err := d.Shutdown(ctx); err != nil {
		fail(err)
	}
	os.Exit(0)
}

// crashHarness is the parent side: the GitLab stand-in, the FireRunner
// child processes and the leak checks.
type crashHarness struct {
	t                 *testing.T
	work, stateDir    string
	cfgPath, listen   string
	gl                *gitlabstandin.Server
	proj              gitlabstandin.Project
	drv               *qemu.Driver
	t0                time.Time
	scenario          string
	network           string // user or tap
	starts            int
	mu                sync.Mutex
	child             *exec.Cmd
	childDone         chan struct{}
	childPIDs         map[int]bool // every FireRunner we started (the reaper leaves them to exec.Cmd)
	timeline          []string
	stopReap          chan struct{}
	reaperDone        chan struct{}
	reportedTimelines bool
}

// newCrashHarness prepares the crash test in work ("": a temp dir) with
// network "user" (QEMU user-mode) or "tap" (production networking: run it
// in a network namespace of its own).
func newCrashHarness(t *testing.T, imageDir, work, network string) *crashHarness {
	if work == "" {
		work = t.TempDir()
	}
	h := &crashHarness{t: t, work: work, stateDir: filepath.Join(work, "state"), t0: time.Now(), network: network,
		childPIDs: map[int]bool{}, stopReap: make(chan struct{}), reaperDone: make(chan struct{})}
	// Orphans of a killed FireRunner (its VMMs, anything else it spawned)
	// become our children: leaks are then exactly our unexpected children.
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		t.Fatalf("PR_SET_CHILD_SUBREAPER: %v", err)
	}
	go h.reaper()
	t.Cleanup(h.cleanup)

	log := slog.New(slog.NewJSONHandler(h.logFile(t, "gitlab-standin.log"), &slog.HandlerOptions{Level: slog.LevelDebug}))
	glOpts := gitlabstandin.Options{Addr: "127.0.0.1:0", ExternalHost: "10.0.2.2",
		Dir: filepath.Join(work, "gitlab"), HardCancel: true, Logger: log}
	if network == "tap" { // VMs reach the stand-in at the bridge address
		gw, err := TapGateway()
		if err != nil {
			t.Fatal(err)
		}
		glOpts.Addr, glOpts.ExternalHost = "0.0.0.0:0", gw.String()
	}
	gl, err := gitlabstandin.New(glOpts)
	if err != nil {
		t.Fatal(err)
	}
	h.gl = gl
	apiToken, hookSecret := "glpat-"+randHex(10), randHex(16)
	gl.AddToken(apiToken, gitlabstandin.ScopeAPI)
	if h.proj, err = gl.AddProject(gitlabstandin.ProjectSpec{Path: "demo/crash", Files: Files}); err != nil {
		t.Fatal(err)
	}
	// A fixed port: GitLab's webhook URL must stay valid across restarts.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	h.listen = ln.Addr().String()
	ln.Close()
	_, glPort, _ := net.SplitHostPort(gl.Addr())
	cfg, err := Config(Options{WorkDir: work, ImageDir: imageDir, VCPUs: 2, MemoryMiB: 2048, Network: network},
		"http://"+net.JoinHostPort("127.0.0.1", glPort), gl.URL(), apiToken, hookSecret)
	if err != nil {
		t.Fatal(err)
	}
	cfg.Listen = h.listen
	cfg.Reconcile.PollProjects = []int64{h.proj.ID}
	cfg.Reconcile.Interval = 2 * time.Second
	if err := cfg.Validate(daemon.Drivers()); err != nil {
		t.Fatal(err)
	}
	b, err := json.Marshal(cfg)
	if err != nil {
		t.Fatal(err)
	}
	h.cfgPath = filepath.Join(work, "config.json")
	if err := os.WriteFile(h.cfgPath, b, 0o600); err != nil {
		t.Fatal(err)
	}
	if h.drv, err = qemu.New(qemu.Options{StateDir: h.stateDir, Logger: log}); err != nil {
		t.Fatal(err)
	}
	gl.SetWebhook("http://"+h.listen+"/webhook", hookSecret)
	h.say("GitLab stand-in at %s, project #%d, FireRunner will listen on %s, work dir %s", gl.Addr(), h.proj.ID, h.listen, work)
	return h
}

func (h *crashHarness) logFile(t *testing.T, name string) *os.File {
	f, err := os.OpenFile(filepath.Join(h.work, name), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

// say records a timeline line and prints it (t.Log and stdout).
func (h *crashHarness) say(format string, a ...any) {
	line := fmt.Sprintf("[%6.1fs] %-30s %s", time.Since(h.t0).Seconds(), h.scenario, fmt.Sprintf(format, a...))
	h.mu.Lock()
	h.timeline = append(h.timeline, line)
	h.mu.Unlock()
	fmt.Println(line)
	h.t.Log(line)
}

func (h *crashHarness) printTimeline() {
	fmt.Println("==== crash recovery timeline ====")
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, l := range h.timeline {
		fmt.Println(l)
	}
	h.reportedTimelines = true
}

// start runs a new FireRunner child on the same state dir and waits for /readyz.
func (h *crashHarness) start(t *testing.T) {
	t.Helper()
	h.starts++
	n := h.starts
	logPath := filepath.Join(h.work, fmt.Sprintf("firerunner-%d.log", n))
	out := h.logFile(t, fmt.Sprintf("firerunner-%d.out", n))
	cmd := exec.Command(os.Args[0], "-test.run=^TestCrashRecovery$", "-test.timeout=0")
	cmd.Env = append(os.Environ(), crashDaemonConfigEnv+"="+h.cfgPath, crashDaemonLogEnv+"="+logPath)
	cmd.Stdout, cmd.Stderr = out, out
	// Its own process group: what it leaves behind is told apart from our children.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	h.mu.Lock()
	if err := cmd.Start(); err != nil {
		h.mu.Unlock()
		t.Fatal(err)
	}
	h.childPIDs[cmd.Process.Pid] = true
	h.child = cmd
	done := make(chan struct{})
	h.childDone = done
	h.mu.Unlock()
	go func() { _ = cmd.Wait(); close(done) }()
	began := time.Now()
	for {
		select {
		case <-done:
			b, _ := os.ReadFile(filepath.Join(h.work, fmt.Sprintf("firerunner-%d.out", n)))
			t.Fatalf("FireRunner #%d exited during start-up: %s\n%s", n, cmd.ProcessState, b)
		default:
		}
		if resp, err := http.Get("http://" + h.listen + "/readyz"); err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				break
			}
		}
		if time.Since(began) > 2*time.Minute {
			t.Fatalf("FireRunner #%d not ready after 2 minutes (log %s)", n, logPath)
		}
		time.Sleep(20 * time.Millisecond)
	}
	h.say("FireRunner #%d (pid %d) started, ready after %.2fs", n, cmd.Process.Pid, time.Since(began).Seconds())
}

func (h *crashHarness) ensureRunning(t *testing.T) {
	if h.alive() {
		return
	}
	h.start(t)
}

func (h *crashHarness) alive() bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.child == nil {
		return false
	}
	select {
	case <-h.childDone:
		return false
	default:
		return true
	}
}

// kill sends SIGKILL to the running FireRunner and waits for it to be gone.
func (h *crashHarness) kill(t *testing.T) {
	t.Helper()
	h.signal(t, syscall.SIGKILL)
	h.say("FireRunner #%d killed with SIGKILL", h.starts)
}

// stop is a graceful SIGTERM shutdown.
func (h *crashHarness) stop(t *testing.T) {
	t.Helper()
	h.signal(t, syscall.SIGTERM)
	h.say("FireRunner #%d stopped", h.starts)
}

func (h *crashHarness) signal(t *testing.T, sig syscall.Signal) {
	h.mu.Lock()
	cmd, done := h.child, h.childDone
	h.mu.Unlock()
	if cmd == nil {
		t.Fatal("no FireRunner running")
	}
	select {
	case <-done:
		t.Fatalf("FireRunner #%d had already exited: %s", h.starts, cmd.ProcessState)
	default:
	}
	_ = cmd.Process.Signal(sig)
	<-done
}

// pipeline creates a one-job pipeline and returns the job id.
func (h *crashHarness) pipeline(t *testing.T, spec gitlabstandin.JobSpec) int64 {
	t.Helper()
	pl, err := h.gl.CreatePipeline(h.proj.ID, spec)
	if err != nil {
		t.Fatal(err)
	}
	h.say("pipeline #%d: job %d %q %v", pl.ID, pl.JobIDs[0], spec.Name, spec.Tags)
	return pl.JobIDs[0]
}

func (h *crashHarness) waitFor(t *testing.T, limit time.Duration, what string, cond func() bool) {
	t.Helper()
	h.waitForEvery(t, limit, 100*time.Millisecond, what, cond)
}

// waitForEvery polls cond; the limit only bounds a hung run (not a speed target).
func (h *crashHarness) waitForEvery(t *testing.T, limit, every time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(limit)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("gave up after %s waiting for %s (logs in %s)", limit, what, h.work)
		}
		time.Sleep(every)
	}
}

// waitGitLab follows a job in GitLab, reporting status changes.
func (h *crashHarness) waitGitLab(t *testing.T, id int64, limit time.Duration, what string, cond func(gitlabstandin.JobState) bool) gitlabstandin.JobState {
	t.Helper()
	var js gitlabstandin.JobState
	last := ""
	h.waitFor(t, limit, fmt.Sprintf("job %d %s", id, what), func() bool {
		js, _ = h.gl.Job(id)
		if js.Status != last {
			h.say("job %d GitLab: %s", id, js.Status)
			last = js.Status
		}
		return cond(js)
	})
	return js
}

// waitDone waits for the job to end in GitLab and in FireRunner's store.
func (h *crashHarness) waitDone(t *testing.T, id int64, limit time.Duration) gitlabstandin.JobState {
	t.Helper()
	js := h.waitGitLab(t, id, limit, "to finish", func(js gitlabstandin.JobState) bool { return gitlabstandin.Terminal(js.Status) })
	var rec job.Job
	h.waitFor(t, limit, fmt.Sprintf("job %d's record to end", id), func() bool {
		rec = h.record(t, id)
		return rec.State.Terminal()
	})
	h.say("job %d FireRunner: %s (%s); states: %s", id, rec.State, rec.Reason, h.transitions(id))
	return js
}

// withStore opens the store read-only, like `firerunner status` while the daemon runs.
func (h *crashHarness) withStore(fn func(*store.Store) error) error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s, err := store.OpenReadOnly(ctx, h.stateDir)
	if err != nil {
		return err
	}
	defer s.Close()
	return fn(s)
}

func (h *crashHarness) record(t *testing.T, id int64) job.Job {
	t.Helper()
	var j job.Job
	err := h.withStore(func(s *store.Store) (err error) {
		j, err = s.GetJob(context.Background(), id)
		return err
	})
	if errors.Is(err, store.ErrNotFound) {
		return job.Job{ID: id}
	}
	if err != nil {
		t.Fatalf("read job %d: %v", id, err)
	}
	return j
}

// vmOf returns the newest VM record started for job id.
func (h *crashHarness) vmOf(id int64) (job.VM, bool) {
	var vs []job.VM
	_ = h.withStore(func(s *store.Store) (err error) {
		vs, err = s.ListVMs(context.Background(), false, id)
		return err
	})
	for i := len(vs) - 1; i >= 0; i-- {
		if vs[i].ForJob == id {
			return vs[i], true
		}
	}
	return job.VM{}, false
}

// dumpJob prints what tells why a job did not end as expected: its trace
// in GitLab and the kept console log of each VM that served it.
func (h *crashHarness) dumpJob(t *testing.T, id int64) {
	t.Helper()
	if js, ok := h.gl.Job(id); ok {
		t.Logf("job %d trace in GitLab:\n%s", id, js.Trace)
	}
	// GitLab's side: every request about the job (the runner's updates
	// and trace patches, with their answers).
	jobPath := fmt.Sprintf("/api/v4/jobs/%d", id)
	h.dumpLines(t, "gitlab-standin.log", func(l string) bool {
		return strings.Contains(l, `"path":"`+jobPath+`"`) || strings.Contains(l, `"path":"`+jobPath+`/`)
	})
	var vs []job.VM
	_ = h.withStore(func(s *store.Store) (err error) {
		vs, err = s.ListVMs(context.Background(), false, id)
		return err
	})
	for _, v := range vs {
		if v.ForJob != id {
			continue
		}
		logs, _ := filepath.Glob(filepath.Join(h.work, "firerunner-*.log"))
		for _, l := range logs {
			h.dumpLines(t, filepath.Base(l), func(l string) bool { return strings.Contains(l, v.ID) })
		}
		b, err := os.ReadFile(filepath.Join(h.work, "console", v.ID+".log"))
		if err != nil {
			t.Logf("vm %s (%s, %s %s): no console log kept: %v", v.ID, v.State, v.Reason, v.ExitReason, err)
			continue
		}
		if len(b) > 64<<10 {
			b = b[len(b)-64<<10:]
		}
		t.Logf("vm %s (%s, %s %s) console:\n%s", v.ID, v.State, v.Reason, v.ExitReason, b)
	}
}

// dumpLines logs the lines of the work dir's file name that keep selects.
func (h *crashHarness) dumpLines(t *testing.T, name string, keep func(string) bool) {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(h.work, name))
	if err != nil {
		t.Logf("%s: %v", name, err)
		return
	}
	var out []string
	for _, l := range strings.Split(string(b), "\n") {
		if keep(l) {
			out = append(out, l)
		}
	}
	if len(out) > 400 {
		out = out[len(out)-400:]
	}
	t.Logf("%s (%d lines):\n%s", name, len(out), strings.Join(out, "\n"))
}

func (h *crashHarness) transitions(id int64) string {
	var out []string
	_ = h.withStore(func(s *store.Store) error {
		tr, err := s.Transitions(context.Background(), id)
		for _, x := range tr {
			out = append(out, x.Object+":"+x.To)
		}
		return err
	})
	return strings.Join(out, "→")
}

func (h *crashHarness) checkRunnerDeleted(t *testing.T, rec job.Job) {
	t.Helper()
	if rec.RunnerID == 0 {
		t.Errorf("job %d: record has no runner id", rec.ID)
		return
	}
	// The job's record ends with GitLab's status; its VM and runner go
	// right after.
	deadline := time.Now().Add(time.Minute)
	for {
		r, ok := h.gl.Runner(rec.RunnerID)
		if ok && !r.DeletedAt.IsZero() {
			return
		}
		if time.Now().After(deadline) {
			t.Errorf("job %d: runner #%d not deleted", rec.ID, rec.RunnerID)
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func (h *crashHarness) vmDir(id string) string { return filepath.Join(h.stateDir, "vms", id) + "/" }

// leftovers lists everything FireRunner should have removed.
func (h *crashHarness) leftovers() []string {
	var out []string
	for _, p := range vm.FindProcs(h.work) {
		out = append(out, "VMM process "+procDesc(p.PID))
	}
	for _, o := range h.orphans() {
		out = append(out, "orphaned process "+o)
	}
	if ents, err := os.ReadDir(filepath.Join(h.stateDir, "vms")); err == nil {
		for _, e := range ents {
			out = append(out, "per-VM dir "+e.Name())
		}
	}
	out = append(out, h.netLeftovers()...)
	if insts, err := h.drv.List(context.Background()); err != nil {
		out = append(out, "driver list: "+err.Error())
	} else {
		for _, in := range insts {
			out = append(out, fmt.Sprintf("driver lists vm %s (pid %d)", in.ID, in.PID))
		}
	}
	for _, r := range h.gl.Runners() {
		out = append(out, fmt.Sprintf("runner #%d (%s) not deleted", r.ID, r.Description))
	}
	if err := h.withStore(func(s *store.Store) error {
		act, err := s.ListJobs(context.Background(), store.Filter{ActiveOnly: true})
		for _, j := range act {
			out = append(out, fmt.Sprintf("job %d still %s", j.ID, j.State))
		}
		if err != nil {
			return err
		}
		live, err := s.ListVMs(context.Background(), true, 0)
		for _, v := range live {
			out = append(out, fmt.Sprintf("vm record %s still %s", v.ID, v.State))
		}
		return err
	}); err != nil {
		out = append(out, "store: "+err.Error())
	}
	return out
}

// netLeftovers lists, in tap mode, what VMs hold of the host's network: a
// tap or an address (netsetup's own view), and the nft rules pinning a tap.
func (h *crashHarness) netLeftovers() []string {
	if h.network != "tap" {
		return nil
	}
	var out []string
	mgr, err := netsetup.New(tapNetwork(), h.stateDir)
	if err != nil {
		return []string{"netsetup: " + err.Error()}
	}
	ids, err := mgr.List(context.Background())
	if err != nil {
		out = append(out, "netsetup list: "+err.Error())
	}
	for _, id := range ids {
		out = append(out, "tap or address of vm "+id)
	}
	rules, err := exec.Command("nft", "list", "table", "bridge", netsetup.TableName).CombinedOutput()
	if err != nil && !strings.Contains(string(rules), "No such file or directory") { // no table: no rule
		return append(out, fmt.Sprintf("nft list table bridge %s: %v %s", netsetup.TableName, err, rules))
	}
	for _, l := range strings.Split(string(rules), "\n") {
		if strings.Contains(l, `iifname "fr-`) {
			out = append(out, "nft rule: "+strings.TrimSpace(l))
		}
	}
	return out
}

// waitClean waits for FireRunner to converge to nothing left, and fails with
// the leftovers if it does not.
func (h *crashHarness) waitClean(t *testing.T, limit time.Duration) {
	t.Helper()
	deadline := time.Now().Add(limit)
	for {
		left := h.leftovers()
		if len(left) == 0 {
			h.say("clean: no VMM, no per-VM dir, no runner, no active job, no orphan")
			return
		}
		if time.Now().After(deadline) {
			h.say("LEFT BEHIND: %s", strings.Join(left, "; "))
			t.Errorf("left behind after %s: %s", limit, strings.Join(left, "; "))
			return
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// orphans lists our live children that are not FireRunner processes we
// started: processes a killed FireRunner left behind (we are their subreaper).
func (h *crashHarness) orphans() []string {
	var out []string
	for _, pid := range h.ourChildren(false) {
		out = append(out, procDesc(pid))
	}
	return out
}

// ourChildren returns the processes a killed FireRunner left to us (we are
// their subreaper); zombies only when zombies is true.
func (h *crashHarness) ourChildren(zombies bool) []int {
	self, pgrp := os.Getpid(), syscall.Getpgrp()
	ents, _ := os.ReadDir("/proc")
	var out []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue
		}
		i := strings.LastIndexByte(string(b), ')')
		f := strings.Fields(string(b)[i+2:]) // state, ppid, pgrp, ...
		// Adopted processes come from a FireRunner's own process group (or
		// a VMM's session); our own children (the stand-in's git) share our
		// group and belong to their exec.Cmd.
		if len(f) < 3 || f[1] != strconv.Itoa(self) || f[2] == strconv.Itoa(pgrp) {
			continue
		}
		h.mu.Lock()
		ours := h.childPIDs[pid]
		h.mu.Unlock()
		if ours || (f[0] == "Z") != zombies {
			continue
		}
		out = append(out, pid)
	}
	return out
}

func procDesc(pid int) string {
	b, _ := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cmdline")
	cmd := strings.TrimSpace(strings.ReplaceAll(string(b), "\x00", " "))
	if len(cmd) > 160 {
		cmd = cmd[:160] + "..."
	}
	return fmt.Sprintf("pid %d [%s]", pid, cmd)
}

// reaper collects the exit status of adopted orphans (VMMs that outlived
// their FireRunner), as init would; FireRunner children are exec.Cmd's.
func (h *crashHarness) reaper() {
	defer close(h.reaperDone)
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		for _, pid := range h.ourChildren(true) {
			var ws unix.WaitStatus
			_, _ = unix.Wait4(pid, &ws, unix.WNOHANG, nil)
		}
		select {
		case <-h.stopReap:
			return
		case <-tick.C:
		}
	}
}

// cleanup kills whatever is left (even after a failure) and stops reaping.
func (h *crashHarness) cleanup() {
	h.mu.Lock()
	cmd, done := h.child, h.childDone
	h.mu.Unlock()
	if cmd != nil {
		select {
		case <-done:
		default:
			_ = cmd.Process.Kill()
			<-done
		}
	}
	for _, p := range vm.FindProcs(h.work) {
		_ = p.KillGroup()
	}
	for _, pid := range h.ourChildren(false) {
		if p, err := vm.LookupProc(pid); err == nil {
			_ = p.KillGroup()
		}
	}
	time.Sleep(300 * time.Millisecond)
	close(h.stopReap)
	<-h.reaperDone
	for _, pid := range h.ourChildren(true) {
		var ws unix.WaitStatus
		_, _ = unix.Wait4(pid, &ws, unix.WNOHANG, nil)
	}
	_ = unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
	if h.gl != nil {
		h.gl.Close()
	}
	if !h.reportedTimelines {
		h.printTimeline()
	}
}
