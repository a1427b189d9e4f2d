package firecracker

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/firerunner/firerunner/internal/config"
	"github.com/firerunner/firerunner/internal/testsupport/fcstandin"
	"github.com/firerunner/firerunner/internal/vm"
)

func TestBootArgs(t *testing.T) {
	s, err := BootArgs(nil, testToken)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"console=ttyS0", "reboot=k", "panic=-1", "pci=off"} {
		if !slices.Contains(strings.Fields(s), want) {
			t.Errorf("boot args %q lack %s", s, want)
		}
	}
	if strings.Contains(s, "nomodule") || len(s) >= MaxCmdline {
		t.Errorf("boot args %q: nomodule or too long", s)
	}
	if s, err := BootArgs([]string{"quiet", "loglevel=4"}); err != nil || !strings.HasSuffix(s, " quiet loglevel=4") {
		t.Errorf("extra args: %q, %v", s, err)
	}
	for name, extra := range map[string][]string{
		"nomodule":   {"nomodule"},
		"whitespace": {"a b"},
		"empty":      {""},
		"too long":   {"x=" + strings.Repeat("y", MaxCmdline)},
		"token":      {"runner=" + testToken},
	} {
		if _, err := BootArgs(extra, testToken); err == nil {
			t.Errorf("%s: BootArgs(%q) accepted", name, extra)
		}
	}
	// The limit leaves room for what Firecracker appends itself.
	fits := "x=" + strings.Repeat("y", MaxCmdline-1-cmdlineReserve-len(s)-3)
	if got, err := BootArgs([]string{fits}); err != nil || len(got) != MaxCmdline-1-cmdlineReserve {
		t.Errorf("longest allowed boot args rejected or miscounted: %d %v", len(got), err)
	}
}

func TestOptionsValidate(t *testing.T) {
	good := Options{Binary: "/usr/local/bin/firecracker", JailerBinary: "/usr/local/bin/jailer", UseJailer: true, UID: 64000, GID: 64000, StateDir: "/var/lib/firerunner"}.withDefaults()
	if err := good.Validate(); err != nil {
		t.Fatalf("good options: %v", err)
	}
	for name, mut := range map[string]func(*Options){
		"no binary":       func(o *Options) { o.Binary = "" },
		"relative state":  func(o *Options) { o.StateDir = "state" },
		"no jailer":       func(o *Options) { o.JailerBinary = "" },
		"exec name":       func(o *Options) { o.Binary = "/usr/bin/fc" },
		"root uid":        func(o *Options) { o.UID = 0 },
		"relative chroot": func(o *Options) { o.ChrootBase = "jail" },
		"log level":       func(o *Options) { o.LogLevel = "Verbose" },
		"bad boot arg":    func(o *Options) { o.ExtraBootArgs = []string{"nomodule"} },
	} {
		o := good
		mut(&o)
		if err := o.Validate(); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	o := good
	o.UseJailer, o.UID, o.JailerBinary = false, 0, ""
	if err := o.Validate(); err != nil {
		t.Errorf("development (no jailer) options rejected: %v", err)
	}
}

func TestProviderReadsConfig(t *testing.T) {
	c := config.Default()
	c.StateDir = t.TempDir()
	c.Firecracker.ChrootBase = "/srv/jail-test"
	d, err := Provider{}.New(c, nil)
	if err != nil {
		t.Fatal(err)
	}
	fd := d.(*Driver)
	if !fd.opts.UseJailer || fd.opts.UID != 64000 || fd.opts.ChrootBase != "/srv/jail-test" || fd.opts.Binary != c.Firecracker.Binary || fd.sd.Root != filepath.Join(c.StateDir, "vms") {
		t.Errorf("provider options = %+v", fd.opts)
	}
	// The defaults reach the driver, and so does every knob of the section.
	if o := fd.opts; o.MemoryOverheadMiB != 64 || o.MemoryOverheadMiBPerGiB != 8 || o.LogLevel != "Warning" || o.SerialBytesPerSec != 256<<10 || o.ParentCgroup != "" || len(o.ExtraBootArgs) != 0 {
		t.Errorf("default knobs = %+v", o)
	}
	k := c
	k.Firecracker.ParentCgroup, k.Firecracker.MemoryOverheadMiB, k.Firecracker.MemoryOverheadMiBPerGiB = "firerunner/vms", 96, 12
	k.Firecracker.ExtraBootArgs, k.Firecracker.LogLevel, k.Firecracker.SerialBytesPerSec = []string{"loglevel=7"}, "Debug", 0
	kd, err := Provider{}.New(k, nil)
	if err != nil {
		t.Fatal(err)
	}
	if o := kd.(*Driver).opts; o.ParentCgroup != "firerunner/vms" || o.MemoryOverheadMiB != 96 || o.MemoryOverheadMiBPerGiB != 12 ||
		!slices.Equal(o.ExtraBootArgs, []string{"loglevel=7"}) || o.LogLevel != "Debug" || o.SerialBytesPerSec >= 0 {
		t.Errorf("knobs did not reach the driver: %+v", o)
	}
	if uid, gid, ok := (Provider{}).VMMUser(c); !ok || uid != 64000 || gid != 64000 {
		t.Errorf("VMMUser with the jailer = %d:%d %v", uid, gid, ok)
	}
	c.Firecracker.UseJailer = false
	if _, _, ok := (Provider{}).VMMUser(c); ok {
		t.Error("VMMUser without the jailer: the VMM runs as FireRunner's user")
	}
	// A config that passes the provider's validation builds; one New refuses
	// is caught by Validate first, with the file's field name.
	c.Firecracker.UseJailer, c.Firecracker.ChrootBase = true, "jail"
	if errs := (Provider{}).Validate(c, true); len(errs) != 1 || errs[0].Field != "firecracker.chroot_base" {
		t.Errorf("Validate = %v", errs)
	}
	if _, err := (Provider{}).New(c, nil); err == nil {
		t.Error("New accepted a relative chroot base")
	}
}

func TestProviderChecks(t *testing.T) {
	c := config.Default()
	var names []string
	for _, ch := range (Provider{}).Checks(c) {
		names = append(names, ch.Name)
	}
	if !slices.Equal(names, []string{"firecracker", "jailer", "kvm-guest", "snapshots"}) { // their tests: checks_test.go
		t.Fatalf("checks %q", names)
	}
	c.Firecracker.UseJailer = false
	if r := (Provider{}).Checks(c)[1].Run(context.Background(), vm.CheckHost{}); r.Status != vm.CheckSkip {
		t.Errorf("jailer check without the jailer: %+v", r)
	}
}

func TestStepChain(t *testing.T) {
	d, err := New(Options{Binary: "/bin/firecracker", StateDir: "/tmp/x"})
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"validate.Cfg", "validate.NetworkCfg", StepPrepareVMDir, StepStartVMM, "fcinit.BootstrapLogging",
		"fcinit.CreateMachine", "fcinit.CreateBootSource", "fcinit.AttachDrives", "fcinit.CreateNetworkInterfaces", StepAddEntropy, StepLimitSerial, StepInstanceStart}
	if got := d.Steps(false); !slices.Equal(got, want) {
		t.Errorf("boot steps:\n got %q\nwant %q", got, want)
	}
	d.opts.UseJailer = true
	if got := d.Steps(false); !slices.Contains(got, StepPrepareJail) || slices.Index(got, StepPrepareJail) > slices.Index(got, StepStartVMM) {
		t.Errorf("jailer steps %q: PrepareJail must come before StartVMM", got)
	}
	wantSnap := []string{"validate.LoadSnapshotCfg", StepPrepareVMDir, StepPrepareJail, StepStartVMM, "fcinit.BootstrapLogging", StepLoadSnapshot}
	if got := d.Steps(true); !slices.Equal(got, wantSnap) {
		t.Errorf("snapshot steps:\n got %q\nwant %q", got, wantSnap)
	}
}

func TestValidateSpec(t *testing.T) {
	e := newEnv(t, false)
	s := e.spec("fr-valid1")
	if err := validateSpec(s); err != nil {
		t.Fatal(err)
	}
	for name, mut := range map[string]func(*vm.Spec){
		"vcpus":   func(s *vm.Spec) { s.VCPUs = 33 },
		"mac":     func(s *vm.Spec) { s.Network.MAC = "nope" },
		"tap":     func(s *vm.Spec) { s.Network.TapName = "a-very-long-tap-name" },
		"id":      func(s *vm.Spec) { s.ID = "../etc" },
		"initrd":  func(s *vm.Spec) { s.Image.Initrd = "" },
		"timeout": func(s *vm.Spec) { s.Guest.JobTimeoutSec = 0 },
	} {
		c := s
		n := *s.Network
		c.Network = &n
		mut(&c)
		if err := validateSpec(c); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

// TestStartFailureLeavesNothing: a request the VMM rejects (a bzImage where
// Firecracker needs an ELF vmlinux) fails Start, which cleans up everything.
func TestStartFailureLeavesNothing(t *testing.T) {
	for _, jailer := range []bool{false, true} {
		e := newEnv(t, jailer)
		os.WriteFile(e.image.Kernel, []byte("MZ a bzImage"), 0o644)
		d := e.driver()
		spec := e.spec("fr-fail1", fcstandin.CmdExit, "0")
		err := d.Start(context.Background(), spec)
		if err == nil || !strings.Contains(err.Error(), "ELF") {
			t.Fatalf("jailer=%v: Start = %v; want the VMM's ELF fault", jailer, err)
		}
		recs, _ := fcstandin.ReadLog(filepath.Join(e.logDir, spec.ID+".jsonl"))
		if n := len(recs); n == 0 || !recs[n-1].Violation || recs[n-1].Path != "/boot-source" {
			t.Errorf("jailer=%v: stand-in did not record the rejected boot-source: %+v", jailer, recs)
		}
		e.assertClean(d, spec.ID, 0)
	}
}

// TestStartRejectsBadSpecWithoutSideEffects: bad input changes nothing.
func TestStartRejectsBadSpecWithoutSideEffects(t *testing.T) {
	e := newEnv(t, true)
	d := e.driver()
	s := e.spec("fr-bad1")
	s.VCPUs = 0
	if err := d.Start(context.Background(), s); err == nil {
		t.Fatal("Start accepted 0 vcpus")
	}
	for _, p := range []string{e.stateDir, e.chrootBase} {
		if _, err := os.Stat(p); err == nil {
			t.Errorf("%s created for a rejected spec", p)
		}
	}
}

func TestPlaceFile(t *testing.T) {
	dir := t.TempDir()
	src := filepath.Join(dir, "src")
	os.WriteFile(src, []byte("image"), 0o644)
	mode, err := placeFile(src, filepath.Join(dir, "dst"))
	if err != nil || mode != placedLink {
		t.Errorf("same filesystem: %v %v; want a hard link", mode, err)
	}
	// /dev/shm is another filesystem (tmpfs) on Linux hosts: copy fallback.
	if shm, err := os.MkdirTemp("/dev/shm", "fcplace"); err == nil {
		defer os.RemoveAll(shm)
		mode, err := placeFile(src, filepath.Join(shm, "dst"))
		b, _ := os.ReadFile(filepath.Join(shm, "dst"))
		if err != nil || mode == placedLink || string(b) != "image" {
			t.Errorf("cross filesystem: %v %v %q; want a reflink or copy", mode, err, b)
		}
	}
	if err := readableBy(src, 12345, 12345); err != nil {
		t.Errorf("world-readable file: %v", err)
	}
	os.Chmod(src, 0o600)
	if err := readableBy(src, 12345, 12345); err == nil && os.Getuid() != 12345 {
		t.Error("0600 file reported readable by another uid")
	}
}
