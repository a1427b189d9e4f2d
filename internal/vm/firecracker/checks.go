package firecracker

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"

	"github.com/firerunner/firerunner/internal/config"
	"github.com/firerunner/firerunner/internal/image"
	"github.com/firerunner/firerunner/internal/vm"
)

// Version is a Firecracker release as `firecracker --version` and `jailer
// --version` print it ("Firecracker v1.12.1", "Jailer v1.13.0-dev").
type Version struct {
	Major, Minor, Patch int
	// Pre is what follows the patch number, with its dash ("-dev"); "" for
	// a release.
	Pre string
}

// MinVersion is the oldest Firecracker the guest can run on: Debian's kernel
// lacks VIRTIO_MMIO_CMDLINE_DEVICES, so it finds its virtio devices only
// through ACPI, which Firecracker has on x86_64 since v1.8.0.
var MinVersion = Version{Major: 1, Minor: 8}

func (v Version) String() string { return fmt.Sprintf("v%d.%d.%d%s", v.Major, v.Minor, v.Patch, v.Pre) }

// Less orders versions as semantic versioning does: by number, and a
// pre-release before its release (v1.8.0-dev may predate a feature of
// v1.8.0, so it does not count as v1.8.0).
func (v Version) Less(w Version) bool {
	if v.Major != w.Major {
		return v.Major < w.Major
	}
	if v.Minor != w.Minor {
		return v.Minor < w.Minor
	}
	if v.Patch != w.Patch {
		return v.Patch < w.Patch
	}
	return v.Pre != "" && w.Pre == "" || v.Pre != "" && w.Pre != "" && v.Pre < w.Pre
}

var reVersion = regexp.MustCompile(`^(\S+) v([0-9]+)\.([0-9]+)\.([0-9]+)(-[0-9A-Za-z.-]+)?$`)

// ParseVersion reads the version from the --version output of product
// ("Firecracker" or "Jailer"): its first line is "<product> vX.Y.Z[-pre]".
// Another product's name is an error, so a jailer_binary that is really
// firecracker (or the reverse) is caught.
func ParseVersion(out, product string) (Version, error) {
	line, _, _ := strings.Cut(strings.TrimSpace(out), "\n")
	line = strings.TrimSpace(line)
	m := reVersion.FindStringSubmatch(line)
	if m == nil {
		return Version{}, fmt.Errorf("no %q version in %q", product+" vX.Y.Z", line)
	}
	if m[1] != product {
		return Version{}, fmt.Errorf("%q is %s's version, not %s's", line, m[1], product)
	}
	var v Version
	for i, p := range []*int{&v.Major, &v.Minor, &v.Patch} {
		n, err := strconv.Atoi(m[2+i])
		if err != nil {
			return Version{}, fmt.Errorf("version %q: %w", line, err)
		}
		*p = n
	}
	v.Pre = m[5]
	return v, nil
}

// CheckVersions judges the firecracker and jailer versions: Firecracker
// must be at least MinVersion, and the jailer's version must equal
// Firecracker's, as the jailer's documentation requires (it execs that
// exact Firecracker and is released with it).
func CheckVersions(fc, jailer Version) error {
	if fc.Less(MinVersion) {
		return fmt.Errorf("firecracker %s is older than %s: the guest's kernel finds its virtio devices only through ACPI, which Firecracker has since %s", fc, MinVersion, MinVersion)
	}
	if jailer != fc {
		return fmt.Errorf("jailer %s differs from Firecracker %s: the jailer must come from the same release as the Firecracker it runs", jailer, fc)
	}
	return nil
}

const versionFix = "install matching firecracker and jailer binaries of v1.8.0 or later from one release: install.sh --firecracker-version v1.16.0 (the default), or --firecracker-bin PATH --jailer-bin PATH"

// firecrackerCheck: the binary answers --version with a Firecracker version
// of at least MinVersion.
func firecrackerCheck(ctx context.Context, h vm.CheckHost, f config.Firecracker) vm.CheckResult {
	p, out, err := h.Version(ctx, f.Binary)
	if err != nil {
		return vm.CheckResult{Status: vm.CheckFail, Fix: fcFix, Detail: err.Error()}
	}
	v, err := ParseVersion(out, "Firecracker")
	if err != nil {
		return vm.CheckResult{Status: vm.CheckFail, Fix: versionFix, Detail: fmt.Sprintf("%s: %v", p, err)}
	}
	if v.Less(MinVersion) {
		return vm.CheckResult{Status: vm.CheckFail, Fix: versionFix, Detail: fmt.Sprintf("%s: %v", p, CheckVersions(v, v))}
	}
	return vm.CheckResult{Status: vm.CheckPass, Detail: fmt.Sprintf("%s: Firecracker %s (>= %s, which the guest's ACPI device discovery needs)", p, v, MinVersion)}
}

// jailerCheck: with use_jailer, the jailer answers --version with exactly
// Firecracker's version (a warning when doctor is not root on this host:
// the jailer must start as root).
func jailerCheck(ctx context.Context, h vm.CheckHost, f config.Firecracker) vm.CheckResult {
	if !f.UseJailer {
		return vm.CheckResult{Status: vm.CheckSkip, Detail: fmt.Sprintf("skipped: jailer not used (driver %s, use_jailer %v)", Name, f.UseJailer)}
	}
	p, out, err := h.Version(ctx, f.JailerBinary)
	if err != nil {
		return vm.CheckResult{Status: vm.CheckFail, Fix: fcFix, Detail: err.Error()}
	}
	jv, err := ParseVersion(out, "Jailer")
	if err != nil {
		return vm.CheckResult{Status: vm.CheckFail, Fix: versionFix, Detail: fmt.Sprintf("%s: %v", p, err)}
	}
	_, fout, err := h.Version(ctx, f.Binary)
	if err != nil {
		return vm.CheckResult{Status: vm.CheckFail, Fix: fcFix, Detail: fmt.Sprintf("%s: Jailer %s; cannot compare it with Firecracker's version: %v", p, jv, err)}
	}
	fv, err := ParseVersion(fout, "Firecracker")
	if err != nil {
		return vm.CheckResult{Status: vm.CheckFail, Fix: versionFix, Detail: fmt.Sprintf("%s: Jailer %s; cannot compare it with Firecracker's version: %v", p, jv, err)}
	}
	if jv != fv {
		return vm.CheckResult{Status: vm.CheckFail, Fix: versionFix, Detail: fmt.Sprintf("%s: %v", p, CheckVersions(fv, jv))}
	}
	r := vm.CheckResult{Status: vm.CheckPass, Detail: fmt.Sprintf("%s: Jailer %s, the same release as Firecracker", p, jv)}
	if h.Real() && os.Geteuid() != 0 {
		r.Status, r.Fix = vm.CheckWarn, "the jailer must start as root (the systemd unit runs firerunner as root for this)"
		r.Detail += "; doctor is not running as root"
	}
	return r
}

// probeConfig is the --config-file of a boot probe: the guest kernel with
// the driver's boot arguments, one vCPU and no disk, so a kernel that boots
// ends in its root-mount panic.
type probeConfig struct {
	BootSource struct {
		KernelImagePath string `json:"kernel_image_path"`
		BootArgs        string `json:"boot_args"`
	} `json:"boot-source"`
	Drives        []struct{} `json:"drives"`
	MachineConfig struct {
		VCPUCount  int  `json:"vcpu_count"`
		MemSizeMiB int  `json:"mem_size_mib"`
		SMT        bool `json:"smt"`
	} `json:"machine-config"`
}

// probeArgv writes the probe's config file into dir and returns the
// Firecracker command line that boots it without an API socket.
func probeArgv(binary, kernel, dir string) ([]string, error) {
	args, err := BootArgs(nil)
	if err != nil {
		return nil, err
	}
	var c probeConfig
	c.BootSource.KernelImagePath, c.BootSource.BootArgs = kernel, args
	c.Drives = []struct{}{}
	c.MachineConfig.VCPUCount, c.MachineConfig.MemSizeMiB = 1, 256
	b, err := json.Marshal(c)
	if err != nil {
		return nil, err
	}
	path := filepath.Join(dir, "probe.json")
	if err := os.WriteFile(path, b, 0o600); err != nil {
		return nil, err
	}
	return []string{binary, "--no-api", "--config-file", path}, nil
}

const kvmGuestFix = "Firecracker needs a KVM that runs guests: use bare metal, or a VM with nested VT-x/AMD-V exposed. For development set vm.driver: qemu (it falls back to TCG)"

// kvmGuestCheck boots the image's real kernel under Firecracker (so under
// KVM, the only accelerator Firecracker has) to its root-mount panic. A
// tiny guest that only halts runs fine on nested KVM that hangs Linux
// guests, so nothing less tells whether jobs will run.
func kvmGuestCheck(ctx context.Context, h vm.CheckHost, c config.Config) vm.CheckResult {
	if _, err := os.Stat(h.Path("/dev/kvm")); err != nil {
		return vm.CheckResult{Status: vm.CheckSkip, Detail: fmt.Sprintf("skipped: no /dev/kvm (see the kvm check): %v", err)}
	}
	m, err := image.Load(c.VM.ImageDir)
	if err != nil {
		return vm.CheckResult{Status: vm.CheckSkip, Detail: fmt.Sprintf("skipped: no guest kernel to boot (see the image check): %v", err)}
	}
	bin, err := exec.LookPath(c.Firecracker.Binary)
	if err != nil {
		return vm.CheckResult{Status: vm.CheckSkip, Detail: fmt.Sprintf("skipped: no firecracker to boot the guest kernel with (see the firecracker check): %v", err)}
	}
	dir, err := os.MkdirTemp("", "firerunner-probe-")
	if err != nil {
		return vm.CheckResult{Status: vm.CheckFail, Fix: "make the temporary directory writable", Detail: err.Error()}
	}
	defer os.RemoveAll(dir)
	kernel := m.VMImage().Kernel
	argv, err := probeArgv(bin, kernel, dir)
	if err == nil {
		err = h.RunBootProbe(ctx, argv, vm.BootProbeTimeout)
	}
	if err != nil {
		return vm.CheckResult{Status: vm.CheckFail, Fix: kvmGuestFix,
			Detail: fmt.Sprintf("KVM cannot run the guest kernel %s under Firecracker, so jobs would never start: %v", kernel, err)}
	}
	return vm.CheckResult{Status: vm.CheckPass, Detail: fmt.Sprintf("jobs get KVM: the guest kernel %s booted under Firecracker to its root-mount panic", kernel)}
}

// SnapshotMinVersion is the oldest Firecracker that can make the pools'
// clones: PUT /snapshot/load with network_overrides (each clone on its own
// tap) and clock_realtime.
var SnapshotMinVersion = Version{Major: 1, Minor: 16}

const snapshotsFix = "turn firecracker.snapshot_refill off, or meet what the detail names (install.sh --firecracker-version v1.16.0 or later; use_jailer: true)"

// snapshotsCheck: what warm VMs and snapshot refills need of the host.
// Warm VMs' assignment channel is Firecracker's own vsock device, backed by
// a Unix socket in each jail, so the host needs no vhost_vsock module. With
// snapshot_refill: the jailer, a Firecracker with network_overrides and
// clock_realtime, a host kernel with KVM_CLOCK_REALTIME (5.16+, else the
// guest clock is set by the agent only), and a snapshot directory only root
// can change, holding files no VMM can write.
func snapshotsCheck(ctx context.Context, h vm.CheckHost, c config.Config) vm.CheckResult {
	const vsock = "warm VMs' vsock is Firecracker's own device on a Unix socket in each jail (no vhost_vsock module needed)"
	f := c.Firecracker
	if !f.SnapshotRefill {
		return vm.CheckResult{Status: vm.CheckPass, Detail: "snapshot refills off (firecracker.snapshot_refill); " + vsock}
	}
	if !f.UseJailer {
		return vm.CheckResult{Status: vm.CheckFail, Fix: snapshotsFix, Detail: "snapshot_refill needs use_jailer: only the jail's fixed paths give each clone its own drives and vsock socket"}
	}
	p, out, err := h.Version(ctx, f.Binary)
	if err != nil {
		return vm.CheckResult{Status: vm.CheckFail, Fix: fcFix, Detail: err.Error()}
	}
	v, err := ParseVersion(out, "Firecracker")
	if err != nil {
		return vm.CheckResult{Status: vm.CheckFail, Fix: versionFix, Detail: fmt.Sprintf("%s: %v", p, err)}
	}
	if v.Less(SnapshotMinVersion) {
		return vm.CheckResult{Status: vm.CheckFail, Fix: snapshotsFix, Detail: fmt.Sprintf("%s: Firecracker %s is older than %s: its snapshot load has no network_overrides or clock_realtime, so clones would reopen their source's tap", p, v, SnapshotMinVersion)}
	}
	dir := filepath.Join(f.ChrootBase, snapshotCacheDir)
	if err := checkSnapshotTree(h.Path(dir)); err != nil {
		return vm.CheckResult{Status: vm.CheckFail, Fix: fmt.Sprintf("remove %s (FireRunner makes it anew, root's, 0700, with 0444 files)", dir), Detail: err.Error()}
	}
	detail := fmt.Sprintf("%s: Firecracker %s restores clones (network_overrides, clock_realtime); %s is root's and no VMM can write it; %s", p, v, dir, vsock)
	rel, _ := os.ReadFile(h.Path("/proc/sys/kernel/osrelease"))
	if k, ok := kernelAtLeast(strings.TrimSpace(string(rel)), 5, 16); !ok {
		return vm.CheckResult{Status: vm.CheckWarn, Fix: "run a host kernel 5.16 or later", Detail: detail + fmt.Sprintf("; host kernel %q lacks KVM_CLOCK_REALTIME: a clone's clock is set by its agent only", k)}
	}
	return vm.CheckResult{Status: vm.CheckPass, Detail: detail}
}

// kernelAtLeast reports whether the kernel release rel ("6.1.0-57-amd64")
// is at least major.minor.
func kernelAtLeast(rel string, major, minor int) (string, bool) {
	m := regexp.MustCompile(`^([0-9]+)\.([0-9]+)`).FindStringSubmatch(rel)
	if m == nil {
		return rel, false
	}
	a, _ := strconv.Atoi(m[1])
	b, _ := strconv.Atoi(m[2])
	return rel, a > major || a == major && b >= minor
}

// checkSnapshotTree checks the pools' snapshot directory (absent is fine):
// directories root's (the daemon's user) and 0700, files regular, root's
// and read-only, no symlinks. A file a VMM's user could write would let one
// VM rewrite the memory every clone of its size runs on.
func checkSnapshotTree(dir string) error {
	if _, err := os.Lstat(dir); os.IsNotExist(err) {
		return nil
	}
	return filepath.Walk(dir, func(p string, fi os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		st, ok := fi.Sys().(*syscall.Stat_t)
		if !ok {
			return nil
		}
		switch {
		case int(st.Uid) != os.Geteuid():
			return fmt.Errorf("%s belongs to uid %d, not to FireRunner's user", p, st.Uid)
		case fi.IsDir() && fi.Mode().Perm()&0o077 != 0:
			return fmt.Errorf("directory %s has mode %04o; want 0700", p, fi.Mode().Perm())
		case fi.Mode()&os.ModeSymlink != 0 || !fi.IsDir() && !fi.Mode().IsRegular():
			return fmt.Errorf("%s is not a regular file (%v)", p, fi.Mode())
		case fi.Mode().IsRegular() && fi.Mode().Perm()&0o222 != 0:
			return fmt.Errorf("%s is writable (mode %04o); snapshot files must be read-only", p, fi.Mode().Perm())
		}
		return nil
	})
}
