package firecracker

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/firerunner/firerunner/internal/guestconfig"
	"github.com/firerunner/firerunner/internal/vm"
)

// Pool refills from snapshots (vm.WarmCloner): the first warm VM of a size
// whose guest is ready is snapshotted once and goes on serving; later warm
// VMs of that size are restored from the snapshot instead of booted.
//
// Snapshots live in <chroot_base>/.firerunner-snapshots/<key>/ (0700,
// root's; files 0444, root's): on the jails' own mount, so each clone's
// jail gets an O(1) hard link to the one memory file, which no VMM can
// write. The key names the size and everything a snapshot depends on: the
// image files and the firecracker binary (by device, inode, size, mtime),
// so a new image or release makes a new snapshot, and the old one is
// removed (running clones keep their links).

const snapshotCacheDir = ".firerunner-snapshots"

var (
	_ vm.WarmCloner = (*Driver)(nil)
	_ vm.Assigner   = (*Driver)(nil)
)

// cloning reports whether this driver refills pools from snapshots: turned
// on, and under the jailer, whose fixed jail paths let every clone reopen
// its own drives and vsock socket (unjailed, a snapshot names its source's
// host paths).
func (d *Driver) cloning() bool { return d.opts.SnapshotRefill && d.opts.UseJailer }

// guestShape is what of a warm guest's config its snapshot keeps and every
// clone shares: all but its identity (hostname, machine-id, gitlab-runner
// system_id, seed, clock, address), which a clone gets with its assignment. A config change (CA
// certificates, DNS, gitlab-runner's wait) makes a new snapshot.
func guestShape(c guestconfig.Config) []byte {
	c.Hostname, c.MachineID, c.SystemID, c.EntropySeed, c.UnixTimeNano = "", "", "", nil, 0
	if n := c.Network; n != nil {
		x := *n
		if p, err := netip.ParsePrefix(x.Address); err == nil {
			x.Address = fmt.Sprintf("/%d", p.Bits())
		}
		c.Network = &x
	}
	b, _ := json.Marshal(c)
	return b
}

// templateDir is the snapshot directory for warm VMs of this size, image,
// network and guest config.
func (d *Driver) templateDir(vcpus, memMiB int, img vm.Image, network bool, guest guestconfig.Config) (string, error) {
	h := sha256.New()
	exec, err := d.resolveExec()
	if err != nil {
		return "", err
	}
	for _, p := range []string{img.Kernel, img.Initrd, img.Rootfs, exec} {
		fi, err := os.Stat(p)
		if err != nil {
			return "", err
		}
		st, _ := fi.Sys().(*syscall.Stat_t)
		fmt.Fprintf(h, "%s %d %d %d %d\n", p, st.Dev, st.Ino, fi.Size(), fi.ModTime().UnixNano())
	}
	fmt.Fprintf(h, "network=%v\nguest=%s\n", network, guestShape(guest))
	return filepath.Join(d.opts.ChrootBase, snapshotCacheDir, fmt.Sprintf("%dcpu-%dmib-%s", vcpus, memMiB, hex.EncodeToString(h.Sum(nil))[:16])), nil
}

func snapshotIn(dir string) Snapshot {
	return Snapshot{StatePath: filepath.Join(dir, SnapshotStateFile), MemPath: filepath.Join(dir, SnapshotMemFile)}
}

// SnapshotWarm implements vm.WarmCloner.
func (d *Driver) SnapshotWarm(ctx context.Context, id string) error {
	if !d.cloning() {
		return nil
	}
	meta, err := d.sd.ReadMeta(id)
	if err != nil || meta.Driver != Name {
		return fmt.Errorf("vm %s: %w", id, vm.ErrNotFound)
	}
	fm, err := d.readFCMeta(id)
	if err != nil {
		return err
	}
	if !fm.Vsock || fm.Restored {
		return nil // only a booted warm guest is a template
	}
	guest, err := d.readDrive(id)
	if err != nil {
		return fmt.Errorf("vm %s: %w", id, err)
	}
	dir, err := d.templateDir(meta.VCPUs, meta.MemoryMiB, meta.Image, meta.Network != nil, guest)
	if err != nil {
		return fmt.Errorf("vm %s: %w", id, err)
	}
	d.snapMu.Lock()
	defer d.snapMu.Unlock()
	if _, err := readSnapshotMeta(snapshotIn(dir)); err == nil {
		return nil
	}
	base := filepath.Dir(dir)
	if err := os.MkdirAll(base, 0o700); err != nil {
		return err
	}
	tmp, err := os.MkdirTemp(base, ".tmp-"+filepath.Base(dir)+"-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	if _, err := d.CreateSnapshot(ctx, id, tmp); err != nil {
		return err
	}
	os.RemoveAll(dir) // an incomplete one (no snapshot.json)
	if err := os.Rename(tmp, dir); err != nil {
		return err
	}
	d.log.Info("pool template snapshotted: later warm VMs of this size are restored from it", "vm", id, "snapshot", dir,
		"vcpus", meta.VCPUs, "memory_mib", meta.MemoryMiB)
	d.pruneSnapshots(dir)
	return nil
}

// pruneSnapshots removes the snapshots of keep's size made for another
// image or firecracker binary. Clones restored from them keep running:
// their jails hold their own links.
func (d *Driver) pruneSnapshots(keep string) {
	size := filepath.Base(keep)
	size = size[:strings.LastIndex(size, "-")+1]
	old, _ := filepath.Glob(filepath.Join(filepath.Dir(keep), size+"*"))
	for _, p := range old {
		if p != keep {
			if err := os.RemoveAll(p); err == nil {
				d.log.Info("removed a snapshot of an older image or firecracker", "snapshot", p)
			}
		}
	}
}

// StartClone implements vm.WarmCloner. A clone that cannot be restored
// (e.g. a Firecracker without network_overrides) is cleaned up, its
// snapshot discarded, and ok=false makes the caller boot it instead.
func (d *Driver) StartClone(ctx context.Context, spec vm.Spec) (bool, error) {
	if !d.cloning() || !spec.Guest.Warm {
		return false, nil
	}
	dir, err := d.templateDir(spec.VCPUs, spec.MemoryMiB, spec.Image, spec.Network != nil, spec.Guest)
	if err != nil {
		return false, nil
	}
	snap := snapshotIn(dir)
	if _, err := readSnapshotMeta(snap); err != nil {
		return false, nil // none yet (or an unreadable one, replaced by the next template)
	}
	if err := d.LoadSnapshot(ctx, spec, snap, true); err != nil {
		if ctx.Err() != nil {
			return true, err
		}
		d.log.Warn("restoring a pool clone failed; discarding the snapshot and booting the VM instead", "vm", spec.ID, "snapshot", dir, "err", err)
		d.snapMu.Lock()
		os.RemoveAll(dir)
		d.snapMu.Unlock()
		return false, nil
	}
	d.log.Info("warm vm restored from its size's snapshot", "vm", spec.ID, "snapshot", dir)
	return true, nil
}
