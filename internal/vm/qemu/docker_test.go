package qemu

import (
	"os"
	"strings"
	"testing"

	"github.com/firerunner/firerunner/internal/guestconfig"
	"github.com/firerunner/firerunner/internal/vm"
)

// TestDockerInGuest boots the real image with Docker asked for: the agent
// loads the Docker modules, mounts the per-VM scratch disk as dockerd's
// data-root, starts dockerd and loads the preloaded helper image before the
// workload runs (as ci, in the socket's group). A container on the default
// bridge network (veth, bridge, NAT through iptables-nft) reaches the host
// through the VM's NIC. The scratch disk is a sparse file in the VM's
// directory, gone with the VM.
func TestDockerInGuest(t *testing.T) {
	e := newRealEnv(t)
	spec := e.spec("fr-docker1", bootBudget, strings.Join([]string{
		"set -e",
		`echo "ID=$(id)"`,
		`docker info --format 'ROOT={{.DockerRootDir}} DRIVER={{.Driver}}'`,
		`echo "MOUNT=$(grep ' /var/lib/docker ' /proc/mounts | cut -d' ' -f1,3)"`,
		`docker images --format 'IMAGE={{.Repository}}:{{.Tag}}'`,
		`docker run --rm ` + "$(cat " + guestconfig.DockerAssetsDir + "/" + guestconfig.HelperImageNameFile + ")" + ` sh -c 'echo "CONTAINER=$(git --version) $(gitlab-runner-helper --version | head -1)"; wget -q -T 10 -O /dev/null http://10.0.2.2:1/ 2>&1 | head -1; ip route 2>/dev/null | head -1 || route -n | tail -1'`,
		`echo DOCKER-OK`,
	}, "\n"))
	spec.MemoryMiB = 1024
	spec.ScratchDiskBytes = 4 << 30
	spec.Guest.Docker = &guestconfig.Docker{DefaultImage: "busybox:latest"}
	var scratchSeen bool
	res, console, tl := e.runVM(t, spec, func(int) {
		st, err := os.Stat(e.drv.StateDir().File(spec.ID, vm.ScratchDisk))
		scratchSeen = err == nil && st.Size() == 4<<30
	})
	if res.ExitCode != 0 {
		t.Fatalf("result %+v\nconsole:\n%s", res, tail(console, 80))
	}
	if !scratchSeen {
		t.Errorf("no 4 GiB scratch disk in the VM's directory while it ran")
	}
	for _, want := range []string{
		"ROOT=/var/lib/docker DRIVER=overlay2", "MOUNT=/dev/vd", " ext4", "IMAGE=firerunner/gitlab-runner-helper:local",
		"CONTAINER=git version", "Version:", "DOCKER-OK", "groups=1000(ci),", "(docker)", guestconfig.MarkerDockerReady,
	} {
		if !strings.Contains(console, want) {
			t.Errorf("console lacks %q\n%s", want, tail(console, 80))
		}
	}
	if _, ok := tl.At(vm.MilestoneDockerReady); !ok {
		t.Errorf("timeline lacks docker ready:\n%s", tl)
	}
	printTimeline(t, spec.ID, tl)
}
