package firecracker

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/firerunner/firerunner/internal/guestconfig"
	"github.com/firerunner/firerunner/internal/testsupport/fcstandin"
	"github.com/firerunner/firerunner/internal/vm"
)

// TestWarmClonerRefill: with snapshot_refill the first ready warm VM of a
// size becomes its template (once), later warm VMs of the size are restored
// from it, and a clone gets its own identity with its job. A newer image
// makes a new snapshot and the old one goes.
func TestWarmClonerRefill(t *testing.T) {
	e := newEnv(t, true)
	e.opts.SnapshotRefill = true
	d := e.driver()
	ctx := context.Background()
	a, b := e.warmSpec("fr-tpl1"), e.warmSpec("fr-pool2")
	a.Guest.SystemID, b.Guest.SystemID = "s_frtpl1aaaaaa", "s_frpool2bbbbb"
	b.Network.TapName, b.Network.MAC = "tap-pool2", "02:FC:0A:00:00:09"
	t.Cleanup(func() { d.Destroy(ctx, a.ID); d.Destroy(ctx, b.ID) })
	if ok, err := d.StartClone(ctx, b); ok || err != nil {
		t.Fatalf("StartClone without a snapshot = %v, %v; want false (boot it)", ok, err)
	}
	if err := d.Start(ctx, a); err != nil {
		t.Fatal(err)
	}
	waitWarm(t, d, a.ID)
	if err := d.SnapshotWarm(ctx, a.ID); err != nil {
		t.Fatalf("SnapshotWarm: %v", err)
	}
	n := len(e.requests(a.ID))
	if err := d.SnapshotWarm(ctx, a.ID); err != nil || len(e.requests(a.ID)) != n {
		t.Errorf("a second SnapshotWarm of the size = %v and sent %d requests; want a no-op", err, len(e.requests(a.ID))-n)
	}
	dirs, _ := filepath.Glob(filepath.Join(e.chrootBase, snapshotCacheDir, "2cpu-512mib-*"))
	if len(dirs) != 1 {
		t.Fatalf("snapshot dirs %v; want one", dirs)
	}
	if fi, err := os.Stat(dirs[0]); err != nil || fi.Mode().Perm() != 0o700 {
		t.Errorf("snapshot dir %v %v; want 0700", fi.Mode(), err)
	}
	other := b
	other.Guest.CACertsPEM = "-----BEGIN CERTIFICATE-----\n"
	if ok, _ := d.StartClone(ctx, other); ok {
		t.Fatal("a snapshot restored a VM whose guest config (CA certificates) differs")
	}
	if ok, err := d.StartClone(ctx, b); !ok || err != nil {
		t.Fatalf("StartClone = %v, %v; want restored", ok, err)
	}
	if fm, _ := d.readFCMeta(b.ID); !fm.Restored || fm.Snapshot != dirs[0] {
		t.Errorf("clone meta %+v", fm)
	}
	actx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	if err := d.Assign(actx, b.ID, guestconfig.Assignment{GitLabURL: "https://gitlab.test", RunnerToken: testToken, JobTimeoutSec: 60}); err != nil {
		t.Fatal(err)
	}
	if _, err := d.Wait(ctx, b.ID); err != nil {
		t.Fatal(err)
	}
	ev := e.guestEvents(b.ID)
	i := slices.IndexFunc(ev, func(x fcstandin.GuestEvent) bool { return x.Event == "assigned" })
	if i < 0 || ev[i].Identity == nil || ev[i].Hostname != b.ID || ev[i].MachineID != b.Guest.MachineID || ev[i].Identity.MAC != b.Network.MAC || ev[i].Identity.SystemID != b.Guest.SystemID {
		t.Fatalf("clone's assignment %+v; want its own identity", ev)
	}
	// A rebuilt image: the next template replaces the old snapshot.
	if err := d.Destroy(ctx, b.ID); err != nil {
		t.Fatal(err)
	}
	time.Sleep(10 * time.Millisecond)
	os.WriteFile(e.image.Rootfs, []byte("ext4 rootfs v2"), 0o644)
	c := e.warmSpec("fr-tpl3")
	c.Network.TapName = "tap-tpl3"
	t.Cleanup(func() { d.Destroy(ctx, c.ID) })
	if ok, _ := d.StartClone(ctx, c); ok {
		t.Fatal("a snapshot of the old image restored a VM of the new one")
	}
	if err := d.Start(ctx, c); err != nil {
		t.Fatal(err)
	}
	waitWarm(t, d, c.ID)
	if err := d.SnapshotWarm(ctx, c.ID); err != nil {
		t.Fatal(err)
	}
	if now, _ := filepath.Glob(filepath.Join(e.chrootBase, snapshotCacheDir, "2cpu-512mib-*")); len(now) != 1 || now[0] == dirs[0] {
		t.Errorf("snapshot dirs after the new image: %v (old %s)", now, dirs[0])
	}
}

// TestWarmClonerOff: without snapshot_refill (or without the jailer) no
// snapshot is made and every warm VM boots.
func TestWarmClonerOff(t *testing.T) {
	e := newEnv(t, true)
	d := e.driver()
	ctx := context.Background()
	a := e.warmSpec("fr-tpl1")
	t.Cleanup(func() { d.Destroy(ctx, a.ID) })
	if err := d.Start(ctx, a); err != nil {
		t.Fatal(err)
	}
	waitWarm(t, d, a.ID)
	if err := d.SnapshotWarm(ctx, a.ID); err != nil {
		t.Fatal(err)
	}
	if m, _ := filepath.Glob(filepath.Join(e.chrootBase, snapshotCacheDir, "*")); len(m) != 0 {
		t.Errorf("snapshot made with snapshot_refill off: %v", m)
	}
	if slices.Contains(calls(e.requests(a.ID)), "PUT /snapshot/create") {
		t.Error("snapshot requested with snapshot_refill off")
	}
}

// TestWarmClonerFallsBack: a Firecracker that cannot restore a clone (one
// without network_overrides refuses the field) leaves nothing of the clone,
// discards the snapshot, and the VM boots instead.
func TestWarmClonerFallsBack(t *testing.T) {
	e := newEnv(t, true)
	e.opts.SnapshotRefill = true
	d := e.driver()
	ctx := context.Background()
	a, b := e.warmSpec("fr-tpl1"), e.warmSpec("fr-pool2")
	b.Network.TapName = "tap-pool2"
	t.Cleanup(func() { d.Destroy(ctx, a.ID); d.Destroy(ctx, b.ID) })
	if err := d.Start(ctx, a); err != nil {
		t.Fatal(err)
	}
	waitWarm(t, d, a.ID)
	if err := d.SnapshotWarm(ctx, a.ID); err != nil {
		t.Fatal(err)
	}
	t.Setenv(fcstandin.EnvAPI, "1.4.1")
	if ok, err := d.StartClone(ctx, b); ok || err != nil {
		t.Fatalf("StartClone on a Firecracker without network_overrides = %v, %v; want false", ok, err)
	}
	if _, err := os.Lstat(d.sd.Path(b.ID)); err == nil {
		t.Error("the failed clone's files are left")
	}
	if m, _ := filepath.Glob(filepath.Join(e.chrootBase, snapshotCacheDir, "2cpu-*")); len(m) != 0 {
		t.Errorf("the unusable snapshot is kept: %v", m)
	}
	os.Unsetenv(fcstandin.EnvAPI)
	if err := d.Start(ctx, b); err != nil {
		t.Fatalf("booting the VM after the failed restore: %v", err)
	}
	var _ vm.WarmCloner = d
}

// BenchmarkWarmStart measures the driver's own cost of starting a warm VM
// against the stand-in VMM, booted (the full configuration sequence) or
// restored from the size's snapshot (logger, metrics, load, and the jail
// links), up to the VMM answering; plus Destroy. It measures FireRunner's
// share only: the stand-in neither boots a kernel nor maps memory.
func BenchmarkWarmStart(b *testing.B) {
	for _, clone := range []bool{false, true} {
		b.Run(map[bool]string{false: "boot", true: "clone"}[clone], func(b *testing.B) {
			e := newEnv(b, true)
			e.opts.SnapshotRefill = true
			d := e.driver()
			ctx := context.Background()
			if clone {
				tpl := e.warmSpec("fr-tpl")
				tpl.Network.TapName = "tap-tpl"
				if err := d.Start(ctx, tpl); err != nil {
					b.Fatal(err)
				}
				waitWarm(b, d, tpl.ID)
				if err := d.SnapshotWarm(ctx, tpl.ID); err != nil {
					b.Fatal(err)
				}
				b.Cleanup(func() { d.Destroy(ctx, tpl.ID) })
			}
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				s := e.warmSpec(fmt.Sprintf("fr-bench%d", i))
				if clone {
					if ok, err := d.StartClone(ctx, s); !ok || err != nil {
						b.Fatal(ok, err)
					}
				} else if err := d.Start(ctx, s); err != nil {
					b.Fatal(err)
				}
				if err := d.Destroy(ctx, s.ID); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
