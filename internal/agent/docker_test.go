package agent

import (
	"encoding/json"
	"strings"
	"testing"

	"github.com/firerunner/firerunner/internal/guestconfig"
)

// The docker executor's runner entry: preloaded helper image, no pulls of
// present images, the VM's socket for jobs, no privileged mode; the token
// appears exactly once (the FIFO's config), never in a volume or image.
func TestRunnerConfigTOMLDocker(t *testing.T) {
	c := runnerConfig()
	c.Docker = &guestconfig.Docker{DefaultImage: "debian:bookworm-slim", RegistryMirror: "http://172.30.0.1:5000",
		HelperImage: "firerunner/gitlab-runner-helper:local"}
	toml := string(RunnerConfigTOML(c))
	for _, want := range []string{
		`executor = "docker"`, `builds_dir = "/builds"`, "[runners.docker]",
		`host = "unix:///var/run/docker.sock"`, `image = "debian:bookworm-slim"`,
		`helper_image = "firerunner/gitlab-runner-helper:local"`, `pull_policy = ["if-not-present"]`,
		"privileged = false", `volumes = ["/var/run/docker.sock:/var/run/docker.sock", "/cache"]`,
	} {
		if !strings.Contains(toml, want) {
			t.Errorf("config lacks %s:\n%s", want, toml)
		}
	}
	if strings.Contains(toml, `executor = "shell"`) || strings.Count(toml, secret) != 1 {
		t.Errorf("config:\n%s", toml)
	}
	// A hostile image name cannot add keys.
	c.Docker.DefaultImage = "x\"\n    privileged = true\n#"
	if toml := string(RunnerConfigTOML(c)); strings.Count(toml, "\n    privileged =") != 1 || strings.Count(toml, "\n") != strings.Count(string(RunnerConfigTOML(runnerConfigDocker())), "\n") {
		t.Fatalf("injection:\n%s", toml)
	}
}

func TestDockerDaemonConfig(t *testing.T) {
	var m map[string]any
	if err := json.Unmarshal(DockerDaemonConfig(&guestconfig.Docker{DefaultImage: "x", RegistryMirror: "http://10.0.2.2:5000"}, 1400), &m); err != nil {
		t.Fatal(err)
	}
	if m["data-root"] != DockerDataRoot || m["storage-driver"] != "overlay2" || m["mtu"] != float64(1400) {
		t.Errorf("daemon.json: %v", m)
	}
	if mr, _ := m["registry-mirrors"].([]any); len(mr) != 1 || mr[0] != "http://10.0.2.2:5000" {
		t.Errorf("registry-mirrors: %v", m["registry-mirrors"])
	}
	m = nil
	if err := json.Unmarshal(DockerDaemonConfig(&guestconfig.Docker{DefaultImage: "x"}, 0), &m); err != nil {
		t.Fatal(err)
	}
	if _, ok := m["registry-mirrors"]; ok {
		t.Errorf("no mirror configured, but daemon.json has one: %v", m)
	}
}

func runnerConfigDocker() guestconfig.Config {
	c := runnerConfig()
	c.Docker = &guestconfig.Docker{DefaultImage: "busybox", HelperImage: "firerunner/gitlab-runner-helper:local"}
	return c
}
