package firecracker

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	sdk "github.com/firecracker-microvm/firecracker-go-sdk"

	"github.com/firerunner/firerunner/internal/testenv"
	"github.com/firerunner/firerunner/internal/testsupport/fcstandin"
	"github.com/firerunner/firerunner/internal/vm"
)

// unitLayoutChild marks the re-executed test binary that runs inside the
// mount namespace TestJailUnderUnitMountLayout made.
const (
	unitLayoutChild = "FIRERUNNER_TEST_UNIT_LAYOUT_CHILD"
	unitLayoutRoot  = "FIRERUNNER_TEST_UNIT_LAYOUT_ROOT"
)

// TestJailUnderUnitMountLayout: under the shipped unit (ProtectSystem=strict,
// ReadWritePaths=<state_dir> /srv/jailer ...) the state dir, holding the
// image, and the chroot base are separate bind mounts of one file system,
// across which link(2) fails with EXDEV. The test reproduces that layout
// in a mount namespace of its own (a tmpfs, the root of it remounted
// read-only, state dir and chroot base bind-mounted read-write onto
// themselves, as systemd does) and checks that every VM's kernel, initrd
// and rootfs are hard links of one staged copy inside the chroot base:
// per-VM root preparation is O(1) whatever the image's size, and no VM
// copies the image.
func TestJailUnderUnitMountLayout(t *testing.T) {
	if os.Getenv(unitLayoutChild) == "1" {
		unitLayoutChildMain(t)
		return
	}
	testenv.RequireRoot(t)
	// The child mounts over this directory in its own namespace; here it
	// stays an empty directory, removed when the test ends.
	root, err := os.MkdirTemp("", "fcunit")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(root) })
	cmd := exec.Command(os.Args[0], "-test.run=^TestJailUnderUnitMountLayout$", "-test.v", "-test.count=1")
	cmd.Env = append(os.Environ(), unitLayoutChild+"=1", unitLayoutRoot+"="+root)
	// Go makes every mount of the new namespace private before exec.
	cmd.SysProcAttr = &syscall.SysProcAttr{Unshareflags: syscall.CLONE_NEWNS}
	out, err := cmd.CombinedOutput()
	t.Logf("in a mount namespace of its own:\n%s", out)
	if err != nil {
		t.Fatalf("child: %v", err)
	}
	if !strings.Contains(string(out), "--- PASS: TestJailUnderUnitMountLayout") {
		t.Fatal("the child did not run the test")
	}
}

// unitLayout builds the unit's mount layout under a fresh tmpfs at root
// (this process must be in a mount namespace of its own) and returns the
// state dir and chroot base.
func unitLayout(t testing.TB, root string) (stateDir, chrootBase string) {
	t.Helper()
	if err := syscall.Mount("tmpfs", root, "tmpfs", 0, "size=512m"); err != nil {
		t.Fatalf("mount tmpfs: %v", err)
	}
	stateDir, chrootBase = filepath.Join(root, "var/lib/firerunner"), filepath.Join(root, "srv/jailer")
	for _, d := range []string{stateDir, chrootBase, filepath.Join(root, "bin")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	// ProtectSystem=strict: everything read-only ...
	if err := syscall.Mount(root, root, "", syscall.MS_BIND|syscall.MS_REC, ""); err != nil {
		t.Fatalf("bind root: %v", err)
	}
	// ... except each ReadWritePaths entry, its own read-write bind mount.
	for _, d := range []string{stateDir, chrootBase} {
		if err := syscall.Mount(d, d, "", syscall.MS_BIND, ""); err != nil {
			t.Fatalf("bind %s: %v", d, err)
		}
	}
	if err := syscall.Mount("", root, "", syscall.MS_REMOUNT|syscall.MS_BIND|syscall.MS_RDONLY, ""); err != nil {
		t.Fatalf("remount root read-only: %v", err)
	}
	// The layout is the one that broke links: one file system, two mounts.
	probe := filepath.Join(stateDir, "probe")
	os.WriteFile(probe, nil, 0o644)
	if err := os.Link(probe, filepath.Join(chrootBase, "probe")); !errorsIs(err, syscall.EXDEV) {
		t.Fatalf("link across the state dir and chroot base mounts: %v; want EXDEV (the layout is not reproduced)", err)
	}
	os.Remove(probe)
	return stateDir, chrootBase
}

func errorsIs(err error, target syscall.Errno) bool { return errors.Is(err, target) }

func unitLayoutChildMain(t *testing.T) {
	// Everything mounted here goes with this process's mount namespace.
	stateDir, chrootBase := unitLayout(t, os.Getenv(unitLayoutRoot))
	e := newEnv(t, true)
	e.stateDir, e.chrootBase = stateDir, chrootBase
	e.opts.StateDir, e.opts.ChrootBase = stateDir, chrootBase
	// The image where install.sh puts it, under the state dir, with a
	// rootfs of real (non-sparse) 64 MiB: a copy per VM would show.
	img := filepath.Join(stateDir, "image")
	os.MkdirAll(img, 0o755)
	for name, size := range map[string]int64{"vmlinux": 0, "initrd.img": 4 << 20, "rootfs.ext4": 64 << 20} {
		p := filepath.Join(img, name)
		f, err := os.OpenFile(p, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o644)
		if err != nil {
			t.Fatal(err)
		}
		if name == "vmlinux" {
			f.WriteString("\x7fELF\x02\x01\x01 vmlinux")
		} else if _, err := io.CopyN(f, rand.Reader, size); err != nil {
			t.Fatal(err)
		}
		f.Close()
	}
	e.image.Kernel, e.image.Initrd, e.image.Rootfs = filepath.Join(img, "vmlinux"), filepath.Join(img, "initrd.img"), filepath.Join(img, "rootfs.ext4")
	d := e.driver()
	ctx := context.Background()

	// Whole VMs, through the jailer stand-in: boot, power off, destroy.
	var inodes = map[string]uint64{}
	for i := range 3 {
		spec := e.spec(fmt.Sprintf("fr-unit%d", i), fcstandin.CmdHang)
		if err := d.Start(ctx, spec); err != nil {
			t.Fatalf("Start under the unit's layout: %v", err)
		}
		for _, f := range []string{jailKernel, jailInitrd, jailRootfs} {
			var st syscall.Stat_t
			if err := syscall.Stat(d.inJail(spec.ID, f), &st); err != nil {
				t.Fatal(err)
			}
			if st.Nlink < 2 {
				t.Errorf("%s: %s in the jail has link count %d: a copy, not a link", spec.ID, f, st.Nlink)
			}
			if prev, ok := inodes[f]; ok && prev != st.Ino {
				t.Errorf("%s: %s is inode %d, the previous VM's %d: each VM has its own copy", spec.ID, f, st.Ino, prev)
			}
			inodes[f] = st.Ino
		}
	}
	// One staged copy of the image in the chroot base, shared by all.
	staged, _ := filepath.Glob(filepath.Join(chrootBase, imageCacheDir, "rootfs.ext4.*"))
	if len(staged) != 1 {
		t.Fatalf("staged rootfs copies: %q; want exactly one", staged)
	}
	var st syscall.Stat_t
	syscall.Stat(staged[0], &st)
	if st.Ino != inodes[jailRootfs] || st.Nlink != 4 {
		t.Errorf("staged rootfs inode %d links %d; want the jails' inode %d and 1+3 links", st.Ino, st.Nlink, inodes[jailRootfs])
	}
	insts, _ := d.List(ctx)
	for _, in := range insts {
		if err := d.Destroy(ctx, in.ID); err != nil {
			t.Fatal(err)
		}
	}
	for _, in := range insts {
		e.assertClean(d, in.ID, 0)
	}
	if len(insts) != 3 {
		t.Errorf("List = %+v; want the 3 VMs (and not the image cache)", insts)
	}

	// Per-VM root preparation alone (the PrepareJail step), timed.
	var worst time.Duration
	for i := range 5 {
		spec := e.spec(fmt.Sprintf("fr-prep%d", i))
		took := prepareJailOnce(t, d, spec)
		worst = max(worst, took)
		d.Destroy(ctx, spec.ID)
	}
	t.Logf("per-VM root preparation under the unit's layout, 68 MiB image: worst of 5 = %s (a copy per VM took the image's size in I/O)", worst)
}

// prepareJailOnce runs the PrepareVMDir and PrepareJail steps of a boot
// (no VMM) and returns how long PrepareJail took.
func prepareJailOnce(t testing.TB, d *Driver, spec vm.Spec) time.Duration {
	t.Helper()
	ctx := context.Background()
	bootArgs, _ := BootArgs(nil)
	b, err := d.newBoot(spec, bootArgs)
	if err != nil {
		t.Fatal(err)
	}
	m, err := sdk.NewMachine(ctx, b.sdkConfig(), sdk.WithLogger(b.logger))
	if err != nil {
		t.Fatal(err)
	}
	if err := b.prepareVMDir(ctx, m); err != nil {
		t.Fatal(err)
	}
	t0 := time.Now()
	if err := b.prepareJail(ctx, m); err != nil {
		t.Fatal(err)
	}
	return time.Since(t0)
}
