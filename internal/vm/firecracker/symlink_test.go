package firecracker

import (
	"context"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/firerunner/firerunner/internal/testsupport/fcstandin"
	"github.com/firerunner/firerunner/internal/vm"
)

// release installs the stand-in under a release's file name, as the
// release tarball names it (firecracker-v1.16.0-x86_64).
func (e *testEnv) release(name string) string {
	e.t.Helper()
	self, err := os.Executable()
	if err != nil {
		e.t.Fatal(err)
	}
	dst := filepath.Join(e.root, "releases", name)
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		e.t.Fatal(err)
	}
	if err := os.Link(self, dst); err != nil {
		in, err := os.Open(self)
		if err != nil {
			e.t.Fatal(err)
		}
		defer in.Close()
		out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o755)
		if err != nil {
			e.t.Fatal(err)
		}
		if _, err := io.Copy(out, in); err != nil {
			e.t.Fatal(err)
		}
		out.Close()
	}
	return dst
}

// point makes bin/firecracker a symlink to target (replacing it atomically).
func (e *testEnv) point(target string) {
	e.t.Helper()
	tmp := e.opts.Binary + ".new"
	os.Remove(tmp)
	if err := os.Symlink(target, tmp); err != nil {
		e.t.Fatal(err)
	}
	if err := os.Rename(tmp, e.opts.Binary); err != nil {
		e.t.Fatal(err)
	}
}

// The jailer canonicalizes --exec-file and names the jail, its pid file and
// the default parent cgroup after the resolved file. With firecracker a
// symlink to a release file (as installs and upgrades do), the driver must
// prepare that jail and wait on the socket in it; a VM started before the
// symlink moved to a new release stays found, waited for and destroyed.
func TestSymlinkedFirecracker(t *testing.T) {
	e := newEnv(t, true)
	ctx := context.Background()
	v16, v17 := e.release("firecracker-v1.16.0-x86_64"), e.release("firecracker-v1.17.0-x86_64")
	e.point(v16)
	d := e.driver()
	a, b := e.spec("fr-symlink1", fcstandin.CmdHang), e.spec("fr-symlink2", fcstandin.CmdExit, "0")
	t.Cleanup(func() { d.Destroy(ctx, a.ID); d.Destroy(ctx, b.ID) })
	if err := d.Start(ctx, a); err != nil {
		t.Fatalf("Start with a symlinked firecracker: %v", err)
	}
	jailA := filepath.Join(e.chrootBase, "firecracker-v1.16.0-x86_64", a.ID)
	meta, _ := d.sd.ReadMeta(a.ID)
	j, err := fcstandin.ParseJailerArgs(meta.Argv[1:])
	if err != nil || j.ExecFile != v16 {
		t.Errorf("--exec-file %q (%v); want the resolved %s", j.ExecFile, err, v16)
	}
	if _, err := os.Stat(filepath.Join(jailA, "root", "firecracker-v1.16.0-x86_64.pid")); err != nil {
		t.Errorf("the jailer's pid file is not where the release's name puts it: %v", err)
	}
	if p, err := d.jailPID(a.ID); err != nil || p.PID != meta.Proc.PID {
		t.Errorf("jail pid %+v %v; want the VMM %d", p, err, meta.Proc.PID)
	}
	if _, err := os.Stat(filepath.Join(e.cgRoot, "firecracker-v1.16.0-x86_64", a.ID+".cgroup.json")); err != nil {
		t.Errorf("cgroup not under the release's name: %v", err)
	}

	// Upgrade: the symlink moves to a new release while VM a runs.
	e.point(v17)
	if err := d.Start(ctx, b); err != nil {
		t.Fatalf("Start after the symlink moved: %v", err)
	}
	if res, err := d.Wait(ctx, b.ID); err != nil || res.ExitCode != 0 {
		t.Fatalf("Wait b = %+v, %v", res, err)
	}
	if _, err := os.Stat(filepath.Join(e.chrootBase, "firecracker-v1.17.0-x86_64", b.ID)); err != nil {
		t.Errorf("VM b's jail not under the new release's name: %v", err)
	}
	// A restarted driver finds both, each by its own jail.
	d2 := e.driver()
	insts, err := d2.List(ctx)
	if err != nil || !slices.ContainsFunc(insts, func(i vm.Instance) bool { return i.ID == a.ID && i.PID == meta.Proc.PID }) ||
		!slices.ContainsFunc(insts, func(i vm.Instance) bool { return i.ID == b.ID }) {
		t.Fatalf("List after the upgrade = %+v, %v; want a (running, pid %d) and b", insts, err, meta.Proc.PID)
	}
	for _, id := range []string{a.ID, b.ID} {
		if err := d2.Destroy(ctx, id); err != nil {
			t.Fatalf("Destroy %s: %v", id, err)
		}
	}
	if _, err := os.Stat(jailA); err == nil {
		t.Errorf("VM a's jail (old release) left behind: %s", jailA)
	}
	e.assertClean(d2, a.ID, meta.Proc.PID)
	e.assertClean(d2, b.ID, 0)

	// A symlink to a file whose name lacks "firecracker" would be refused
	// by the jailer: Start says so and leaves nothing.
	other := filepath.Join(e.root, "releases", "fc-v1.18")
	if err := os.Link(v17, other); err != nil {
		t.Fatal(err)
	}
	e.point(other)
	c := e.spec("fr-symlink3")
	if err := d2.Start(ctx, c); err == nil || !strings.Contains(err.Error(), `resolves to `+other) {
		t.Fatalf("Start with firecracker → %s: %v", other, err)
	}
	if _, err := os.Stat(d2.sd.Path(c.ID)); err == nil {
		t.Error("a refused start left its state dir")
	}
}
