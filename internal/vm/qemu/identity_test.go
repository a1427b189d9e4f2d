package qemu

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/firerunner/firerunner/internal/guestconfig"
	"github.com/firerunner/firerunner/internal/vm"
)

// TestAssignedIdentityApplied runs the agent's identity switch, what a VM
// restored from a Firecracker snapshot gets with its assignment, in a real
// guest (the assignment channel's protocol is the same with both drivers;
// here QEMU's virtio-serial port carries it). The warm guest booted as
// fr-idsrc at 10.0.2.15; the assignment names it fr-idclone at 10.0.2.16
// with another MAC and machine-id. The agent applies that before
// gitlab-runner reads its config: gitlab-runner's job request then comes
// from the new address, and its system_id is machine-id based.
func TestAssignedIdentityApplied(t *testing.T) {
	e := newRealEnv(t)
	type request struct {
		SystemID string `json:"system_id"`
	}
	reqs := make(chan request, 8)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/api/v4/jobs/request" {
			var q request
			b, _ := io.ReadAll(r.Body)
			json.Unmarshal(b, &q)
			select {
			case reqs <- q:
			default:
			}
		}
		w.WriteHeader(http.StatusNoContent) // no job
	}))
	defer srv.Close()
	port := srv.URL[strings.LastIndexByte(srv.URL, ':')+1:]
	spec := vm.Spec{ID: "fr-idsrc", VCPUs: 2, MemoryMiB: 512, Image: e.img, Timeout: bootBudget,
		Guest: guestconfig.Config{Hostname: "fr-idsrc", JobTimeoutSec: 600, WaitTimeoutSec: 600, Warm: true,
			MachineID: strings.Repeat("a", 32), EntropySeed: bytes.Repeat([]byte{1}, 32), UnixTimeNano: time.Now().UnixNano()}}
	ctx, cancel := context.WithTimeout(context.Background(), bootBudget)
	defer cancel()
	if err := e.drv.Start(ctx, spec); err != nil {
		t.Fatal(err)
	}
	defer e.drv.Destroy(context.Background(), spec.ID)
	tl, _ := e.drv.Timeline(spec.ID)
	for {
		if _, ok := tl.At(vm.MilestoneWarm); ok {
			break
		}
		if ctx.Err() != nil {
			t.Fatal("warm guest not ready in time")
		}
		time.Sleep(100 * time.Millisecond)
	}
	id := &guestconfig.Identity{Hostname: "fr-idclone", MachineID: strings.Repeat("b", 32), EntropySeed: bytes.Repeat([]byte{2}, 32),
		UnixTimeNano: time.Now().UnixNano(), MAC: "02:fc:0a:00:02:10",
		Network: &guestconfig.Network{Address: "10.0.2.16/24", Gateway: "10.0.2.2", DNS: []string{"10.0.2.3"}}}
	a := guestconfig.Assignment{GitLabURL: "http://10.0.2.2:" + port, RunnerToken: "glrt-" + strings.Repeat("i", 20), JobTimeoutSec: 600, Identity: id}
	if err := e.drv.Assign(ctx, spec.ID, a); err != nil {
		t.Fatal(err)
	}
	var q request
	select {
	case q = <-reqs:
	case <-ctx.Done():
		console, _ := os.ReadFile(e.drv.StateDir().File(spec.ID, vm.ConsoleFile))
		t.Fatalf("no job request from the renumbered guest\n%s", tail(string(console), 40))
	}
	// gitlab-runner goes on polling (no job): the console says the rest.
	console, _ := os.ReadFile(e.drv.StateDir().File(spec.ID, vm.ConsoleFile))
	if err := e.drv.Destroy(context.Background(), spec.ID); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(console), "FIRERUNNER-AGENT: identity of fr-idclone applied") || strings.Contains(string(console), "identity:") {
		t.Errorf("the agent did not apply the identity\n%s", tail(string(console), 40))
	}
	// gitlab-runner's own derivation (GenerateUniqueSystemID): "s_" and
	// the first 12 hex digits of HMAC-SHA256(machine-id, "gitlab-runner").
	sysID := func(machineID string) string {
		m := hmac.New(sha256.New, []byte(machineID))
		m.Write([]byte("gitlab-runner"))
		return "s_" + hex.EncodeToString(m.Sum(nil))[:12]
	}
	if q.SystemID != sysID(id.MachineID) {
		t.Errorf("gitlab-runner's system_id %q; want %q from the assigned machine-id (the booted one gives %q)", q.SystemID, sysID(id.MachineID), sysID(spec.Guest.MachineID))
	}
	t.Logf("job request from the renumbered guest, system_id %s", q.SystemID)
}
