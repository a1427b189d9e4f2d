package firecracker

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/firerunner/firerunner/internal/guestconfig"
	"github.com/firerunner/firerunner/internal/testsupport/fcstandin"
	"github.com/firerunner/firerunner/internal/vm"
)

// vmState asks the VMM its state (GET /: "Running", "Paused", ...).
func vmState(t testing.TB, socket string) string {
	t.Helper()
	hc := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", socket)
	}}}
	defer hc.CloseIdleConnections()
	resp, err := hc.Get("http://localhost/")
	if err != nil {
		t.Fatalf("GET /: %v", err)
	}
	defer resp.Body.Close()
	var info struct {
		State string `json:"state"`
	}
	json.NewDecoder(resp.Body).Decode(&info)
	return info.State
}

// waitWarm waits until warm VM id's guest said gitlab-runner waits for its
// config: the state a pool's snapshot is taken in.
func waitWarm(t testing.TB, d *Driver, id string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		if tl, ok := d.Timeline(id); ok {
			if _, warm := tl.At(vm.MilestoneWarm); warm {
				return
			}
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("vm %s: guest not warm within 10s", id)
}

func statOf(t testing.TB, p string) (os.FileMode, uint32, uint64) {
	t.Helper()
	fi, err := os.Lstat(p)
	if err != nil {
		t.Fatal(err)
	}
	st := fi.Sys().(*syscall.Stat_t)
	return fi.Mode(), st.Uid, st.Ino
}

// TestContractSnapshotClones: a warm VM is snapshotted and goes on running;
// two clones are restored from the snapshot while it runs, each on its own
// tap (network_overrides) with clock_realtime, each with the memory file
// root's and read-only in its jail; each gets its own identity with its
// assignment, and the source keeps its own. Every request passes both specs.
func TestContractSnapshotClones(t *testing.T) {
	for _, jailer := range []bool{false, true} {
		t.Run(map[bool]string{false: "direct", true: "jailer"}[jailer], func(t *testing.T) {
			e := newEnv(t, jailer)
			d := e.driver()
			ctx := context.Background()
			src := e.warmSpec("fr-snapsrc")
			clones := []vm.Spec{e.warmSpec("fr-clone1"), e.warmSpec("fr-clone2")}
			for i := range clones {
				clones[i].Network.MAC = []string{"02:FC:0A:00:00:03", "02:FC:0A:00:00:04"}[i]
				clones[i].Guest.MachineID = strings.Repeat([]string{"c1", "c2"}[i], 16)
			}
			t.Cleanup(func() {
				for _, s := range append(clones, src) {
					d.Destroy(ctx, s.ID)
				}
			})
			if err := d.Start(ctx, src); err != nil {
				t.Fatal(err)
			}
			waitWarm(t, d, src.ID)
			fm, _ := d.readFCMeta(src.ID)
			snapDir := filepath.Join(e.chrootBase, "snap")
			snap, err := d.CreateSnapshot(ctx, src.ID, snapDir)
			if err != nil {
				t.Fatalf("CreateSnapshot: %v", err)
			}
			if st := vmState(t, fm.Socket); st != "Running" {
				t.Errorf("source VM %s after the snapshot; want Running", st)
			}
			recs := e.requests(src.ID)
			got := slices.DeleteFunc(calls(recs), func(c string) bool { return c == "GET /" })
			if n := len(got); n < 3 || !slices.Equal(got[n-3:], []string{"PATCH /vm", "PUT /snapshot/create", "PATCH /vm"}) {
				t.Errorf("snapshot sequence = %q; want ... PATCH /vm, PUT /snapshot/create, PATCH /vm", got)
			}
			if c := body(t, recs, "PUT /snapshot/create"); c["snapshot_type"] != "Full" {
				t.Errorf("snapshot/create = %v; want a full snapshot", c)
			}
			for _, p := range []string{snap.StatePath, snap.MemPath} {
				if mode, uid, _ := statOf(t, p); mode.Perm() != 0o444 || int(uid) != os.Geteuid() {
					t.Errorf("%s: mode %v uid %d; want 0444, the daemon's (root's)", p, mode, uid)
				}
			}
			_, _, memIno := statOf(t, snap.MemPath)
			for _, c := range clones {
				if err := d.LoadSnapshot(ctx, c, snap, true); err != nil {
					t.Fatalf("LoadSnapshot %s while the source runs: %v", c.ID, err)
				}
				crecs := e.requests(c.ID)
				got := calls(crecs)
				for len(got) > 0 && got[0] == "GET /machine-config" {
					got = got[1:]
				}
				if want := []string{"PUT /logger", "PUT /metrics", "PUT /snapshot/load"}; !slices.Equal(got, want) {
					t.Errorf("restore sequence = %q, want %q", got, want)
				}
				ld := body(t, crecs, "PUT /snapshot/load")
				ov, _ := json.Marshal(ld["network_overrides"])
				if string(ov) != `[{"host_dev_name":"`+c.Network.TapName+`","iface_id":"1"}]` || ld["clock_realtime"] != true || ld["resume_vm"] != true {
					t.Errorf("snapshot/load = %v; want network_overrides to %s, clock_realtime, resume_vm", ld, c.Network.TapName)
				}
				if _, ok := ld["mem_file_path"]; ok {
					t.Errorf("snapshot/load sends the deprecated mem_file_path: %v", ld)
				}
				if jailer {
					mem := d.inJail(c.ID, jailSnapMem)
					mode, uid, ino := statOf(t, mem)
					if mode.Perm() != 0o444 || int(uid) != os.Geteuid() || ino != memIno {
						t.Errorf("clone's memory file: mode %v uid %d inode %d; want a 0444 root-owned hard link to inode %d", mode, uid, ino, memIno)
					}
					if err := syscall.Access(mem, 2); err == nil && os.Geteuid() != 0 {
						t.Errorf("clone's memory file is writable")
					}
				} else if _, ok := ld["vsock_override"]; !ok {
					t.Errorf("unjailed clone restored without vsock_override (would rebind the source's socket): %v", ld)
				}
				if tl, ok := d.Timeline(c.ID); !ok {
					t.Error("no timeline for the clone")
				} else if _, warm := tl.At(vm.MilestoneWarm); !warm {
					t.Error("a restored warm clone is not marked warm")
				}
			}
			// Each VM its own assignment and identity.
			for _, s := range append(clones, src) {
				a := guestconfig.Assignment{GitLabURL: "https://gitlab.test", RunnerToken: testToken + s.ID, JobTimeoutSec: 60}
				actx, cancel := context.WithTimeout(ctx, 20*time.Second)
				err := d.Assign(actx, s.ID, a)
				cancel()
				if err != nil {
					t.Fatalf("Assign %s: %v", s.ID, err)
				}
				if res, err := d.Wait(ctx, s.ID); err != nil || res.ExitCode != 0 {
					t.Fatalf("Wait %s = %+v, %v", s.ID, res, err)
				}
			}
			seen := map[string]string{}
			for _, s := range append(clones, src) {
				ev := e.guestEvents(s.ID)
				i := slices.IndexFunc(ev, func(x fcstandin.GuestEvent) bool { return x.Event == "assigned" })
				if i < 0 {
					t.Fatalf("%s: no assignment in %+v", s.ID, ev)
				}
				a := ev[i]
				if a.TokenSHA256 != tokenSum(testToken+s.ID) {
					t.Errorf("%s got another VM's runner", s.ID)
				}
				if a.Hostname != s.ID || a.MachineID != s.Guest.MachineID {
					t.Errorf("%s runs as %s with machine-id %s; want its own", s.ID, a.Hostname, a.MachineID)
				}
				if prev, dup := seen[a.MachineID]; dup {
					t.Errorf("%s and %s share machine-id %s", prev, s.ID, a.MachineID)
				}
				seen[a.MachineID] = s.ID
				if s.ID == src.ID {
					if a.Identity != nil || a.Restored {
						t.Errorf("the booted source got an identity: %+v", a)
					}
					continue
				}
				if !a.Restored || a.Identity == nil || a.Identity.MAC != s.Network.MAC || len(a.Identity.EntropySeed) < 32 || a.Identity.UnixTimeNano == 0 {
					t.Errorf("clone %s: %+v; want a fresh identity with its MAC, seed and clock", s.ID, a)
				}
			}
			// A warm VM's token travels over the channel only: no file has it.
			filepath.Walk(e.root, func(p string, fi os.FileInfo, err error) error {
				if err != nil || !fi.Mode().IsRegular() {
					return nil
				}
				b, _ := os.ReadFile(p)
				for _, s := range append(clones, src) {
					if bytes.Contains(b, []byte(testToken+s.ID)) {
						t.Errorf("%s's runner token is in %s", s.ID, p)
					}
				}
				return nil
			})
			for _, s := range append(clones, src) {
				if err := d.Destroy(ctx, s.ID); err != nil {
					t.Fatal(err)
				}
			}
			for _, s := range append(clones, src) {
				e.assertClean(d, s.ID, 0)
			}
			if _, err := os.Stat(snap.MemPath); err != nil {
				t.Errorf("destroying the clones removed the shared snapshot: %v", err)
			}
		})
	}
}

// TestLoadSnapshotRejectsMismatch: a snapshot restores only VMs of its own
// size, warmth and jailing; and a snapshot file not root's and read-only is
// never linked into a jail.
func TestLoadSnapshotRejectsMismatch(t *testing.T) {
	e := newEnv(t, true)
	d := e.driver()
	ctx := context.Background()
	src := e.warmSpec("fr-snapsrc")
	t.Cleanup(func() { d.Destroy(ctx, src.ID) })
	if err := d.Start(ctx, src); err != nil {
		t.Fatal(err)
	}
	waitWarm(t, d, src.ID)
	snap, err := d.CreateSnapshot(ctx, src.ID, filepath.Join(e.chrootBase, "snap"))
	if err != nil {
		t.Fatal(err)
	}
	big := e.warmSpec("fr-big")
	big.VCPUs = 4
	if err := d.LoadSnapshot(ctx, big, snap, true); err == nil {
		t.Error("a 2-vCPU snapshot restored a 4-vCPU VM")
	}
	if err := d.LoadSnapshot(ctx, e.spec("fr-cold", fcstandin.CmdHang), snap, true); err == nil {
		t.Error("a warm guest's snapshot restored a cold VM")
	}
	os.Chmod(snap.MemPath, 0o644)
	c := e.warmSpec("fr-clone9")
	t.Cleanup(func() { d.Destroy(ctx, c.ID) })
	if err := d.LoadSnapshot(ctx, c, snap, true); err == nil || !strings.Contains(err.Error(), "read-only") {
		t.Errorf("LoadSnapshot with a writable memory file = %v; want refused", err)
	}
}

// TestCreateSnapshotResumesOnError: whatever fails after the pause, the VM
// is running again when CreateSnapshot returns.
func TestCreateSnapshotResumesOnError(t *testing.T) {
	e := newEnv(t, true)
	d := e.driver()
	ctx := context.Background()
	src := e.warmSpec("fr-snaperr")
	t.Cleanup(func() { d.Destroy(ctx, src.ID) })
	if err := d.Start(ctx, src); err != nil {
		t.Fatal(err)
	}
	fm, _ := d.readFCMeta(src.ID)
	lastIsResume := func() {
		t.Helper()
		recs, _ := fcstandin.ReadLog(filepath.Join(e.logDir, src.ID+".jsonl"))
		last := recs[len(recs)-1]
		if last.Method+" "+last.Path != "PATCH /vm" || !strings.Contains(string(last.Body), "Resumed") || last.Status != 204 {
			t.Errorf("last request %s %s %s (%d); want PATCH /vm Resumed", last.Method, last.Path, last.Body, last.Status)
		}
		if st := vmState(t, fm.Socket); st != "Running" {
			t.Errorf("VM %s after a failed snapshot; want Running", st)
		}
	}
	// 1. Firecracker refuses to create it (its snapshot dir is gone).
	os.RemoveAll(d.inJail(src.ID, jailSnapDir))
	if _, err := d.CreateSnapshot(ctx, src.ID, filepath.Join(e.chrootBase, "snap1")); err == nil {
		t.Fatal("CreateSnapshot succeeded without a place to write")
	}
	lastIsResume()
	os.Mkdir(d.inJail(src.ID, jailSnapDir), 0o750)
	os.Chown(d.inJail(src.ID, jailSnapDir), e.opts.UID, e.opts.GID)
	// 2. Moving the files out fails (after the resume).
	moved := moveSnapshotFile
	t.Cleanup(func() { moveSnapshotFile = moved })
	moveSnapshotFile = func(string, string) error { return errors.New("disk full") }
	if _, err := d.CreateSnapshot(ctx, src.ID, filepath.Join(e.chrootBase, "snap2")); err == nil {
		t.Fatal("CreateSnapshot succeeded though the move failed")
	}
	lastIsResume()
	// Nothing of the failed snapshots is left in the jail or its parent.
	for _, p := range []string{d.inJail(src.ID, jailSnapMem), d.inJail(src.ID, jailSnapVM), filepath.Join(filepath.Dir(d.chrootDir(src.ID)), ".snapshot."+SnapshotMemFile)} {
		if _, err := os.Lstat(p); err == nil {
			t.Errorf("left after a failed snapshot: %s", p)
		}
	}
}

// TestSnapshotNotCopiedWhilePaused: the memory file is moved (and, across
// file systems, copied) only once the VM runs again; while it is paused
// only O(1) renames happen. /dev/shm is another file system than the
// jail's here, so the move is a real copy.
func TestSnapshotNotCopiedWhilePaused(t *testing.T) {
	e := newEnv(t, true)
	d := e.driver()
	ctx := context.Background()
	src := e.warmSpec("fr-snapcopy")
	t.Cleanup(func() { d.Destroy(ctx, src.ID) })
	if err := d.Start(ctx, src); err != nil {
		t.Fatal(err)
	}
	fm, _ := d.readFCMeta(src.ID)
	moved := moveSnapshotFile
	t.Cleanup(func() { moveSnapshotFile = moved })
	var states []string
	moveSnapshotFile = func(a, b string) error {
		states = append(states, vmState(t, fm.Socket))
		return moved(a, b)
	}
	other, err := os.MkdirTemp("/dev/shm", "fcsnap")
	if err != nil {
		t.Skip("no /dev/shm")
	}
	t.Cleanup(func() { os.RemoveAll(other) })
	snap, err := d.CreateSnapshot(ctx, src.ID, filepath.Join(other, "snap"))
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(states, []string{"Running", "Running"}) {
		t.Errorf("VM states while moving the snapshot files: %q; want Running for both", states)
	}
	for _, p := range []string{snap.StatePath, snap.MemPath} {
		if mode, uid, _ := statOf(t, p); mode.Perm() != 0o444 || int(uid) != os.Geteuid() {
			t.Errorf("%s (copied): mode %v uid %d; want 0444, root's", p, mode, uid)
		}
	}
}
