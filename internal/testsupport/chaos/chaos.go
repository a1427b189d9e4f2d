// Package chaos runs FireRunner through many jobs under failures and counts
// what went wrong: every webhook duplicated, reordered or dropped, GitLab
// API calls failing with 5xx/429 (some after GitLab did the work), and the
// FireRunner process killed with SIGKILL and started again every few
// seconds. FireRunner runs as a real child process on the process-backed
// fake driver (fakevm.ProcDriver: each VM is a guest process that outlives
// FireRunner, playing gitlab-runner against the GitLab stand-in's runner
// API with the token from its config drive) and a file-backed network, all
// on loopback. `make chaos` runs it (cmd/firerunner-chaos).
package chaos

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/firerunner/firerunner/internal/config"
	"github.com/firerunner/firerunner/internal/job"
	"github.com/firerunner/firerunner/internal/planner"
	"github.com/firerunner/firerunner/internal/store"
	"github.com/firerunner/firerunner/internal/testsupport/gitlabstandin"
	"github.com/firerunner/firerunner/internal/vm"
)

// Options shape a run. DefaultOptions is what `make chaos` runs.
type Options struct {
	Jobs int
	// Self is the executable run as "Self serve CONFIG" (a FireRunner) and
	// "Self guest DIR" (a fake VM).
	Self string
	// WorkDir keeps state, logs and the report; "" = a new temp dir.
	WorkDir string
	// FireRunner is killed (SIGKILL) this long after each start is ready.
	KillMin, KillMax time.Duration
	// Webhooks: dropped with probability HookDrop, else delivered 1 to
	// HookCopies times, each copy delayed by up to HookDelay.
	HookDrop   float64
	HookCopies int
	HookDelay  time.Duration
	// APIFail is the share of GitLab API calls answered 500/502/503/429.
	APIFail float64
	// FeedEvery: a pipeline of 1-4 jobs is created about this often.
	FeedEvery time.Duration
	Capacity  planner.Capacity
	// Timeout bounds the run (jobs not resolved by then are lost); Settle
	// bounds the wait for FireRunner to clean up after the last job.
	Timeout, Settle time.Duration
	// Stall ends the run early when, with every job created, no job was
	// resolved for this long.
	Stall time.Duration
	Seed  uint64
	// Log receives progress lines (nil: none).
	Log io.Writer
}

// DefaultOptions: 1,000 jobs, kills every 2-5 s, 10 % of hooks dropped, up
// to 3 deliveries each within 500 ms, 20 % of API calls failing.
func DefaultOptions() Options {
	return Options{Jobs: 1000, KillMin: 2 * time.Second, KillMax: 5 * time.Second, HookDrop: 0.1, HookCopies: 3,
		HookDelay: 500 * time.Millisecond, APIFail: 0.2, FeedEvery: 100 * time.Millisecond,
		Capacity: planner.Capacity{VCPUs: 24, MemoryMiB: 48 * 1024, MaxVMs: 16},
		Timeout:  8 * time.Minute, Settle: time.Minute, Stall: 90 * time.Second}
}

// Result is what the run found.
type Result struct {
	Jobs, Served, Failed, Lost, Doubled    int
	LeakedVMs, LeakedRunners, LeakedTaps   int
	P99Start                               time.Duration
	Kills, Starts                          int
	HooksReceived, HooksDropped, HooksSent int64
	HooksFailed, APICalls, APIFailedBefore int64
	APIFailedAfter                         int64
	Problems                               []string // one line per lost or doubled job and per leak
	Notes                                  []string // harness events that are not FireRunner's doing
	WorkDir                                string
	Elapsed                                time.Duration
	jobsAll, servedIDs, failedIDs, lostIDs []int64
	startLatencies                         []time.Duration
	reasons                                map[string]int
	pickCounts                             map[int64]int
	recordPicks                            map[int64]int
}

// Line is the one line `make chaos` prints.
func (r Result) Line() string {
	return fmt.Sprintf("chaos: jobs=%d served=%d lost=%d doubled=%d leaked_vms=%d leaked_runners=%d leaked_taps=%d p99_start_ms=%d",
		r.Jobs, r.Served, r.Lost, r.Doubled, r.LeakedVMs, r.LeakedRunners, r.LeakedTaps, r.P99Start.Milliseconds())
}

// OK reports whether every job was served or failed with a reason, none
// ran twice and nothing was left behind.
func (r Result) OK() bool {
	return r.Lost == 0 && r.Doubled == 0 && r.LeakedVMs == 0 && r.LeakedRunners == 0 && r.LeakedTaps == 0 &&
		r.Served+r.Failed == r.Jobs
}

// Summary is the report: the figures, the chaos applied, and every problem.
func (r Result) Summary() string {
	var b strings.Builder
	fmt.Fprintln(&b, r.Line())
	fmt.Fprintf(&b, "failed with a reason: %d %v\n", r.Failed, r.reasons)
	fmt.Fprintf(&b, "firerunner: %d starts, %d SIGKILLs; elapsed %s\n", r.Starts, r.Kills, r.Elapsed.Round(time.Second))
	fmt.Fprintf(&b, "webhooks: %d from GitLab, %d dropped, %d deliveries, %d deliveries failed (FireRunner down)\n",
		r.HooksReceived, r.HooksDropped, r.HooksSent, r.HooksFailed)
	fmt.Fprintf(&b, "api: %d calls, %d failed before GitLab, %d failed after GitLab did the work\n", r.APICalls, r.APIFailedBefore, r.APIFailedAfter)
	for _, p := range r.Problems {
		fmt.Fprintln(&b, "problem:", p)
	}
	for _, n := range r.Notes {
		fmt.Fprintln(&b, "note:", n)
	}
	fmt.Fprintf(&b, "work dir: %s\n", r.WorkDir)
	return b.String()
}

const hostID = "chaos-host"

func randHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// Run runs the chaos and returns what it found. An error means the harness
// itself could not run (not that FireRunner misbehaved: see Result.OK).
func Run(ctx context.Context, o Options) (res Result, err error) {
	began := time.Now()
	logf := func(format string, a ...any) {
		if o.Log != nil {
			fmt.Fprintf(o.Log, "[%6.1fs] %s\n", time.Since(began).Seconds(), fmt.Sprintf(format, a...))
		}
	}
	if o.Self == "" {
		if o.Self, err = os.Executable(); err != nil {
			return res, err
		}
	}
	if o.WorkDir == "" {
		if o.WorkDir, err = os.MkdirTemp("", "firerunner-chaos-"); err != nil {
			return res, err
		}
	}
	res.WorkDir, res.Jobs = o.WorkDir, o.Jobs
	stateDir := filepath.Join(o.WorkDir, "state")
	if err := os.MkdirAll(stateDir, 0o700); err != nil {
		return res, err
	}
	rnd := newRand(o.Seed)

	// Guests of a killed FireRunner become our children: reap them.
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		return res, fmt.Errorf("PR_SET_CHILD_SUBREAPER: %w", err)
	}
	defer func() { _ = unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0) }()
	fr := &child{self: o.Self, work: o.WorkDir, pids: map[int]bool{}}
	stopReap := reaper(fr)
	defer stopReap()

	hooks := newHookProxy(o.HookDrop, o.HookCopies, o.HookDelay, rnd)
	hookSrv, err := serve(hooks)
	if err != nil {
		return res, err
	}
	defer hookSrv.close()
	defer hooks.close()
	apiToken, secret := "glpat-chaos"+randHex(8), randHex(16)
	gl, err := gitlabstandin.New(gitlabstandin.Options{WebhookURL: hookSrv.url + "/hook", WebhookSecret: secret,
		ProjectRunnerCap: -1, Dir: filepath.Join(o.WorkDir, "gitlab")})
	if err != nil {
		return res, err
	}
	defer gl.Close()
	gl.AddToken(apiToken, gitlabstandin.ScopeAPI)
	proj, err := gl.AddProject(gitlabstandin.ProjectSpec{Path: "chaos/app", Files: map[string]string{"README": "chaos\n"}})
	if err != nil {
		return res, err
	}
	api, err := newAPIProxy(gl.URL(), o.APIFail, rnd)
	if err != nil {
		return res, err
	}
	apiSrv, err := serve(api)
	if err != nil {
		return res, err
	}
	defer apiSrv.close()

	listen, err := fixedPort(rnd) // fixed across restarts: GitLab's hook URL
	if err != nil {
		return res, err
	}
	writeCfg := func(listen string) error {
		cfgPath, err := writeChildConfig(o, stateDir, listen, apiSrv.url, gl.URL(), apiToken, secret, proj.ID)
		fr.cfg = cfgPath
		hooks.setTarget("http://" + listen + "/webhook")
		return err
	}
	if err := writeCfg(listen); err != nil {
		return res, err
	}
	defer fr.cleanup()
	// start starts FireRunner; when its port was taken meanwhile (by
	// another program on this shared machine), it moves to a new one.
	start := func() error {
		for try := 0; ; try++ {
			err := fr.start(ctx, listen)
			var inUse *portInUseError
			if !errors.As(err, &inUse) || try == 5 {
				return err
			}
			res.Notes = append(res.Notes, inUse.Error())
			if listen, err = fixedPort(rnd); err != nil {
				return err
			}
			if err := writeCfg(listen); err != nil {
				return err
			}
		}
	}
	if err := start(); err != nil {
		return res, err
	}
	logf("FireRunner #1 ready (pid %d); GitLab stand-in %s, API proxy %s, hooks via %s", fr.pid(), gl.URL(), apiSrv.url, hookSrv.url)

	// Jobs arrive over time, in pipelines of 1-4.
	var mu sync.Mutex
	var ids []int64
	feedDone := make(chan error, 1)
	feedCtx, stopFeed := context.WithCancel(ctx)
	defer stopFeed()
	go func() {
		feedDone <- feed(feedCtx, o, gl, proj.ID, rnd, func(id int64) { mu.Lock(); ids = append(ids, id); mu.Unlock() })
	}()

	deadline := began.Add(o.Timeout)
	nextKill := time.Now().Add(rnd.Duration(o.KillMin, o.KillMax))
	fed, lastReport := false, time.Now()
	// Jobs stuck for good (a state FireRunner never leaves) end the run
	// early: no progress for Stall with every job created.
	lastUnresolved, progressAt := -1, time.Now()
	for {
		select {
		case <-ctx.Done():
			return res, ctx.Err()
		case err := <-feedDone:
			if err != nil {
				return res, fmt.Errorf("creating jobs: %w", err)
			}
			fed = true
			logf("all %d jobs created", o.Jobs)
		case <-time.After(200 * time.Millisecond):
		}
		mu.Lock()
		created := slices.Clone(ids)
		mu.Unlock()
		unresolved := -1
		if fed || time.Since(lastReport) > 5*time.Second {
			unresolved = len(pending(gl, stateDir, created))
		}
		if time.Since(lastReport) > 5*time.Second {
			logf("%d jobs created, %d not resolved yet; %d kills", len(created), unresolved, res.Kills)
			lastReport = time.Now()
		}
		if fed && unresolved == 0 {
			logf("every job resolved")
			break
		}
		if unresolved != lastUnresolved {
			lastUnresolved, progressAt = unresolved, time.Now()
		}
		if fed && time.Since(progressAt) > o.Stall {
			logf("no progress for %s: %d jobs unresolved", o.Stall, unresolved)
			break
		}
		if time.Now().After(deadline) {
			logf("timeout: %d jobs unresolved", unresolved)
			break
		}
		if time.Now().After(nextKill) {
			fr.kill()
			res.Kills++
			if err := start(); err != nil {
				return res, err
			}
			nextKill = time.Now().Add(rnd.Duration(o.KillMin, o.KillMax))
		}
	}
	stopFeed()
	mu.Lock()
	res.jobsAll = slices.Clone(ids)
	mu.Unlock()
	// No more kills: FireRunner must clean up everything by itself.
	settle := time.Now().Add(o.Settle)
	for {
		left := leftovers(gl, stateDir)
		if len(left) == 0 || time.Now().After(settle) {
			break
		}
		time.Sleep(250 * time.Millisecond)
	}
	res.Starts = fr.starts
	measure(&res, gl, stateDir)
	// Graceful stop, then make sure nothing of ours keeps running.
	fr.stop()
	for _, p := range vm.FindProcs(filepath.Join(stateDir, "vms") + "/") {
		_ = p.KillGroup()
	}
	res.HooksReceived, res.HooksDropped, res.HooksSent, res.HooksFailed = hooks.received.Load(), hooks.dropped.Load(), hooks.sent.Load(), hooks.failed.Load()
	res.APICalls, res.APIFailedBefore, res.APIFailedAfter = api.calls.Load(), api.before.Load(), api.after.Load()
	res.Elapsed = time.Since(began)
	_ = os.WriteFile(filepath.Join(o.WorkDir, "report.txt"), []byte(res.Summary()), 0o600)
	return res, nil
}

// fixedPort picks a free loopback port below the kernel's ephemeral range:
// while FireRunner is down, any outgoing connection could otherwise take
// its port as a source port and the restart would fail to listen.
func fixedPort(rnd *lockedRand) (string, error) {
	lo := 32768
	if b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range"); err == nil {
		if f := strings.Fields(string(b)); len(f) == 2 {
			if n, err := strconv.Atoi(f[0]); err == nil {
				lo = n
			}
		}
	}
	if lo <= 10000 {
		return "", fmt.Errorf("ephemeral ports start at %d: no room for a fixed port below them", lo)
	}
	for range 100 {
		addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(10000+rnd.IntN(lo-10000)))
		if ln, err := net.Listen("tcp", addr); err == nil {
			ln.Close()
			return addr, nil
		}
	}
	return "", errors.New("no free port below the ephemeral range")
}

var sizes = []string{"firecracker-1cpu-1gb", "firecracker-1cpu-2gb", "firecracker-2cpu-4gb", "firecracker-4cpu-8gb"}

// feed creates o.Jobs jobs in pipelines of 1-4, some with an extra tag (a
// runner made for [size, linux] may then take a plain [size] job, as GitLab
// allows).
func feed(ctx context.Context, o Options, gl *gitlabstandin.Server, project int64, rnd *lockedRand, add func(int64)) error {
	for n := 0; n < o.Jobs; {
		k := min(1+rnd.IntN(4), o.Jobs-n)
		var specs []gitlabstandin.JobSpec
		for i := range k {
			tags := []string{sizes[rnd.IntN(len(sizes))]}
			if rnd.IntN(4) == 0 {
				tags = append(tags, "linux")
			}
			specs = append(specs, gitlabstandin.JobSpec{Name: fmt.Sprintf("job-%d", n+i+1), Tags: tags, Script: []string{"true"}})
		}
		pl, err := gl.CreatePipeline(project, specs...)
		if err != nil {
			return err
		}
		for _, id := range pl.JobIDs {
			add(id)
		}
		n += k
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(rnd.Duration(o.FeedEvery/2, o.FeedEvery*3/2)):
		}
	}
	return nil
}

func writeChildConfig(o Options, stateDir, listen, apiURL, guestURL, apiToken, secret string, project int64) (string, error) {
	tokFile, secFile := filepath.Join(o.WorkDir, "gitlab_token"), filepath.Join(o.WorkDir, "webhook_secret")
	if err := os.WriteFile(tokFile, []byte(apiToken+"\n"), 0o600); err != nil {
		return "", err
	}
	if err := os.WriteFile(secFile, []byte(secret+"\n"), 0o600); err != nil {
		return "", err
	}
	cfg := config.Default()
	cfg.Listen, cfg.StateDir, cfg.HostID = listen, stateDir, hostID
	cfg.GitLab.URL, cfg.GitLab.GuestURL = apiURL, guestURL
	cfg.GitLab.TokenFile, cfg.GitLab.WebhookSecretFile = tokFile, secFile
	cfg.GitLab.RequestTimeout = 10 * time.Second
	cfg.Reconcile.Interval = 2 * time.Second // the backstop poll and sweep
	cfg.Reconcile.PollProjects = []int64{project}
	cfg.Limits.VMStartTimeout = 20 * time.Second
	cfg.Limits.JobMaxDuration = 2 * time.Minute
	cfg.Limits.DrainTimeout = 2 * time.Second
	cfg.Limits.StartAttempts = 8
	cfg.Limits.RetryBackoff = 200 * time.Millisecond
	cfg.VM.Driver = "fakeproc"
	cfg.Network.Mode = "tap" // the file-backed network
	cc := childConfig{Config: cfg, HostID: hostID, Capacity: o.Capacity,
		Guest:    []string{o.Self, "guest"},
		GuestEnv: []string{picksEnv + "=" + filepath.Join(o.WorkDir, "picks.log")}}
	b, err := json.MarshalIndent(cc, "", "  ")
	if err != nil {
		return "", err
	}
	p := filepath.Join(o.WorkDir, "firerunner.json")
	return p, os.WriteFile(p, b, 0o600)
}

// child is the FireRunner process of the moment.
type child struct {
	self, cfg, work string
	mu              sync.Mutex
	cmd             *exec.Cmd
	done            chan struct{}
	pids            map[int]bool
	starts          int
}

func (c *child) pid() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.cmd.Process.Pid
}

func (c *child) isOurs(pid int) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.pids[pid]
}

// start runs a new FireRunner on the same state and waits for /readyz.
func (c *child) start(ctx context.Context, listen string) error {
	c.mu.Lock()
	c.starts++
	n := c.starts
	c.mu.Unlock()
	out, err := os.OpenFile(filepath.Join(c.work, fmt.Sprintf("firerunner-%d.log", n)), os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	defer out.Close()
	cmd := exec.Command(c.self, "serve", c.cfg)
	cmd.Stdout, cmd.Stderr = out, out
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	c.mu.Lock()
	if err := cmd.Start(); err != nil {
		c.mu.Unlock()
		return err
	}
	done := make(chan struct{})
	c.cmd, c.done = cmd, done
	c.pids[cmd.Process.Pid] = true
	c.mu.Unlock()
	go func() { _ = cmd.Wait(); close(done) }()
	limit := time.Now().Add(time.Minute)
	for {
		select {
		case <-done:
			b, _ := os.ReadFile(filepath.Join(c.work, fmt.Sprintf("firerunner-%d.log", n)))
			if strings.Contains(string(b), "bind: address already in use") {
				out, _ := exec.Command("ss", "-tanp", "sport = :"+listen[strings.LastIndexByte(listen, ':')+1:]).CombinedOutput()
				return &portInUseError{n: n, listen: listen, holders: string(out)}
			}
			return fmt.Errorf("FireRunner #%d exited during start-up: %s\n%s", n, cmd.ProcessState, tail(string(b), 2000))
		case <-ctx.Done():
			return ctx.Err()
		default:
		}
		if resp, err := http.Get("http://" + listen + "/readyz"); err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
		}
		if time.Now().After(limit) {
			return fmt.Errorf("FireRunner #%d not ready after a minute", n)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// portInUseError: FireRunner could not listen on its port.
type portInUseError struct {
	n               int
	listen, holders string
}

func (e *portInUseError) Error() string {
	return fmt.Sprintf("FireRunner #%d: %s was taken while it was down; moved to another port. Sockets on it:\n%s", e.n, e.listen, e.holders)
}

func tail(s string, n int) string {
	if len(s) > n {
		return s[len(s)-n:]
	}
	return s
}

func (c *child) signal(sig syscall.Signal, wait time.Duration) {
	c.mu.Lock()
	cmd, done := c.cmd, c.done
	c.mu.Unlock()
	if cmd == nil {
		return
	}
	_ = cmd.Process.Signal(sig)
	select {
	case <-done:
	case <-time.After(wait):
		_ = cmd.Process.Kill()
		<-done
	}
}

func (c *child) kill() { c.signal(syscall.SIGKILL, time.Minute) }
func (c *child) stop() { c.signal(syscall.SIGTERM, 90*time.Second) }
func (c *child) cleanup() {
	c.mu.Lock()
	done := c.done
	c.mu.Unlock()
	if done != nil {
		select {
		case <-done:
		default:
			c.kill()
		}
	}
}

// reaper collects adopted guests (orphans of a killed FireRunner) as init
// would. FireRunner processes are exec.Cmd's to wait for, and children in
// our own process group (the stand-in's git) too: those are left alone.
func reaper(fr *child) (stop func()) { return reaperFunc(fr.isOurs) }

// readStore reads FireRunner's records like `firerunner status` does.
func readStore(stateDir string, fn func(*store.Store) error) error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s, err := store.OpenReadOnly(ctx, stateDir)
	if err != nil {
		return err
	}
	defer s.Close()
	return fn(s)
}

// pending returns the jobs not resolved yet: resolved means GitLab ended
// the job and FireRunner's record ended too, or FireRunner gave it up.
func pending(gl *gitlabstandin.Server, stateDir string, ids []int64) []int64 {
	recs := map[int64]job.Job{}
	if err := readStore(stateDir, func(s *store.Store) error {
		all, err := s.ListJobs(context.Background(), store.Filter{})
		for _, j := range all {
			recs[j.ID] = j
		}
		return err
	}); err != nil {
		return ids
	}
	var out []int64
	for _, id := range ids {
		js, _ := gl.Job(id)
		r, ok := recs[id]
		switch {
		case ok && r.State == job.Failed && js.Status != gitlabstandin.StatusSuccess:
		case ok && r.State.Terminal() && gitlabstandin.Terminal(js.Status):
		default:
			out = append(out, id)
		}
	}
	return out
}

// leftovers lists what FireRunner still has to clean up: VMs (dirs, guest
// processes, live records), runners in GitLab, "taps", active records.
func leftovers(gl *gitlabstandin.Server, stateDir string) []string {
	var out []string
	sd := vm.NewStateDir(stateDir)
	ids, _ := sd.IDs()
	for _, id := range ids {
		out = append(out, "vm dir "+id)
	}
	for _, p := range vm.FindProcs(sd.Root + "/") {
		out = append(out, fmt.Sprintf("guest process %d", p.PID))
	}
	for _, r := range gl.Runners() {
		out = append(out, fmt.Sprintf("runner #%d %q", r.ID, r.Description))
	}
	taps, _ := NewFileNet(netDir(stateDir)).List(context.Background())
	for _, t := range taps {
		out = append(out, "tap "+t)
	}
	if err := readStore(stateDir, func(s *store.Store) error {
		live, err := s.ListVMs(context.Background(), true, 0)
		for _, v := range live {
			out = append(out, fmt.Sprintf("vm record %s %s", v.ID, v.State))
		}
		if err != nil {
			return err
		}
		act, err := s.ListJobs(context.Background(), store.Filter{ActiveOnly: true})
		for _, j := range act {
			out = append(out, fmt.Sprintf("job record %d %s", j.ID, j.State))
		}
		return err
	}); err != nil {
		out = append(out, "store: "+err.Error())
	}
	return out
}

// measure classifies every job and counts leaks.
func measure(res *Result, gl *gitlabstandin.Server, stateDir string) {
	res.reasons, res.pickCounts, res.recordPicks = map[string]int{}, map[int64]int{}, map[int64]int{}
	recs := map[int64]job.Job{}
	vmRecs := map[string]job.VM{}
	if err := readStore(stateDir, func(s *store.Store) error {
		all, err := s.ListJobs(context.Background(), store.Filter{})
		if err != nil {
			return err
		}
		for _, j := range all {
			recs[j.ID] = j
		}
		vms, err := s.ListVMs(context.Background(), false, 0)
		for _, v := range vms {
			vmRecs[v.ID] = v
			if v.PickedJobID != 0 {
				res.recordPicks[v.PickedJobID]++
			}
		}
		return err
	}); err != nil {
		res.Problems = append(res.Problems, "store: "+err.Error())
	}
	if f, err := os.Open(filepath.Join(filepath.Dir(stateDir), "picks.log")); err == nil {
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			if id, err := strconv.ParseInt(strings.Fields(sc.Text() + " x")[0], 10, 64); err == nil {
				res.pickCounts[id]++
			}
		}
		f.Close()
	}
	for _, id := range res.jobsAll {
		js, _ := gl.Job(id)
		r, known := recs[id]
		var ran gitlabstandin.RunnerState
		if js.RunnerID != 0 {
			ran, _ = gl.Runner(js.RunnerID)
		}
		ours := strings.HasPrefix(ran.Description, "firerunner "+hostID+" ")
		switch {
		case js.Status == gitlabstandin.StatusSuccess && ours && known && r.State == job.Done && r.RunnerID == js.RunnerID && r.VMID != "":
			res.Served++
			res.servedIDs = append(res.servedIDs, id)
			res.startLatencies = append(res.startLatencies, js.StartedAt.Sub(js.QueuedAt))
		case js.Status != gitlabstandin.StatusSuccess && js.RunnerID == 0 && known && r.State == job.Failed && r.Reason != "":
			res.Failed++
			res.failedIDs = append(res.failedIDs, id)
			res.reasons[job.ReasonKey(r.Reason)]++
		default:
			res.Lost++
			res.lostIDs = append(res.lostIDs, id)
			res.Problems = append(res.Problems, fmt.Sprintf("lost job %d: GitLab %s (runner #%d %q), record %v %s %q vm %s runner %d",
				id, js.Status, js.RunnerID, ran.Description, known, r.State, r.Reason, r.VMID, r.RunnerID))
		}
		if n, m := res.pickCounts[id], res.recordPicks[id]; n > 1 || m > 1 {
			res.Doubled++
			res.Problems = append(res.Problems, fmt.Sprintf("doubled job %d: taken %d times by guests, by %d VM records", id, n, m))
		}
	}
	slices.Sort(res.startLatencies)
	if n := len(res.startLatencies); n > 0 {
		res.P99Start = res.startLatencies[(n*99+99)/100-1]
	}
	// Leaks: VMs (dir, guest process or live record), runners, taps.
	leakedVMs := map[string]bool{}
	sd := vm.NewStateDir(stateDir)
	ids, _ := sd.IDs()
	for _, id := range ids {
		leakedVMs[id] = true
		res.Problems = append(res.Problems, "leaked vm dir "+id)
	}
	for _, p := range vm.FindProcs(sd.Root + "/") {
		cmd, _ := os.ReadFile("/proc/" + strconv.Itoa(p.PID) + "/cmdline")
		id := fmt.Sprintf("pid %d", p.PID)
		if i := strings.Index(string(cmd), sd.Root+"/"); i >= 0 {
			id = strings.SplitN(string(cmd)[i+len(sd.Root)+1:], "/", 2)[0]
		}
		leakedVMs[id] = true
		res.Problems = append(res.Problems, fmt.Sprintf("leaked guest process %d (%s)", p.PID, id))
	}
	for id, v := range vmRecs {
		if v.State.Live() {
			leakedVMs[id] = true
			res.Problems = append(res.Problems, fmt.Sprintf("leaked vm record %s (%s)", id, v.State))
		}
	}
	res.LeakedVMs = len(leakedVMs)
	for _, r := range gl.Runners() {
		res.LeakedRunners++
		res.Problems = append(res.Problems, fmt.Sprintf("leaked runner #%d %q", r.ID, r.Description))
	}
	taps, _ := NewFileNet(netDir(stateDir)).List(context.Background())
	for _, t := range taps {
		res.LeakedTaps++
		res.Problems = append(res.Problems, "leaked tap "+t)
	}
	for id, r := range recs {
		if !r.State.Terminal() && r.State != job.Ignored {
			res.Problems = append(res.Problems, fmt.Sprintf("job record %d still %s", id, r.State))
		}
	}
}

// ErrNotOK is returned by callers when the figures show a problem.
var ErrNotOK = errors.New("chaos: jobs lost or doubled, or resources leaked")
