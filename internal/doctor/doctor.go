// Package doctor checks that a host can run FireRunner (KVM, VMM binaries,
// guest image, cgroups, network, capacity, GitLab access, secret files).
package doctor

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/firerunner/firerunner/internal/config"
	"github.com/firerunner/firerunner/internal/image"
	"github.com/firerunner/firerunner/internal/netsetup"
	"github.com/firerunner/firerunner/internal/vm"
)

// Status of one check.
type Status string

const (
	Pass Status = "pass"
	Warn Status = "warn"
	Fail Status = "fail"
	Skip Status = "skip"
)

// Result is one check's outcome and, unless it passed, how to fix it.
type Result struct {
	Name   string `json:"name"`
	Status Status `json:"status"`
	Detail string `json:"detail"`
	Fix    string `json:"fix,omitempty"`
}

// Report is every result; OK is false when any check failed.
type Report struct {
	OK      bool     `json:"ok"`
	Results []Result `json:"checks"`
}

// Env is the host as the checks see it. Zero fields get the real thing, so
// tests replace only what they fake (a root directory, an HTTP GitLab...).
type Env struct {
	Config config.Config
	// ConfigErr is the error loading the config file, reported as a failure.
	ConfigErr error
	// Drivers are the VM drivers (daemon.Drivers); the selected driver's
	// checks (its VMM binaries and kvm-guest, which boots the image's
	// kernel) run after the image check.
	Drivers *vm.Registry[config.Config]
	// Root prefixes host paths (/dev, /proc, /sys); "" means "/".
	Root string
	// HTTPClient talks to GitLab; default a client with the config's timeout.
	HTTPClient *http.Client
	// BootProbe boots the guest kernel for the driver's kvm-guest check;
	// default vm.RunBootProbe (tests fake it).
	BootProbe func(ctx context.Context, argv []string, timeout time.Duration) error
	// NetCheck lists network problems; default netsetup.Manager.Check.
	NetCheck func(ctx context.Context) ([]string, error)
	// Command runs a binary with args and returns its output (versions).
	Command func(ctx context.Context, bin string, args ...string) (string, error)
	// NumCPU is the host's CPU count; default runtime.NumCPU().
	NumCPU int
}

func (e *Env) path(p string) string {
	if e.Root == "" {
		return p
	}
	return filepath.Join(e.Root, p)
}

func (e *Env) defaults() {
	if e.HTTPClient == nil {
		t := e.Config.GitLab.RequestTimeout
		if t <= 0 {
			t = 15 * time.Second
		}
		e.HTTPClient = &http.Client{Timeout: t}
	}
	if e.Command == nil {
		e.Command = func(ctx context.Context, bin string, args ...string) (string, error) {
			ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			defer cancel()
			out, err := exec.CommandContext(ctx, bin, args...).CombinedOutput()
			return string(out), err
		}
	}
	if e.NetCheck == nil {
		e.NetCheck = func(ctx context.Context) ([]string, error) {
			m, err := netsetup.New(e.Config.Network, e.Config.StateDir)
			if err != nil {
				return nil, err
			}
			return m.Check(ctx), nil
		}
	}
	if e.NumCPU == 0 {
		e.NumCPU = runtime.NumCPU()
	}
}

type check func(context.Context, *Env) Result

// Run performs every check in order: the host's, with the selected VM
// driver's own checks in the middle. The driver's come after the image
// check because its kvm-guest check boots the image's kernel: the
// acceleration jobs get is decided by the driver's probe of the real guest,
// never by a stand-in guest.
func Run(ctx context.Context, env Env) Report {
	env.defaults()
	checks := []check{checkConfig, checkKVMDevice, checkCPUVirt, checkImage}
	checks = append(checks, driverChecks(&env)...)
	checks = append(checks, checkCgroup, checkTun, checkNetwork, checkDisk, checkMemory, checkCPUs,
		checkState, checkGitLabReachable, checkToken, checkWebhookSecret)
	r := Report{OK: true}
	for _, c := range checks {
		res := c(ctx, &env)
		if res.Status == Fail {
			r.OK = false
		}
		r.Results = append(r.Results, res)
	}
	return r
}

// driverChecks are the checks the selected driver's provider gives (for
// example its VMM binaries), or one failure when there is no such driver.
func driverChecks(e *Env) []check {
	if e.Drivers == nil {
		return []check{func(context.Context, *Env) Result {
			return res("vm-driver", Fail, "doctor needs the driver registry (daemon.Drivers)", "no VM drivers given: cannot check driver %q", e.Config.VM.Driver)
		}}
	}
	vc, err := e.Drivers.Checks(e.Config.VM.Driver, e.Config)
	if err != nil {
		return []check{func(context.Context, *Env) Result {
			return res("vm-driver", Fail, "set vm.driver to one of "+strings.Join(e.Drivers.Names(), ", "), "%v", err)
		}}
	}
	var cs []check
	for _, c := range vc {
		cs = append(cs, func(ctx context.Context, e *Env) Result {
			r := c.Run(ctx, vm.CheckHost{Root: e.Root, Command: e.Command, BootProbe: e.BootProbe})
			return Result{Name: c.Name, Status: Status(r.Status), Detail: r.Detail, Fix: r.Fix}
		})
	}
	return cs
}

// WriteText prints one line per check, with the fix indented under it.
func (r Report) WriteText(w io.Writer) {
	for _, c := range r.Results {
		fmt.Fprintf(w, "%-4s  %-16s %s\n", strings.ToUpper(string(c.Status)), c.Name, c.Detail)
		if c.Fix != "" && c.Status != Pass {
			fmt.Fprintf(w, "      %-16s fix: %s\n", "", c.Fix)
		}
	}
	n := map[Status]int{}
	for _, c := range r.Results {
		n[c.Status]++
	}
	fmt.Fprintf(w, "\n%d passed, %d warnings, %d failed, %d skipped\n", n[Pass], n[Warn], n[Fail], n[Skip])
}

// WriteJSON prints the report as JSON.
func (r Report) WriteJSON(w io.Writer) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(r)
}

func pass(name, format string, a ...any) Result {
	return Result{Name: name, Status: Pass, Detail: fmt.Sprintf(format, a...)}
}

func res(name string, s Status, fix, format string, a ...any) Result {
	return Result{Name: name, Status: s, Detail: fmt.Sprintf(format, a...), Fix: fix}
}

func checkConfig(_ context.Context, e *Env) Result {
	if e.ConfigErr != nil {
		return res("config", Fail, "edit the config file; the detail lists every bad field (each is documented in /etc/firerunner/config.yaml)", "%v", e.ConfigErr)
	}
	return pass("config", "configuration valid (driver %s, network %s)", e.Config.VM.Driver, e.Config.Network.Mode)
}

const kvmFix = "enable VT-x/AMD-V in the firmware, load the module (modprobe kvm_intel or kvm_amd); on a cloud VM use a bare-metal or nested-virtualisation instance"

func checkKVMDevice(_ context.Context, e *Env) Result {
	p := e.path("/dev/kvm")
	fi, err := os.Stat(p)
	if err != nil {
		return res("kvm", Fail, kvmFix, "/dev/kvm missing: %v", err)
	}
	if e.Root == "" && fi.Mode()&os.ModeCharDevice == 0 {
		return res("kvm", Fail, kvmFix, "/dev/kvm is not a character device")
	}
	f, err := os.OpenFile(p, os.O_RDWR, 0)
	if err != nil {
		return res("kvm", Fail, "run firerunner as root or as a member of the kvm group (the systemd unit does)", "/dev/kvm not usable: %v", err)
	}
	f.Close()
	return pass("kvm", "/dev/kvm present and opens read-write")
}

func checkCPUVirt(_ context.Context, e *Env) Result {
	b, err := os.ReadFile(e.path("/proc/cpuinfo"))
	if err != nil {
		return res("cpu-virt", Fail, "mount /proc", "read /proc/cpuinfo: %v", err)
	}
	var flags []string
	sc := bufio.NewScanner(bytes.NewReader(b))
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		if k, v, ok := strings.Cut(sc.Text(), ":"); ok && strings.TrimSpace(k) == "flags" {
			flags = strings.Fields(v)
			break
		}
	}
	switch {
	case slices.Contains(flags, "vmx"):
		return pass("cpu-virt", "Intel VT-x (vmx)")
	case slices.Contains(flags, "svm"):
		return pass("cpu-virt", "AMD-V (svm)")
	case slices.Contains(flags, "hypervisor"):
		return res("cpu-virt", Fail, "enable nested virtualisation for this VM (or use bare metal)", "no vmx/svm flag: this is a VM without nested virtualisation")
	default:
		return res("cpu-virt", Fail, "enable VT-x/AMD-V in the firmware setup", "no vmx/svm CPU flag")
	}
}

func checkImage(_ context.Context, e *Env) Result {
	dir := e.Config.VM.ImageDir
	fix := fmt.Sprintf("build it: firerunner image build --out %s (or re-run install.sh)", dir)
	if err := image.Verify(dir); err != nil {
		return res("image", Fail, fix, "guest image %s: %v", dir, err)
	}
	m, _ := image.Load(dir)
	if e.Config.Runners.Executor == config.ExecutorDocker && !m.HasDocker() {
		return res("image", Fail, fix, "guest image %s has no Docker engine, which runners.executor docker needs", m.Dir)
	}
	return pass("image", "%s: kernel %s, %d artefacts match the manifest", m.Dir, m.Inputs.KernelRelease, len(m.Artifacts))
}

func checkCgroup(_ context.Context, e *Env) Result {
	fix := "boot with cgroup v2 only (systemd.unified_cgroup_hierarchy=1 on the kernel command line)"
	b, err := os.ReadFile(e.path("/sys/fs/cgroup/cgroup.controllers"))
	if err != nil {
		return res("cgroup-v2", Fail, fix, "cgroup v2 not mounted at /sys/fs/cgroup: %v", err)
	}
	ctrl := strings.Fields(string(b))
	var missing []string
	for _, c := range []string{"cpu", "memory", "pids"} {
		if !slices.Contains(ctrl, c) {
			missing = append(missing, c)
		}
	}
	if len(missing) > 0 {
		return res("cgroup-v2", Fail, "enable the controllers in the root cgroup (cgroup.subtree_control) or kernel config", "cgroup v2 lacks controllers: %s", strings.Join(missing, ", "))
	}
	return pass("cgroup-v2", "unified hierarchy with %s", strings.Join(ctrl, " "))
}

func checkTun(_ context.Context, e *Env) Result {
	if e.Config.Network.Mode != "tap" {
		return res("tun", Skip, "", "skipped: network.mode is %s", e.Config.Network.Mode)
	}
	if _, err := os.Stat(e.path("/dev/net/tun")); err != nil {
		return res("tun", Fail, "modprobe tun", "/dev/net/tun missing: %v", err)
	}
	return pass("tun", "/dev/net/tun present")
}

func checkNetwork(ctx context.Context, e *Env) Result {
	if e.Config.Network.Mode != "tap" {
		return res("network", Warn, "set network.mode: tap for production (user mode is QEMU-only, for development)", "network.mode is %s: VMs are not isolated by FireRunner", e.Config.Network.Mode)
	}
	problems, err := e.NetCheck(ctx)
	if err != nil {
		return res("network", Fail, "fix network.* in the config", "%v", err)
	}
	var hard, soft []string
	for _, p := range problems {
		if strings.HasPrefix(p, "nftables:") {
			hard = append(hard, p)
		} else {
			soft = append(soft, p)
		}
	}
	if len(hard) > 0 {
		return res("network", Fail, "install nftables and make sure the nf_tables module loads (modprobe nf_tables)", "%s", strings.Join(append(hard, soft...), "; "))
	}
	if len(soft) > 0 {
		return res("network", Warn, "start the service (firerunner serve creates the bridge, enables ip_forward and installs table inet firerunner)", "%s", strings.Join(soft, "; "))
	}
	return pass("network", "bridge %s with NAT (nft table inet %s), ip_forward on", e.Config.Network.Bridge, netsetup.TableName)
}

// existingDir walks up to the nearest directory that exists (the state dir
// may not have been created yet) so free space can still be measured.
func existingDir(p string) string {
	for p != "/" && p != "." {
		if fi, err := os.Stat(p); err == nil && fi.IsDir() {
			return p
		}
		p = filepath.Dir(p)
	}
	return p
}

const (
	minFreeDisk  = 1 << 30 // below this VMs cannot even write console logs
	warnFreeDisk = 5 << 30
)

func checkDisk(_ context.Context, e *Env) Result {
	dir := existingDir(e.Config.StateDir)
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		return res("disk", Fail, "create the state dir", "statfs %s: %v", dir, err)
	}
	free := st.Bavail * uint64(st.Bsize)
	gib := float64(free) / (1 << 30)
	fix := fmt.Sprintf("free space on the filesystem holding %s or move state_dir", e.Config.StateDir)
	switch {
	case free < minFreeDisk:
		return res("disk", Fail, fix, "%.1f GiB free in %s (need >= 1 GiB)", gib, dir)
	case free < warnFreeDisk:
		return res("disk", Warn, fix, "%.1f GiB free in %s (5 GiB recommended)", gib, dir)
	}
	return pass("disk", "%.1f GiB free in %s", gib, dir)
}

func memTotalMiB(e *Env) (int, error) {
	b, err := os.ReadFile(e.path("/proc/meminfo"))
	if err != nil {
		return 0, err
	}
	for _, l := range strings.Split(string(b), "\n") {
		if f := strings.Fields(l); len(f) >= 2 && f[0] == "MemTotal:" {
			kb, err := strconv.Atoi(f[1])
			return kb / 1024, err
		}
	}
	return 0, errors.New("no MemTotal in /proc/meminfo")
}

func checkMemory(_ context.Context, e *Env) Result {
	total, err := memTotalMiB(e)
	if err != nil {
		return res("memory", Fail, "mount /proc", "%v", err)
	}
	c := e.Config.Capacity
	avail := total - c.ReserveMemoryMiB
	want := c.MemoryMiB
	if want == 0 {
		want = avail
	}
	if avail <= 0 || want > avail {
		return res("memory", Fail, "lower capacity.memory_mib or capacity.reserve_memory_mib",
			"capacity %d MiB + reserve %d MiB exceeds host memory %d MiB", want, c.ReserveMemoryMiB, total)
	}
	if per := c.MaxMemoryGiBPerVM * 1024; per > want {
		return res("memory", Warn, "lower capacity.max_memory_gib_per_vm so the largest job fits",
			"a %d GiB job can never fit in %d MiB of capacity", c.MaxMemoryGiBPerVM, want)
	}
	return pass("memory", "%d MiB for VMs of %d MiB host memory (%d MiB reserved)", want, total, c.ReserveMemoryMiB)
}

func checkCPUs(_ context.Context, e *Env) Result {
	c := e.Config.Capacity
	avail := e.NumCPU - c.ReserveVCPUs
	want := c.VCPUs
	if want == 0 {
		want = avail
	}
	if want < 1 {
		return res("cpus", Fail, "lower capacity.reserve_vcpus", "no vCPUs left for VMs (%d CPUs, %d reserved)", e.NumCPU, c.ReserveVCPUs)
	}
	if want > avail {
		return res("cpus", Warn, "vCPUs are overcommitted; lower capacity.vcpus unless that is intended",
			"capacity %d vCPUs > %d host CPUs minus %d reserved", want, e.NumCPU, c.ReserveVCPUs)
	}
	return pass("cpus", "%d vCPUs for VMs of %d host CPUs", want, e.NumCPU)
}

func apiURL(base, path string) string { return strings.TrimRight(base, "/") + "/api/v4" + path }

func checkGitLabReachable(ctx context.Context, e *Env) Result {
	u := e.Config.GitLab.URL
	if u == "" {
		return res("gitlab", Fail, "set gitlab.url in the config", "gitlab.url is not set")
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, apiURL(u, "/version"), nil)
	if err != nil {
		return res("gitlab", Fail, "fix gitlab.url", "%v", err)
	}
	resp, err := e.HTTPClient.Do(req)
	if err != nil {
		return res("gitlab", Fail, "check gitlab.url, DNS, proxies and firewalls between this host and GitLab", "GitLab unreachable: %v", err)
	}
	resp.Body.Close()
	// Any answer from the API (401 without a token is normal) proves reachability.
	if resp.StatusCode >= 500 || (resp.StatusCode != http.StatusOK && resp.StatusCode != http.StatusUnauthorized && resp.StatusCode != http.StatusForbidden) {
		return res("gitlab", Fail, "check that gitlab.url points at GitLab (no path, no proxy page)", "GET /api/v4/version returned HTTP %d", resp.StatusCode)
	}
	return pass("gitlab", "%s answers (HTTP %d)", u, resp.StatusCode)
}

// tokenSelf is GET /api/v4/personal_access_tokens/self (also valid for
// project, group and service-account tokens).
type tokenSelf struct {
	Name      string   `json:"name"`
	Scopes    []string `json:"scopes"`
	Active    bool     `json:"active"`
	Revoked   bool     `json:"revoked"`
	ExpiresAt *string  `json:"expires_at"`
}

// missingScopes returns what the token lacks: `api` alone is enough, else
// read_api (read jobs) + create_runner + manage_runner (delete runners).
func missingScopes(have []string, legacy bool) []string {
	if slices.Contains(have, "api") {
		return nil
	}
	need := []string{"read_api", "create_runner", "manage_runner"}
	if legacy { // runners are registered with a registration token instead
		need = []string{"read_api", "manage_runner"}
	}
	var miss []string
	for _, s := range need {
		if !slices.Contains(have, s) {
			miss = append(miss, s)
		}
	}
	return miss
}

func checkToken(ctx context.Context, e *Env) Result {
	path := e.Config.GitLab.TokenFile
	tokFix := fmt.Sprintf("create a token with scopes create_runner, manage_runner, read_api (or api), then: install -m 600 /dev/stdin %s", path)
	tok, err := config.ReadSecret(path)
	if err != nil {
		return res("gitlab-token", Fail, tokFix, "%v", err)
	}
	if e.Config.GitLab.URL == "" {
		return res("gitlab-token", Skip, "", "skipped: gitlab.url not set")
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, apiURL(e.Config.GitLab.URL, "/personal_access_tokens/self"), nil)
	if err != nil {
		return res("gitlab-token", Fail, "fix gitlab.url", "%v", err)
	}
	req.Header.Set("PRIVATE-TOKEN", tok)
	resp, err := e.HTTPClient.Do(req)
	if err != nil {
		return res("gitlab-token", Fail, "see the gitlab check", "GitLab unreachable: %v", err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	switch resp.StatusCode {
	case http.StatusOK:
	case http.StatusUnauthorized:
		return res("gitlab-token", Fail, tokFix, "GitLab rejected the token in %s (HTTP 401: invalid, expired or revoked)", path)
	default:
		return res("gitlab-token", Fail, tokFix, "GET /personal_access_tokens/self returned HTTP %d", resp.StatusCode)
	}
	var ts tokenSelf
	if err := json.Unmarshal(body, &ts); err != nil {
		return res("gitlab-token", Fail, "check that gitlab.url points at GitLab", "unexpected token info: %v", err)
	}
	if !ts.Active || ts.Revoked {
		return res("gitlab-token", Fail, tokFix, "token %q is not active (revoked=%v)", ts.Name, ts.Revoked)
	}
	if miss := missingScopes(ts.Scopes, e.Config.Runners.Registration == "legacy"); len(miss) > 0 {
		return res("gitlab-token", Fail, tokFix, "token %q lacks scopes %s (has %s)", ts.Name, strings.Join(miss, ", "), strings.Join(ts.Scopes, ", "))
	}
	if ts.ExpiresAt != nil {
		if exp, err := time.Parse("2006-01-02", *ts.ExpiresAt); err == nil && time.Until(exp) < 14*24*time.Hour {
			return res("gitlab-token", Warn, "rotate the token before it expires and replace "+path, "token %q expires on %s", ts.Name, *ts.ExpiresAt)
		}
	}
	return pass("gitlab-token", "token %q valid with scopes %s", ts.Name, strings.Join(ts.Scopes, ", "))
}

func checkWebhookSecret(_ context.Context, e *Env) Result {
	path := e.Config.GitLab.WebhookSecretFile
	fix := fmt.Sprintf("head -c 32 /dev/urandom | base64 | install -m 600 /dev/stdin %s, and enter the same secret in GitLab's webhook settings", path)
	s, err := config.ReadSecret(path)
	if err != nil {
		return res("webhook-secret", Fail, fix, "%v", err)
	}
	if len(s) < 16 {
		return res("webhook-secret", Warn, fix, "webhook secret in %s is only %d characters (use >= 32 random characters)", path, len(s))
	}
	return pass("webhook-secret", "%s is 0600 and holds a %d-character secret", path, len(s))
}
