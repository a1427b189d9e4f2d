// Package vm defines the small interface every VM driver (qemu, firecracker)
// implements, the per-VM Spec the controller hands it, and the driver registry.
package vm

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"time"

	"github.com/firerunner/firerunner/internal/guestconfig"
)

// Spec is everything a driver needs to boot one VM. It is a plain struct
// with Validate(), in the style of firecracker-go-sdk's Config.
type Spec struct {
	// ID names the VM on the host (state dir, tap, process tags). It must match
	// IDPattern so it is safe in file names and interface names.
	ID string
	// VCPUs and MemoryMiB come from the job's size tag.
	VCPUs     int
	MemoryMiB int
	// Image holds the guest artefacts shared by every VM (never modified).
	Image Image
	// Guest is written to the per-VM read-only config drive (0600). It carries
	// the runner token, which therefore never reaches argv or a kernel cmdline.
	Guest guestconfig.Config
	// Network attaches the VM to a tap device; nil means the driver's
	// development networking (QEMU user-mode) or none.
	Network *NetAttachment
	// Timeout is the hard deadline after which the driver kills the VM.
	// Zero means no driver-side deadline.
	Timeout time.Duration
	// ScratchDiskBytes, when > 0, gives the VM a per-VM read-write scratch
	// disk of that size (ScratchDisk: sparse, ext4, destroyed with the VM).
	ScratchDiskBytes int64
}

// Image is the location of one built guest image (see internal/image).
type Image struct {
	Kernel string // ELF vmlinux (Firecracker, QEMU PVH boot)
	Initrd string // initramfs (busybox + modules), mounts root, switch_root
	Rootfs string // ext4, attached read-only; the guest overlays a tmpfs on it
	// DockerSeed, when set, is the image's Docker seed (ext4 with the
	// helper image loaded): scratch disks start as a copy of it.
	DockerSeed string
}

// NetAttachment is a tap device prepared by internal/netsetup.
type NetAttachment struct {
	TapName string
	MAC     string
	// UID and GID, when not 0, are this VM's own VMM user (a per-VM uid
	// from a configured range), which the tap belongs to; 0 = the driver's
	// default user.
	UID, GID int
}

// IDPattern documents the allowed VM id shape: "fr-" plus up to 12 lowercase
// letters or digits, so "fr-<id>" fits an interface name (15 bytes).
const IDPattern = `^fr-[a-z0-9]{1,12}$`

// Validate reports the first problem with the spec.
func (s Spec) Validate() error {
	if !validID(s.ID) {
		return fmt.Errorf("vm id %q: must match %s", s.ID, IDPattern)
	}
	if s.VCPUs < 1 {
		return fmt.Errorf("vm %s: vcpus must be >= 1, got %d", s.ID, s.VCPUs)
	}
	if s.MemoryMiB < 128 {
		return fmt.Errorf("vm %s: memory must be >= 128 MiB, got %d", s.ID, s.MemoryMiB)
	}
	if s.Image.Kernel == "" || s.Image.Initrd == "" || s.Image.Rootfs == "" {
		return fmt.Errorf("vm %s: image kernel, initrd and rootfs are required", s.ID)
	}
	if s.ScratchDiskBytes < 0 || (s.ScratchDiskBytes > 0 && s.ScratchDiskBytes < 64<<20) {
		return fmt.Errorf("vm %s: scratch disk of %d bytes: 0 (none) or at least 64 MiB", s.ID, s.ScratchDiskBytes)
	}
	if s.Guest.Docker != nil && s.ScratchDiskBytes == 0 {
		return fmt.Errorf("vm %s: a Docker guest needs a scratch disk (ScratchDiskBytes)", s.ID)
	}
	return s.Guest.Validate()
}

func validID(id string) bool {
	if len(id) < 4 || len(id) > 15 || id[:3] != "fr-" {
		return false
	}
	for _, c := range id[3:] {
		if (c < 'a' || c > 'z') && (c < '0' || c > '9') {
			return false
		}
	}
	return true
}

// Result is how a VM ended.
type Result struct {
	// ExitCode is the guest workload's exit status as reported by the agent on
	// the console (guestconfig.ExitMarker); -1 when the guest never reported one.
	ExitCode int
	// Reason is empty on a clean power-off, else why the VM ended
	// ("timeout", "killed", "vmm exited: ...").
	Reason string
	// ConsoleLog is the path of the serial console log (removed on Destroy).
	ConsoleLog string
}

// Instance is a VM found on the host, for reconciliation.
type Instance struct {
	ID  string
	PID int // 0 when no VMM process is alive (only files are left)
}

// Driver runs microVMs. Every method is safe to call again (idempotent), and
// Wait/Destroy/List work on VMs started by an earlier FireRunner process.
type Driver interface {
	// Name is the driver's name, its Provider's ("qemu", "firecracker", "fake").
	Name() string
	// Start prepares per-VM files and starts the VMM; it returns once the VMM
	// process runs (not when the guest has booted).
	Start(ctx context.Context, spec Spec) error
	// Wait blocks until the VM has stopped (or ctx ends) and reports how.
	Wait(ctx context.Context, id string) (Result, error)
	// Destroy kills the VMM if alive and removes everything the VM made on
	// the host (state dir, overlay, config drive, sockets, logs). Destroying an
	// unknown id is not an error.
	Destroy(ctx context.Context, id string) error
	// List returns the VMs this driver has on the host, alive or not.
	List(ctx context.Context) ([]Instance, error)
}

// ErrNotFound is returned by Wait for an id the driver does not know.
var ErrNotFound = errors.New("vm not found")

// AssignFile is the assignment channel's host end inside the VM's state
// dir: a Unix socket (QEMU: the virtio-serial port's chardev; Firecracker:
// the vsock device's uds_path prefix).
const AssignFile = "assign.sock"

// Assigner is a driver that can boot warm VMs (Spec.Guest.Warm) and hand
// such a VM its job's runner later, over a host→guest channel only that VM
// can read: the guest config with the token never touches argv, a kernel
// command line, the config drive or the store.
type Assigner interface {
	// Assign delivers a to warm VM id and returns once the guest agent
	// has acknowledged it (or ctx ends).
	Assign(ctx context.Context, id string, a guestconfig.Assignment) error
}

// WarmCloner is a driver that can refill a pool by restoring a snapshot of
// a booted warm guest of the same size instead of booting one
// (Firecracker). The controller uses it where the driver has it; a driver
// without it, or a size without a snapshot, boots warm VMs cold.
type WarmCloner interface {
	// SnapshotWarm makes warm VM id, whose guest reported ready, the
	// template of its size: a snapshot later clones are restored from. The
	// VM goes on running (paused only while the snapshot is written). It
	// does nothing when the size already has one, or the driver clones
	// nothing (turned off, or not possible).
	SnapshotWarm(ctx context.Context, id string) error
	// StartClone starts warm VM spec from its size's snapshot; ok=false
	// (no error) when there is none that fits: the caller boots it (Start).
	// A clone gets its own identity with its assignment (Assigner).
	StartClone(ctx context.Context, spec Spec) (ok bool, err error)
}

// SendAssignment is the host side of the assignment protocol on an open
// stream to the guest agent: one JSON object and a newline; the agent
// answers "ok\n" once it has read and accepted it.
func SendAssignment(ctx context.Context, conn net.Conn, a guestconfig.Assignment) error {
	if err := a.Validate(); err != nil {
		return err
	}
	if dl, ok := ctx.Deadline(); ok {
		_ = conn.SetDeadline(dl)
	}
	stop := context.AfterFunc(ctx, func() { _ = conn.SetDeadline(time.Now()) })
	defer stop()
	b, err := json.Marshal(a)
	if err != nil {
		return err
	}
	if _, err := conn.Write(append(b, '\n')); err != nil {
		return fmt.Errorf("send assignment: %w", err)
	}
	ack := make([]byte, 3)
	if _, err := io.ReadFull(conn, ack); err != nil || string(ack) != "ok\n" {
		return fmt.Errorf("assignment not acknowledged by the guest (%q): %v", ack, err)
	}
	return nil
}
