package qemu

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
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
	s := fmt.Sprintf("timeline of %s (host-observed; +since first, (+stage)):\n%s", name, tl)
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
	const timeout = 60 * time.Second
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

func TestHelperStartAndExit(t *testing.T) {
	raw := os.Getenv(helperEnv)
	if raw == "" {
		t.Skip("helper process for TestAdoptOrphanAfterRestart")
	}
	var r helperReq
	if err := json.Unmarshal([]byte(raw), &r); err != nil {
		t.Fatal(err)
	}
	d, err := New(Options{Binary: r.Binary, Accel: AccelAuto, StateDir: r.State})
	if err != nil {
		t.Fatal(err)
	}
	if err := d.Start(context.Background(), r.Spec); err != nil {
		t.Fatal(err)
	}
	// Exit without Wait/Destroy: the qemu process is orphaned.
}

func startOrphan(t *testing.T, e realEnv, spec vm.Spec) {
	t.Helper()
	b, _ := json.Marshal(helperReq{State: e.state, Binary: e.drv.binary, Spec: spec})
	cmd := exec.Command(os.Args[0], "-test.run=^TestHelperStartAndExit$", "-test.count=1")
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
