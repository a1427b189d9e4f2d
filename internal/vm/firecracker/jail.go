package firecracker

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// Names of the files inside a jail (absolute paths as the jailed Firecracker
// sees them). They are the same for every VM, so a snapshot taken in one jail
// names drive paths that resolve in any other.
const (
	jailKernel   = "/vmlinux"
	jailInitrd   = "/initrd.img"
	jailRootfs   = "/rootfs.ext4"
	jailConfig   = "/config.img"
	jailScratch  = "/scratch.img"
	jailLog      = "/firecracker.log"
	jailMetrics  = "/firecracker.metrics"
	jailSocket   = "/run/firecracker.socket"
	jailSnapDir  = "/snapshot"
	jailSnapVM   = "/snapshot/vmstate"
	jailSnapMem  = "/snapshot/memory"
	cpuPeriodUS  = 100000
	defaultCgVer = "2"
)

// jailArgs is the jailer command line for one VM. It is built here rather
// than with the SDK's JailerCommandBuilder because that builder has no
// --new-pid-ns and pins every VM to NUMA node 0.
func (d *Driver) jailArgs(id string, vcpus, memMiB, uid, gid int) []string {
	args := []string{
		"--id", id,
		// The canonical path the VM's jail is named after (jailExec): the
		// jailer resolves it again and gets the same name.
		"--exec-file", d.jailExec(id),
		"--uid", strconv.Itoa(uid),
		"--gid", strconv.Itoa(gid),
		"--chroot-base-dir", d.opts.ChrootBase,
		"--cgroup-version", defaultCgVer,
	}
	for _, c := range d.cgroupSettings(vcpus, memMiB) {
		args = append(args, "--cgroup", c)
	}
	if d.opts.ParentCgroup != "" {
		args = append(args, "--parent-cgroup", d.opts.ParentCgroup)
	}
	// --new-pid-ns: Firecracker becomes init of its own PID namespace, so
	// killing it kills everything it could have spawned. Not --daemonize:
	// that would send the serial console (Firecracker's stdout) to /dev/null;
	// the driver detaches the jailer with setsid itself instead.
	args = append(args, "--new-pid-ns", "--", "--api-sock", jailSocket)
	return args
}

// cgroupSettings are the VM cgroup's (v2) limits, written by the jailer:
//   - cpu.max: the vCPUs' time plus one CPU for Firecracker's own threads
//     (the API and the device emulation thread that serves virtio queues).
//     N vCPU threads can never use more than N CPUs, so the extra CPU is
//     only ever the VMM's: with a quota of exactly N, busy vCPUs would
//     starve the device thread and stall the guest's own I/O.
//   - memory.max: guest memory, plus MemoryOverheadMiB for Firecracker,
//     plus MemoryOverheadMiBPerGiB per GiB for KVM's page tables of the
//     guest, which are charged to the cgroup (about 4 MiB per GiB without
//     THP: a fixed overhead OOM-kills large VMs once the guest touches its
//     memory).
//   - memory.swap.max=0: the VM's memory is never swapped (a swapped
//     guest is slow for everyone and its memory leaves the cgroup's
//     bound), where the kernel accounts swap (see swapAccounting).
func (d *Driver) cgroupSettings(vcpus, memMiB int) []string {
	s := []string{
		fmt.Sprintf("cpu.max=%d %d", (vcpus+1)*cpuPeriodUS, cpuPeriodUS),
		fmt.Sprintf("memory.max=%d", int64(memMiB+d.memoryOverheadMiB(memMiB))<<20),
	}
	if d.swapAccounted {
		s = append(s, "memory.swap.max=0")
	}
	return s
}

// memoryOverheadMiB is what the VM's cgroup gets beyond guest memory.
func (d *Driver) memoryOverheadMiB(memMiB int) int {
	gib := (memMiB + 1023) / 1024
	return d.opts.MemoryOverheadMiB + gib*d.opts.MemoryOverheadMiBPerGiB
}

// swapAccounting reports whether the cgroup v2 hierarchy at root has swap
// accounting (memory.swap.max files), as a kernel with CONFIG_MEMCG_SWAP
// (and swap accounting not turned off) has in every non-root cgroup with
// the memory controller. Without it the jailer could not write
// memory.swap.max and every start would fail.
func swapAccounting(root string) bool {
	m, _ := filepath.Glob(filepath.Join(root, "*", "memory.swap.max"))
	return len(m) > 0
}

// resolveExec is the firecracker binary as the jailer sees it: the jailer
// canonicalizes --exec-file (realpath) and names the chroot directory
// (<chroot_base>/<name>/<id>), the pid file (<name>.pid) and the default
// parent cgroup after the canonical file's name. A symlink such as
// /usr/local/bin/firecracker → firecracker-v1.16.0-x86_64 must therefore be
// resolved here the same way, or the driver prepares one jail and waits on
// a socket in it while Firecracker runs in another.
func (d *Driver) resolveExec() (string, error) {
	p, err := filepath.EvalSymlinks(d.opts.Binary)
	if err != nil {
		return "", fmt.Errorf("firecracker binary: %w", err)
	}
	if p, err = filepath.Abs(p); err != nil {
		return "", err
	}
	if !strings.Contains(filepath.Base(p), "firecracker") {
		return "", fmt.Errorf("firecracker binary %s resolves to %s: the jailer requires the resolved file name to contain \"firecracker\"", d.opts.Binary, p)
	}
	return p, nil
}

// jailExec is the canonical firecracker path VM id's jail is named after:
// the one recorded when the VM started (so a symlink switched to a new
// release later changes nothing for it), else the binary's resolution now.
func (d *Driver) jailExec(id string) string {
	if m, err := d.readFCMeta(id); err == nil && m.Exec != "" {
		return m.Exec
	}
	if p, err := d.resolveExec(); err == nil {
		return p
	}
	return d.opts.Binary
}

// execName is the jailer's <exec_file_name> for VM id: the chroot's parent
// directory name and the name of its pid file.
func (d *Driver) execName(id string) string { return filepath.Base(d.jailExec(id)) }

// jailDir is <chroot_base>/<exec_file_name>/<id>, removed whole on Destroy.
func (d *Driver) jailDir(id string) string { return d.jailDirOf(d.execName(id), id) }

func (d *Driver) jailDirOf(execName, id string) string {
	return filepath.Join(d.opts.ChrootBase, execName, id)
}

// chrootDir is the jail root Firecracker sees as "/".
func (d *Driver) chrootDir(id string) string { return filepath.Join(d.jailDir(id), "root") }

// inJail maps a jail path to the host path.
func (d *Driver) inJail(id, p string) string { return filepath.Join(d.chrootDir(id), p) }

// cgroupDir is where the jailer creates the VM's cgroup (v2).
func (d *Driver) cgroupDir(id string) string { return d.cgroupDirOf(d.execName(id), id) }

func (d *Driver) cgroupDirOf(execName, id string) string {
	parent := d.opts.ParentCgroup
	if parent == "" {
		parent = execName // the jailer's default parent cgroup
	}
	return filepath.Join(d.opts.CgroupRoot, parent, id)
}

// placeMode says how a file got into the jail.
type placeMode string

const (
	placedLink    placeMode = "hardlink"
	placedReflink placeMode = "reflink"
	placedCopy    placeMode = "copy"
)

// imageCacheDir is where, inside the chroot base, shared image files are
// staged (see stageShared). The jailer never looks at it, and List only
// at <chroot_base>/*firecracker*/.
const imageCacheDir = ".firerunner-images"

// stageShared returns a path for the shared, read-only image file src
// inside the chroot base's own mount, from which every jail gets a hard
// link in O(1).
//
// link(2) (and FICLONE) fail with EXDEV across mounts even on one file
// system, and under the shipped unit (ProtectSystem=strict) every
// ReadWritePaths entry is its own bind mount: the image under state_dir
// and the jails under chroot_base are always on different mounts, so
// linking the image straight into each jail fell back to a full copy of
// rootfs, kernel and initrd per VM: seconds of I/O, N× the disk, no
// shared page cache. Staging costs one link (or reflink, or copy) per
// image version; a copy is logged at warn. A staged file is keyed by the
// source's device, inode, size and mtime, so a rebuilt image is staged
// anew; versions no jail links any more are removed then.
func (d *Driver) stageShared(src string) (string, error) {
	fi, err := os.Stat(src)
	if err != nil {
		return "", err
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return "", fmt.Errorf("stat %s: no inode", src)
	}
	dir := filepath.Join(d.opts.ChrootBase, imageCacheDir)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", err
	}
	name := filepath.Base(src)
	staged := filepath.Join(dir, fmt.Sprintf("%s.%x-%x-%x-%x", name, st.Dev, st.Ino, fi.Size(), fi.ModTime().UnixNano()))
	if _, err := os.Stat(staged); err == nil {
		return staged, nil
	}
	d.stageMu.Lock()
	defer d.stageMu.Unlock()
	if _, err := os.Stat(staged); err == nil {
		return staged, nil // staged by a concurrent start
	}
	tmp := fmt.Sprintf("%s.tmp-%d", staged, os.Getpid())
	os.Remove(tmp)
	mode, err := placeFile(src, tmp)
	if err != nil {
		return "", err
	}
	if mode != placedLink {
		// A copy must not stay writable through a shared inode: 0644,
		// read by the jail user through "other".
		if err := os.Chmod(tmp, 0o644); err != nil {
			os.Remove(tmp)
			return "", err
		}
	}
	if err := os.Rename(tmp, staged); err != nil {
		os.Remove(tmp)
		return "", err
	}
	lg := d.log.Info
	if mode == placedCopy {
		lg = d.log.Warn
	}
	lg("image file staged in the chroot base, for O(1) hard links into every jail", "file", src, "staged", staged, "how", mode,
		"bytes", fi.Size(), "why", "jails can only link files on their own mount (chroot_base)")
	d.pruneStaged(dir, name, staged)
	return staged, nil
}

// pruneStaged removes the other staged versions of an image file that no
// jail links any more (link count 1).
func (d *Driver) pruneStaged(dir, name, keep string) {
	old, _ := filepath.Glob(filepath.Join(dir, name+".*"))
	for _, p := range old {
		fi, err := os.Lstat(p)
		if err != nil || p == keep || !fi.Mode().IsRegular() {
			continue
		}
		if st, ok := fi.Sys().(*syscall.Stat_t); ok && st.Nlink == 1 {
			if err := os.Remove(p); err == nil {
				d.log.Info("removed an image file no jail uses", "staged", p)
			}
		}
	}
}

// placeFile puts src at dst: a hard link when both are on one filesystem
// and mount (O(1), shares the inode), else a reflink (O(1) on btrfs/xfs),
// else a full copy. Shared image files are linked, never chowned: the
// jailed uid reads them through their "other" permission bits.
func placeFile(src, dst string) (placeMode, error) {
	if err := os.Link(src, dst); err == nil {
		return placedLink, nil
	} else if !errors.Is(err, syscall.EXDEV) && !errors.Is(err, syscall.EPERM) {
		return "", fmt.Errorf("link %s into jail: %w", src, err)
	}
	in, err := os.Open(src)
	if err != nil {
		return "", err
	}
	defer in.Close()
	fi, err := in.Stat()
	if err != nil {
		return "", err
	}
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, fi.Mode().Perm())
	if err != nil {
		return "", err
	}
	if err := unix.IoctlFileClone(int(out.Fd()), int(in.Fd())); err == nil {
		return placedReflink, out.Close()
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		os.Remove(dst)
		return "", fmt.Errorf("copy %s into jail: %w", src, err)
	}
	return placedCopy, out.Close()
}

// readableBy reports whether uid/gid may read path through its mode bits
// (the jailed Firecracker has no capabilities).
func readableBy(path string, uid, gid int) error {
	fi, err := os.Stat(path)
	if err != nil {
		return err
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return nil
	}
	perm := fi.Mode().Perm()
	switch {
	case int(st.Uid) == uid && perm&0o400 != 0,
		int(st.Gid) == gid && perm&0o040 != 0,
		perm&0o004 != 0:
		return nil
	}
	return fmt.Errorf("%s (mode %04o, owner %d:%d) is not readable by the jail user %d:%d; make image files world-readable (chmod o+r)", path, perm, st.Uid, st.Gid, uid, gid)
}
