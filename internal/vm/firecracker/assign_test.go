package firecracker

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/firerunner/firerunner/internal/guestconfig"
	"github.com/firerunner/firerunner/internal/testsupport/fcstandin"
	"github.com/firerunner/firerunner/internal/vm"
)

// warmSpec is a pool's VM: no token and no command on its drive.
func (e *testEnv) warmSpec(id string) vm.Spec {
	s := e.spec(id)
	s.Guest.RunnerToken, s.Guest.GitLabURL, s.Guest.Warm = "", "", true
	s.Guest.MachineID = strings.Repeat("ab", 16)
	return s
}

func (e *testEnv) guestEvents(id string) []fcstandin.GuestEvent {
	ev, _ := fcstandin.ReadGuestEvents(filepath.Join(e.logDir, id+".guest.jsonl"))
	return ev
}

func tokenSum(tok string) string {
	s := sha256.Sum256([]byte(tok))
	return hex.EncodeToString(s[:])
}

// TestContractAssignOverVsock: a warm VM gets a vsock device (valid per
// both specs), and Assign hands the job's runner to the guest agent over
// Firecracker's guest-initiated vsock forwarding ("<uds_path>_52"); the
// stand-in guest runs the agent's own protocol code. The token reaches no
// file, and the host socket is gone afterwards.
func TestContractAssignOverVsock(t *testing.T) {
	for _, jailer := range []bool{false, true} {
		t.Run(map[bool]string{false: "direct", true: "jailer"}[jailer], func(t *testing.T) {
			e := newEnv(t, jailer)
			d := e.driver()
			ctx := context.Background()
			spec := e.warmSpec("fr-assign1")
			t.Cleanup(func() { d.Destroy(ctx, spec.ID) })
			if err := d.Start(ctx, spec); err != nil {
				t.Fatal(err)
			}
			recs := e.requests(spec.ID)
			got := calls(recs)
			if n := len(got); n < 2 || got[n-2] != "PUT /vsock" || got[n-1] != "PUT /actions" {
				t.Errorf("warm boot sequence %q; want PUT /vsock right before InstanceStart", got)
			}
			api, host := d.vsockPaths(spec.ID, jailer)
			if v := body(t, recs, "PUT /vsock"); v["uds_path"] != api || v["guest_cid"] != float64(vsockCID) || len(v) != 2 {
				t.Errorf("PUT /vsock = %v; want uds_path %s, guest_cid %d and nothing else", v, api, vsockCID)
			}
			if jailer && !strings.HasPrefix(host, d.chrootDir(spec.ID)+"/") {
				t.Errorf("vsock socket %s outside the VM's jail", host)
			}
			a := guestconfig.Assignment{GitLabURL: "https://gitlab.test", RunnerToken: testToken, JobTimeoutSec: 60}
			actx, cancel := context.WithTimeout(ctx, 20*time.Second)
			err := d.Assign(actx, spec.ID, a)
			cancel()
			if err != nil {
				t.Fatalf("Assign: %v", err)
			}
			res, err := d.Wait(ctx, spec.ID)
			if err != nil || res.ExitCode != 0 {
				t.Fatalf("Wait = %+v, %v", res, err)
			}
			ev := e.guestEvents(spec.ID)
			i := slices.IndexFunc(ev, func(x fcstandin.GuestEvent) bool { return x.Event == "assigned" })
			if i < 0 || ev[i].TokenSHA256 != tokenSum(testToken) || ev[i].GitLabURL != a.GitLabURL {
				t.Fatalf("guest events %+v; want the assignment received", ev)
			}
			if ev[i].Identity != nil || ev[i].MachineID != spec.Guest.MachineID {
				t.Errorf("a booted warm VM keeps its own identity; got %+v", ev[i])
			}
			// Only the VM's own VMM user may connect: 0600, its uid (root's
			// for an unjailed VMM, which runs as the daemon's user).
			wantUID := os.Geteuid()
			if jailer {
				wantUID = e.opts.UID
			}
			if m := ev[i].SocketMode; m&os.ModeSocket == 0 || m.Perm() != 0o600 || ev[i].SocketUID != wantUID {
				t.Errorf("assignment socket %v owned by %d; want a 0600 socket of uid %d", m, ev[i].SocketUID, wantUID)
			}
			if _, err := os.Lstat(d.assignSocket(spec.ID, fcMeta{Jailed: jailer})); err == nil {
				t.Error("the assignment socket is left after Assign")
			}
			meta, _ := d.sd.ReadMeta(spec.ID)
			e.checkNoSecretOutsideDrive(d, spec.ID, meta)
			if err := d.Destroy(ctx, spec.ID); err != nil {
				t.Fatal(err)
			}
			e.assertClean(d, spec.ID, 0)
		})
	}
}

// TestAssignTimesOut: a guest that never connects fails Assign at the
// context's deadline, and no socket is left.
func TestAssignTimesOut(t *testing.T) {
	e := newEnv(t, true)
	d := e.driver()
	ctx := context.Background()
	spec := e.warmSpec("fr-assign2")
	t.Cleanup(func() { d.Destroy(ctx, spec.ID) })
	if err := d.Start(ctx, spec); err != nil {
		t.Fatal(err)
	}
	fm, _ := d.readFCMeta(spec.ID)
	// The guest's connect is refused while the VM is paused.
	code, fault, err := apiPatchVM(ctx, fm.Socket, "Paused")
	if err != nil || code != 204 {
		t.Fatalf("pause: %d %s %v", code, fault, err)
	}
	actx, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
	defer cancel()
	err = d.Assign(actx, spec.ID, guestconfig.Assignment{GitLabURL: "https://gitlab.test", RunnerToken: testToken, JobTimeoutSec: 60})
	if err == nil || !strings.Contains(err.Error(), "did not connect") {
		t.Errorf("Assign to a guest that never connects = %v", err)
	}
	if _, err := os.Lstat(d.assignSocket(spec.ID, fm)); err == nil {
		t.Error("the assignment socket is left after a failed Assign")
	}
	cold := e.spec("fr-assign3", fcstandin.CmdHang)
	t.Cleanup(func() { d.Destroy(ctx, cold.ID) })
	if err := d.Start(ctx, cold); err != nil {
		t.Fatal(err)
	}
	if err := d.Assign(ctx, cold.ID, guestconfig.Assignment{GitLabURL: "https://gitlab.test", RunnerToken: testToken, JobTimeoutSec: 60}); err == nil {
		t.Error("Assign to a cold VM (no vsock) succeeded")
	}
	if slices.Contains(calls(e.requests(cold.ID)), "PUT /vsock") {
		t.Error("a cold VM got a vsock device")
	}
}
