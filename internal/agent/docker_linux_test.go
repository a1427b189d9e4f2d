package agent

import (
	"testing"

	"github.com/firerunner/firerunner/internal/guestconfig"
)

// With Docker the job gate listens on the VM's own address: the helper
// container reaches GitLab through the runner's URL, and a container's
// loopback is not the VM's.
func TestGateAddr(t *testing.T) {
	c := runnerConfig()
	if a := gateAddr(c); a != "127.0.0.1:0" {
		t.Errorf("shell executor: gate on %s, want loopback", a)
	}
	c.Docker = &guestconfig.Docker{DefaultImage: "busybox"}
	if a := gateAddr(c); a != "10.0.2.15:0" {
		t.Errorf("docker, user-mode network: gate on %s, want 10.0.2.15:0", a)
	}
	c.Network = &guestconfig.Network{Address: "172.30.0.7/24", Gateway: "172.30.0.1"}
	if a := gateAddr(c); a != "172.30.0.7:0" {
		t.Errorf("docker, tap network: gate on %s, want 172.30.0.7:0", a)
	}
}
