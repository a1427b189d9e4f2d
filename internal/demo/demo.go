// Package demo runs FireRunner end to end on one host: the GitLab stand-in,
// a real FireRunner (QEMU driver) and a pipeline whose jobs run in real
// microVMs. `firerunner-demo` (cmd/firerunner-demo) and the end-to-end test
// both use it.
package demo

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/firerunner/firerunner/internal/config"
	"github.com/firerunner/firerunner/internal/daemon"
	"github.com/firerunner/firerunner/internal/job"
	"github.com/firerunner/firerunner/internal/store"
	"github.com/firerunner/firerunner/internal/tags"
	"github.com/firerunner/firerunner/internal/testsupport/gitlabstandin"
	"github.com/firerunner/firerunner/internal/testsupport/registry"
	"github.com/firerunner/firerunner/internal/vm"
)

// Options configure a run. ImageDir is required; the rest has defaults.
type Options struct {
	// ImageDir is a built guest image (firerunner image build) with gitlab-runner.
	ImageDir string
	// Jobs is the pipeline; default DefaultJobs().
	Jobs []gitlabstandin.JobSpec
	// CancelWhenRunning names jobs to cancel in GitLab once a runner picked them.
	CancelWhenRunning []string
	// VCPUs and MemoryMiB are FireRunner's capacity; default 3 and 4096.
	VCPUs, MemoryMiB int
	// WorkDir holds state, secrets, logs; default a temp dir removed at the end.
	WorkDir string
	// Out receives the human-readable progress, traces and timeline.
	Out io.Writer
	// LogOut receives FireRunner's JSON logs; default WorkDir/firerunner.log.
	LogOut io.Writer
	// Timeout bounds the whole run; default 15 minutes.
	Timeout time.Duration
	// Network is how VMs are networked. "user" (default): QEMU user-mode
	// networking, the stand-in on loopback. "tap": production networking (a
	// tap per VM on FireRunner's bridge, an address from network.cidr,
	// nftables NAT and isolation); the stand-in listens on all addresses and
	// VMs reach it at the bridge address. Tap mode creates the bridge and
	// nft tables in the caller's network namespace: run it in a throwaway one.
	Network string
	// WarmSize, when set (a size tag), gives FireRunner a warm pool of one
	// VM of that size; the pipeline starts once that VM is ready, so its
	// job of that size runs warm while the others boot cold.
	WarmSize string
	// Docker runs FireRunner with the docker executor (runners.executor
	// docker): jobs run in their image: with their services:, jobs without
	// image: in registry.ImageShell, and the VMs pull through a registry
	// mirror (Mirror, or one the run starts in WorkDir). User-mode
	// networking only.
	Docker bool
	// Mirror is the Docker Hub stand-in and pull-through cache the VMs pull
	// through (nil with Docker: the run starts one and stops it at the end).
	Mirror *registry.Mirror
	// JobMaxDuration is FireRunner's limits.job_max_duration; default 10
	// minutes.
	JobMaxDuration time.Duration
}

// DefaultJobs is the demo pipeline: two jobs of different sizes, and one
// job without a FireRunner tag, which FireRunner must leave alone.
func DefaultJobs() []gitlabstandin.JobSpec {
	return []gitlabstandin.JobSpec{
		{Name: "hello", Tags: []string{"firecracker-1cpu-1gb"}, Script: []string{
			`echo "hello from $(hostname), kernel $(uname -r)"`,
			`echo "NPROC=$(nproc) $(grep MemTotal /proc/meminfo)"`,
			`cat README.md`, `git log --oneline -1`,
		}},
		{Name: "build", Tags: []string{"firecracker-2cpu-2gb"}, Script: []string{
			`echo "NPROC=$(nproc) $(grep MemTotal /proc/meminfo)"`,
			`sh ./build.sh`,
		}, AfterScript: []string{`echo "after_script ran"`}},
		{Name: "not-ours", Tags: []string{"docker"}, Script: []string{"echo never runs here"}},
	}
}

// DockerJobs are the demo's jobs for the docker executor (Options.Docker):
// an image: job with a service reached by its alias, and a docker build of
// the repository's Dockerfile whose result runs, in the VM's own Docker.
func DockerJobs() []gitlabstandin.JobSpec {
	return []gitlabstandin.JobSpec{
		{Name: "docker-image", Tags: []string{"firecracker-1cpu-1gb"},
			Image:    &gitlabstandin.ImageSpec{Name: registry.ImageBusybox},
			Services: []gitlabstandin.ImageSpec{{Name: registry.ImageWeb, Alias: "web"}},
			Script: []string{
				`echo "running in: $(busybox | head -1)"`,
				`test ! -e /etc/debian_version && echo "not the VM's Debian root"`,
				`echo "service says: $(wget -qO- http://web/)"`,
			}},
		{Name: "docker-build", Tags: []string{"firecracker-2cpu-2gb"},
			Image: &gitlabstandin.ImageSpec{Name: registry.ImageDockerCLI},
			Script: []string{
				`docker version --format 'docker client {{.Client.Version}}, the VM daemon {{.Server.Version}}'`,
				`docker build -q -t demo-built:1 .`,
				`docker run --rm demo-built:1`,
			}},
	}
}

// Files is the demo repository.
var Files = map[string]string{
	"README.md":  "# demo/app\nA repository served by the GitLab stand-in over git smart HTTP.\n",
	"Dockerfile": "FROM busybox:latest\nRUN echo \"built by docker build in the job's VM (kernel $(uname -r))\" > /built.txt\nCMD [\"cat\", \"/built.txt\"]\n",
	"build.sh":   "#!/bin/sh\nset -e\necho building...\nseq 1 200000 | sort -n | tail -1 > out.txt\necho \"built: $(cat out.txt)\"\n",
}

// JobResult is what happened to one job, seen from GitLab and FireRunner.
type JobResult struct {
	Spec   gitlabstandin.JobSpec
	GitLab gitlabstandin.JobState
	// Ours reports whether the job carried a FireRunner size tag.
	Ours bool
	// Record is FireRunner's record of the job (nil when it has none).
	Record *job.Job
	// VM is the record of the VM that ran the job: started for it or, when
	// a runner made for another job picked it first (GitLab matches tag
	// subsets), for that job. Nil when no VM of ours ran it.
	VM *job.VM
	// Runner is the runner that ran it, as the stand-in saw it (zero if none).
	Runner gitlabstandin.RunnerState
	// Guest is the VM's boot timeline as seen by the driver (nil if no VM).
	Guest *vm.Timeline
	// CanceledAt is when the demo canceled the job in GitLab (zero if not).
	CanceledAt time.Time
}

// Report is the outcome of a run.
type Report struct {
	Jobs []JobResult
	// Leftovers lists anything FireRunner left behind: VMs the driver still
	// knows, per-VM directories, runners not deleted. Empty means clean.
	Leftovers []string
	// RunnersCreated counts runners created in GitLab during the run.
	RunnersCreated int
}

// Job returns the result of the job with the given name.
func (r *Report) Job(name string) (JobResult, bool) {
	for _, j := range r.Jobs {
		if j.Spec.Name == name {
			return j, true
		}
	}
	return JobResult{}, false
}

// Run performs the demo and reports what happened. It cleans up after itself.
func Run(ctx context.Context, o Options) (rep *Report, err error) {
	if o.ImageDir == "" {
		return nil, errors.New("demo: ImageDir is required (build one with make image)")
	}
	if o.Jobs == nil {
		o.Jobs = DefaultJobs()
	}
	if o.VCPUs == 0 {
		o.VCPUs = 3
	}
	if o.MemoryMiB == 0 {
		o.MemoryMiB = 4096
	}
	if o.Timeout == 0 {
		o.Timeout = 15 * time.Minute
	}
	if o.Out == nil {
		o.Out = io.Discard
	}
	switch o.Network {
	case "":
		o.Network = "user"
	case "user", "tap":
	default:
		return nil, fmt.Errorf("demo: network %q is not one of user, tap", o.Network)
	}
	if o.Docker && o.Network != "user" {
		return nil, errors.New("demo: the docker executor demo runs with user-mode networking only")
	}
	ctx, cancel := context.WithTimeout(ctx, o.Timeout)
	defer cancel()
	p := &printer{w: o.Out, t0: time.Now()}

	if o.WorkDir == "" {
		if o.WorkDir, err = os.MkdirTemp("", "firerunner-demo-"); err != nil {
			return nil, err
		}
		defer os.RemoveAll(o.WorkDir)
	}
	logOut := o.LogOut
	if logOut == nil {
		f, err := os.OpenFile(filepath.Join(o.WorkDir, "firerunner.log"), os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
		if err != nil {
			return nil, err
		}
		defer f.Close()
		logOut = f
	}
	log := slog.New(slog.NewJSONHandler(logOut, &slog.HandlerOptions{Level: slog.LevelDebug}))

	// GitLab stand-in on loopback; VMs reach it through QEMU user-mode
	// networking, where the host's loopback is 10.0.2.2. With taps, VMs
	// reach it at the bridge (gateway) address instead.
	glOpts := gitlabstandin.Options{
		Addr: "127.0.0.1:0", ExternalHost: "10.0.2.2", Dir: filepath.Join(o.WorkDir, "gitlab"),
		HardCancel: true, Logger: log.With("component", "gitlab-standin"),
	}
	if o.Network == "tap" {
		gw, err := TapGateway()
		if err != nil {
			return nil, err
		}
		glOpts.Addr, glOpts.ExternalHost = "0.0.0.0:0", gw.String()
	}
	gl, err := gitlabstandin.New(glOpts)
	if err != nil {
		return nil, fmt.Errorf("gitlab stand-in: %w", err)
	}
	defer gl.Close()
	apiToken, hookSecret := "glpat-"+randHex(10), randHex(16)
	gl.AddToken(apiToken, gitlabstandin.ScopeAPI)
	proj, err := gl.AddProject(gitlabstandin.ProjectSpec{Path: "demo/app", Files: Files})
	if err != nil {
		return nil, err
	}
	p.say("GitLab stand-in at http://%s (VMs see %s), project %s #%d", gl.Addr(), gl.URL(), proj.Path, proj.ID)

	if o.Docker && o.Mirror == nil {
		m, err := registry.StartMirror(ctx, filepath.Join(o.WorkDir, "registry"), 0)
		if err != nil {
			return nil, fmt.Errorf("registry mirror: %w", err)
		}
		defer m.Close()
		o.Mirror = m
	}
	if o.Docker {
		p.say("Docker Hub stand-in (docker-registry) at %s holding %d test images; pull-through mirror at %s (VMs: %s)",
			o.Mirror.Upstream.Addr, len(o.Mirror.Images), o.Mirror.Mirror.Addr, MirrorURL(o.Mirror))
	}
	_, glPort, _ := net.SplitHostPort(gl.Addr())
	cfg, err := Config(o, "http://"+net.JoinHostPort("127.0.0.1", glPort), gl.URL(), apiToken, hookSecret)
	if err != nil {
		return nil, err
	}
	d, err := daemon.Start(ctx, cfg, log)
	if err != nil {
		return nil, fmt.Errorf("start firerunner: %w", err)
	}
	shutdown := func() error {
		sctx, scancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer scancel()
		return d.Shutdown(sctx)
	}
	defer func() {
		if d != nil {
			_ = shutdown()
		}
	}()
	gl.SetWebhook("http://"+d.Addr()+"/webhook", hookSecret)
	p.say("FireRunner listening on %s (driver %s, image %s)", d.Addr(), cfg.VM.Driver, filepath.Base(d.Image.Dir))

	if o.WarmSize != "" {
		if err := waitWarm(ctx, d); err != nil {
			return nil, err
		}
		p.say("warm pool ready: a %s VM with gitlab-runner waiting for its config", o.WarmSize)
	}
	pl, err := gl.CreatePipeline(proj.ID, o.Jobs...)
	if err != nil {
		return nil, err
	}
	p.say("pipeline #%d created with %d jobs", pl.ID, len(pl.JobIDs))

	rep = &Report{}
	results := make([]JobResult, len(o.Jobs))
	for i, spec := range o.Jobs {
		_, ours, _ := tags.Parse(spec.Tags, tags.Limits{})
		results[i] = JobResult{Spec: spec, Ours: ours}
	}
	// Follow each job: grab the driver's boot timeline while its VM exists,
	// cancel the ones asked for, report state changes.
	var wg sync.WaitGroup
	guests := &guestTimelines{m: map[string]*vm.Timeline{}}
	for i, id := range pl.JobIDs {
		if !results[i].Ours {
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			follow(ctx, p, gl, d, id, &results[i], slices.Contains(o.CancelWhenRunning, results[i].Spec.Name), guests)
		}()
	}
	wg.Wait()
	if err := ctx.Err(); err != nil {
		return rep, fmt.Errorf("demo timed out: %w (FireRunner log: %s)", err, filepath.Join(o.WorkDir, "firerunner.log"))
	}

	// A job's record ends with GitLab's status; its VM is torn down right
	// after. Let the teardown finish before looking for leftovers.
	for deadline := time.Now().Add(2 * time.Minute); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		if live, err := d.Store.ListVMs(ctx, true, 0); err == nil && !slices.ContainsFunc(live, func(v job.VM) bool { return !v.Warm() }) {
			break // a pool's warm VMs stay until shutdown
		}
	}
	// Each job's record names the VM and runner that actually ran it.
	for i, id := range pl.JobIDs {
		js, _ := gl.Job(id)
		results[i].GitLab = js
		if rec, err := d.Store.GetJob(ctx, id); err == nil && rec.State != job.Ignored {
			results[i].Record = &rec
			if v, err := d.Store.GetVM(ctx, rec.VMID); err == nil {
				results[i].VM = &v
				results[i].Guest = guests.get(v.ID)
			}
			if r, ok := gl.Runner(rec.RunnerID); ok {
				results[i].Runner = r
			}
		}
		if !results[i].Ours {
			p.say("job %d %-10s not ours (tags %v): status %s, FireRunner record: %v", id, results[i].Spec.Name, results[i].Spec.Tags, js.Status, results[i].Record != nil)
			_ = gl.Cancel(id)
		}
	}
	rep.Jobs = results
	rep.Leftovers = leftovers(ctx, d, gl)
	if rs, err := d.Store.ListRunners(ctx, false); err == nil {
		rep.RunnersCreated = len(rs)
	}
	err = shutdown()
	// After the shutdown not even a pool's warm VM may be left.
	if vms, lerr := d.Driver.List(context.Background()); lerr == nil {
		for _, v := range vms {
			rep.Leftovers = append(rep.Leftovers, fmt.Sprintf("vm %s (pid %d) after shutdown", v.ID, v.PID))
		}
	}
	d = nil
	if err != nil {
		return rep, fmt.Errorf("shutdown: %w", err)
	}
	p.report(rep)
	return rep, nil
}

// Config is the FireRunner configuration the demo runs with.
func Config(o Options, apiURL, guestURL, apiToken, hookSecret string) (config.Config, error) {
	secrets := filepath.Join(o.WorkDir, "secrets")
	if err := os.MkdirAll(secrets, 0o700); err != nil {
		return config.Config{}, err
	}
	cfg := config.Default()
	cfg.Listen = "127.0.0.1:0"
	cfg.LogLevel = "debug"
	cfg.StateDir = filepath.Join(o.WorkDir, "state")
	cfg.GitLab.URL, cfg.GitLab.GuestURL = apiURL, guestURL
	cfg.GitLab.TokenFile = filepath.Join(secrets, "gitlab_token")
	cfg.GitLab.WebhookSecretFile = filepath.Join(secrets, "webhook_secret")
	cfg.Reconcile.Interval = 5 * time.Second
	cfg.Capacity.VCPUs, cfg.Capacity.MemoryMiB = o.VCPUs, o.MemoryMiB
	cfg.Capacity.MaxVCPUsPerVM, cfg.Capacity.MaxMemoryGiBPerVM = 4, 4
	cfg.Limits.JobMaxDuration = 10 * time.Minute
	if o.JobMaxDuration > 0 {
		cfg.Limits.JobMaxDuration = o.JobMaxDuration
	}
	cfg.Limits.VMStartTimeout = 5 * time.Minute
	cfg.Limits.DrainTimeout = time.Minute
	// The QEMU driver is for development (it runs QEMU as root, sandboxed
	// by seccomp only), which the demo is.
	cfg.VM.Driver, cfg.VM.ImageDir, cfg.QEMU.AllowForDevelopment = "qemu", o.ImageDir, true
	cfg.VM.ConsoleLogDir = filepath.Join(o.WorkDir, "console")
	// The demo's default: QEMU user-mode networking, which lets guests reach
	// this host's loopback (GitLab's stand-in listens there), so it must be
	// allowed explicitly; serve refuses it otherwise.
	cfg.Network.Mode, cfg.Network.AllowUserModeForDevelopment = "user", true
	if o.WarmSize != "" {
		cfg.Pools = []config.Pool{{Size: o.WarmSize, MinIdle: 1, MaxIdle: 1}}
	}
	if o.Docker {
		if o.Mirror == nil {
			return cfg, errors.New("demo: docker needs a registry mirror")
		}
		cfg.Runners.Executor, cfg.Runners.DefaultImage = config.ExecutorDocker, registry.ImageShell
		cfg.Docker.RegistryMirror = MirrorURL(o.Mirror)
		cfg.Docker.ScratchDiskGiB = 8
	}
	if o.Network == "tap" {
		// Production networking. Host ports are closed to VMs, so open
		// exactly the one GitLab (guest_url) listens on.
		cfg.Network.Mode, cfg.Network.AllowUserModeForDevelopment = "tap", false
		u, err := url.Parse(guestURL)
		if err != nil {
			return cfg, fmt.Errorf("guest url: %w", err)
		}
		port, err := strconv.Atoi(u.Port())
		if err != nil {
			return cfg, fmt.Errorf("guest url %s: no port: %w", guestURL, err)
		}
		cfg.Network.AllowHostPorts = []int{port}
	}
	for path, secret := range map[string]string{cfg.GitLab.TokenFile: apiToken, cfg.GitLab.WebhookSecretFile: hookSecret} {
		if err := os.WriteFile(path, []byte(secret+"\n"), 0o600); err != nil {
			return cfg, err
		}
	}
	return cfg, cfg.Validate(daemon.Drivers())
}

// MirrorURL is the mirror's URL as VMs on user-mode networking see it.
func MirrorURL(m *registry.Mirror) string {
	_, port, _ := net.SplitHostPort(m.Mirror.Addr)
	return "http://10.0.2.2:" + port
}

// waitWarm waits until a pool's VM reports gitlab-runner waiting for its
// config.
func waitWarm(ctx context.Context, d *daemon.Daemon) error {
	ctx, cancel := context.WithTimeout(ctx, 3*time.Minute)
	defer cancel()
	for {
		live, _ := d.Store.ListVMs(ctx, true, 0)
		for _, v := range live {
			if v.Warm() && v.State == job.VMWarm && !v.Timeline.Ready.IsZero() {
				return nil
			}
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("warm pool: no VM ready: %w", ctx.Err())
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// TapGateway is the bridge address VMs reach the host at in tap mode: the
// first address of the default network.cidr.
func TapGateway() (netip.Addr, error) {
	p, err := netip.ParsePrefix(config.Default().Network.CIDR)
	if err != nil {
		return netip.Addr{}, err
	}
	return p.Masked().Addr().Next(), nil
}

// follow watches one of our jobs until GitLab and FireRunner are both done with it.
func follow(ctx context.Context, p *printer, gl *gitlabstandin.Server, d *daemon.Daemon, id int64, res *JobResult, cancelIt bool, guests *guestTimelines) {
	name := res.Spec.Name
	src, _ := d.Driver.(vm.TimelineSource)
	var lastGL, lastFR string
	var gaveUp time.Time
	var haveGuest bool
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for {
		js, _ := gl.Job(id)
		if js.Status != lastGL {
			p.say("job %d %-10s GitLab: %s", id, name, js.Status)
			lastGL = js.Status
		}
		if cancelIt && res.CanceledAt.IsZero() && js.Status == "running" {
			res.CanceledAt = time.Now()
			p.say("job %d %-10s canceling it in GitLab", id, name)
			_ = gl.Cancel(id)
		}
		rec, err := d.Store.GetJob(ctx, id)
		if err == nil {
			if st := string(rec.State); st != lastFR {
				extra := ""
				if rec.Reason != "" {
					extra = " (" + rec.Reason + ")"
				}
				p.say("job %d %-10s FireRunner: %s%s", id, name, st, extra)
				lastFR = st
			}
			if src != nil && !haveGuest && rec.VMID != "" {
				if tl, ok := src.Timeline(rec.VMID); ok {
					guests.put(rec.VMID, tl)
					haveGuest = true
				}
			}
			glDone := js.Status == "success" || js.Status == "failed" || js.Status == "canceled"
			if glDone && rec.State.Terminal() {
				return
			}
			// FireRunner gave up on a job GitLab still has open (e.g. its VM
			// never picked it): report that instead of waiting for GitLab.
			if rec.State.Terminal() && !glDone {
				if gaveUp.IsZero() {
					gaveUp = time.Now()
				} else if time.Since(gaveUp) > 30*time.Second {
					p.say("job %d %-10s FireRunner is done with it (%s) but GitLab still says %s", id, name, rec.Reason, js.Status)
					return
				}
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
	}
}

// guestTimelines holds each VM's boot timeline, grabbed while the VM exists.
type guestTimelines struct {
	mu sync.Mutex
	m  map[string]*vm.Timeline
}

func (g *guestTimelines) put(id string, tl *vm.Timeline) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.m[id] = tl
}

func (g *guestTimelines) get(id string) *vm.Timeline {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.m[id]
}

// leftovers lists what FireRunner should have removed but did not.
func leftovers(ctx context.Context, d *daemon.Daemon, gl *gitlabstandin.Server) []string {
	var out []string
	warm := map[string]bool{} // a pool's warm VMs stay until shutdown
	if live, err := d.Store.ListVMs(ctx, true, 0); err == nil {
		for _, v := range live {
			warm[v.ID] = v.Warm()
		}
	}
	if vms, err := d.Driver.List(ctx); err != nil {
		out = append(out, "driver list: "+err.Error())
	} else {
		for _, v := range vms {
			if !warm[v.ID] {
				out = append(out, fmt.Sprintf("vm %s (pid %d)", v.ID, v.PID))
			}
		}
	}
	if ents, err := os.ReadDir(filepath.Join(d.Config.StateDir, "vms")); err == nil {
		for _, e := range ents {
			if !warm[e.Name()] {
				out = append(out, "per-VM dir "+e.Name())
			}
		}
	}
	for _, r := range gl.Runners() { // the demo creates no runners of its own
		out = append(out, fmt.Sprintf("runner %d (%s) not deleted", r.ID, r.Description))
	}
	if recs, err := d.Store.ListJobs(ctx, store.Filter{ActiveOnly: true}); err == nil {
		for _, r := range recs {
			out = append(out, fmt.Sprintf("job %d still %s", r.ID, r.State))
		}
	}
	if vms, err := d.Store.ListVMs(ctx, true, 0); err == nil {
		for _, v := range vms {
			if !v.Warm() {
				out = append(out, fmt.Sprintf("vm record %s still %s", v.ID, v.State))
			}
		}
	}
	if rs, err := d.Store.ListRunners(ctx, true); err == nil {
		for _, r := range rs {
			out = append(out, fmt.Sprintf("runner record %d not deleted", r.ID))
		}
	}
	return out
}

func randHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// printer writes timestamped progress lines.
type printer struct {
	mu sync.Mutex
	w  io.Writer
	t0 time.Time
}

func (p *printer) say(format string, a ...any) {
	p.mu.Lock()
	defer p.mu.Unlock()
	fmt.Fprintf(p.w, "[%6.1fs] %s\n", time.Since(p.t0).Seconds(), fmt.Sprintf(format, a...))
}

var (
	ansi    = regexp.MustCompile(`\x1b\[[0-9;]*[A-Za-z]`)
	section = regexp.MustCompile(`section_(start|end):[0-9]+:[A-Za-z0-9_.-]+(\[[^\]]*\])?`)
	// gitlab-runner >= 17 prefixes each line: "<RFC3339 time> <stream><O|E>[+] ".
	stamp = regexp.MustCompile(`(?m)^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9:.]+Z [0-9a-f]{2}[OE]\+? ?`)
)

// CleanTrace strips gitlab-runner's ANSI colours, section markers and line
// timestamps.
func CleanTrace(t string) string {
	t = section.ReplaceAllString(ansi.ReplaceAllString(t, ""), "")
	var lines []string
	for _, l := range strings.Split(strings.ReplaceAll(t, "\r\n", "\n"), "\n") {
		if i := strings.LastIndexByte(l, '\r'); i >= 0 {
			l = l[i+1:]
		}
		lines = append(lines, l)
	}
	return strings.TrimRight(stamp.ReplaceAllString(strings.Join(lines, "\n"), ""), "\n")
}

// report prints each job's trace and timeline.
func (p *printer) report(rep *Report) {
	w := p.w
	for _, r := range rep.Jobs {
		fmt.Fprintf(w, "\n==== job %d %q  tags %v  GitLab status: %s", r.GitLab.ID, r.Spec.Name, r.Spec.Tags, r.GitLab.Status)
		if r.GitLab.Status == "failed" {
			fmt.Fprintf(w, " (exit code %d)", r.GitLab.ExitCode)
		}
		fmt.Fprintln(w)
		if !r.Ours {
			fmt.Fprintln(w, "  no firecracker size tag: FireRunner created no runner and no VM")
			continue
		}
		if r.Record != nil {
			fmt.Fprintf(w, "  FireRunner: %s (%s), runner #%d, vm %s, %d vCPU / %d MiB, attempts %d\n",
				r.Record.State, r.Record.Reason, r.Record.RunnerID, r.Record.VMID, r.Record.VCPUs, r.Record.MemoryMiB, r.Record.Attempts)
			if r.VM != nil && r.VM.ForJob != r.GitLab.ID {
				fmt.Fprintf(w, "  ran in the VM started for job %d: its runner (tags %v) took this job first\n", r.VM.ForJob, r.VM.Tags)
			}
		}
		if tr := CleanTrace(r.GitLab.Trace); tr != "" {
			fmt.Fprintln(w, "  ---- trace ----")
			for _, l := range strings.Split(tr, "\n") {
				fmt.Fprintln(w, "  | "+l)
			}
		}
		fmt.Fprintln(w, "  ---- timeline ----")
		for _, e := range r.Timeline() {
			fmt.Fprintf(w, "  %+8.2fs  %s\n", e.Since.Seconds(), e.Name)
		}
	}
	p.compare(rep)
	fmt.Fprintf(w, "\nrunners created: %d; leftovers: %d\n", rep.RunnersCreated, len(rep.Leftovers))
	for _, l := range rep.Leftovers {
		fmt.Fprintln(w, "  LEFTOVER: "+l)
	}
}

// compare prints the jobs' timelines side by side, each relative to its own
// webhook, so a warm job's path can be read against a cold one's.
func (p *printer) compare(rep *Report) {
	var cols []JobResult
	for _, r := range rep.Jobs {
		if r.Ours && r.Record != nil {
			cols = append(cols, r)
		}
	}
	if len(cols) < 2 {
		return
	}
	var rows []string
	at := make([]map[string]time.Duration, len(cols))
	for i, r := range cols {
		at[i] = map[string]time.Duration{}
		var base time.Time
		for _, e := range r.Timeline() {
			if e.Name == "webhook received" {
				base = e.At
			}
		}
		for _, e := range r.Timeline() {
			if _, seen := at[i][e.Name]; !seen && !slices.Contains(rows, e.Name) {
				rows = append(rows, e.Name)
			}
			if !base.IsZero() {
				at[i][e.Name] = e.At.Sub(base)
			}
		}
	}
	fmt.Fprintf(p.w, "\n==== timelines side by side (seconds after each job's webhook)\n%-32s", "")
	for _, r := range cols {
		kind := "cold"
		if r.VM != nil && !r.VM.Timeline.Assigned.IsZero() {
			kind = "warm"
		}
		fmt.Fprintf(p.w, " %16s", r.Spec.Name+" ("+kind+")")
	}
	fmt.Fprintln(p.w)
	for _, row := range rows {
		fmt.Fprintf(p.w, "%-32s", row)
		for i := range cols {
			if d, ok := at[i][row]; ok {
				fmt.Fprintf(p.w, " %+16.2f", d.Seconds())
			} else {
				fmt.Fprintf(p.w, " %16s", "-")
			}
		}
		fmt.Fprintln(p.w)
	}
}

// Event is one timeline entry, relative to the webhook's arrival.
type Event struct {
	Name  string
	At    time.Time
	Since time.Duration
}

// Timeline merges FireRunner's, the driver's and GitLab's view of the job.
func (r JobResult) Timeline() []Event {
	var ev []Event
	add := func(name string, at time.Time) {
		if !at.IsZero() {
			ev = append(ev, Event{Name: name, At: at})
		}
	}
	if rec := r.Record; rec != nil {
		t := rec.Timeline
		add("webhook received", t.WebhookReceived)
		add("tags fetched", t.TagsFetched)
	}
	if v := r.VM; v != nil {
		t := v.Timeline
		if !t.Assigned.IsZero() {
			add("warm VM assigned to the job", t.Assigned)
		} else {
			add("VM planned", t.Planned)
		}
		add("runner created", t.RunnerCreated)
		add("VM start requested", t.StartRequest)
		add("VM destroyed", t.Destroyed)
		add("runner deleted", t.RunnerDeleted)
	}
	if g := r.Guest; g != nil {
		for _, m := range []struct {
			name string
			m    vm.Milestone
		}{
			{"VM process started", vm.MilestoneVMMStarted}, {"guest kernel", vm.MilestoneKernel},
			{"guest init", vm.MilestoneInit}, {"guest agent start", vm.MilestoneAgentStart},
			{"docker ready (helper image loaded)", vm.MilestoneDockerReady},
			{"gitlab-runner started", vm.MilestoneJobStart}, {"gitlab-runner exited", vm.MilestoneJobEnd},
			{"VM powered off", vm.MilestoneVMMExited},
		} {
			if at, ok := g.At(m.m); ok {
				add(m.name, at)
			}
		}
	}
	add("runner's first job request", r.Runner.FirstRequestAt)
	add("job picked by runner", r.GitLab.StartedAt)
	add("canceled in GitLab", r.CanceledAt)
	add("job finished in GitLab", r.GitLab.FinishedAt)
	sort.SliceStable(ev, func(i, j int) bool { return ev[i].At.Before(ev[j].At) })
	if len(ev) > 0 {
		for i := range ev {
			ev[i].Since = ev[i].At.Sub(ev[0].At)
		}
	}
	return ev
}
