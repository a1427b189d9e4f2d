package firecracker

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/firerunner/firerunner/internal/testenv"
	"github.com/firerunner/firerunner/internal/testsupport/fcstandin"
)

// The VM cgroup's memory.max grows with the guest: KVM's page tables for
// the guest (about 4 MiB per GiB without THP) are charged to it, so a
// fixed overhead OOM-kills big VMs once their guest touches its memory.
// Its cpu.max leaves Firecracker's own threads a CPU beyond the vCPUs; its
// memory.swap.max pins the memory where the kernel accounts swap.
func TestCgroupSettings(t *testing.T) {
	cg := t.TempDir()
	d, err := New(Options{Binary: "/usr/local/bin/firecracker", JailerBinary: "/usr/local/bin/jailer", UseJailer: true, UID: 64000, GID: 64000,
		StateDir: t.TempDir(), CgroupRoot: cg})
	if err != nil {
		t.Fatal(err)
	}
	if d.swapAccounted {
		t.Fatal("swap accounting found in an empty cgroup root")
	}
	for _, tc := range []struct {
		vcpus, memMiB int
		want          []string
	}{
		{1, 1024, []string{"cpu.max=200000 100000", fmt.Sprintf("memory.max=%d", int64(1024+64+8)<<20)}},
		{4, 16 << 10, []string{"cpu.max=500000 100000", fmt.Sprintf("memory.max=%d", int64(16<<10+64+16*8)<<20)}},
		{32, 64 << 10, []string{"cpu.max=3300000 100000", fmt.Sprintf("memory.max=%d", int64(64<<10+64+64*8)<<20)}},
		{2, 1536, []string{"cpu.max=300000 100000", fmt.Sprintf("memory.max=%d", int64(1536+64+2*8)<<20)}}, // part GiB counts whole
	} {
		if got := d.cgroupSettings(tc.vcpus, tc.memMiB); !slices.Equal(got, tc.want) {
			t.Errorf("%d vCPUs, %d MiB: %q, want %q", tc.vcpus, tc.memMiB, got, tc.want)
		}
	}
	// Page tables alone need ~4 MiB per GiB; the overhead always covers
	// that plus Firecracker, up to the largest size tag the config allows.
	for gib := 1; gib <= 4096; gib *= 2 {
		if over := d.memoryOverheadMiB(gib << 10); over < 64+4*gib {
			t.Errorf("%d GiB guest: overhead %d MiB < %d (Firecracker + 4 MiB/GiB of page tables)", gib, over, 64+4*gib)
		}
	}
	// With swap accounting (memory.swap.max in the hierarchy): no swap.
	os.Mkdir(filepath.Join(cg, "system.slice"), 0o755)
	os.WriteFile(filepath.Join(cg, "system.slice", "memory.swap.max"), []byte("max\n"), 0o644)
	d, _ = New(d.opts)
	if got := d.cgroupSettings(1, 1024); !slices.Contains(got, "memory.swap.max=0") {
		t.Errorf("with swap accounting: %q lacks memory.swap.max=0", got)
	}
	// The configured overheads are used.
	o := d.opts
	o.MemoryOverheadMiB, o.MemoryOverheadMiBPerGiB = 100, 10
	d, _ = New(o)
	if got := d.cgroupSettings(1, 2048)[1]; got != fmt.Sprintf("memory.max=%d", int64(2048+100+20)<<20) {
		t.Errorf("configured overheads: %s", got)
	}
}

func TestValidParentCgroup(t *testing.T) {
	for p, ok := range map[string]bool{"": true, "firerunner": true, "system.slice/firerunner.service/vms": true,
		"/firerunner": false, "a/../b": false, "./a": false, "a//b": false, "a/": false} {
		if err := ValidParentCgroup(p); (err == nil) != ok {
			t.Errorf("ValidParentCgroup(%q) = %v", p, err)
		}
	}
}

// Every knob of the firecracker section reaches Firecracker and the jailer:
// the parent cgroup, the memory overheads, the extra boot args, the log
// level and the serial console's rate.
func TestKnobsReachFirecracker(t *testing.T) {
	e := newEnv(t, true)
	e.opts.ParentCgroup, e.opts.MemoryOverheadMiB, e.opts.MemoryOverheadMiBPerGiB = "firerunner/vms", 100, 10
	e.opts.ExtraBootArgs, e.opts.LogLevel, e.opts.SerialBytesPerSec = []string{"loglevel=7"}, "Debug", 8192
	d := e.driver()
	ctx := context.Background()
	spec := e.spec("fr-knobs1", fcstandin.CmdExit, "0")
	t.Cleanup(func() { d.Destroy(ctx, spec.ID) })
	if err := d.Start(ctx, spec); err != nil {
		t.Fatal(err)
	}
	if _, err := d.Wait(ctx, spec.ID); err != nil {
		t.Fatal(err)
	}
	meta, _ := d.sd.ReadMeta(spec.ID)
	j, err := fcstandin.ParseJailerArgs(meta.Argv[1:])
	if err != nil || j.ParentCgroup != "firerunner/vms" {
		t.Errorf("--parent-cgroup %q (%v)", j.ParentCgroup, err)
	}
	if want := fmt.Sprintf("memory.max=%d", int64(512+100+10)<<20); !slices.Contains(j.Cgroups, want) {
		t.Errorf("cgroups %q lack %s", j.Cgroups, want)
	}
	if _, err := os.Stat(filepath.Join(e.cgRoot, "firerunner", "vms", spec.ID+".cgroup.json")); err != nil {
		t.Errorf("VM cgroup not under the parent cgroup: %v", err)
	}
	recs := e.requests(spec.ID)
	if l := body(t, recs, "PUT /logger"); l["level"] != "Debug" {
		t.Errorf("PUT /logger = %v", l)
	}
	if bs := body(t, recs, "PUT /boot-source"); !strings.HasSuffix(fmt.Sprint(bs["boot_args"]), " loglevel=7") {
		t.Errorf("boot_args = %v", bs["boot_args"])
	}
	if s := body(t, recs, "PUT /serial"); fmt.Sprint(s["rate_limiter"]) != fmt.Sprint(map[string]any{"size": 8192.0, "refill_time": 1000.0, "one_time_burst": 32768.0}) {
		t.Errorf("PUT /serial = %v", s)
	}
	if err := d.Destroy(ctx, spec.ID); err != nil {
		t.Fatal(err)
	}
	e.assertClean(d, spec.ID, 0)
}

// With firecracker.vm_uid_base each jailed VM runs as the uid/gid its
// network attachment names (its own, from the range netsetup hands out):
// the jailer drops to it, the VM's files in the jail are its. A user not
// from the range is refused; a VM without one runs as firecracker.uid.
func TestPerVMUser(t *testing.T) {
	testenv.RequireRoot(t) // chown to other users
	e := newEnv(t, true)
	e.opts.VMUIDBase = 300000
	d := e.driver()
	ctx := context.Background()
	spec := e.spec("fr-peruid1", fcstandin.CmdExit, "0")
	spec.Network.UID, spec.Network.GID = 300005, 300005
	t.Cleanup(func() { d.Destroy(ctx, spec.ID) })
	if err := d.Start(ctx, spec); err != nil {
		t.Fatal(err)
	}
	meta, _ := d.sd.ReadMeta(spec.ID)
	j, err := fcstandin.ParseJailerArgs(meta.Argv[1:])
	if err != nil || j.UID != 300005 || j.GID != 300005 {
		t.Errorf("jailer --uid/--gid %d/%d (%v); want the VM's own 300005", j.UID, j.GID, err)
	}
	for _, f := range []string{jailConfig, jailLog, filepath.Dir(jailSocket)} {
		fi, err := os.Stat(d.inJail(spec.ID, f))
		if err != nil || statUID(fi) != 300005 {
			t.Errorf("%s in the jail: owner %d (%v); want 300005", f, statUID(fi), err)
		}
	}
	if fm, _ := d.readFCMeta(spec.ID); fm.UID != 300005 || fm.GID != 300005 {
		t.Errorf("firecracker.json user %d:%d", fm.UID, fm.GID)
	}
	if _, err := d.Wait(ctx, spec.ID); err != nil {
		t.Fatal(err)
	}
	if err := d.Destroy(ctx, spec.ID); err != nil {
		t.Fatal(err)
	}
	e.assertClean(d, spec.ID, 0)

	bad := e.spec("fr-peruid2", fcstandin.CmdExit, "0")
	bad.Network.UID, bad.Network.GID = 1000, 1000
	if err := d.Start(ctx, bad); err == nil || !strings.Contains(err.Error(), "not from the per-VM range") {
		t.Errorf("a user below the range: %v", err)
	}
	shared := e.spec("fr-peruid3", fcstandin.CmdExit, "0")
	if err := d.Start(ctx, shared); err != nil {
		t.Fatal(err)
	}
	meta, _ = d.sd.ReadMeta(shared.ID)
	if j, _ := fcstandin.ParseJailerArgs(meta.Argv[1:]); j.UID != e.opts.UID {
		t.Errorf("a VM without its own user runs as %d, want firecracker.uid %d", j.UID, e.opts.UID)
	}
	d.Wait(ctx, shared.ID)
	d.Destroy(ctx, shared.ID)
}
