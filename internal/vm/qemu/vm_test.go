package qemu

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/firerunner/firerunner/internal/guestconfig"
	"github.com/firerunner/firerunner/internal/image"
	"github.com/firerunner/firerunner/internal/testenv"
	"github.com/firerunner/firerunner/internal/vm"
)

// Real-VM tests: they boot the built guest image under QEMU (TCG here) and
// need root, qemu-system-x86_64 and $FIRERUNNER_TEST_IMAGE.

// bootBudget bounds a whole boot-run-poweroff under TCG on a loaded
// 2-core host; it is a hang guard, not a speed target (see the timeline).
const bootBudget = 4 * time.Minute

type realEnv struct {
	img   vm.Image
	state string
	drv   *Driver
}

func newRealEnv(t *testing.T) realEnv {
	t.Helper()
	testenv.RequireRoot(t)
	bin := testenv.QEMU(t)
	dir := testenv.ImageDir(t)
	m, err := image.Load(dir)
	if err != nil {
		t.Fatalf("load image %s: %v", dir, err)
	}
	state := t.TempDir()
	d, err := New(Options{Binary: bin, Accel: AccelAuto, StateDir: state, NetworkMode: "user"})
	if err != nil {
		t.Fatal(err)
	}
	e := realEnv{img: m.VMImage(), state: state, drv: d}
	t.Cleanup(func() { e.assertNothingLeft(t) })
	return e
}

func (e realEnv) spec(id string, timeout time.Duration, script string) vm.Spec {
	return vm.Spec{
		ID: id, VCPUs: 2, MemoryMiB: 512, Image: e.img, Timeout: timeout,
		Guest: guestconfig.Config{JobTimeoutSec: 3600, Command: []string{"/bin/sh", "-c", script}},
	}
}

// assertNothingLeft checks no VM state dir and no qemu naming our state
// dir survive; it kills stragglers so a failing test leaks nothing.
func (e realEnv) assertNothingLeft(t *testing.T) {
	t.Helper()
	if ps := vm.FindProcs(e.state); len(ps) > 0 {
		for _, p := range ps {
			_ = p.KillGroup()
		}
		t.Errorf("qemu processes left behind: %+v", ps)
	}
	if ents, _ := os.ReadDir(filepath.Join(e.state, "vms")); len(ents) > 0 {
		t.Errorf("per-VM files left behind: %v", ents)
	}
}

// runVM starts spec, waits for it (bounded) and returns the result, the
// console log text and the timeline; the VM is destroyed afterwards.
func (e realEnv) runVM(t *testing.T, spec vm.Spec, whileRunning func(pid int)) (vm.Result, string, *vm.Timeline) {
	t.Helper()
	tl0 := time.Now() // image ready: loaded and checked by newRealEnv
	ctx, cancel := context.WithTimeout(context.Background(), bootBudget)
	defer cancel()
	if err := e.drv.Start(ctx, spec); err != nil {
		t.Fatalf("start: %v", err)
	}
	tl, ok := e.drv.Timeline(spec.ID)
	if !ok {
		t.Fatal("no timeline for a VM this driver started")
	}
	tl.MarkAt(vm.MilestoneImageReady, tl0)
	destroyed := false
	defer func() { // on t.Fatal: never leave the VM behind
		if !destroyed {
			_ = e.drv.Destroy(context.Background(), spec.ID)
		}
	}()
	if whileRunning != nil {
		meta, err := e.drv.StateDir().ReadMeta(spec.ID)
		if err != nil {
			t.Fatal(err)
		}
		whileRunning(meta.Proc.PID)
	}
	res, err := e.drv.Wait(ctx, spec.ID)
	if err != nil {
		t.Fatalf("wait: %v", err)
	}
	console, _ := os.ReadFile(res.ConsoleLog)
	destroyed = true
	if err := e.drv.Destroy(context.Background(), spec.ID); err != nil {
		t.Fatalf("destroy: %v", err)
	}
	if _, err := os.Stat(e.drv.StateDir().Path(spec.ID)); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("per-VM dir survived Destroy: %v", err)
	}
	return res, string(console), tl
}

func printTimeline(t *testing.T, name string, tl *vm.Timeline) {
	s := fmt.Sprintf("timeline of %s (host-observed):\n%s  all milestones (+since first, (+since previous)):\n%s", name, tl.Summary(), tl)
	t.Log(s)
	fmt.Println(s)
}

// TestBootRunsCommand boots the real image; the agent reads the config drive
// and runs the command, whose output and exit status come back through the
// console log; Destroy leaves nothing behind.
func TestBootRunsCommand(t *testing.T) {
	e := newRealEnv(t)
	spec := e.spec("fr-boot1", bootBudget, "echo hello-from-guest; nproc; head -1 /proc/meminfo; exit 7")
	res, console, tl := e.runVM(t, spec, nil)
	if res.ExitCode != 7 || res.Reason != "" {
		t.Fatalf("result = %+v, want exit 7 and a clean power-off\nconsole:\n%s", res, tail(console, 40))
	}
	for _, want := range []string{"hello-from-guest", "MemTotal:", guestconfig.MarkerAgentStart, guestconfig.MarkerJobEnd} {
		if !strings.Contains(console, want) {
			t.Errorf("console lacks %q\n%s", want, tail(console, 40))
		}
	}
	if !strings.Contains(console, "\n2\r\n") && !strings.Contains(console, "\n2\n") {
		t.Errorf("nproc did not print 2 (spec has 2 vCPUs)\n%s", tail(console, 40))
	}
	for _, m := range []vm.Milestone{vm.MilestoneVMMStarted, vm.MilestoneKernel, vm.MilestoneInit, vm.MilestoneAgentStart,
		vm.MilestoneJobStart, vm.MilestoneJobEnd, vm.MilestoneExit, vm.MilestonePowerOff, vm.MilestoneVMMExited, vm.MilestoneDestroyed} {
		if _, ok := tl.At(m); !ok {
			t.Errorf("timeline lacks %s:\n%s", m, tl)
		}
	}
	if i, j := strings.Index(console, guestconfig.MarkerJobStart), strings.Index(console, guestconfig.MarkerJobEnd); i >= 0 && j > i {
		t.Logf("command output:\n%s", console[i:j+len(guestconfig.MarkerJobEnd)])
	}
	printTimeline(t, spec.ID, tl)
}

// TestHangingVMKilledAtTimeout: a command that never ends is killed at
// Spec.Timeout by the driver (not by the guest), Reason "timeout".
func TestHangingVMKilledAtTimeout(t *testing.T) {
	e := newRealEnv(t)
	const timeout = 40 * time.Second
	spec := e.spec("fr-hang1", timeout, "echo hanging; sleep 100000")
	var pid int
	res, console, tl := e.runVM(t, spec, func(p int) { pid = p })
	if res.Reason != "timeout" || res.ExitCode != -1 {
		t.Fatalf("result = %+v, want reason timeout and no exit status\n%s", res, tail(console, 30))
	}
	started, _ := tl.At(vm.MilestoneVMMStarted)
	exited, _ := tl.At(vm.MilestoneVMMExited)
	if d := exited.Sub(started); d < timeout {
		t.Errorf("VMM ended after %s, before its %s timeout", d, timeout)
	}
	if _, ok := tl.At(vm.MilestoneJobStart); !ok {
		t.Logf("note: the guest had not started the command within %s (slow host); the kill was still at the deadline", timeout)
	}
	if _, err := os.Stat("/proc/" + strconv.Itoa(pid)); err == nil {
		if p, err := vm.LookupProc(pid); err == nil && p.Alive() {
			b, _ := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cmdline")
			if bytes.Contains(b, []byte(spec.ID)) {
				t.Errorf("qemu pid %d still alive after timeout", pid)
			}
		}
	}
	printTimeline(t, spec.ID, tl)
}

// TestTokenNeverInArgvOrKernelCmdline: the runner token reaches the guest
// only through the config drive: not qemu's /proc/PID/cmdline, not the
// guest's /proc/cmdline.
func TestTokenNeverInArgvOrKernelCmdline(t *testing.T) {
	e := newRealEnv(t)
	tok := fakeToken()
	spec := e.spec("fr-tok1", bootBudget, "echo GUEST-CMDLINE: $(cat /proc/cmdline); exit 0")
	spec.Guest.RunnerToken = tok
	spec.Guest.GitLabURL = "http://10.0.2.2:1"
	var argv []byte
	res, console, _ := e.runVM(t, spec, func(pid int) {
		var err error
		argv, err = os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cmdline")
		if err != nil {
			t.Fatalf("read qemu cmdline: %v", err)
		}
	})
	if !bytes.Contains(argv, []byte("microvm")) {
		t.Fatalf("/proc/PID/cmdline is not qemu's: %q", argv)
	}
	if bytes.Contains(argv, []byte(tok)) {
		t.Fatal("token in qemu's /proc/PID/cmdline")
	}
	if res.ExitCode != 0 {
		t.Fatalf("result %+v\n%s", res, tail(console, 30))
	}
	i := strings.Index(console, "GUEST-CMDLINE: ")
	if i < 0 {
		t.Fatalf("guest did not print its /proc/cmdline\n%s", tail(console, 30))
	}
	line := console[i:]
	line = line[:strings.IndexAny(line+"\n", "\r\n")]
	if !strings.Contains(line, "console=ttyS0") {
		t.Fatalf("guest cmdline line looks wrong: %q", line)
	}
	if strings.Contains(line, tok) || strings.Contains(console, tok) {
		t.Fatalf("token on the guest kernel command line or console: %q", line)
	}
	t.Logf("guest %s", line)
}

// helperEnv makes the test binary act as a short-lived "FireRunner" that
// starts one VM and exits without waiting, leaving an orphaned VM.
const helperEnv = "FIRERUNNER_QEMU_TEST_HELPER"

type helperReq struct {
	State, Binary string
	Spec          vm.Spec
}

// helperStartAndExit starts the VM described in helperEnv and exits.
func helperStartAndExit(raw string) error {
	var r helperReq
	if err := json.Unmarshal([]byte(raw), &r); err != nil {
		return err
	}
	d, err := New(Options{Binary: r.Binary, Accel: AccelAuto, StateDir: r.State})
	if err != nil {
		return err
	}
	// Exit without Wait/Destroy: the qemu process is orphaned.
	return d.Start(context.Background(), r.Spec)
}

func startOrphan(t *testing.T, e realEnv, spec vm.Spec) {
	t.Helper()
	b, _ := json.Marshal(helperReq{State: e.state, Binary: e.drv.binary, Spec: spec})
	cmd := exec.Command(os.Args[0])
	cmd.Env = append(os.Environ(), helperEnv+"="+string(b))
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("helper: %v\n%s", err, out)
	}
}

// TestAdoptOrphanAfterRestart: VMs left by a dead FireRunner process are
// listed, waited for (deadline enforced) and destroyed by a new Driver on the
// same state dir.
func TestAdoptOrphanAfterRestart(t *testing.T) {
	e := newRealEnv(t)
	long := e.spec("fr-orph1", time.Hour, "sleep 100000")
	short := e.spec("fr-orph2", 5*time.Second, "sleep 100000")
	startOrphan(t, e, long)
	startOrphan(t, e, short)

	d2, err := New(Options{Binary: e.drv.binary, Accel: AccelTCG, StateDir: e.state})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	list, err := d2.List(ctx)
	if err != nil {
		t.Fatal(err)
	}
	pids := map[string]int{}
	for _, in := range list {
		pids[in.ID] = in.PID
	}
	if len(list) != 2 || pids["fr-orph1"] == 0 || pids["fr-orph2"] == 0 {
		t.Fatalf("List after restart = %+v, want both VMs alive", list)
	}
	orphan, err := vm.LookupProc(pids["fr-orph1"])
	if err != nil {
		t.Fatal(err)
	}
	if ppid := parentPID(t, orphan.PID); ppid == os.Getpid() {
		t.Fatalf("qemu's parent is this test process: not an orphan")
	}

	// Wait enforces the deadline recorded by the dead process.
	wctx, cancel := context.WithTimeout(ctx, bootBudget)
	defer cancel()
	res, err := d2.Wait(wctx, "fr-orph2")
	if err != nil || res.Reason != "timeout" {
		t.Fatalf("Wait on adopted VM with a 5s deadline = %+v, %v; want reason timeout", res, err)
	}
	// Wait honours the caller's ctx on a VM that keeps running.
	sctx, scancel := context.WithTimeout(ctx, 500*time.Millisecond)
	_, err = d2.Wait(sctx, "fr-orph1")
	scancel()
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Wait on a running adopted VM: %v, want deadline exceeded", err)
	}

	for _, id := range []string{"fr-orph1", "fr-orph2"} {
		if err := d2.Destroy(ctx, id); err != nil {
			t.Fatalf("destroy %s: %v", id, err)
		}
	}
	if orphan.Alive() {
		t.Fatal("orphaned qemu survived Destroy")
	}
	if list, _ := d2.List(ctx); len(list) != 0 {
		t.Fatalf("List after Destroy = %+v", list)
	}
}

func parentPID(t *testing.T, pid int) int {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		t.Fatal(err)
	}
	f := strings.Fields(string(b[bytes.LastIndexByte(b, ')')+2:]))
	p, _ := strconv.Atoi(f[1])
	return p
}

func tail(s string, n int) string {
	lines := strings.Split(s, "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// TestBootProbe checks the accelerator probe's verdicts with an accelerator
// that works here (TCG) and a "kernel" that cannot boot.
func TestBootProbe(t *testing.T) {
	e := newRealEnv(t)
	khz, _, err := HostTSCkHz()
	if err != nil {
		t.Fatal(err)
	}
	tcg := []string{"-accel", "tcg", "-cpu", "max"}
	if err := probeBoot(context.Background(), e.drv.binary, e.img.Kernel, tcg, "tsc_early_khz="+strconv.Itoa(khz), bootBudget); err != nil {
		t.Fatalf("probe of a bootable kernel under TCG failed: %v", err)
	}
	bogus := filepath.Join(t.TempDir(), "not-a-kernel")
	if err := os.WriteFile(bogus, bytes.Repeat([]byte("x"), 4096), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := probeBoot(context.Background(), e.drv.binary, bogus, tcg, "", time.Minute); err == nil {
		t.Fatal("probe of a non-kernel succeeded")
	} else {
		t.Logf("non-kernel: %v", err)
	}
	acc, why := resolveAccel(context.Background(), e.drv.binary, AccelAuto, e.img.Kernel)
	t.Logf("auto accel on this host: %s (%s)", acc, why)
	if acc2, _ := resolveAccel(context.Background(), e.drv.binary, AccelAuto, e.img.Kernel); acc2 != acc {
		t.Fatalf("cached probe result changed: %s then %s", acc, acc2)
	}
}

// TestDestroyWhileBooting: Destroy of a booting VM kills and reaps qemu
// (no zombie), a concurrent Wait reports "killed", nothing is left.
func TestDestroyWhileBooting(t *testing.T) {
	e := newRealEnv(t)
	spec := e.spec("fr-kill1", time.Hour, "sleep 100000")
	ctx := context.Background()
	if err := e.drv.Start(ctx, spec); err != nil {
		t.Fatal(err)
	}
	if err := e.drv.Start(ctx, spec); err != nil { // idempotent while running
		t.Fatalf("second Start of a running VM: %v", err)
	}
	meta, err := e.drv.StateDir().ReadMeta(spec.ID)
	if err != nil || !meta.Proc.Alive() {
		t.Fatalf("meta %+v, %v: VMM not alive after Start", meta, err)
	}
	list, _ := e.drv.List(ctx)
	if len(list) != 1 || list[0].PID != meta.Proc.PID {
		t.Fatalf("List = %+v, want pid %d", list, meta.Proc.PID)
	}
	waited := make(chan vm.Result, 1)
	go func() {
		r, _ := e.drv.Wait(ctx, spec.ID)
		waited <- r
	}()
	if err := e.drv.Destroy(ctx, spec.ID); err != nil {
		t.Fatal(err)
	}
	if r := <-waited; r.Reason != "killed" {
		t.Fatalf("Wait during Destroy = %+v, want reason killed", r)
	}
	if meta.Proc.Exists() {
		t.Fatalf("qemu pid %d still exists (zombie or alive) after Destroy", meta.Proc.PID)
	}
	if err := e.drv.Destroy(ctx, spec.ID); err != nil {
		t.Fatalf("second Destroy: %v", err)
	}
	if _, err := e.drv.Wait(ctx, spec.ID); !errors.Is(err, vm.ErrNotFound) {
		t.Fatalf("Wait after Destroy: %v, want ErrNotFound", err)
	}
}

// TestVMMFailureReported: a qemu that cannot boot (not a kernel) ends with
// a reason carrying qemu's own error.
func TestVMMFailureReported(t *testing.T) {
	e := newRealEnv(t)
	spec := e.spec("fr-fail1", time.Minute, "true")
	spec.Image.Kernel = filepath.Join(t.TempDir(), "not-a-kernel")
	if err := os.WriteFile(spec.Image.Kernel, bytes.Repeat([]byte{0x90}, 8192), 0o600); err != nil {
		t.Fatal(err)
	}
	res, _, _ := e.runVM(t, spec, nil)
	if res.ExitCode != -1 || !strings.HasPrefix(res.Reason, "vmm exited: exit status 1") || !strings.Contains(res.Reason, "kernel") {
		t.Fatalf("result = %+v, want qemu's kernel error", res)
	}
	t.Logf("reason: %s", res.Reason)
}

// BenchmarkBootToCommand boots the real image per iteration, runs `true`
// and destroys the VM; it reports the mean per-stage times of the timeline.
func BenchmarkBootToCommand(b *testing.B) {
	testenv.RequireRoot(b)
	bin := testenv.QEMU(b)
	m, err := image.Load(testenv.ImageDir(b))
	if err != nil {
		b.Fatal(err)
	}
	d, err := New(Options{Binary: bin, Accel: AccelAuto, StateDir: b.TempDir()})
	if err != nil {
		b.Fatal(err)
	}
	stages := []struct {
		name     string
		from, to vm.Milestone
	}{
		{"vmm_start_ms", vm.MilestonePrepared, vm.MilestoneVMMStarted},
		{"kernel_to_init_s", vm.MilestoneVMMStarted, vm.MilestoneInit},
		{"init_to_agent_s", vm.MilestoneInit, vm.MilestoneAgentStart},
		{"agent_to_jobend_s", vm.MilestoneAgentStart, vm.MilestoneJobEnd},
		{"jobend_to_gone_s", vm.MilestoneJobEnd, vm.MilestoneDestroyed},
		{"total_s", vm.MilestoneVMMStarted, vm.MilestoneDestroyed},
	}
	sums := make([]float64, len(stages))
	n := 0
	ctx := context.Background()
	for b.Loop() {
		id := "fr-bench" + strconv.Itoa(n)
		spec := vm.Spec{ID: id, VCPUs: 2, MemoryMiB: 512, Image: m.VMImage(), Timeout: bootBudget,
			Guest: guestconfig.Config{JobTimeoutSec: 60, Command: []string{"true"}}}
		if err := d.Start(ctx, spec); err != nil {
			b.Fatal(err)
		}
		tl, _ := d.Timeline(id)
		res, err := d.Wait(ctx, id)
		if derr := d.Destroy(ctx, id); derr != nil {
			b.Fatal(derr)
		}
		if err != nil || res.ExitCode != 0 {
			b.Fatalf("boot %d: %+v %v", n, res, err)
		}
		for i, s := range stages {
			dur, ok := tl.Between(s.from, s.to)
			if !ok {
				b.Fatalf("timeline lacks %s or %s:\n%s", s.from, s.to, tl)
			}
			if strings.HasSuffix(s.name, "_ms") {
				sums[i] += float64(dur) / float64(time.Millisecond)
			} else {
				sums[i] += dur.Seconds()
			}
		}
		n++
	}
	for i, s := range stages {
		b.ReportMetric(sums[i]/float64(n), s.name)
	}
}

// TestUserNetReachesHostLoopback: with user-mode networking the guest
// reaches a server on the host's loopback as 10.0.2.2 (how development
// setups and tests reach the GitLab stand-in).
func TestUserNetReachesHostLoopback(t *testing.T) {
	e := newRealEnv(t)
	nonce := "nonce-" + strconv.FormatInt(time.Now().UnixNano(), 36)
	hits := make(chan string, 4)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hits <- r.URL.Path
		fmt.Fprint(w, nonce)
	}))
	defer srv.Close()
	port := srv.URL[strings.LastIndexByte(srv.URL, ':')+1:]
	spec := e.spec("fr-unet1", bootBudget, "echo; echo GOT-$(curl -sS --max-time 30 http://10.0.2.2:"+port+"/from-guest)")
	res, console, _ := e.runVM(t, spec, nil)
	if res.ExitCode != 0 {
		t.Fatalf("result %+v\n%s", res, tail(console, 30))
	}
	if !strings.Contains(console, "GOT-"+nonce) {
		t.Fatalf("guest did not fetch from the host's loopback\n%s", tail(console, 30))
	}
	if p := <-hits; p != "/from-guest" {
		t.Fatalf("server saw %q", p)
	}
}

// TestTapNetworking boots a VM on a tap device (the production path) inside
// a network namespace the test creates, with a static guest address from
// the config drive; the guest reaches the namespace's end of the tap.
func TestTapNetworking(t *testing.T) {
	e := newRealEnv(t)
	ipBin, err := exec.LookPath("ip")
	if err != nil {
		t.Fatalf("ip (iproute2) is required: %v", err)
	}
	suffix := strconv.FormatInt(time.Now().UnixNano()%1e6, 36)
	ns, tap := "frq-"+suffix, "frqt"+suffix
	ipc := func(args ...string) {
		t.Helper()
		if out, err := exec.Command(ipBin, args...).CombinedOutput(); err != nil {
			t.Fatalf("ip %v: %v\n%s", args, err, out)
		}
	}
	ipc("netns", "add", ns)
	t.Cleanup(func() { _ = exec.Command(ipBin, "netns", "del", ns).Run() }) // deletes the tap too
	ipc("-n", ns, "tuntap", "add", "dev", tap, "mode", "tap")
	ipc("-n", ns, "addr", "add", "172.31.254.1/30", "dev", tap)
	ipc("-n", ns, "link", "set", tap, "up")
	// qemu must open the tap in its namespace: run it through ip netns exec.
	wrapper := filepath.Join(t.TempDir(), "qemu-in-netns")
	script := "#!/bin/sh\nexec " + ipBin + " netns exec " + ns + " " + e.drv.binary + " \"$@\"\n"
	if err := os.WriteFile(wrapper, []byte(script), 0o700); err != nil {
		t.Fatal(err)
	}
	d, err := New(Options{Binary: wrapper, Accel: AccelTCG, StateDir: e.state, NetworkMode: "tap"})
	if err != nil {
		t.Fatal(err)
	}
	e.drv = d

	// A server inside the namespace (this test binary re-run there).
	nonce := "nonce-" + strconv.FormatInt(time.Now().UnixNano(), 36)
	srv := exec.Command(ipBin, "netns", "exec", ns, os.Args[0])
	srv.Env = append(os.Environ(), netnsServerEnv+"=172.31.254.1:8080 "+nonce)
	var srvOut bytes.Buffer
	srv.Stdout, srv.Stderr = &srvOut, &srvOut
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = srv.Process.Kill(); _ = srv.Wait() }()

	spec := e.spec("fr-tap1", bootBudget,
		"ip -4 -o addr show eth0; cat /sys/class/net/eth0/address; echo; echo GOT-$(curl -sS --retry 5 --retry-connrefused --max-time 60 http://172.31.254.1:8080/)")
	spec.Network = &vm.NetAttachment{TapName: tap, MAC: "02:fc:00:00:01:02"}
	spec.Guest.Network = &guestconfig.Network{Address: "172.31.254.2/30", Gateway: "172.31.254.1", MTU: 1500}
	res, console, _ := e.runVM(t, spec, nil)
	if res.ExitCode != 0 {
		t.Fatalf("result %+v\n%s", res, tail(console, 30))
	}
	for _, want := range []string{"172.31.254.2/30", "02:fc:00:00:01:02", "GOT-" + nonce} {
		if !strings.Contains(console, want) {
			t.Errorf("console lacks %q\n%s\nserver: %s", want, tail(console, 30), srvOut.String())
		}
	}
}

const netnsServerEnv = "FIRERUNNER_QEMU_TEST_NETNS_SERVER"

// helperNetnsServer is the HTTP server TestTapNetworking runs inside its
// network namespace: it answers every request with the nonce.
func helperNetnsServer(cfg string) error {
	addr, nonce, _ := strings.Cut(cfg, " ")
	srv := &http.Server{Addr: addr, Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprint(w, nonce)
	})}
	go func() { time.Sleep(bootBudget); srv.Close() }()
	if err := srv.ListenAndServe(); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

// TestMain lets the test binary double as the helper processes above.
func TestMain(m *testing.M) {
	run := func(f func(string) error, arg string) {
		if err := f(arg); err != nil {
			fmt.Fprintln(os.Stderr, "helper:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	if v := os.Getenv(helperEnv); v != "" {
		run(helperStartAndExit, v)
	}
	if v := os.Getenv(netnsServerEnv); v != "" {
		run(helperNetnsServer, v)
	}
	os.Exit(m.Run())
}

// TestConcurrentVMsShareReadOnlyBase: several VMs boot at once from one
// base image; each gets its own writable root (tmpfs overlay in the guest)
// and exit status, and the base image is never written.
func TestConcurrentVMsShareReadOnlyBase(t *testing.T) {
	e := newRealEnv(t)
	before, err := os.Stat(e.img.Rootfs)
	if err != nil {
		t.Fatal(err)
	}
	const n = 3
	ctx, cancel := context.WithTimeout(context.Background(), 2*bootBudget)
	defer cancel()
	ids := make([]string, n)
	for i := range n {
		ids[i] = "fr-conc" + strconv.Itoa(i)
		// $HOME lives on the root filesystem: the write must land in this
		// VM's overlay only.
		spec := e.spec(ids[i], 2*bootBudget, "echo "+ids[i]+" > $HOME/mine && df -h $HOME | tail -1 && cat $HOME/mine; exit "+strconv.Itoa(10+i))
		if err := e.drv.Start(ctx, spec); err != nil {
			t.Fatal(err)
		}
	}
	for i, id := range ids {
		res, err := e.drv.Wait(ctx, id)
		console, _ := os.ReadFile(res.ConsoleLog)
		if derr := e.drv.Destroy(context.Background(), id); derr != nil {
			t.Error(derr)
		}
		if err != nil || res.ExitCode != 10+i || res.Reason != "" {
			t.Errorf("%s: %+v %v\n%s", id, res, err, tail(string(console), 20))
			continue
		}
		if !strings.Contains(string(console), "overlay ") {
			t.Errorf("%s: $HOME is not on the overlay root:\n%s", id, tail(string(console), 20))
		}
		for j, other := range ids {
			if got := strings.Contains(string(console), other+"\r\n") || strings.Contains(string(console), other+"\n"); got != (i == j) {
				t.Errorf("%s console mentions %s: %v", id, other, got)
			}
		}
	}
	after, err := os.Stat(e.img.Rootfs)
	if err != nil || !after.ModTime().Equal(before.ModTime()) || after.Size() != before.Size() {
		t.Fatalf("base image changed: %v -> %v (%v)", before.ModTime(), after.ModTime(), err)
	}
}
