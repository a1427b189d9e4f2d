package firecracker

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/firerunner/firerunner/internal/config"
	"github.com/firerunner/firerunner/internal/image"
	"github.com/firerunner/firerunner/internal/testsupport/fcstandin"
	"github.com/firerunner/firerunner/internal/vm"
)

func TestParseVersion(t *testing.T) {
	for _, tc := range []struct {
		out, product string
		want         Version
		err          string
	}{
		{"Firecracker v1.12.1\n\nSupported snapshot data format versions: v5.0.0\n", "Firecracker", Version{1, 12, 1, ""}, ""},
		{"Jailer v1.12.1\n\n", "Jailer", Version{1, 12, 1, ""}, ""},
		{"Firecracker v1.13.0-dev\n", "Firecracker", Version{1, 13, 0, "-dev"}, ""},
		{"  Firecracker v0.25.2  \n", "Firecracker", Version{0, 25, 2, ""}, ""},
		{"Firecracker v1.12.1\n", "Jailer", Version{}, "is Firecracker's version, not Jailer's"},
		{"Jailer v1.12.1\n", "Firecracker", Version{}, "is Jailer's version, not Firecracker's"},
		{"Firecracker 1.12.1\n", "Firecracker", Version{}, `no "Firecracker vX.Y.Z" version`},
		{"Firecracker v1.12\n", "Firecracker", Version{}, "no"},
		{"Firecracker v1.12.1 (built today)\n", "Firecracker", Version{}, "no"},
		{"", "Firecracker", Version{}, "no"},
		{"error: unknown option --version\n", "Firecracker", Version{}, "no"},
	} {
		v, err := ParseVersion(tc.out, tc.product)
		if tc.err == "" && (err != nil || v != tc.want) {
			t.Errorf("ParseVersion(%q, %s) = %+v, %v; want %+v", tc.out, tc.product, v, err, tc.want)
		}
		if tc.err != "" && (err == nil || !strings.Contains(err.Error(), tc.err)) {
			t.Errorf("ParseVersion(%q, %s) = %+v, %v; want an error containing %q", tc.out, tc.product, v, err, tc.err)
		}
	}
}

func TestCheckVersions(t *testing.T) {
	v := func(s string) Version {
		t.Helper()
		x, err := ParseVersion("Firecracker "+s, "Firecracker")
		if err != nil {
			t.Fatal(err)
		}
		return x
	}
	for _, tc := range []struct {
		fc, jailer string
		err        string
	}{
		{"v1.8.0", "v1.8.0", ""},
		{"v1.16.0", "v1.16.0", ""},
		{"v2.0.0", "v2.0.0", ""},
		{"v1.17.0-dev", "v1.17.0-dev", ""},
		{"v1.7.9", "v1.7.9", "older than v1.8.0"},
		{"v1.7.0", "v1.7.0", "older than v1.8.0"},
		{"v0.25.2", "v0.25.2", "older than v1.8.0"},
		{"v1.8.0-dev", "v1.8.0-dev", "older than v1.8.0"}, // a pre-release comes before its release
		{"v1.12.1", "v1.12.0", "jailer v1.12.0 differs from Firecracker v1.12.1"},
		{"v1.12.0", "v1.12.1", "differs"},
		{"v1.13.0-dev", "v1.13.0", "differs"},
		{"v1.10.0", "v2.10.0", "differs"},
	} {
		err := CheckVersions(v(tc.fc), v(tc.jailer))
		if tc.err == "" && err != nil {
			t.Errorf("CheckVersions(%s, %s) = %v", tc.fc, tc.jailer, err)
		}
		if tc.err != "" && (err == nil || !strings.Contains(err.Error(), tc.err)) {
			t.Errorf("CheckVersions(%s, %s) = %v, want an error containing %q", tc.fc, tc.jailer, err, tc.err)
		}
	}
	for _, tc := range []struct {
		a, b string
		less bool
	}{
		{"v1.7.0", "v1.8.0", true}, {"v1.8.0", "v1.7.0", false}, {"v1.9.0", "v1.10.0", true},
		{"v1.8.0-dev", "v1.8.0", true}, {"v1.8.0", "v1.8.0-dev", false}, {"v1.8.0", "v1.8.0", false},
		{"v1.8.0-alpha", "v1.8.0-beta", true}, {"v0.99.99", "v1.0.0", true}, {"v1.8.1", "v1.8.0", false},
	} {
		if got := v(tc.a).Less(v(tc.b)); got != tc.less {
			t.Errorf("%s.Less(%s) = %v", tc.a, tc.b, got)
		}
	}
}

// fakeBinaries writes firecracker and jailer shell scripts into a temp dir
// that answer --version like the real ones (or with the given output).
func fakeBinaries(t *testing.T, fcOut, jailerOut string) (fc, jailer string) {
	t.Helper()
	dir := t.TempDir()
	write := func(name, out string) string {
		p := filepath.Join(dir, name)
		script := fmt.Sprintf("#!/bin/sh\n[ \"$1\" = --version ] || { echo \"unexpected args: $*\" >&2; exit 2; }\nprintf '%%s' '%s'\n", out)
		if strings.HasPrefix(out, "exit ") {
			script = "#!/bin/sh\necho 'Error: something broke' >&2\n" + out + "\n"
		}
		if err := os.WriteFile(p, []byte(script), 0o755); err != nil {
			t.Fatal(err)
		}
		return p
	}
	return write("firecracker", fcOut), write("jailer", jailerOut)
}

// TestVersionChecksRunTheBinaries runs the provider's firecracker and
// jailer checks for real (CheckHost without fakes) against executables the
// test writes: versions are parsed from what the binaries print.
func TestVersionChecksRunTheBinaries(t *testing.T) {
	fc := func(v string) string {
		return "Firecracker " + v + "\n\nSupported snapshot data format versions: v5.0.0\n"
	}
	jl := func(v string) string { return "Jailer " + v + "\n\n" }
	for _, tc := range []struct {
		name, fcOut, jailerOut string
		fcWant, jailerWant     vm.CheckStatus
		fcDetail, jailerDetail string
	}{
		{"same release", fc("v1.16.0"), jl("v1.16.0"), vm.CheckPass, vm.CheckPass, "Firecracker v1.16.0 (>= v1.8.0", "Jailer v1.16.0, the same release as Firecracker"},
		{"dev builds", fc("v1.17.0-dev"), jl("v1.17.0-dev"), vm.CheckPass, vm.CheckPass, "Firecracker v1.17.0-dev", "Jailer v1.17.0-dev"},
		{"too old", fc("v1.7.0"), jl("v1.7.0"), vm.CheckFail, vm.CheckPass, "firecracker v1.7.0 is older than v1.8.0", "Jailer v1.7.0"},
		{"jailer of another release", fc("v1.16.0"), jl("v1.15.1"), vm.CheckPass, vm.CheckFail, "Firecracker v1.16.0", "jailer v1.15.1 differs from Firecracker v1.16.0"},
		{"jailer is firecracker", fc("v1.16.0"), fc("v1.16.0"), vm.CheckPass, vm.CheckFail, "Firecracker v1.16.0", "is Firecracker's version, not Jailer's"},
		{"firecracker is the jailer", jl("v1.16.0"), jl("v1.16.0"), vm.CheckFail, vm.CheckFail, "is Jailer's version, not Firecracker's", "cannot compare it with Firecracker's version"},
		{"unreadable version", "firecracker, some version\n", jl("v1.16.0"), vm.CheckFail, vm.CheckFail, `no "Firecracker vX.Y.Z" version`, "cannot compare"},
		{"firecracker fails", "exit 1", jl("v1.16.0"), vm.CheckFail, vm.CheckFail, "--version failed: exit status 1: Error: something broke", "cannot compare"},
		{"jailer fails", fc("v1.16.0"), "exit 3", vm.CheckPass, vm.CheckFail, "Firecracker v1.16.0", "--version failed: exit status 3"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := config.Default()
			c.Firecracker.Binary, c.Firecracker.JailerBinary = fakeBinaries(t, tc.fcOut, tc.jailerOut)
			got := map[string]vm.CheckResult{}
			for _, ch := range (Provider{}).Checks(c) {
				if ch.Name != "kvm-guest" {
					got[ch.Name] = ch.Run(context.Background(), vm.CheckHost{})
				}
			}
			for _, w := range []struct {
				name   string
				status vm.CheckStatus
				detail string
			}{{"firecracker", tc.fcWant, tc.fcDetail}, {"jailer", tc.jailerWant, tc.jailerDetail}} {
				r := got[w.name]
				if os.Geteuid() != 0 && w.name == "jailer" && w.status == vm.CheckPass {
					w.status = vm.CheckWarn // the jailer must start as root
				}
				if r.Status != w.status || !strings.Contains(r.Detail, w.detail) {
					t.Errorf("%s = %s %q, want %s containing %q", w.name, r.Status, r.Detail, w.status, w.detail)
				}
				if r.Status == vm.CheckFail && r.Fix == "" {
					t.Errorf("%s fails without a fix", w.name)
				}
			}
		})
	}
	// Without the jailer only firecracker is asked.
	c := config.Default()
	c.Firecracker.Binary, c.Firecracker.JailerBinary = fakeBinaries(t, fc("v1.16.0"), "exit 1")
	c.Firecracker.UseJailer = false
	if r := jailerCheck(context.Background(), vm.CheckHost{}, c.Firecracker); r.Status != vm.CheckSkip {
		t.Errorf("jailer check without use_jailer = %+v", r)
	}
}

// fakeImage writes an image directory image.Load accepts.
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

// TestKVMGuestCheckBootsTheKernel runs the kvm-guest check's real boot
// probe with a fake firecracker that keeps its command line and config file
// and plays a guest: the config must be valid for the Firecracker API (the
// swagger specs the contract test uses) and boot the image's kernel with
// the driver's boot arguments, no initrd and no disk; only a root-mount
// panic passes.
func TestKVMGuestCheckBootsTheKernel(t *testing.T) {
	specs, err := fcstandin.FindSpecs()
	if err != nil {
		t.Fatal(err)
	}
	if n := specs.Note(); n != "" {
		t.Log(n)
	}
	checker, err := fcstandin.LoadChecker(specs.Paths()...)
	if err != nil {
		t.Fatal(err)
	}
	imgDir, kernel := fakeImage(t)
	for _, tc := range []struct {
		name, guest string
		want        vm.CheckStatus
		detail      string
	}{
		{"kernel boots", "echo '[    0.000000] Linux version 6.1.0-28-amd64'; echo '[    0.9] Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(0,0)'",
			vm.CheckPass, "jobs get KVM: the guest kernel " + kernel + " booted under Firecracker"},
		{"kvm fails", "echo 'Error: Vmm(Kvm(...)): KVM_RUN failed' >&2; exit 1",
			vm.CheckFail, "KVM cannot run the guest kernel " + kernel + " under Firecracker, so jobs would never start: "},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			fc := filepath.Join(dir, "firecracker")
			script := fmt.Sprintf("#!/bin/sh\necho \"$@\" > %[1]s/argv\ncp \"$3\" %[1]s/config.json\n%[2]s\n", dir, tc.guest)
			if err := os.WriteFile(fc, []byte(script), 0o755); err != nil {
				t.Fatal(err)
			}
			root := t.TempDir()
			if err := os.MkdirAll(filepath.Join(root, "dev"), 0o755); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(filepath.Join(root, "dev", "kvm"), nil, 0o666); err != nil {
				t.Fatal(err)
			}
			c := config.Default()
			c.Firecracker.Binary, c.VM.ImageDir = fc, imgDir
			r := kvmGuestCheck(context.Background(), vm.CheckHost{Root: root}, c)
			if r.Status != tc.want || !strings.Contains(r.Detail, tc.detail) {
				t.Fatalf("kvm-guest = %s %q, want %s containing %q", r.Status, r.Detail, tc.want, tc.detail)
			}
			if r.Status == vm.CheckFail && (r.Fix == "" || !strings.Contains(r.Detail, "exited (exit status 1)")) {
				t.Errorf("failure without the VMM's exit or a fix: %+v", r)
			}
			argv, err := os.ReadFile(filepath.Join(dir, "argv"))
			if err != nil {
				t.Fatal(err)
			}
			if f := strings.Fields(string(argv)); len(f) != 3 || f[0] != "--no-api" || f[1] != "--config-file" {
				t.Errorf("firecracker argv %q, want --no-api --config-file FILE", argv)
			}
			b, err := os.ReadFile(filepath.Join(dir, "config.json"))
			if err != nil {
				t.Fatal(err)
			}
			var cfg map[string]json.RawMessage
			if err := json.Unmarshal(b, &cfg); err != nil {
				t.Fatalf("config %s: %v", b, err)
			}
			// Each section of a config file is the body of its API call.
			for section, call := range map[string]string{"boot-source": "/boot-source", "machine-config": "/machine-config"} {
				if _, _, err := checker.Check("PUT", call, cfg[section]); err != nil {
					t.Errorf("config section %s is not a valid PUT %s body: %v", section, call, err)
				}
			}
			var bs struct {
				Kernel string `json:"kernel_image_path"`
				Initrd string `json:"initrd_path"`
				Args   string `json:"boot_args"`
			}
			_ = json.Unmarshal(cfg["boot-source"], &bs)
			wantArgs, _ := BootArgs(nil)
			if bs.Kernel != kernel || bs.Initrd != "" || bs.Args != wantArgs || string(cfg["drives"]) != "[]" {
				t.Errorf("probe config %s: want kernel %s, no initrd, boot args %q, no drives", b, kernel, wantArgs)
			}
			if _, err := os.Stat(strings.Fields(string(argv))[2]); !os.IsNotExist(err) {
				t.Errorf("the probe's config file was left behind: %v", err)
			}
		})
	}
	// Nothing to boot: skipped, pointing at the check that fails.
	c := config.Default()
	c.VM.ImageDir = t.TempDir()
	if r := kvmGuestCheck(context.Background(), vm.CheckHost{Root: t.TempDir()}, c); r.Status != vm.CheckSkip || !strings.Contains(r.Detail, "no /dev/kvm") {
		t.Errorf("without /dev/kvm: %+v", r)
	}
}
