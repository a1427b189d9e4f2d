package chaos

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"sort"
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
	"github.com/firerunner/firerunner/internal/testsupport/pgtest"
	"github.com/firerunner/firerunner/internal/vm"
)

// FleetOptions shape a fleet run (make test-fleet): Hosts FireRunner
// processes on one throwaway PostgreSQL cluster and one GitLab stand-in,
// Jobs jobs whose webhooks go to a random host, duplicated and reordered
// (and a few dropped: the poll leader finds those), one host killed with
// SIGKILL when KillAfter jobs were created, and brought back once every
// job is resolved, to reap its VMs.
type FleetOptions struct {
	Jobs, Hosts int
	// Self is run as "Self serve CONFIG" (a host) and "Self guest DIR".
	Self    string
	WorkDir string
	// KillAfter: host 2 is killed once this many jobs exist (0: never).
	KillAfter  int
	HookDrop   float64
	HookCopies int
	HookDelay  time.Duration
	FeedEvery  time.Duration
	Capacity   planner.Capacity // each host's
	// Heartbeat and Lease are state.heartbeat_interval and state.host_lease.
	Heartbeat, Lease       time.Duration
	Timeout, Settle, Stall time.Duration
	Seed                   uint64
	Log                    io.Writer
}

// DefaultFleetOptions: three hosts of 6 VMs, 1,000 jobs, host 2 killed
// after 400 jobs were created.
func DefaultFleetOptions() FleetOptions {
	return FleetOptions{Jobs: 1000, Hosts: 3, KillAfter: 400, HookDrop: 0.02, HookCopies: 3, HookDelay: 300 * time.Millisecond,
		FeedEvery: 25 * time.Millisecond, Capacity: planner.Capacity{VCPUs: 12, MemoryMiB: 24 * 1024, MaxVMs: 6},
		Heartbeat: 200 * time.Millisecond, Lease: 2 * time.Second,
		Timeout: 4 * time.Minute, Settle: time.Minute, Stall: 60 * time.Second}
}

// FleetResult is what a fleet run found.
type FleetResult struct {
	Jobs, Served, HostLost, OtherFailed, Lost, Doubled int
	ServedBy                                           map[string]int // jobs served, by the host whose VM ran them
	MaxVMs                                             map[string]int // most live VM records a host held at once
	LeakedVMs, LeakedRunners                           int
	Killed                                             string
	KilledRunning, KilledWaiting                       int // the killed host's jobs at its death: running, claimed and waiting
	Requeued                                           int // of those waiting ones, served by another host
	HooksReceived, HooksDropped, HooksSent             int64
	Problems                                           []string
	Elapsed                                            time.Duration
	WorkDir                                            string
}

// OK reports a clean run: nothing lost, doubled or leaked, no host over
// its capacity, every host served jobs.
func (r FleetResult) OK() bool { return len(r.Problems) == 0 }

// Line is the one-line summary.
func (r FleetResult) Line() string {
	var by []string
	for h, n := range r.ServedBy {
		by = append(by, fmt.Sprintf("%s:%d(max %d VMs)", h, n, r.MaxVMs[h]))
	}
	sort.Strings(by)
	return fmt.Sprintf("fleet: jobs=%d served=%d host_lost=%d other_failed=%d lost=%d doubled=%d leaked_vms=%d leaked_runners=%d killed=%s (running %d, waiting %d, requeued and served %d) by_host=[%s] elapsed=%s",
		r.Jobs, r.Served, r.HostLost, r.OtherFailed, r.Lost, r.Doubled, r.LeakedVMs, r.LeakedRunners, r.Killed,
		r.KilledRunning, r.KilledWaiting, r.Requeued, strings.Join(by, " "), r.Elapsed.Round(time.Second))
}

// fleetHost is one FireRunner process of the fleet.
type fleetHost struct {
	id, stateDir, listen string
	fr                   *child
}

// RunFleet runs the fleet and returns what it found; an error means the
// harness itself failed.
func RunFleet(ctx context.Context, o FleetOptions) (res FleetResult, err error) {
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
		if o.WorkDir, err = os.MkdirTemp("", "firerunner-fleet-"); err != nil {
			return res, err
		}
	}
	res.WorkDir, res.Jobs = o.WorkDir, o.Jobs
	rnd := newRand(o.Seed)

	pg, err := pgtest.Start(pgtest.Options{})
	if err != nil {
		return res, fmt.Errorf("throwaway PostgreSQL: %w", err)
	}
	defer pg.Stop()
	dsn, err := pg.CreateDatabase()
	if err != nil {
		return res, err
	}
	dsnFile := filepath.Join(o.WorkDir, "postgres.dsn")
	if err := os.WriteFile(dsnFile, []byte(dsn+"\n"), 0o600); err != nil {
		return res, err
	}
	logf("PostgreSQL up in %s", pg.Dir)

	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		return res, fmt.Errorf("PR_SET_CHILD_SUBREAPER: %w", err)
	}
	defer func() { _ = unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0) }()
	var hosts []*fleetHost
	var pidMu sync.Mutex
	ours := func(pid int) bool {
		pidMu.Lock()
		defer pidMu.Unlock()
		for _, h := range hosts {
			if h.fr.isOurs(pid) {
				return true
			}
		}
		return false
	}
	stopReap := reaperFunc(ours) // leaves every host process alone
	defer stopReap()

	hooks := newHookProxy(o.HookDrop, o.HookCopies, o.HookDelay, rnd)
	hookSrv, err := serve(hooks)
	if err != nil {
		return res, err
	}
	defer hookSrv.close()
	defer hooks.close()
	apiToken, secret := "glpat-fleet"+randHex(8), randHex(16)
	gl, err := gitlabstandin.New(gitlabstandin.Options{WebhookURL: hookSrv.url + "/hook", WebhookSecret: secret,
		ProjectRunnerCap: -1, Dir: filepath.Join(o.WorkDir, "gitlab")})
	if err != nil {
		return res, err
	}
	defer gl.Close()
	gl.AddToken(apiToken, gitlabstandin.ScopeAPI)
	proj, err := gl.AddProject(gitlabstandin.ProjectSpec{Path: "fleet/app", Files: map[string]string{"README": "fleet\n"}})
	if err != nil {
		return res, err
	}
	tokFile, secFile := filepath.Join(o.WorkDir, "gitlab_token"), filepath.Join(o.WorkDir, "webhook_secret")
	if err := os.WriteFile(tokFile, []byte(apiToken+"\n"), 0o600); err != nil {
		return res, err
	}
	if err := os.WriteFile(secFile, []byte(secret+"\n"), 0o600); err != nil {
		return res, err
	}
	var targets []string
	for i := 1; i <= o.Hosts; i++ {
		listen, err := fixedPort(rnd)
		if err != nil {
			return res, err
		}
		h := &fleetHost{id: fmt.Sprintf("fleet-%d", i), stateDir: filepath.Join(o.WorkDir, fmt.Sprintf("host-%d", i)), listen: listen}
		work := filepath.Join(o.WorkDir, h.id)
		if err := os.MkdirAll(work, 0o700); err != nil {
			return res, err
		}
		h.fr = &child{self: o.Self, work: work, pids: map[int]bool{}}
		cfg := config.Default()
		cfg.Listen, cfg.StateDir, cfg.HostID = listen, h.stateDir, h.id
		cfg.GitLab.URL, cfg.GitLab.GuestURL = gl.URL(), gl.URL()
		cfg.GitLab.TokenFile, cfg.GitLab.WebhookSecretFile = tokFile, secFile
		cfg.GitLab.RequestTimeout = 10 * time.Second
		cfg.State.Backend, cfg.State.PostgresDSNFile = "postgres", dsnFile
		cfg.State.HeartbeatInterval, cfg.State.HostLease = o.Heartbeat, o.Lease
		cfg.Reconcile.Interval = 2 * time.Second
		cfg.Reconcile.PollProjects = []int64{proj.ID}
		cfg.Limits.VMStartTimeout = 20 * time.Second
		cfg.Limits.JobMaxDuration = 2 * time.Minute
		cfg.Limits.DrainTimeout = 2 * time.Second
		cfg.Limits.StartAttempts = 8
		cfg.Limits.RetryBackoff = 200 * time.Millisecond
		cfg.VM.Driver = "fakeproc"
		cfg.Network.Mode = "tap"
		cc := childConfig{Config: cfg, HostID: h.id, Capacity: o.Capacity, Guest: []string{o.Self, "guest"},
			GuestEnv: []string{picksEnv + "=" + filepath.Join(o.WorkDir, "picks.log")}}
		if i == 2 && o.KillAfter > 0 {
			// The host to be killed runs long jobs (up to 4 leases), so
			// some still run when its lease ends: those must fail host_lost.
			cc.GuestEnv = append(cc.GuestEnv, fmt.Sprintf("%s=%d", jobMSEnv, 4*o.Lease.Milliseconds()))
		}
		b, err := json.MarshalIndent(cc, "", "  ")
		if err != nil {
			return res, err
		}
		h.fr.cfg = filepath.Join(work, "firerunner.json")
		if err := os.WriteFile(h.fr.cfg, b, 0o600); err != nil {
			return res, err
		}
		pidMu.Lock()
		hosts = append(hosts, h)
		pidMu.Unlock()
		targets = append(targets, "http://"+listen+"/webhook")
	}
	defer func() {
		for _, h := range hosts {
			h.fr.cleanup()
		}
	}()
	for _, h := range hosts {
		if err := h.fr.start(ctx, h.listen); err != nil {
			return res, err
		}
	}
	hooks.targets.Store(&targets)
	hooks.setTarget(targets[0])
	logf("%d hosts ready; GitLab stand-in %s", len(hosts), gl.URL())

	st, err := store.OpenPostgresReadOnly(ctx, dsn)
	if err != nil {
		return res, err
	}
	defer st.Close()

	var mu sync.Mutex
	var ids []int64
	feedDone := make(chan error, 1)
	feedCtx, stopFeed := context.WithCancel(ctx)
	defer stopFeed()
	go func() {
		feedDone <- feed(feedCtx, Options{Jobs: o.Jobs, FeedEvery: o.FeedEvery}, gl, proj.ID, rnd,
			func(id int64) { mu.Lock(); ids = append(ids, id); mu.Unlock() })
	}()
	var victim *fleetHost
	if o.KillAfter > 0 && len(hosts) > 1 {
		victim = hosts[1]
	}
	killed := false
	var victimClaimed []job.Job
	deadline := began.Add(o.Timeout)
	fed, lastReport := false, time.Now()
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
		case <-time.After(100 * time.Millisecond):
		}
		mu.Lock()
		created := slices.Clone(ids)
		mu.Unlock()
		if victim != nil && !killed && len(created) >= o.KillAfter && (fed || victimBusy(ctx, st, victim.id)) {
			// What the victim holds right now, then SIGKILL: no drain, no
			// cleanup, its heartbeats stop.
			claimed, _ := st.ClaimedJobs(ctx, victim.id)
			victim.fr.kill()
			killed = true
			res.Killed = victim.id
			for _, j := range claimed {
				switch j.State {
				case job.Running:
					res.KilledRunning++
				case job.Queued:
					res.KilledWaiting++
				}
			}
			logf("SIGKILL %s (pid %d) with %d jobs claimed (%d running)", victim.id, victim.fr.pid(), len(claimed), res.KilledRunning)
			victimClaimed = claimed
		}
		unresolved := -1
		if fed || time.Since(lastReport) > 5*time.Second {
			unresolved = len(fleetPending(gl, st, created))
		}
		if time.Since(lastReport) > 5*time.Second {
			logf("%d jobs created, %d not resolved yet", len(created), unresolved)
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
	}
	stopFeed()
	mu.Lock()
	all := slices.Clone(ids)
	mu.Unlock()
	for _, j := range victimClaimed {
		if j.State != job.Queued {
			continue
		}
		r, _ := st.GetJob(ctx, j.ID)
		v, _ := st.GetVM(ctx, r.VMID)
		logf("the killed host's waiting job %d: %s %q, ran on %q", j.ID, r.State, r.Reason, v.HostID)
		if r.State == job.Done && v.HostID != victim.id {
			res.Requeued++
		}
	}
	if killed {
		// The dead host comes back: it tears down what it left running.
		if err := victim.fr.start(ctx, victim.listen); err != nil {
			return res, fmt.Errorf("restarting %s: %w", victim.id, err)
		}
		logf("%s restarted to reap its VMs", victim.id)
	}
	settle := time.Now().Add(o.Settle)
	for {
		left := fleetLeftovers(gl, st, hosts)
		if len(left) == 0 || time.Now().After(settle) {
			break
		}
		time.Sleep(250 * time.Millisecond)
	}
	fleetMeasure(&res, gl, st, hosts, all, o)
	for _, h := range hosts {
		h.fr.stop()
		for _, p := range vm.FindProcs(filepath.Join(h.stateDir, "vms") + "/") {
			_ = p.KillGroup()
		}
	}
	res.HooksReceived, res.HooksDropped, res.HooksSent = hooks.received.Load(), hooks.dropped.Load(), hooks.sent.Load()
	res.Elapsed = time.Since(began)
	summary := res.Line() + "\n" + strings.Join(res.Problems, "\n") + "\n"
	_ = os.WriteFile(filepath.Join(o.WorkDir, "report.txt"), []byte(summary), 0o600)
	return res, nil
}

// victimBusy reports whether host runs a job on one of its VMs: the kill
// waits for that, so that a running job dies with the host.
func victimBusy(ctx context.Context, st *store.Store, host string) bool {
	live, err := st.ListVMs(ctx, true, 0)
	if err != nil {
		return false
	}
	for _, v := range live {
		if v.HostID == host && v.State == job.VMBusy {
			return true
		}
	}
	return false
}

// reaperFunc collects adopted guests (orphans of a killed FireRunner) as
// init would, never a process isHost names (FireRunner processes are
// exec.Cmd's to wait for) nor one of our own process group (the stand-in's
// git).
func reaperFunc(isHost func(int) bool) (stop func()) {
	quit, done := make(chan struct{}), make(chan struct{})
	self, pgrp := strconv.Itoa(os.Getpid()), strconv.Itoa(syscall.Getpgrp())
	reap := func() {
		ents, _ := os.ReadDir("/proc")
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
			f := strings.Fields(string(b)[i+2:]) // state, ppid, pgrp
			if len(f) < 3 || f[0] != "Z" || f[1] != self || f[2] == pgrp || isHost(pid) {
				continue
			}
			var ws unix.WaitStatus
			_, _ = unix.Wait4(pid, &ws, unix.WNOHANG, nil)
		}
	}
	go func() {
		defer close(done)
		t := time.NewTicker(100 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-quit:
				reap()
				return
			case <-t.C:
				reap()
			}
		}
	}()
	return func() { close(quit); <-done }
}

// fleetPending: jobs not resolved yet (GitLab ended the job and the record
// ended, or FireRunner failed it).
func fleetPending(gl *gitlabstandin.Server, st *store.Store, ids []int64) []int64 {
	recs := map[int64]job.Job{}
	all, err := st.ListJobs(context.Background(), store.Filter{})
	if err != nil {
		return ids
	}
	for _, j := range all {
		recs[j.ID] = j
	}
	var out []int64
	for _, id := range ids {
		js, _ := gl.Job(id)
		r, ok := recs[id]
		switch {
		case ok && r.State == job.Failed:
		case ok && r.State.Terminal() && gitlabstandin.Terminal(js.Status):
		default:
			out = append(out, id)
		}
	}
	return out
}

// fleetLeftovers: what the fleet still has to clean up.
func fleetLeftovers(gl *gitlabstandin.Server, st *store.Store, hosts []*fleetHost) []string {
	var out []string
	for _, h := range hosts {
		sd := vm.NewStateDir(h.stateDir)
		ids, _ := sd.IDs()
		for _, id := range ids {
			out = append(out, h.id+": vm dir "+id)
		}
		for _, p := range vm.FindProcs(sd.Root + "/") {
			out = append(out, fmt.Sprintf("%s: guest process %d", h.id, p.PID))
		}
		taps, _ := NewFileNet(netDir(h.stateDir)).List(context.Background())
		for _, t := range taps {
			out = append(out, h.id+": tap "+t)
		}
	}
	for _, r := range gl.Runners() {
		out = append(out, fmt.Sprintf("runner #%d %q", r.ID, r.Description))
	}
	live, err := st.ListVMs(context.Background(), true, 0)
	for _, v := range live {
		out = append(out, fmt.Sprintf("vm record %s on %s: %s", v.ID, v.HostID, v.State))
	}
	act, err2 := st.ListJobs(context.Background(), store.Filter{ActiveOnly: true})
	for _, j := range act {
		out = append(out, fmt.Sprintf("job record %d %s", j.ID, j.State))
	}
	if err := errors.Join(err, err2); err != nil {
		out = append(out, "store: "+err.Error())
	}
	return out
}

// fleetMeasure classifies every job, finds each host's peak of live VM
// records (from their Planned and Gone times: exact, not sampled) and
// counts leaks.
func fleetMeasure(res *FleetResult, gl *gitlabstandin.Server, st *store.Store, hosts []*fleetHost, ids []int64, o FleetOptions) {
	ctx := context.Background()
	res.ServedBy, res.MaxVMs = map[string]int{}, map[string]int{}
	problem := func(f string, a ...any) { res.Problems = append(res.Problems, fmt.Sprintf(f, a...)) }
	recs := map[int64]job.Job{}
	all, err := st.ListJobs(ctx, store.Filter{})
	if err != nil {
		problem("store: %v", err)
	}
	for _, j := range all {
		recs[j.ID] = j
	}
	vms, err := st.ListVMs(ctx, false, 0)
	if err != nil {
		problem("store: %v", err)
	}
	vmByID, recordPicks := map[string]job.VM{}, map[int64]int{}
	type edge struct {
		at    time.Time
		delta int
	}
	edges := map[string][]edge{}
	for _, v := range vms {
		vmByID[v.ID] = v
		if v.PickedJobID != 0 {
			recordPicks[v.PickedJobID]++
		}
		end := v.Timeline.Gone
		if end.IsZero() {
			end = time.Now()
		}
		edges[v.HostID] = append(edges[v.HostID], edge{v.CreatedAt, 1}, edge{end, -1})
	}
	for h, es := range edges {
		sort.Slice(es, func(i, j int) bool {
			if es[i].at.Equal(es[j].at) {
				return es[i].delta < es[j].delta // a VM gone at the instant another is planned: freed first
			}
			return es[i].at.Before(es[j].at)
		})
		n := 0
		for _, e := range es {
			n += e.delta
			res.MaxVMs[h] = max(res.MaxVMs[h], n)
		}
		if o.Capacity.MaxVMs > 0 && res.MaxVMs[h] > o.Capacity.MaxVMs {
			problem("host %s held %d VMs at once, capacity %d", h, res.MaxVMs[h], o.Capacity.MaxVMs)
		}
	}
	picks := map[int64]int{}
	if f, err := os.Open(filepath.Join(o.WorkDir, "picks.log")); err == nil {
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			if id, err := strconv.ParseInt(strings.Fields(sc.Text() + " x")[0], 10, 64); err == nil {
				picks[id]++
			}
		}
		f.Close()
	}
	for _, id := range ids {
		js, _ := gl.Job(id)
		r, known := recs[id]
		v := vmByID[r.VMID]
		switch {
		case known && r.State == job.Done && r.VMID != "" && r.RunnerID == js.RunnerID && js.Status == gitlabstandin.StatusSuccess:
			res.Served++
			res.ServedBy[v.HostID]++
		case known && r.State == job.Failed && job.ReasonKey(r.Reason) == job.ReasonHostLost:
			res.HostLost++
			if v.HostID != res.Killed {
				problem("job %d failed host_lost, but ran on %s, which was not killed", id, v.HostID)
			}
		case known && r.State == job.Failed:
			res.OtherFailed++
			problem("job %d failed: %s (GitLab %s)", id, r.Reason, js.Status)
		default:
			res.Lost++
			problem("lost job %d: GitLab %s runner #%d, record %v %s %q vm %q runner %d", id, js.Status, js.RunnerID, known, r.State, r.Reason, r.VMID, r.RunnerID)
		}
		if picks[id] > 1 || recordPicks[id] > 1 {
			res.Doubled++
			problem("doubled job %d: taken %d times by guests, by %d VM records", id, picks[id], recordPicks[id])
		}
	}
	for _, h := range hosts {
		if res.ServedBy[h.id] == 0 && (h.id != res.Killed || res.HostLost == 0) {
			problem("host %s ran no job", h.id) // the killed one may have run only jobs that failed host_lost
		}
	}
	// A host process built with -race reports races on its stderr (its log).
	for _, h := range hosts {
		logs, _ := filepath.Glob(filepath.Join(h.fr.work, "firerunner-*.log"))
		for _, l := range logs {
			if b, err := os.ReadFile(l); err == nil && strings.Contains(string(b), "WARNING: DATA RACE") {
				problem("%s: the race detector reported a data race in %s", h.id, l)
			}
		}
	}
	left := fleetLeftovers(gl, st, hosts)
	for _, l := range left {
		if strings.HasPrefix(l, "runner #") {
			res.LeakedRunners++
		} else {
			res.LeakedVMs++
		}
		problem("leaked: %s", l)
	}
	hs, err := st.Hosts(ctx)
	if err != nil || len(hs) != len(hosts) {
		problem("hosts table: %d rows, %v", len(hs), err)
	}
	for _, h := range hs {
		if !h.Alive(time.Now()) {
			problem("host %s not alive at the end", h.ID)
		}
	}
}
