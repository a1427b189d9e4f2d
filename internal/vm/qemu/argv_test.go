package qemu

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/firerunner/firerunner/internal/guestconfig"
	"github.com/firerunner/firerunner/internal/vm"
)

// fakeToken builds a runner token at runtime so no token-shaped literal is
// committed.
func fakeToken() string {
	return "glrt-" + strings.Repeat("x", 4) + "FakeTestToken" + time.Now().Format("150405.000000")
}

func testSpec(tok string) vm.Spec {
	return vm.Spec{
		ID: "fr-argv1", VCPUs: 2, MemoryMiB: 768,
		Image: vm.Image{Kernel: "/img/vmlinux", Initrd: "/img/initrd.img", Rootfs: "/img/root,fs.ext4"},
		Guest: guestconfig.Config{
			Hostname: "fr-argv1", GitLabURL: "http://10.0.2.2:8080", RunnerToken: tok,
			JobTimeoutSec: 60, Env: map[string]string{"SECRET_ENV": tok},
		},
		Timeout: time.Minute,
	}
}

// argValue returns the argument after flag (the first occurrence).
func argValue(t *testing.T, args []string, flag string) string {
	t.Helper()
	i := slices.Index(args, flag)
	if i < 0 || i+1 >= len(args) {
		t.Fatalf("argv lacks %s: %q", flag, args)
	}
	return args[i+1]
}

func TestArgvTCG(t *testing.T) {
	tok := fakeToken()
	spec := testSpec(tok)
	l := launch{accel: AccelTCG, tscKHz: 2096006, consoleLog: "/s/vms/fr-argv1/console.log", configDrive: "/s/vms/fr-argv1/config.img"}
	args := qemuArgs(spec, l)
	joined := strings.Join(args, " ")

	if strings.Contains(joined, tok) || strings.Contains(joined, "glrt-") {
		t.Fatalf("token in argv: %q", args)
	}
	if slices.Contains(args, "-nodefaults") {
		t.Fatal("-nodefaults on microvm drops the serial console")
	}
	if got := argValue(t, args, "-M"); got != "microvm,x-option-roms=off,rtc=on" {
		t.Errorf("-M %s", got)
	}
	if got := argValue(t, args, "-accel"); got != "tcg,thread=multi" {
		t.Errorf("-accel %s", got)
	}
	if got := argValue(t, args, "-cpu"); got != "max" {
		t.Errorf("-cpu %s", got)
	}
	if argValue(t, args, "-smp") != "2" || argValue(t, args, "-m") != "768" {
		t.Errorf("smp/mem wrong: %q", args)
	}
	for _, f := range []string{"-no-reboot"} {
		if !slices.Contains(args, f) {
			t.Errorf("argv lacks %s", f)
		}
	}
	// Every QEMU runs inside its seccomp sandbox, the strictest QEMU offers.
	if got := argValue(t, args, "-sandbox"); got != "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny" {
		t.Errorf("-sandbox %q", got)
	}
	if got := argValue(t, args, "-serial"); got != "chardev:console" {
		t.Errorf("-serial %s", got)
	}
	if got := argValue(t, args, "-chardev"); got != "file,id=console,path=/s/vms/fr-argv1/console.log,append=on" {
		t.Errorf("-chardev %s: the console log must be appended to (the cap cuts it in place)", got)
	}
	if argValue(t, args, "-kernel") != "/img/vmlinux" || argValue(t, args, "-initrd") != "/img/initrd.img" {
		t.Errorf("kernel/initrd wrong: %q", args)
	}
	cmdline := argValue(t, args, "-append")
	for _, want := range []string{"console=ttyS0", "reboot=t", "panic=-1", "tsc_early_khz=2096006"} {
		if !slices.Contains(strings.Fields(cmdline), want) {
			t.Errorf("kernel cmdline %q lacks %s", cmdline, want)
		}
	}
	if strings.Contains(cmdline, tok) {
		t.Fatal("token on the kernel command line")
	}
	// Both disks read-only; the comma in the rootfs path is escaped.
	var drives []string
	for i, a := range args {
		if a == "-drive" {
			drives = append(drives, args[i+1])
		}
	}
	if len(drives) != 2 {
		t.Fatalf("want 2 drives, got %q", drives)
	}
	if !strings.Contains(drives[0], "file=/img/root,,fs.ext4,") {
		t.Errorf("root drive path not escaped: %s", drives[0])
	}
	for _, d := range drives {
		if !strings.Contains(d, "readonly=on") || !strings.Contains(d, "format=raw") {
			t.Errorf("drive not read-only raw: %s", d)
		}
	}
	if !strings.Contains(drives[1], "file=/s/vms/fr-argv1/config.img") {
		t.Errorf("config drive: %s", drives[1])
	}
	for _, dev := range []string{"virtio-blk-device,drive=root", "virtio-blk-device,drive=config", "virtio-rng-device", "virtio-net-device,netdev=net0"} {
		if !slices.Contains(args, dev) {
			t.Errorf("argv lacks -device %s", dev)
		}
	}
	if argValue(t, args, "-netdev") != "user,id=net0" {
		t.Errorf("netdev %s, want user", argValue(t, args, "-netdev"))
	}
}

func TestArgvKVMAndTap(t *testing.T) {
	spec := testSpec(fakeToken())
	spec.Network = &vm.NetAttachment{TapName: "fr-argv1", MAC: "02:fc:00:00:00:01"}
	args := qemuArgs(spec, launch{accel: AccelKVM, tscKHz: 2096006, vhostNet: true, consoleLog: "/c", configDrive: "/d"})
	if argValue(t, args, "-accel") != "kvm" || argValue(t, args, "-cpu") != "host" {
		t.Errorf("kvm accel/cpu wrong: %q", args)
	}
	if strings.Contains(argValue(t, args, "-append"), "tsc_early_khz") {
		t.Error("tsc_early_khz passed under KVM (the guest reads the TSC frequency from KVM)")
	}
	if got := argValue(t, args, "-netdev"); got != "tap,id=net0,ifname=fr-argv1,script=no,downscript=no,vhost=on" {
		t.Errorf("-netdev %s", got)
	}
	if !slices.Contains(args, "virtio-net-device,netdev=net0,mac=02:fc:00:00:00:01") {
		t.Errorf("nic lacks mac: %q", args)
	}
}

func TestKernelArgsAppended(t *testing.T) {
	c := kernelCmdline(launch{accel: AccelTCG, tscKHz: 1000, extraKernel: []string{"quiet"}})
	if !strings.HasPrefix(c, "console=ttyS0 reboot=t panic=-1") || !strings.HasSuffix(c, "tsc_early_khz=1000 quiet") {
		t.Fatalf("cmdline %q", c)
	}
	if c := kernelCmdline(launch{accel: AccelTCG}); strings.Contains(c, "tsc_early_khz") {
		t.Fatalf("tsc_early_khz without a known frequency: %q", c)
	}
}

func TestCheckNet(t *testing.T) {
	s := testSpec("")
	if err := checkNet(s, "tap"); err == nil {
		t.Error("tap mode without a tap accepted")
	}
	if err := checkNet(s, "user"); err != nil {
		t.Error(err)
	}
	for _, bad := range []vm.NetAttachment{
		{TapName: ""}, {TapName: "a,b"}, {TapName: "sixteen-chars-xx"},
		{TapName: "fr-x", MAC: "02:00:00:00:00"}, {TapName: "fr-x", MAC: "zz:00:00:00:00:00"},
	} {
		s.Network = &bad
		if err := checkNet(s, "tap"); err == nil {
			t.Errorf("bad attachment %+v accepted", bad)
		}
	}
	s.Network = &vm.NetAttachment{TapName: "fr-x", MAC: "02:AB:00:00:00:01"}
	if err := checkNet(s, "tap"); err != nil {
		t.Error(err)
	}
}

func TestTSCParsing(t *testing.T) {
	log := []byte("tsc: Detected 2096.006 MHz processor\nfoo\ntsc: Refined TSC clocksource calibration: 2095.99 MHz\n")
	if k, src, ok := tscFromKernelLog(log); !ok || k != 2095990 || !strings.Contains(src, "refined") {
		t.Errorf("refined: %d %q %v", k, src, ok)
	}
	if k, _, ok := tscFromKernelLog([]byte("tsc: Detected 2096.006 MHz processor\n")); !ok || k != 2096006 {
		t.Errorf("detected: %d %v", k, ok)
	}
	if _, _, ok := tscFromKernelLog([]byte("nothing")); ok {
		t.Error("parsed a TSC from nothing")
	}
	if k, ok := tscFromCPUInfo([]byte("model name\t: X\ncpu MHz\t\t: 2096.006\n")); !ok || k != 2096006 {
		t.Errorf("cpuinfo: %d %v", k, ok)
	}
	if k, ok := tscFromCPUInfo([]byte("cpu MHz\t\t: 3000\n")); !ok || k != 3000000 {
		t.Errorf("cpuinfo integer: %d %v", k, ok)
	}
	k, src, err := HostTSCkHz()
	if err != nil || k < 100000 {
		t.Fatalf("HostTSCkHz on this host = %d (%s), %v", k, src, err)
	}
	t.Logf("host TSC: %d kHz from %s", k, src)
}

func TestOptionsValidate(t *testing.T) {
	for _, o := range []Options{
		{Accel: "xen", NetworkMode: "user", StateDir: "/x"},
		{Accel: "tcg", NetworkMode: "bridge", StateDir: "/x"},
		{Accel: "tcg", NetworkMode: "user", StateDir: ""},
		{Accel: "tcg", NetworkMode: "user", StateDir: "/a,b"},
	} {
		if err := o.Validate(); err == nil {
			t.Errorf("%+v accepted", o)
		}
	}
}

// TestStartRejectsBadSpecAndLeavesNothing checks that bad input changes nothing.
func TestStartRejectsBadSpecAndLeavesNothing(t *testing.T) {
	state := t.TempDir()
	d, err := New(Options{Binary: "/bin/true", Accel: AccelTCG, StateDir: state, NetworkMode: "tap"})
	if err != nil {
		t.Fatal(err)
	}
	img := t.TempDir()
	s := testSpec(fakeToken())
	s.Image = vm.Image{Kernel: filepath.Join(img, "k"), Initrd: filepath.Join(img, "i"), Rootfs: filepath.Join(img, "r")}
	for _, f := range []string{s.Image.Kernel, s.Image.Initrd, s.Image.Rootfs} {
		if err := os.WriteFile(f, []byte("x"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	s.Network = &vm.NetAttachment{TapName: "fr-argv1"}
	cases := map[string]vm.Spec{
		"bad id":        func() vm.Spec { x := s; x.ID = "../x"; return x }(),
		"no vcpus":      func() vm.Spec { x := s; x.VCPUs = 0; return x }(),
		"no tap":        func() vm.Spec { x := s; x.Network = nil; return x }(),
		"bad tap":       func() vm.Spec { x := s; x.Network = &vm.NetAttachment{TapName: "a,b"}; return x }(),
		"missing image": func() vm.Spec { x := s; x.Image.Rootfs = filepath.Join(img, "nope"); return x }(),
		"bad guest":     func() vm.Spec { x := s; x.Guest.JobTimeoutSec = 0; return x }(),
	}
	for name, bad := range cases {
		err := d.Start(context.Background(), bad)
		if err == nil {
			t.Errorf("%s: accepted", name)
		} else {
			t.Logf("%s: %v", name, err)
		}
	}
	if ents, _ := os.ReadDir(filepath.Join(state, "vms")); len(ents) != 0 {
		t.Fatalf("rejected specs left files: %v", ents)
	}
	if _, err := d.Wait(context.Background(), "fr-nothere"); !errors.Is(err, vm.ErrNotFound) {
		t.Fatalf("Wait unknown: %v", err)
	}
	if err := d.Destroy(context.Background(), "fr-nothere"); err != nil {
		t.Fatalf("Destroy unknown: %v", err)
	}
	if err := d.Destroy(context.Background(), "../../etc"); err == nil {
		t.Fatal("Destroy accepted a path as id")
	}
}

// TestConfigDriveIsPrivate checks the per-VM preparation: a 0600 config
// drive holding the guest config (token included) in a 0700 dir.
func TestConfigDriveIsPrivate(t *testing.T) {
	keep := filepath.Join(t.TempDir(), "kept")
	d, err := New(Options{Accel: AccelTCG, StateDir: t.TempDir(), Binary: "/bin/true", ConsoleLogDir: keep})
	if err != nil {
		t.Fatal(err)
	}
	tok := fakeToken()
	s := testSpec(tok)
	dir, err := d.Prepare(s)
	if err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(filepath.Join(dir, vm.ConfigDrive))
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("config drive: %v %v", fi, err)
	}
	f, _ := os.Open(filepath.Join(dir, vm.ConfigDrive))
	defer f.Close()
	g, err := guestconfig.Decode(f)
	if err != nil || g.RunnerToken != tok || g.UnixTimeNano == 0 || len(g.EntropySeed) == 0 {
		t.Fatalf("decoded config: %v (seed %d bytes), %v", g, len(g.EntropySeed), err)
	}
	if err := os.WriteFile(filepath.Join(dir, vm.ConsoleFile), []byte("console text\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := d.Destroy(context.Background(), s.ID); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Fatalf("state dir survived Destroy: %v", err)
	}
	// console_log_dir keeps a private copy of the console log.
	kept := filepath.Join(keep, s.ID+".log")
	b, err := os.ReadFile(kept)
	if err != nil || string(b) != "console text\n" {
		t.Fatalf("kept console log: %q %v", b, err)
	}
	if fi, err := os.Stat(kept); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("kept console log mode: %v %v", fi, err)
	}
}

// BenchmarkPrepare measures per-VM disk preparation: state dir + config
// drive; the root disk is the shared read-only base image, so this is all.
func BenchmarkPrepare(b *testing.B) {
	d, err := New(Options{Accel: AccelTCG, StateDir: b.TempDir(), Binary: "/bin/true"})
	if err != nil {
		b.Fatal(err)
	}
	s := testSpec("glrt-bench")
	b.ResetTimer()
	for b.Loop() {
		if _, err := d.Prepare(s); err != nil {
			b.Fatal(err)
		}
		b.StopTimer()
		if err := d.sd.Remove(s.ID); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
	}
}

// A scratch disk is one more virtio-blk device, read-write (unlike root and
// config drive); no scratch disk, no such device.
func TestArgvScratchDisk(t *testing.T) {
	spec := testSpec(fakeToken())
	l := launch{accel: AccelTCG, consoleLog: "/c", configDrive: "/d", scratchDisk: "/s/vms/fr-argv1/scratch.img"}
	args := qemuArgs(spec, l)
	var drives []string
	for i, a := range args {
		if a == "-drive" {
			drives = append(drives, args[i+1])
		}
	}
	if len(drives) != 3 || !strings.HasPrefix(drives[2], "id=scratch,file=/s/vms/fr-argv1/scratch.img,format=raw,") ||
		strings.Contains(drives[2], "readonly") || !slices.Contains(args, "virtio-blk-device,drive=scratch") {
		t.Fatalf("scratch drive: %q", drives)
	}
	l.scratchDisk = ""
	if args := qemuArgs(spec, l); slices.Contains(args, "virtio-blk-device,drive=scratch") {
		t.Fatalf("a scratch device without a scratch disk: %q", args)
	}
}
