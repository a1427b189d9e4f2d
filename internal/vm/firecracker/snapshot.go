package firecracker

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"syscall"
	"time"

	sdk "github.com/firecracker-microvm/firecracker-go-sdk"

	"github.com/firerunner/firerunner/internal/vm"
)

// Snapshot is a full Firecracker snapshot on the host: the microVM state and
// the guest memory file. Both are root's and read-only (0444): Firecracker
// opens them read-only on restore and maps the memory MAP_PRIVATE, so one
// memory file backs every clone, and no clone's VMM (nor the source's) may
// be able to rewrite memory other clones run on.
type Snapshot struct {
	StatePath string `json:"state_path"`
	MemPath   string `json:"mem_path"`
}

// snapshotMeta is what the driver records beside a snapshot (0600):
// enough to restore clones that fit it.
type snapshotMeta struct {
	VCPUs     int  `json:"vcpus"`
	MemoryMiB int  `json:"memory_mib"`
	Jailed    bool `json:"jailed"`
	// Warm: taken of a warm guest waiting for its assignment, with the
	// vsock device of the assignment channel.
	Warm bool `json:"warm"`
	// Network: the source had a network interface (iface "1"), which a
	// clone must point at its own tap (network_overrides).
	Network bool      `json:"network"`
	Source  string    `json:"source"`
	Created time.Time `json:"created"`
}

// Snapshot file names inside a snapshot directory.
const (
	SnapshotStateFile = "vmstate"
	SnapshotMemFile   = "memory"
	snapshotMetaFile  = "snapshot.json"
)

// netIfaceID is the id the SDK gives the VM's one network interface.
const netIfaceID = "1"

// moveSnapshotFile moves a snapshot file from its staging place to the
// snapshot directory: a rename, or a copy across file systems. A variable
// so the tests can check it never runs while the VM is paused.
var moveSnapshotFile = moveFile

// CreateSnapshot takes a full snapshot of running VM id into dir, and the
// VM goes on running:
//  1. PATCH /vm Paused, PUT /snapshot/create (post-boot, paused only);
//  2. still paused, only O(1) steps: the files Firecracker wrote (as the
//     jail user, inside its jail) are renamed to a place only root can
//     reach and made root's and read-only, so no VMM can write them again;
//  3. PATCH /vm Resumed;
//  4. the files move into dir (a copy, if dir is on another file system,
//     happens while the VM runs, never while it is paused).
//
// Every error after the pause resumes the VM before returning: a failed
// snapshot never leaves a VM paused. Drive paths are recorded in the
// snapshot: under the jailer they are fixed jail paths, so any VM can
// restore it; without the jailer they are the source's host paths.
func (d *Driver) CreateSnapshot(ctx context.Context, id, dir string) (snap Snapshot, err error) {
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
	apiState, apiMem := d.sd.File(id, "snapshot."+SnapshotStateFile), d.sd.File(id, "snapshot."+SnapshotMemFile)
	hostState, hostMem := apiState, apiMem
	// stage is root's only: the VM dir (0700), or the jail's parent
	// directory, which the jailed VMM cannot see, on the jail's mount.
	stage := d.sd.Path(id)
	if fm.Jailed {
		apiState, apiMem = jailSnapVM, jailSnapMem
		hostState, hostMem = d.inJail(id, jailSnapVM), d.inJail(id, jailSnapMem)
		stage = filepath.Dir(d.chrootDir(id))
	}
	stState, stMem := filepath.Join(stage, ".snapshot."+SnapshotStateFile), filepath.Join(stage, ".snapshot."+SnapshotMemFile)
	for _, p := range []string{hostState, hostMem, stState, stMem} {
		os.Remove(p)
	}
	defer func() {
		for _, p := range []string{hostState, hostMem, stState, stMem} {
			os.Remove(p)
		}
	}()

	paused := false
	resume := func() error {
		if !paused {
			return nil
		}
		code, fault, rerr := apiPatchVM(context.WithoutCancel(ctx), fm.Socket, "Resumed")
		if rerr == nil && code != http.StatusNoContent {
			rerr = fmt.Errorf("HTTP %d: %s", code, fault)
		}
		if rerr != nil {
			return fmt.Errorf("vm %s: resume after snapshot: %w", id, rerr)
		}
		paused = false
		return nil
	}
	defer func() {
		if rerr := resume(); rerr != nil { // the error paths
			err = errors.Join(err, rerr)
		}
	}()
	// Set first: a pause that timed out may still have paused the VM.
	paused = true
	if code, fault, perr := apiPatchVM(ctx, fm.Socket, "Paused"); perr != nil || code != http.StatusNoContent {
		return Snapshot{}, fmt.Errorf("vm %s: pause: HTTP %d %s: %v", id, code, fault, perr)
	}
	body, _ := json.Marshal(map[string]string{"snapshot_type": "Full", "snapshot_path": apiState, "mem_file_path": apiMem})
	if code, fault, cerr := apiDoTimeout(ctx, http.MethodPut, fm.Socket, "/snapshot/create", body, snapshotTimeout(meta.MemoryMiB)); cerr != nil || code != http.StatusNoContent {
		return Snapshot{}, fmt.Errorf("vm %s: create snapshot: HTTP %d %s: %v", id, code, fault, cerr)
	}
	for _, mv := range [][2]string{{hostState, stState}, {hostMem, stMem}} {
		if err := secureFile(mv[0], mv[1]); err != nil {
			return Snapshot{}, fmt.Errorf("vm %s: snapshot file: %w", id, err)
		}
	}
	if err := resume(); err != nil {
		return Snapshot{}, err
	}
	snap = Snapshot{StatePath: filepath.Join(dir, SnapshotStateFile), MemPath: filepath.Join(dir, SnapshotMemFile)}
	for _, mv := range [][2]string{{stState, snap.StatePath}, {stMem, snap.MemPath}} {
		os.Remove(mv[1])
		if err := moveSnapshotFile(mv[0], mv[1]); err != nil {
			return Snapshot{}, fmt.Errorf("vm %s: move snapshot out: %w", id, err)
		}
		if err := os.Chmod(mv[1], 0o444); err != nil { // a copy's mode
			return Snapshot{}, err
		}
	}
	sm := snapshotMeta{VCPUs: meta.VCPUs, MemoryMiB: meta.MemoryMiB, Jailed: fm.Jailed, Warm: fm.Vsock, Network: meta.Network != nil, Source: id, Created: time.Now()}
	b, _ := json.Marshal(sm)
	if err := os.WriteFile(filepath.Join(dir, snapshotMetaFile), b, 0o600); err != nil {
		return Snapshot{}, err
	}
	return snap, nil
}

// snapshotTimeout bounds PUT /snapshot/create: Firecracker writes the whole
// guest memory; 10 s plus 10 s per GiB is far above any disk's time.
func snapshotTimeout(memMiB int) time.Duration {
	return 10*time.Second + time.Duration((memMiB+1023)/1024)*10*time.Second
}

// secureFile moves a file Firecracker just wrote (as the jail user) to dst
// in a root-only directory on the same file system, and makes it root's and
// read-only. It is O(1) (the VM is paused meanwhile). The source path is in
// a directory the jail user owns: it is never followed (Lstat, rename), and
// only a regular file with one link is taken.
func secureFile(src, dst string) error {
	fi, err := os.Lstat(src)
	if err != nil {
		return err
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !fi.Mode().IsRegular() || !ok || st.Nlink != 1 {
		return fmt.Errorf("%s is not a regular file of its own (mode %v)", src, fi.Mode())
	}
	if err := os.Rename(src, dst); err != nil {
		return err
	}
	// Root's in production; the daemon's own user where tests run unprivileged.
	if err := os.Lchown(dst, os.Geteuid(), os.Getegid()); err != nil {
		return err
	}
	return os.Chmod(dst, 0o444)
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

// readSnapshotMeta reads what CreateSnapshot recorded beside snap.
func readSnapshotMeta(snap Snapshot) (snapshotMeta, error) {
	var m snapshotMeta
	b, err := os.ReadFile(filepath.Join(filepath.Dir(snap.StatePath), snapshotMetaFile))
	if err != nil {
		return m, err
	}
	return m, json.Unmarshal(b, &m)
}

// LoadSnapshot starts VM spec.ID from snap instead of booting: a fresh
// Firecracker gets its logger and metrics, then PUT /snapshot/load (nothing
// else may be configured first); the VM is resumed when resume is true.
//
// The devices come back from the snapshot and reopen their host files:
//   - drives and the vsock socket by their paths, which under the jailer
//     are the same jail paths in every jail (so each clone opens its own);
//   - the network interface by its tap, which the request points at the
//     clone's own (network_overrides, API 1.12+): without it a clone
//     reopens its source's tap;
//   - the memory file is hard-linked into the jail, root's and read-only.
//
// clock_realtime (x86_64) advances the guest's kvmclock by the time since
// the snapshot. Both fields are sent raw: the SDK's API 1.4.1 models lack
// them.
func (d *Driver) LoadSnapshot(ctx context.Context, spec vm.Spec, snap Snapshot, resume bool) error {
	if err := validateSpec(spec); err != nil {
		return err
	}
	for _, p := range []string{snap.StatePath, snap.MemPath} {
		if _, err := os.Stat(p); err != nil {
			return fmt.Errorf("vm %s: snapshot: %w", spec.ID, err)
		}
	}
	sm, err := readSnapshotMeta(snap)
	if err != nil {
		return fmt.Errorf("vm %s: snapshot: %w", spec.ID, err)
	}
	if sm.VCPUs != spec.VCPUs || sm.MemoryMiB != spec.MemoryMiB {
		return fmt.Errorf("vm %s: snapshot of a %d-vCPU %d MiB VM cannot restore a %d-vCPU %d MiB one", spec.ID, sm.VCPUs, sm.MemoryMiB, spec.VCPUs, spec.MemoryMiB)
	}
	if sm.Jailed != d.opts.UseJailer {
		return fmt.Errorf("vm %s: snapshot taken with use_jailer=%v cannot be restored with use_jailer=%v (its device paths differ)", spec.ID, sm.Jailed, d.opts.UseJailer)
	}
	if sm.Network != (spec.Network != nil) {
		return fmt.Errorf("vm %s: the snapshot's network interface and the spec's do not match", spec.ID)
	}
	if sm.Warm != spec.Guest.Warm {
		return fmt.Errorf("vm %s: a snapshot of a warm guest restores warm VMs only (and the other way round)", spec.ID)
	}
	b, err := d.newBoot(spec, "")
	if err != nil {
		return err
	}
	b.snap, b.snapMeta, b.resume = &snap, &sm, resume
	if err := b.run(ctx); err != nil {
		if b.created {
			if derr := d.Destroy(context.WithoutCancel(ctx), spec.ID); derr != nil {
				err = errors.Join(err, fmt.Errorf("cleanup: %w", derr))
			}
		}
		return fmt.Errorf("vm %s: load snapshot: %w", spec.ID, err)
	}
	if sm.Warm && resume {
		// The guest resumed where its source was: gitlab-runner waiting
		// for its config (the source printed the marker before).
		b.vr.tl.Mark(vm.MilestoneWarm)
	}
	return nil
}

// loadSnapshot is the restore step: PUT /snapshot/load, raw.
func (b *boot) loadSnapshot(ctx context.Context, m *sdk.Machine) error {
	req := map[string]any{
		"snapshot_path": m.Cfg.Snapshot.SnapshotPath,
		"mem_backend":   map[string]string{"backend_type": "File", "backend_path": sdk.StringValue(m.Cfg.Snapshot.MemBackend.BackendPath)},
		"resume_vm":     b.resume,
	}
	if n := b.spec.Network; n != nil {
		req["network_overrides"] = []map[string]string{{"iface_id": netIfaceID, "host_dev_name": n.TapName}}
	}
	if runtime.GOARCH == "amd64" {
		req["clock_realtime"] = true
	}
	if b.snapMeta != nil && b.snapMeta.Warm && !b.jailed {
		// Unjailed, the vsock socket path is the source's host path.
		api, _ := b.d.vsockPaths(b.spec.ID, false)
		req["vsock_override"] = map[string]string{"uds_path": api}
	}
	body, _ := json.Marshal(req)
	code, fault, err := apiDoTimeout(ctx, http.MethodPut, b.socket, "/snapshot/load", body, 60*time.Second)
	if err != nil {
		return fmt.Errorf("PUT /snapshot/load: %w", err)
	}
	if code != http.StatusNoContent {
		return fmt.Errorf("PUT /snapshot/load: HTTP %d: %s", code, fault)
	}
	return nil
}

// apiPatchVM sends PATCH /vm {"state": state} (Paused, Resumed).
func apiPatchVM(ctx context.Context, socket, state string) (int, string, error) {
	return apiDo(ctx, http.MethodPatch, socket, "/vm", []byte(`{"state":"`+state+`"}`))
}

// readOnlyRoot refuses a snapshot file that is not root's and read-only:
// linked into a jail, its owner could rewrite every clone's memory.
func readOnlyRoot(path string) error {
	fi, err := os.Lstat(path)
	if err != nil {
		return err
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !fi.Mode().IsRegular() || !ok || int(st.Uid) != os.Geteuid() || fi.Mode().Perm()&0o222 != 0 {
		return fmt.Errorf("snapshot file %s must be a regular file, root's and read-only (mode %v)", path, fi.Mode())
	}
	return nil
}
