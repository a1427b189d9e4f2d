package agent

import (
	"encoding/json"
	"fmt"
	"strings"

	"github.com/firerunner/firerunner/internal/guestconfig"
)

// Docker in the guest (docker executor; see docs/docker.md). The agent
// mounts the scratch disk as Docker's data-root, loads the Docker kernel
// modules, starts dockerd, loads the preloaded helper image and only then
// lets gitlab-runner take a job. gitlab-runner still runs as ci (the
// socket's group gives it Docker); the token still reaches it only through
// the config FIFO, and no container is given it.

// DockerSocket is the guest dockerd's API socket.
const DockerSocket = "/var/run/docker.sock"

// DockerDataRoot is where the scratch disk is mounted (dockerd's data-root).
const DockerDataRoot = "/var/lib/docker"

// DockerDaemonConfig renders /etc/docker/daemon.json.
func DockerDaemonConfig(d *guestconfig.Docker, mtu int) []byte {
	cfg := map[string]any{
		"data-root":      DockerDataRoot,
		"storage-driver": "overlay2",
		"log-level":      "warn",
		// The guest's only job: no restart policies to honour, no live
		// restore across a dockerd restart that never happens.
		"live-restore": false,
	}
	if d.RegistryMirror != "" {
		cfg["registry-mirrors"] = []string{d.RegistryMirror}
	}
	if mtu > 0 {
		cfg["mtu"] = mtu
	}
	b, _ := json.MarshalIndent(cfg, "", "  ")
	return append(b, '\n')
}

// dockerRunnerTOML writes the docker executor's part of the runner entry.
// The VM is the isolation boundary, so the job may use the VM's own Docker
// daemon (the socket is mounted into job containers: docker build and
// docker run work without privileged mode), and images are pulled only
// when absent: the helper image is preloaded, so no job pulls it.
func dockerRunnerTOML(b *strings.Builder, kv func(k, v string), d *guestconfig.Docker) {
	kv("executor", "docker")
	kv("builds_dir", "/builds")
	kv("cache_dir", "/cache")
	b.WriteString("  [runners.docker]\n")
	kv4 := func(k, v string) { fmt.Fprintf(b, "    %s = %s\n", k, tomlString(v)) }
	kv4("host", "unix://"+DockerSocket)
	kv4("image", d.DefaultImage)
	if d.HelperImage != "" {
		kv4("helper_image", d.HelperImage)
	}
	b.WriteString("    privileged = false\n")
	b.WriteString("    tls_verify = false\n")
	b.WriteString("    disable_cache = false\n")
	b.WriteString("    pull_policy = [\"if-not-present\"]\n")
	fmt.Fprintf(b, "    volumes = [%s, %s]\n", tomlString(DockerSocket+":"+DockerSocket), tomlString("/cache"))
}
