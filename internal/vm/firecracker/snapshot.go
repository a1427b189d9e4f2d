package firecracker

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"syscall"

	sdk "github.com/firecracker-microvm/firecracker-go-sdk"
	"github.com/firecracker-microvm/firecracker-go-sdk/client/models"

	"github.com/firerunner/firerunner/internal/vm"
)

// Snapshot is a full Firecracker snapshot on the host: the microVM state and
// the guest memory file. It is the basis for warm starts.
type Snapshot struct {
	StatePath string `json:"state_path"`
	MemPath   string `json:"mem_path"`
}

// Snapshot file names inside a snapshot directory.
const (
	SnapshotStateFile = "vmstate"
	SnapshotMemFile   = "memory"
)

// CreateSnapshot pauses running VM id (PATCH /vm Paused), writes a full
// snapshot (PUT /snapshot/create, post-boot only and only while paused) and
// moves it into dir. The VM is resumed when resume is true, else left paused.
//
// Drive paths are recorded in the snapshot: under the jailer they are fixed
// jail paths, so any VM can restore it; without the jailer they are the
// source VM's host paths, which must still exist when restoring.
func (d *Driver) CreateSnapshot(ctx context.Context, id, dir string, resume bool) (Snapshot, error) {
	meta, err := d.sd.ReadMeta(id)
	if err != nil || meta.Driver != Name {
		return Snapshot{}, fmt.Errorf("vm %s: %w", id, vm.ErrNotFound)
	}
	if !meta.Proc.Alive() {
		return Snapshot{}, fmt.Errorf("vm %s: not running", id)
	}
	fm, err := d.readFCMeta(id)
	if err != nil {
		return Snapshot{}, err
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return Snapshot{}, err
	}
	// Firecracker writes where it can: the jail's snapshot dir (jail user)
	// or the VM dir; the files are then moved out to dir.
	apiState, apiMem := d.sd.File(id, "snapshot."+SnapshotStateFile), d.sd.File(id, "snapshot."+SnapshotMemFile)
	hostState, hostMem := apiState, apiMem
	if fm.Jailed {
		apiState, apiMem = jailSnapVM, jailSnapMem
		hostState, hostMem = d.inJail(id, jailSnapVM), d.inJail(id, jailSnapMem)
	}
	logger := sdkLogger(d.log.With("vm", id))
	client := sdk.NewClient(fm.Socket, logger, false)
	if _, err := client.PatchVM(ctx, &models.VM{State: sdk.String(models.VMStatePaused)}); err != nil {
		return Snapshot{}, fmt.Errorf("vm %s: pause: %w", id, err)
	}
	_, err = client.CreateSnapshot(ctx, &models.SnapshotCreateParams{
		SnapshotPath: sdk.String(apiState), MemFilePath: sdk.String(apiMem),
		SnapshotType: models.SnapshotCreateParamsSnapshotTypeFull,
	})
	if err != nil {
		return Snapshot{}, fmt.Errorf("vm %s: create snapshot: %w", id, err)
	}
	snap := Snapshot{StatePath: filepath.Join(dir, SnapshotStateFile), MemPath: filepath.Join(dir, SnapshotMemFile)}
	for _, mv := range [][2]string{{hostState, snap.StatePath}, {hostMem, snap.MemPath}} {
		if err := moveFile(mv[0], mv[1]); err != nil {
			return Snapshot{}, fmt.Errorf("vm %s: move snapshot out: %w", id, err)
		}
	}
	if resume {
		if _, err := client.PatchVM(ctx, &models.VM{State: sdk.String(models.VMStateResumed)}); err != nil {
			return snap, fmt.Errorf("vm %s: resume: %w", id, err)
		}
	}
	return snap, nil
}

// moveFile renames src to dst, copying when they are on different filesystems.
func moveFile(src, dst string) error {
	if err := os.Rename(src, dst); err == nil || !errors.Is(err, syscall.EXDEV) {
		return err
	}
	if _, err := placeFile(src, dst); err != nil {
		return err
	}
	return os.Remove(src)
}

// LoadSnapshot starts VM spec.ID from snap instead of booting: a fresh
// Firecracker gets its logger/metrics and then PUT /snapshot/load (nothing
// else may be configured first); the VM is resumed when resume is true.
// Devices come from the snapshot, so the network tap must have the same name
// as when it was taken (API 1.4.1 has no network_overrides).
func (d *Driver) LoadSnapshot(ctx context.Context, spec vm.Spec, snap Snapshot, resume bool) error {
	if err := validateSpec(spec); err != nil {
		return err
	}
	for _, p := range []string{snap.StatePath, snap.MemPath} {
		if _, err := os.Stat(p); err != nil {
			return fmt.Errorf("vm %s: snapshot: %w", spec.ID, err)
		}
	}
	b, err := d.newBoot(spec, "")
	if err != nil {
		return err
	}
	b.snap, b.resume = &snap, resume
	if err := b.run(ctx); err != nil {
		if b.created {
			if derr := d.Destroy(context.WithoutCancel(ctx), spec.ID); derr != nil {
				err = errors.Join(err, fmt.Errorf("cleanup: %w", derr))
			}
		}
		return fmt.Errorf("vm %s: load snapshot: %w", spec.ID, err)
	}
	return nil
}
