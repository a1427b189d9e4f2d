package qemu

import (
	"context"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/firerunner/firerunner/internal/guestconfig"
	"github.com/firerunner/firerunner/internal/image"
	"github.com/firerunner/firerunner/internal/testenv"
	"github.com/firerunner/firerunner/internal/testsupport/registry"
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
	// The image's Docker seed (when it has one) already holds the helper
	// image: the VM does not docker load it.
	if e.img.DockerSeed != "" && !strings.Contains(console, "is on the scratch disk (docker seed)") {
		t.Errorf("the image has a docker seed, but the VM loaded the helper image itself:\n%s", tail(console, 80))
	}
	printTimeline(t, spec.ID, tl)
}

// BenchmarkDocker (make bench-docker) boots the real image with Docker and
// a registry mirror (docker-registry pull-through cache in front of a local
// Docker Hub stand-in, as in the tests) and prints a table: VM start to
// Docker ready (dockerd answering, helper image loaded), an image pull with
// the mirror's cache cold (fetched from the upstream) and warm (what every
// later VM gets), a container start, and a docker build of a small
// Dockerfile. Timings inside the guest come from GNU date around each step.
func BenchmarkDocker(b *testing.B) {
	testenv.RequireRoot(b)
	bin := testenv.QEMU(b)
	if err := registry.Check(); err != nil {
		testenv.Missing(b, err.Error(), "run make deps")
	}
	m, err := image.Load(testenv.ImageDir(b))
	if err != nil {
		b.Fatal(err)
	}
	d, err := New(Options{Binary: bin, Accel: AccelAuto, StateDir: b.TempDir(), NetworkMode: "user"})
	if err != nil {
		b.Fatal(err)
	}
	ctx := context.Background()
	for b.Loop() {
		mirror, err := registry.StartMirror(ctx, b.TempDir(), 0)
		if err != nil {
			b.Fatal(err)
		}
		_, port, _ := net.SplitHostPort(mirror.Mirror.Addr)
		big := registry.ImageDockerCLI // ~17 MB compressed: a pull worth timing
		script := strings.Join([]string{
			"set -e",
			`step() { name=$1; shift; s=$(date +%s%N); "$@" >/dev/null; e=$(date +%s%N); echo "BENCH $name $(( (e - s) / 1000000 ))"; }`,
			"step pull_cold_mirror docker pull " + big,
			"docker rmi " + big + " >/dev/null",
			"step pull_warm_mirror docker pull " + big,
			"step pull_small_cold docker pull " + registry.ImageBusybox,
			"step container_run docker run --rm " + registry.ImageBusybox + " true",
			"mkdir -p /tmp/ctx && printf 'FROM " + registry.ImageBusybox + "\\nRUN echo hi > /hi\\nCMD cat /hi\\n' > /tmp/ctx/Dockerfile",
			"step docker_build docker build -q -t bench:1 /tmp/ctx",
			"step container_run_built docker run --rm bench:1",
		}, "\n")
		spec := vm.Spec{ID: "fr-dbench", VCPUs: 2, MemoryMiB: 2048, Image: m.VMImage(), Timeout: 10 * time.Minute,
			ScratchDiskBytes: 8 << 30,
			Guest: guestconfig.Config{JobTimeoutSec: 600, Command: []string{"/bin/bash", "-c", script},
				Docker: &guestconfig.Docker{DefaultImage: registry.ImageBusybox, RegistryMirror: "http://10.0.2.2:" + port}}}
		if err := d.Start(ctx, spec); err != nil {
			b.Fatal(err)
		}
		tl, _ := d.Timeline(spec.ID)
		res, err := d.Wait(ctx, spec.ID)
		console, _ := os.ReadFile(res.ConsoleLog)
		if derr := d.Destroy(ctx, spec.ID); derr != nil {
			b.Fatal(derr)
		}
		mirror.Close()
		if err != nil || res.ExitCode != 0 {
			b.Fatalf("bench VM: %+v %v\n%s", res, err, tail(string(console), 60))
		}
		ready, ok := tl.Between(vm.MilestoneVMMStarted, vm.MilestoneDockerReady)
		if !ok {
			b.Fatalf("no docker ready milestone:\n%s", tl)
		}
		agent, _ := tl.Between(vm.MilestoneVMMStarted, vm.MilestoneAgentStart)
		rows := [][2]string{
			{"VM start -> guest agent", fmt.Sprintf("%.2f s", agent.Seconds())},
			{"VM start -> Docker ready (dockerd up, helper image loaded)", fmt.Sprintf("%.2f s", ready.Seconds())},
		}
		if i := strings.Index(string(console), guestconfig.MarkerDockerReady); i >= 0 {
			line := string(console[i:])
			line = line[:strings.IndexByte(line, '\n')]
			rows = append(rows, [2]string{"  of which (guest)", strings.TrimSpace(strings.TrimPrefix(line, guestconfig.MarkerDockerReady))})
		}
		names := map[string]string{
			"pull_cold_mirror":    "pull " + big + ", mirror cache cold (from upstream)",
			"pull_warm_mirror":    "pull " + big + ", from the mirror's cache",
			"pull_small_cold":     "pull " + registry.ImageBusybox + " (1 MB), mirror cache cold",
			"container_run":       "docker run --rm busybox true",
			"docker_build":        "docker build (FROM busybox, one RUN)",
			"container_run_built": "docker run --rm of the built image",
		}
		for _, l := range strings.Split(string(console), "\n") {
			f := strings.Fields(strings.TrimSpace(l))
			if len(f) == 3 && f[0] == "BENCH" {
				ms, _ := strconv.Atoi(f[2])
				rows = append(rows, [2]string{names[f[1]], fmt.Sprintf("%.2f s", float64(ms)/1000)})
				b.ReportMetric(float64(ms)/1000, f[1]+"_s")
			}
		}
		b.ReportMetric(ready.Seconds(), "docker_ready_s")
		var sb strings.Builder
		fmt.Fprintf(&sb, "\nDocker in a FireRunner VM (2 vCPU, 2 GiB, accel %s):\n", accelOf(string(console)))
		for _, r := range rows {
			fmt.Fprintf(&sb, "  %-62s %10s\n", r[0], r[1])
		}
		fmt.Print(sb.String())
	}
}

func accelOf(console string) string {
	if strings.Contains(console, "tsc_early_khz") {
		return "tcg"
	}
	return "kvm"
}
