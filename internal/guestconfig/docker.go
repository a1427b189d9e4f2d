package guestconfig

import (
	"errors"
	"fmt"
	"net/url"
	"strings"
)

// Docker asks the guest to run a Docker engine and gitlab-runner's docker
// executor. nil: the shell executor, no Docker.
type Docker struct {
	// DefaultImage is the runner's image for jobs without `image:`.
	DefaultImage string `json:"default_image"`
	// RegistryMirror is dockerd's registry-mirrors entry ("" none).
	RegistryMirror string `json:"registry_mirror,omitempty"`
	// HelperImage is the preloaded helper image's name, filled in by the
	// guest agent from the image (never sent by the host).
	HelperImage string `json:"-"`
}

// Validate reports the first problem with the Docker settings.
func (d *Docker) Validate() error {
	if d == nil {
		return nil
	}
	if strings.TrimSpace(d.DefaultImage) == "" || strings.ContainsAny(d.DefaultImage, " \t\n\"\\") {
		return fmt.Errorf("guest config: docker default_image %q is not an image reference", d.DefaultImage)
	}
	if d.RegistryMirror != "" {
		u, err := url.Parse(d.RegistryMirror)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			return fmt.Errorf("guest config: docker registry_mirror %q is not an http(s) URL", d.RegistryMirror)
		}
	}
	return nil
}

// The per-VM scratch disk (Docker's data-root): a sparse file on the host
// that the drivers format as ext4 with this label and attach read-write as
// one more virtio-blk device; it is destroyed with the VM.
const ScratchLabel = "frscratch"

// Where internal/image puts the guest's Docker assets, and their names.
const (
	// DockerAssetsDir holds the helper image and the Docker kernel modules.
	DockerAssetsDir = "/usr/local/share/firerunner/docker"
	// HelperImageTar is the `docker save` archive of the gitlab-runner
	// helper image, loaded by the agent before gitlab-runner starts.
	HelperImageTar = "helper-image.tar"
	// HelperImageNameFile holds the helper image's name:tag.
	HelperImageNameFile = "helper-image.name"
	// DockerModulesOrder lists modules/*.ko in load order.
	DockerModulesOrder = "modules.order"
)

// Console markers of the Docker start-up (for timelines and tests).
const (
	// MarkerDockerReady: dockerd answers and the helper image is loaded.
	MarkerDockerReady = "FIRERUNNER-DOCKER-READY"
	// MarkerDockerSeeded: a DockerSeed boot stopped dockerd and unmounted
	// the scratch disk cleanly.
	MarkerDockerSeeded = "FIRERUNNER-DOCKER-SEEDED"
)

// ErrNoScratch means a Docker VM came up without its scratch disk.
var ErrNoScratch = errors.New("no scratch disk (label " + ScratchLabel + ")")
