package firecracker

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"github.com/firerunner/firerunner/internal/guestconfig"
	"github.com/firerunner/firerunner/internal/vm"
)

// The assignment channel of a warm Firecracker VM is its vsock device
// (Firecracker's docs/vsock.md). The agent connects from the guest to the
// host (CID 2) on guestconfig.AssignVsockPort, retrying while nothing
// listens; Firecracker forwards such a guest-initiated connection to the
// Unix socket "<uds_path>_<port>" beside the device's uds_path. Assign
// listens there only while it hands over one assignment, so a warm VM has
// no host end to talk to before or after.
//
// uds_path is inside the VM's own directory (unjailed: its 0700 state dir;
// jailed: its jail, which only the VM's uid and root can reach), so only
// that VM's Firecracker can connect: the socket is created in a root-only
// directory, given to the VM's uid with mode 0600, and renamed into place
// (no path inside the jail, which the jail user may rewrite, is ever
// followed by root).

// vsockCID is the guest's vsock CID. Every VM may use the same: the host
// side is a Unix socket per VMM, not the host's vsock address space.
const vsockCID = 3

// jailVsock is the vsock device's uds_path inside a jail; the jail's /run
// belongs to the VM's uid, as Firecracker must bind there.
const jailVsock = "/run/" + vm.AssignFile

// DefaultAssignTimeout bounds Assign when its context has no deadline.
const DefaultAssignTimeout = 30 * time.Second

// vsockPaths are VM id's vsock uds_path as the API names it and on the host.
func (d *Driver) vsockPaths(id string, jailed bool) (api, host string) {
	if jailed {
		return jailVsock, d.inJail(id, jailVsock)
	}
	p := d.sd.File(id, vm.AssignFile)
	return p, p
}

// assignSocket is where the host end of the guest-initiated connection
// listens for VM id.
func (d *Driver) assignSocket(id string, fm fcMeta) string {
	_, host := d.vsockPaths(id, fm.Jailed)
	return host + "_" + strconv.Itoa(guestconfig.AssignVsockPort)
}

// Assign implements vm.Assigner over the VM's vsock: listen on
// "<uds_path>_52", wait for the agent's connection, send the assignment
// and wait for its "ok". A VM restored from a snapshot also gets its own
// identity with it (see cloneIdentity).
func (d *Driver) Assign(ctx context.Context, id string, a guestconfig.Assignment) error {
	meta, err := d.sd.ReadMeta(id)
	if err != nil || meta.Driver != Name {
		return fmt.Errorf("vm %s: %w", id, vm.ErrNotFound)
	}
	fm, err := d.readFCMeta(id)
	if err != nil {
		return fmt.Errorf("vm %s: %w", id, err)
	}
	if !fm.Vsock {
		return fmt.Errorf("vm %s: not a warm vm (it has no vsock device for the assignment)", id)
	}
	if !meta.Proc.Alive() {
		return fmt.Errorf("vm %s: not running", id)
	}
	if fm.Restored && a.Identity == nil {
		id, err := d.cloneIdentity(id)
		if err != nil {
			return fmt.Errorf("vm %s: clone identity: %w", meta.ID, err)
		}
		a.Identity = id
	}
	if err := a.Validate(); err != nil {
		return err
	}
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, DefaultAssignTimeout)
		defer cancel()
	}
	l, cleanup, err := d.listenAssign(id, fm)
	if err != nil {
		return fmt.Errorf("vm %s: assignment channel: %w", id, err)
	}
	defer cleanup()
	stop := context.AfterFunc(ctx, func() { l.Close() })
	defer stop()
	conn, err := l.Accept()
	if err != nil {
		if ctx.Err() != nil {
			return fmt.Errorf("vm %s: the guest agent did not connect for its assignment: %w", id, ctx.Err())
		}
		return fmt.Errorf("vm %s: assignment channel: %w", id, err)
	}
	defer conn.Close()
	// One connection only: nothing else may take the VM's assignment.
	l.Close()
	return vm.SendAssignment(ctx, conn, a)
}

// listenAssign creates the listening socket for VM id's assignment. The
// returned cleanup closes it and removes the socket file.
func (d *Driver) listenAssign(id string, fm fcMeta) (*net.UnixListener, func(), error) {
	final := d.assignSocket(id, fm)
	if len(final) >= 108 {
		return nil, nil, fmt.Errorf("socket path %s is longer than a Unix socket allows (107 bytes); shorten state_dir or chroot_base", final)
	}
	// Made in a directory only root can reach: the VM's state dir (0700)
	// or, jailed, the jail's parent directory (root's, not visible from
	// inside), on the jail's file system for the rename.
	tmpDir := d.sd.Path(id)
	if fm.Jailed {
		tmpDir = filepath.Dir(d.chrootDir(id))
	}
	tmp := filepath.Join(tmpDir, ".assign-"+strconv.Itoa(os.Getpid())+".sock")
	os.Remove(tmp)
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: tmp, Net: "unix"})
	if err != nil {
		return nil, nil, err
	}
	l.SetUnlinkOnClose(false)
	cleanup := func() {
		l.Close()
		os.Remove(tmp)
		os.Remove(final)
	}
	// Connecting needs write permission on the socket: the VMM's user only.
	if err := os.Chmod(tmp, 0o600); err != nil {
		cleanup()
		return nil, nil, err
	}
	if fm.Jailed {
		if err := os.Lchown(tmp, fm.UID, fm.GID); err != nil {
			cleanup()
			return nil, nil, err
		}
	}
	if err := os.Rename(tmp, final); err != nil {
		cleanup()
		return nil, nil, err
	}
	return l, cleanup, nil
}

// errNotClone: the VM was booted, not restored.
var errNotClone = errors.New("not restored from a snapshot")

// cloneIdentity is the identity of restored VM id: its own spec's, which
// the driver wrote to its config drive (0600, root's) when it restored it.
// The guest resumed with the snapshot source's and takes this one on.
func (d *Driver) cloneIdentity(id string) (*guestconfig.Identity, error) {
	c, err := d.readDrive(id)
	if err != nil {
		return nil, err
	}
	fm, err := d.readFCMeta(id)
	if err != nil {
		return nil, err
	}
	if !fm.Restored {
		return nil, errNotClone
	}
	ident := &guestconfig.Identity{Hostname: c.Hostname, MachineID: c.MachineID, EntropySeed: c.EntropySeed,
		UnixTimeNano: time.Now().UnixNano(), Network: c.Network, MAC: fm.GuestMAC, SystemID: c.SystemID}
	// A spec without them still gets a clone of its own: never the
	// source's machine-id or RNG state.
	if ident.Hostname == "" {
		ident.Hostname = id
	}
	if len(ident.MachineID) != 32 {
		ident.MachineID = hex.EncodeToString(randomBytes(16))
	}
	if len(ident.EntropySeed) < 32 {
		ident.EntropySeed = randomBytes(64)
	}
	return ident, nil
}

func randomBytes(n int) []byte {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return b
}

// readDrive decodes the config drive the driver wrote for VM id.
func (d *Driver) readDrive(id string) (guestconfig.Config, error) {
	f, err := os.Open(d.sd.File(id, vm.ConfigDrive))
	if err != nil {
		return guestconfig.Config{}, err
	}
	defer f.Close()
	return guestconfig.Decode(f)
}
