package firecracker

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/firerunner/firerunner/internal/config"
	"github.com/firerunner/firerunner/internal/vm"
)

// TestSnapshotsCheck: the doctor check passes with refills off (warm VMs'
// vsock needs nothing of the host), and with them on needs the jailer, a
// Firecracker with network_overrides, and a snapshot directory only root
// can write.
func TestSnapshotsCheck(t *testing.T) {
	run := func(c config.Config) vm.CheckResult {
		for _, ch := range (Provider{}).Checks(c) {
			if ch.Name == "snapshots" {
				return ch.Run(context.Background(), vm.CheckHost{})
			}
		}
		t.Fatal("no snapshots check")
		return vm.CheckResult{}
	}
	c := config.Default()
	if r := run(c); r.Status != vm.CheckPass || !strings.Contains(r.Detail, "no vhost_vsock module needed") {
		t.Errorf("refills off: %+v", r)
	}
	c.Firecracker.SnapshotRefill = true
	c.Firecracker.ChrootBase = t.TempDir()
	c.Firecracker.UseJailer = false
	if r := run(c); r.Status != vm.CheckFail || !strings.Contains(r.Detail, "use_jailer") {
		t.Errorf("refills without the jailer: %+v", r)
	}
	c.Firecracker.UseJailer = true
	fcOut := func(v string) string { return "Firecracker " + v + "\n" }
	c.Firecracker.Binary, _ = fakeBinaries(t, fcOut("v1.15.0"), "Jailer v1.15.0\n")
	if r := run(c); r.Status != vm.CheckFail || !strings.Contains(r.Detail, "older than v1.16.0") || r.Fix == "" {
		t.Errorf("Firecracker 1.15: %+v", r)
	}
	c.Firecracker.Binary, _ = fakeBinaries(t, fcOut("v1.16.0"), "Jailer v1.16.0\n")
	if r := run(c); r.Status == vm.CheckFail {
		t.Errorf("Firecracker 1.16, no snapshots yet: %+v", r)
	}
	dir := filepath.Join(c.Firecracker.ChrootBase, snapshotCacheDir, "2cpu-512mib-x")
	os.MkdirAll(dir, 0o700)
	os.Chmod(filepath.Dir(dir), 0o700)
	mem := filepath.Join(dir, SnapshotMemFile)
	os.WriteFile(mem, []byte("m"), 0o444)
	if r := run(c); r.Status == vm.CheckFail {
		t.Errorf("a proper snapshot tree: %+v", r)
	}
	os.Chmod(mem, 0o644)
	if r := run(c); r.Status != vm.CheckFail || !strings.Contains(r.Detail, "writable") {
		t.Errorf("a writable memory file: %+v", r)
	}
	os.Chmod(mem, 0o444)
	os.Chmod(dir, 0o755)
	if r := run(c); r.Status != vm.CheckFail || !strings.Contains(r.Detail, "want 0700") {
		t.Errorf("an open snapshot dir: %+v", r)
	}
	if rel, ok := kernelAtLeast("5.15.0-1-amd64", 5, 16); ok {
		t.Errorf("kernelAtLeast(%s, 5.16)", rel)
	}
	if _, ok := kernelAtLeast("6.1.0-57-amd64", 5, 16); !ok {
		t.Error("kernelAtLeast(6.1, 5.16) false")
	}
}
