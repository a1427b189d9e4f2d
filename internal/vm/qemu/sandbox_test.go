package qemu

import (
	"os"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestQEMUSandboxed: a real QEMU runs a real guest inside its seccomp
// sandbox (-sandbox on,...,spawn=deny,...): the kernel reports a seccomp
// filter on the process while the guest runs, and the guest still boots,
// runs its command and powers off.
func TestQEMUSandboxed(t *testing.T) {
	e := newRealEnv(t)
	spec := e.spec("fr-sandbox1", bootBudget, "echo sandboxed-ok")
	var seccomp string
	res, console, _ := e.runVM(t, spec, func(pid int) {
		// QEMU installs its filter while it starts: watch until it is
		// there or the guest has finished (a hang guard, not a timing).
		for deadline := time.Now().Add(bootBudget); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
			status, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
			if err != nil {
				return // the VM ended
			}
			for _, l := range strings.Split(string(status), "\n") {
				if v, ok := strings.CutPrefix(l, "Seccomp:"); ok {
					seccomp = strings.TrimSpace(v)
				}
			}
			if seccomp == "2" {
				return
			}
		}
	})
	if seccomp != "2" {
		t.Errorf("qemu's Seccomp: %q; want 2 (a filter: -sandbox on)", seccomp)
	}
	if res.ExitCode != 0 || !strings.Contains(console, "sandboxed-ok") {
		t.Errorf("sandboxed guest: %+v\n%s", res, tail(console, 20))
	}
}
