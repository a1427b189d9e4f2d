package firecracker

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/firerunner/firerunner/internal/guestconfig"
	"github.com/firerunner/firerunner/internal/testsupport/fcstandin"
	"github.com/firerunner/firerunner/internal/vm"
)

// TestMain lets the test binary play Firecracker and the jailer: the driver
// execs it through symlinks named "firecracker" and "jailer".
func TestMain(m *testing.M) {
	fcstandin.Dispatch()
	os.Exit(m.Run())
}

// testToken is assembled so it never looks like a committed real token.
var testToken = "glrt" + "-contract-test-SECRET-token"

var (
	specsOnce  sync.Once
	specs      fcstandin.Specs
	specsError error
)

// testEnv is one driver on a fresh temp tree with the stand-in as its VMM.
type testEnv struct {
	t                         testing.TB
	root, logDir, cgRoot      string
	stateDir, chrootBase, bin string
	image                     vm.Image
	opts                      Options
}

func newEnv(t testing.TB, jailer bool) *testEnv {
	t.Helper()
	specsOnce.Do(func() { specs, specsError = fcstandin.FindSpecs() })
	if specsError != nil {
		t.Fatalf("contract test needs the SDK's Firecracker API spec (client/swagger.yaml), and ../shared/specs/%s where ../shared/specs exists: %v", fcstandin.OfficialSpecName, specsError)
	}
	if n := specs.Note(); n != "" {
		t.Log(n)
	}
	// A short root: Unix socket paths are limited to 107 bytes.
	root, err := os.MkdirTemp("", "fc")
	if err != nil {
		t.Fatal(err)
	}
	e := &testEnv{t: t, root: root, logDir: filepath.Join(root, "log"), cgRoot: filepath.Join(root, "cg"),
		stateDir: filepath.Join(root, "state"), chrootBase: filepath.Join(root, "jail"), bin: filepath.Join(root, "bin")}
	for _, d := range []string{e.logDir, e.cgRoot, e.bin, filepath.Join(root, "img"), filepath.Join(e.cgRoot, "system.slice")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	// A cgroup v2 hierarchy with swap accounting, as Debian's kernel has.
	if err := os.WriteFile(filepath.Join(e.cgRoot, "system.slice", "memory.swap.max"), []byte("max\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range []string{"firecracker", "jailer"} {
		if err := os.Symlink(self, filepath.Join(e.bin, n)); err != nil {
			t.Fatal(err)
		}
	}
	// A minimal ELF vmlinux (the stand-in checks the magic), initrd, rootfs;
	// world-readable like a built image, so the jail user can read links.
	e.image = vm.Image{Kernel: filepath.Join(root, "img", "vmlinux"), Initrd: filepath.Join(root, "img", "initrd.img"), Rootfs: filepath.Join(root, "img", "rootfs.ext4")}
	for p, content := range map[string]string{e.image.Kernel: "\x7fELF\x02\x01\x01 vmlinux", e.image.Initrd: "initramfs", e.image.Rootfs: "ext4 rootfs"} {
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	t.Setenv(fcstandin.EnvSpecs, strings.Join(specs.Paths(), string(os.PathListSeparator)))
	t.Setenv(fcstandin.EnvLogDir, e.logDir)
	t.Setenv(fcstandin.EnvCgroupRoot, e.cgRoot)
	// The host's taps, as the stand-in models them: per test tree, so
	// parallel runs never share one.
	t.Setenv(fcstandin.EnvTapDir, filepath.Join(root, "taps"))
	uid, gid := 64000, 64000
	if os.Geteuid() != 0 {
		uid, gid = os.Getuid(), os.Getgid() // chown to oneself needs no privilege
	}
	e.opts = Options{
		Binary: filepath.Join(e.bin, "firecracker"), StateDir: e.stateDir,
		UseJailer: jailer, JailerBinary: filepath.Join(e.bin, "jailer"), UID: uid, GID: gid,
		ChrootBase: e.chrootBase, CgroupRoot: e.cgRoot,
		Logger: slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelInfo})),
	}
	t.Cleanup(func() {
		if !t.Failed() {
			os.RemoveAll(root)
		} else {
			t.Logf("test tree kept for inspection: %s", root)
		}
	})
	return e
}

type testWriter struct{ t testing.TB }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSpace(string(p)))
	return len(p), nil
}

func (e *testEnv) driver() *Driver {
	d, err := New(e.opts)
	if err != nil {
		e.t.Fatal(err)
	}
	return d
}

func (e *testEnv) spec(id string, cmd ...string) vm.Spec {
	return vm.Spec{
		ID: id, VCPUs: 2, MemoryMiB: 512, Image: e.image,
		Guest:   guestconfig.Config{Hostname: id, JobTimeoutSec: 60, RunnerToken: testToken, GitLabURL: "http://gitlab.test", Command: cmd},
		Network: &vm.NetAttachment{TapName: "tap-" + id[3:], MAC: "AA:FC:00:00:00:01"},
		Timeout: time.Minute,
	}
}

// requests reads the stand-in's request log for a VM and fails the test on
// any contract violation or non-2xx answer.
func (e *testEnv) requests(id string) []fcstandin.Record {
	e.t.Helper()
	recs, err := fcstandin.ReadLog(filepath.Join(e.logDir, id+".jsonl"))
	if err != nil {
		e.t.Fatalf("stand-in request log: %v", err)
	}
	for _, r := range recs {
		if r.Violation || r.Status >= 300 {
			e.t.Errorf("request %d %s %s violates the Firecracker API contract: %d %s (body %s)", r.Seq, r.Method, r.Path, r.Status, r.Fault, r.Body)
		}
	}
	return recs
}

func calls(recs []fcstandin.Record) []string {
	var out []string
	for _, r := range recs {
		out = append(out, r.Method+" "+r.Path)
	}
	return out
}

func body(t *testing.T, recs []fcstandin.Record, call string) map[string]any {
	t.Helper()
	for _, r := range recs {
		if r.Method+" "+r.Path == call {
			var m map[string]any
			if err := json.Unmarshal(r.Body, &m); err != nil {
				t.Fatalf("%s body: %v", call, err)
			}
			return m
		}
	}
	t.Fatalf("no %s request", call)
	return nil
}

// assertClean checks that nothing of VM id is left on the host.
func (e *testEnv) assertClean(d *Driver, id string, pid int) {
	e.t.Helper()
	for _, p := range []string{d.sd.Path(id), d.jailDir(id), d.cgroupDir(id)} {
		if _, err := os.Lstat(p); err == nil {
			e.t.Errorf("left behind after Destroy: %s", p)
		}
	}
	if pid > 0 {
		if _, err := os.Stat("/proc/" + strconv.Itoa(pid)); err == nil {
			if st, _ := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat"); !bytes.Contains(st, []byte(") Z")) {
				e.t.Errorf("VMM pid %d still alive after Destroy", pid)
			}
		}
	}
	if insts, err := d.List(context.Background()); err != nil || len(insts) != 0 {
		e.t.Errorf("List after Destroy = %v, %v; want nothing", insts, err)
	}
	if ents, _ := os.ReadDir(filepath.Join(e.stateDir, "vms")); len(ents) != 0 {
		e.t.Errorf("state dir not empty after Destroy: %v", ents)
	}
}

// TestContractBootAndDestroy drives the full boot, guest power-off, Wait and
// Destroy sequence through the SDK against the stand-in, which checks every
// request against API 1.4.1 (the SDK's spec) and, where ../shared/specs
// exists, 1.17.0-dev (newest official).
func TestContractBootAndDestroy(t *testing.T) {
	for _, jailer := range []bool{false, true} {
		t.Run(map[bool]string{false: "direct", true: "jailer"}[jailer], func(t *testing.T) {
			e := newEnv(t, jailer)
			d := e.driver()
			ctx := context.Background()
			id := "fr-contract1"
			spec := e.spec(id, fcstandin.CmdExit, "3")
			t.Cleanup(func() { d.Destroy(ctx, id) })
			if err := d.Start(ctx, spec); err != nil {
				t.Fatalf("Start: %v", err)
			}
			meta, err := d.sd.ReadMeta(id)
			if err != nil {
				t.Fatal(err)
			}
			pid := meta.Proc.PID
			res, err := d.Wait(ctx, id)
			if err != nil {
				t.Fatalf("Wait: %v", err)
			}
			if res.ExitCode != 3 || res.Reason != "" {
				t.Errorf("Wait = %+v; want exit code 3 from the console marker and a clean power-off", res)
			}
			console, _ := os.ReadFile(res.ConsoleLog)
			if !bytes.Contains(console, []byte("Linux version")) {
				t.Errorf("console log lacks the guest's serial output:\n%s", console)
			}

			recs := e.requests(id)
			got := calls(recs)
			// The socket probe (GET /machine-config) may repeat; then the chain.
			for len(got) > 0 && got[0] == "GET /machine-config" {
				got = got[1:]
			}
			want := []string{
				"PUT /logger", "PUT /metrics",
				"PUT /machine-config", "GET /machine-config",
				"PUT /boot-source",
				"PUT /drives/rootfs", "PUT /drives/config",
				"PUT /network-interfaces/1",
				"PUT /entropy",
				"PUT /serial",
				"PUT /actions",
			}
			if !slices.Equal(got, want) {
				t.Errorf("API sequence:\n got %q\nwant %q", got, want)
			}
			// The console behind Firecracker's limiter; stdout stays the
			// console (no serial_out_path).
			serial := body(t, recs, "PUT /serial")
			if _, ok := serial["serial_out_path"]; ok || fmt.Sprint(serial["rate_limiter"]) != fmt.Sprint(map[string]any{
				"size": float64(DefaultSerialBytesPerSec), "refill_time": 1000.0, "one_time_burst": float64(4 * DefaultSerialBytesPerSec)}) {
				t.Errorf("PUT /serial = %v; want only the default rate limiter", serial)
			}
			if a := body(t, recs, "PUT /actions"); a["action_type"] != "InstanceStart" {
				t.Errorf("last request %v; want InstanceStart", a)
			}
			mc := body(t, recs, "PUT /machine-config")
			if mc["vcpu_count"] != 2.0 || mc["mem_size_mib"] != 512.0 || mc["smt"] != false {
				t.Errorf("machine-config = %v", mc)
			}
			bs := body(t, recs, "PUT /boot-source")
			wantArgs, _ := BootArgs(nil)
			if bs["boot_args"] != wantArgs || strings.Contains(wantArgs, "nomodule") {
				t.Errorf("boot_args = %q, want %q", bs["boot_args"], wantArgs)
			}
			root := body(t, recs, "PUT /drives/rootfs")
			cfgDrive := body(t, recs, "PUT /drives/config")
			if root["is_read_only"] != true || root["is_root_device"] != true || cfgDrive["is_read_only"] != true || cfgDrive["is_root_device"] != false {
				t.Errorf("drives: rootfs %v, config %v; want both read-only, rootfs the root device", root, cfgDrive)
			}
			nic := body(t, recs, "PUT /network-interfaces/1")
			if nic["host_dev_name"] != spec.Network.TapName || nic["guest_mac"] != spec.Network.MAC {
				t.Errorf("network interface = %v", nic)
			}
			if jailer {
				for k, v := range map[string]any{"kernel_image_path": jailKernel, "initrd_path": jailInitrd} {
					if bs[k] != v {
						t.Errorf("boot-source %s = %v; want jail path %s", k, bs[k], v)
					}
				}
				if root["path_on_host"] != jailRootfs || cfgDrive["path_on_host"] != jailConfig {
					t.Errorf("drive paths %v %v; want jail paths", root["path_on_host"], cfgDrive["path_on_host"])
				}
				e.checkJail(d, spec, meta, pid)
			} else {
				if bs["kernel_image_path"] != e.image.Kernel || root["path_on_host"] != e.image.Rootfs {
					t.Errorf("boot-source/drive paths %v %v; want the image's", bs["kernel_image_path"], root["path_on_host"])
				}
				if want := []string{e.opts.Binary, "--api-sock", d.sd.File(id, socketFile), "--id", id}; !slices.Equal(meta.Argv, want) {
					t.Errorf("firecracker argv = %q, want %q", meta.Argv, want)
				}
			}
			e.checkNoSecretOutsideDrive(d, id, meta)

			if err := d.Destroy(ctx, id); err != nil {
				t.Fatalf("Destroy: %v", err)
			}
			e.assertClean(d, id, pid)
			if err := d.Destroy(ctx, id); err != nil {
				t.Errorf("second Destroy: %v (must be idempotent)", err)
			}
			if _, err := d.Wait(ctx, id); err == nil {
				t.Errorf("Wait after Destroy succeeded; want vm.ErrNotFound")
			}
		})
	}
}

// checkJail verifies the jailer command line and what it built.
func (e *testEnv) checkJail(d *Driver, spec vm.Spec, meta vm.Meta, pid int) {
	t := e.t
	if meta.Argv[0] != e.opts.JailerBinary {
		t.Fatalf("argv[0] = %s; want the jailer", meta.Argv[0])
	}
	j, err := fcstandin.ParseJailerArgs(meta.Argv[1:])
	if err != nil {
		t.Fatalf("jailer argv %q: %v", meta.Argv, err)
	}
	// The binary is a symlink (bin/firecracker → the test binary): the
	// jailer gets the file it points to, which names the jail.
	canon, _ := filepath.EvalSymlinks(e.opts.Binary)
	if j.ID != spec.ID || j.ExecFile != canon || j.UID != e.opts.UID || j.GID != e.opts.GID ||
		j.ChrootBase != e.chrootBase || j.CgroupVersion != "2" || !j.NewPIDNS || j.Daemonize {
		t.Errorf("jailer args = %+v", j)
	}
	// 2 vCPUs plus one CPU for Firecracker's own threads; 512 MiB plus 64
	// MiB for Firecracker plus 8 MiB per GiB for KVM's page tables; no swap.
	wantCg := []string{"cpu.max=300000 100000", fmt.Sprintf("memory.max=%d", int64(512+64+8)<<20), "memory.swap.max=0"}
	if !slices.Equal(j.Cgroups, wantCg) {
		t.Errorf("jailer cgroups = %q, want %q", j.Cgroups, wantCg)
	}
	if !slices.Equal(j.Extra, []string{"--api-sock", jailSocket}) {
		t.Errorf("firecracker args after -- = %q", j.Extra)
	}
	rec, err := os.ReadFile(d.cgroupDir(spec.ID) + ".cgroup.json")
	if err != nil || !bytes.Contains(rec, []byte(`"version":"2"`)) {
		t.Errorf("jailer cgroup record: %s, %v", rec, err)
	}
	// Per-VM files in the jail belong to the jail user; the config drive
	// stays 0600.
	fi, err := os.Stat(d.inJail(spec.ID, jailConfig))
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 || int(statUID(fi)) != e.opts.UID {
		t.Errorf("jail config drive mode %v uid %d; want 0600 owned by %d", fi.Mode(), statUID(fi), e.opts.UID)
	}
	if os.Geteuid() == 0 {
		// The stand-in jailer used CLONE_NEWPID: firecracker is pid 1 there.
		status, _ := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
		for _, l := range strings.Split(string(status), "\n") {
			if f := strings.Fields(l); len(f) > 0 && f[0] == "NSpid:" && (len(f) != 3 || f[2] != "1") {
				t.Errorf("firecracker not init of a new PID namespace: %s", l)
			}
		}
	}
}

// checkNoSecretOutsideDrive: the runner token reaches only the config drive.
func (e *testEnv) checkNoSecretOutsideDrive(d *Driver, id string, meta vm.Meta) {
	t := e.t
	if strings.Contains(strings.Join(meta.Argv, " "), testToken) {
		t.Error("runner token in the VMM argv")
	}
	filepath.Walk(e.root, func(p string, fi os.FileInfo, err error) error {
		if err != nil || fi.IsDir() || fi.Mode()&os.ModeType != 0 || p == filepath.Join(d.chrootDir(id), d.execName(id)) {
			return nil // (the jail's copy of the test binary holds the constant)
		}
		b, _ := os.ReadFile(p)
		if bytes.Contains(b, []byte(testToken)) {
			if fi.Mode().Perm() != 0o600 {
				t.Errorf("%s holds the token with mode %v", p, fi.Mode())
			}
			if filepath.Base(p) != vm.ConfigDrive && filepath.Base(p) != filepath.Base(jailConfig) {
				t.Errorf("runner token found outside the config drive: %s", p)
			}
		}
		return nil
	})
}

// TestContractTimeout: a guest that never powers off is killed at
// Spec.Timeout and reported as "timeout".
func TestContractTimeout(t *testing.T) {
	e := newEnv(t, false)
	d := e.driver()
	ctx := context.Background()
	spec := e.spec("fr-timeout1", fcstandin.CmdHang)
	spec.Timeout = 300 * time.Millisecond
	t.Cleanup(func() { d.Destroy(ctx, spec.ID) })
	if err := d.Start(ctx, spec); err != nil {
		t.Fatal(err)
	}
	if err := d.Start(ctx, spec); err != nil {
		t.Errorf("second Start of a running VM: %v (must be idempotent)", err)
	}
	res, err := d.Wait(ctx, spec.ID)
	if err != nil {
		t.Fatal(err)
	}
	if res.Reason != "timeout" || res.ExitCode != -1 {
		t.Errorf("Wait = %+v; want reason timeout, exit code -1", res)
	}
	e.requests(spec.ID)
	if err := d.Destroy(ctx, spec.ID); err != nil {
		t.Fatal(err)
	}
	e.assertClean(d, spec.ID, 0)
}

// TestReconcileAfterRestart: a new driver (a restarted FireRunner) finds a
// running VM through its files, and one whose files are gone through /proc,
// and destroys both completely.
func TestReconcileAfterRestart(t *testing.T) {
	for _, jailer := range []bool{false, true} {
		t.Run(map[bool]string{false: "direct", true: "jailer"}[jailer], func(t *testing.T) {
			e := newEnv(t, jailer)
			ctx := context.Background()
			d1 := e.driver()
			a, b := e.spec("fr-recon1", fcstandin.CmdHang), e.spec("fr-recon2", fcstandin.CmdHang)
			for _, s := range []vm.Spec{a, b} {
				t.Cleanup(func() { d1.Destroy(ctx, s.ID) })
				// The VM must outlive the context it was started with.
				sctx, scancel := context.WithCancel(ctx)
				if err := d1.Start(sctx, s); err != nil {
					t.Fatal(err)
				}
				scancel()
			}
			ma, _ := d1.sd.ReadMeta(a.ID)
			mb, _ := d1.sd.ReadMeta(b.ID)
			// Simulate a crash right after the VMM started: b's records are lost.
			for _, f := range []string{vm.MetaFile, vm.PIDFile, fcMetaFile} {
				os.Remove(d1.sd.File(b.ID, f))
			}
			if jailer {
				os.Remove(filepath.Join(d1.chrootDir(b.ID), d1.execName(b.ID)+".pid"))
			}

			d2 := e.driver() // the restarted daemon
			insts, err := d2.List(ctx)
			if err != nil {
				t.Fatal(err)
			}
			want := []vm.Instance{{ID: a.ID, PID: ma.Proc.PID}, {ID: b.ID, PID: mb.Proc.PID}}
			if !slices.Equal(insts, want) {
				t.Fatalf("List after restart = %+v; want %+v", insts, want)
			}
			// Wait works for an adopted VM too (it has a deadline): use a short ctx.
			wctx, cancel := context.WithTimeout(ctx, 100*time.Millisecond)
			if _, err := d2.Wait(wctx, a.ID); err != context.DeadlineExceeded {
				t.Errorf("Wait on a running adopted VM = %v; want the context deadline", err)
			}
			cancel()
			for _, inst := range insts {
				if err := d2.Destroy(ctx, inst.ID); err != nil {
					t.Fatalf("Destroy %s: %v", inst.ID, err)
				}
			}
			e.assertClean(d2, a.ID, ma.Proc.PID)
			e.assertClean(d2, b.ID, mb.Proc.PID)
		})
	}
}

// BenchmarkStartWaitDestroy measures the driver's own cost per VM (files,
// jail, SDK API sequence, reaping, cleanup) against the stand-in VMM.
func BenchmarkStartWaitDestroy(b *testing.B) {
	for _, jailer := range []bool{false, true} {
		b.Run(map[bool]string{false: "direct", true: "jailer"}[jailer], func(b *testing.B) {
			e := newEnv(b, jailer)
			d := e.driver()
			ctx := context.Background()
			for i := 0; i < b.N; i++ {
				spec := e.spec(fmt.Sprintf("fr-bench%d", i), fcstandin.CmdExit, "0")
				if err := d.Start(ctx, spec); err != nil {
					b.Fatal(err)
				}
				if _, err := d.Wait(ctx, spec.ID); err != nil {
					b.Fatal(err)
				}
				if err := d.Destroy(ctx, spec.ID); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// TestWaitReportsKilled: Destroy of a running VM ends a pending Wait with
// reason "killed".
func TestWaitReportsKilled(t *testing.T) {
	e := newEnv(t, false)
	d := e.driver()
	ctx := context.Background()
	spec := e.spec("fr-killed1", fcstandin.CmdHang)
	t.Cleanup(func() { d.Destroy(ctx, spec.ID) })
	if err := d.Start(ctx, spec); err != nil {
		t.Fatal(err)
	}
	type waited struct {
		res vm.Result
		err error
	}
	ch := make(chan waited, 1)
	go func() {
		r, err := d.Wait(ctx, spec.ID)
		ch <- waited{r, err}
	}()
	if err := d.Destroy(ctx, spec.ID); err != nil {
		t.Fatal(err)
	}
	w := <-ch
	if w.err != nil || w.res.Reason != "killed" || w.res.ExitCode != -1 {
		t.Errorf("Wait = %+v, %v; want reason killed", w.res, w.err)
	}
	e.assertClean(d, spec.ID, 0)
}

// TestContractScratchDisk: a Docker VM's scratch disk is one more drive,
// read-write and not the root device, named by its jail path with the jailer;
// the file is a sparse ext4 of the asked size in the VM's directory (in the
// jail, the jail user's) and is gone after Destroy.
func TestContractScratchDisk(t *testing.T) {
	for _, jailer := range []bool{false, true} {
		t.Run(map[bool]string{false: "direct", true: "jailer"}[jailer], func(t *testing.T) {
			e := newEnv(t, jailer)
			d := e.driver()
			ctx := context.Background()
			id := "fr-scratch1"
			spec := e.spec(id, fcstandin.CmdExit, "0")
			spec.ScratchDiskBytes = 1 << 30
			spec.Guest.Docker = &guestconfig.Docker{DefaultImage: "busybox:latest"}
			t.Cleanup(func() { d.Destroy(ctx, id) })
			if err := d.Start(ctx, spec); err != nil {
				t.Fatalf("Start: %v", err)
			}
			meta, err := d.sd.ReadMeta(id)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := d.Wait(ctx, id); err != nil {
				t.Fatalf("Wait: %v", err)
			}
			recs := e.requests(id)
			if got := calls(recs); !slices.Contains(got, "PUT /drives/scratch") {
				t.Fatalf("no scratch drive in %q", got)
			}
			sc := body(t, recs, "PUT /drives/scratch")
			want := d.sd.File(id, vm.ScratchDisk)
			if jailer {
				want = jailScratch
			}
			if sc["is_read_only"] != false || sc["is_root_device"] != false || sc["path_on_host"] != want {
				t.Errorf("scratch drive %v; want read-write, not root, at %s", sc, want)
			}
			file := d.sd.File(id, vm.ScratchDisk)
			if jailer {
				file = d.inJail(id, jailScratch)
			}
			fi, err := os.Stat(file)
			if err != nil {
				t.Fatal(err)
			}
			if fi.Size() != 1<<30 || fi.Mode().Perm() != 0o600 {
				t.Errorf("scratch disk %s: size %d mode %v", file, fi.Size(), fi.Mode())
			}
			if jailer && int(statUID(fi)) != e.opts.UID {
				t.Errorf("jail scratch disk owned by %d, want the jail user %d", statUID(fi), e.opts.UID)
			}
			pid := meta.Proc.PID
			if err := d.Destroy(ctx, id); err != nil {
				t.Fatalf("Destroy: %v", err)
			}
			e.assertClean(d, id, pid)
			if _, err := os.Stat(file); !os.IsNotExist(err) {
				t.Errorf("scratch disk survived Destroy: %v", err)
			}
		})
	}
}
