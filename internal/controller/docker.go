package controller

import (
	"github.com/firerunner/firerunner/internal/config"
	"github.com/firerunner/firerunner/internal/guestconfig"
	"github.com/firerunner/firerunner/internal/vm"
)

// dockerSpec gives a VM of the docker executor its Docker settings and its
// scratch disk (cold and warm VMs alike: a warm VM starts dockerd while it
// waits for its job).
func dockerSpec(s *vm.Spec, cfg config.Config) {
	if cfg.Runners.Executor != config.ExecutorDocker {
		return
	}
	s.Guest.Docker = &guestconfig.Docker{DefaultImage: cfg.Runners.DefaultImage, RegistryMirror: cfg.Docker.RegistryMirror}
	s.ScratchDiskBytes = int64(cfg.Docker.ScratchDiskGiB) << 30
}
