package qemu

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/firerunner/firerunner/internal/config"
	"github.com/firerunner/firerunner/internal/image"
	"github.com/firerunner/firerunner/internal/testenv"
	"github.com/firerunner/firerunner/internal/vm"
)

// fakeImage writes an image directory whose manifest image.Load accepts and
// returns it with its kernel's path.
func fakeImage(t *testing.T) (dir, kernel string) {
	t.Helper()
	dir = t.TempDir()
	arts := map[string]image.Artifact{}
	for _, n := range []string{image.ArtVMLinux, image.ArtInitrd, image.ArtRootfs} {
		if err := os.WriteFile(filepath.Join(dir, n), []byte(n), 0o644); err != nil {
			t.Fatal(err)
		}
		arts[n] = image.Artifact{File: n}
	}
	b, _ := json.Marshal(image.Manifest{Format: 1, Artifacts: arts})
	if err := os.WriteFile(filepath.Join(dir, image.ManifestFile), b, 0o644); err != nil {
		t.Fatal(err)
	}
	m, err := image.Load(dir)
	if err != nil {
		t.Fatal(err)
	}
	return dir, m.VMImage().Kernel
}

func kvmGuestCheck(t *testing.T, c config.Config) vm.Check {
	t.Helper()
	for _, ch := range (Provider{}).Checks(c) {
		if ch.Name == "kvm-guest" {
			return ch
		}
	}
	t.Fatal("the qemu provider has no kvm-guest check")
	return vm.Check{}
}

// TestAccelCheck: kvm-guest reports the accelerator the driver's own probe
// picks, with its reason, and fails only when KVM is forced but cannot run
// the guest.
func TestAccelCheck(t *testing.T) {
	self, err := os.Executable() // any executable stands in for QEMU; the probe is faked
	if err != nil {
		t.Fatal(err)
	}
	imgDir, kernel := fakeImage(t)
	hang := errors.New("no root-mount panic within 15s")
	for _, tc := range []struct {
		name     string
		accel    string
		noKVM    bool
		noImage  bool
		noQEMU   bool
		probeErr error
		want     vm.CheckStatus
		detail   string
		probed   bool
	}{
		{name: "tcg configured", accel: AccelTCG, want: vm.CheckPass, detail: "jobs get TCG (software emulation): qemu.accel is tcg"},
		{name: "auto, kvm boots", accel: AccelAuto, want: vm.CheckPass, detail: "jobs get KVM (qemu.accel auto): the guest kernel " + kernel, probed: true},
		{name: "auto, kvm hangs", accel: AccelAuto, probeErr: hang, want: vm.CheckWarn,
			detail: "jobs get TCG (software emulation), not KVM: kvm boot probe failed (no root-mount panic within 15s); using tcg", probed: true},
		{name: "auto, no /dev/kvm", accel: AccelAuto, noKVM: true, want: vm.CheckWarn, detail: "jobs get TCG (software emulation), not KVM: no usable /dev/kvm"},
		{name: "kvm configured, kvm boots", accel: AccelKVM, want: vm.CheckPass, detail: "jobs get KVM (qemu.accel kvm)", probed: true},
		{name: "kvm configured, kvm hangs", accel: AccelKVM, probeErr: hang, want: vm.CheckFail, detail: "qemu.accel is kvm, but KVM cannot boot the guest kernel", probed: true},
		{name: "no image", accel: AccelAuto, noImage: true, want: vm.CheckSkip, detail: "no guest kernel to boot"},
		{name: "no qemu", accel: AccelAuto, noQEMU: true, want: vm.CheckSkip, detail: "no QEMU to boot the guest kernel with"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			root := t.TempDir()
			if !tc.noKVM {
				if err := os.MkdirAll(filepath.Join(root, "dev"), 0o755); err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(filepath.Join(root, "dev", "kvm"), nil, 0o666); err != nil {
					t.Fatal(err)
				}
			}
			c := config.Default()
			c.QEMU.Binary, c.QEMU.Accel, c.VM.ImageDir = self, tc.accel, imgDir
			if tc.noImage {
				c.VM.ImageDir = t.TempDir()
			}
			if tc.noQEMU {
				c.QEMU.Binary = "/nonexistent/qemu-system-x86_64"
			}
			var probes [][]string
			h := vm.CheckHost{Root: root, BootProbe: func(_ context.Context, argv []string, _ time.Duration) error {
				probes = append(probes, argv)
				return tc.probeErr
			}}
			r := kvmGuestCheck(t, c).Run(context.Background(), h)
			if r.Status != tc.want || !strings.Contains(r.Detail, tc.detail) {
				t.Errorf("kvm-guest = %s %q, want %s containing %q", r.Status, r.Detail, tc.want, tc.detail)
			}
			if (r.Status == vm.CheckWarn || r.Status == vm.CheckFail) && r.Fix == "" {
				t.Errorf("no fix for %s", r.Status)
			}
			if !tc.probed {
				if len(probes) != 0 {
					t.Errorf("probed %q; want no probe", probes)
				}
				return
			}
			// The probe is the driver's: KVM, the image's kernel, no initrd.
			if len(probes) != 1 {
				t.Fatalf("%d probes, want 1", len(probes))
			}
			want := probeArgv(self, kernel, []string{"-accel", "kvm", "-cpu", "host"}, "")
			if !slices.Equal(probes[0], want) {
				t.Errorf("probe argv\n got %q\nwant %q", probes[0], want)
			}
		})
	}
}

// TestProbeKVMReal runs the driver's accelerator probe on this host's real
// /dev/kvm with the built guest kernel, and holds doctor and the driver to
// the same answer: doctor's kvm-guest must name the accelerator the probe
// chose, and when that is KVM, a real job VM must run under KVM. A host
// whose nested KVM hangs Linux guests (like the development machines) gets
// TCG with the probe's reason; a good KVM host gets KVM and a booted VM.
func TestProbeKVMReal(t *testing.T) {
	e := newRealEnv(t)
	r := probeKVM(context.Background(), e.drv.binary, e.img.Kernel) // uncached: the probe itself
	t.Logf("probe on this host: %s (%s)", r.accel, r.reason)
	switch r.accel {
	case AccelKVM:
		if r.reason != "kvm boot probe reached the kernel's root-mount panic" {
			t.Errorf("kvm verdict with reason %q", r.reason)
		}
	case AccelTCG:
		if !strings.HasPrefix(r.reason, "no usable /dev/kvm: ") && !strings.HasPrefix(r.reason, "kvm boot probe failed (") {
			t.Errorf("tcg verdict with reason %q: neither /dev/kvm nor the boot probe", r.reason)
		}
		if strings.Contains(r.reason, "boot probe: ") { // the VMM never started: the probe proved nothing
			t.Errorf("the probe did not run QEMU: %s", r.reason)
		}
	default:
		t.Fatalf("probe chose %q", r.accel)
	}

	c := config.Default()
	c.QEMU.Binary, c.QEMU.Accel, c.VM.ImageDir = e.drv.binary, AccelAuto, testenv.ImageDir(t)
	check := kvmGuestCheck(t, c).Run(context.Background(), vm.CheckHost{})
	t.Logf("doctor kvm-guest: %s %s", check.Status, check.Detail)
	want := map[string]string{AccelKVM: "jobs get KVM", AccelTCG: "jobs get TCG"}[r.accel]
	if !strings.HasPrefix(check.Detail, want) {
		t.Fatalf("doctor says %q; the driver's probe chose %s (%s)", check.Detail, r.accel, r.reason)
	}
	if r.accel == AccelTCG && !strings.Contains(check.Detail, r.reason) {
		t.Errorf("doctor's reason %q differs from the probe's %q", check.Detail, r.reason)
	}

	if r.accel != AccelKVM {
		return
	}
	// KVM was chosen: a real job VM must boot and run under it.
	d, err := New(Options{Binary: e.drv.binary, Accel: AccelKVM, StateDir: e.state, NetworkMode: "user"})
	if err != nil {
		t.Fatal(err)
	}
	kvm := realEnv{img: e.img, state: e.state, drv: d}
	res, console, _ := kvm.runVM(t, kvm.spec("fr-kvmprobe", bootBudget, "echo kvm-ok; exit 7"), nil)
	if res.ExitCode != 7 || !strings.Contains(console, "kvm-ok") {
		t.Fatalf("a VM under KVM, which the probe chose, did not run its command: exit %d, console tail:\n%s", res.ExitCode, tail(console, 20))
	}
}
