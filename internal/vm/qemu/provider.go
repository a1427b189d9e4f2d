package qemu

import (
	"context"
	"log/slog"
	"strings"

	"github.com/firerunner/firerunner/internal/config"
	"github.com/firerunner/firerunner/internal/vm"
)

// Provider is the QEMU driver's vm.Provider: it owns the qemu section of
// the configuration, the driver's doctor checks, and building a Driver from
// the configuration. The daemon adds it to its driver registry.
type Provider struct{}

var _ vm.Provider[config.Config] = Provider{}

// Name implements vm.Provider.
func (Provider) Name() string { return Name }

// Validate implements vm.Provider. qemu.accel is checked even when another
// driver is selected, so a typo never waits for the day qemu is chosen.
func (Provider) Validate(c config.Config, selected bool) []vm.FieldError {
	var errs []vm.FieldError
	if selected && c.QEMU.Binary == "" {
		errs = append(errs, vm.Fieldf("qemu.binary", "must be set"))
	}
	if selected && !c.QEMU.AllowForDevelopment {
		errs = append(errs, vm.Fieldf("vm.driver", "qemu is for development: every VM's QEMU runs as FireRunner's user (root) with no per-VM uid or cgroup, "+
			"confined only by QEMU's seccomp sandbox; use firecracker (jailed) in production, or set qemu.allow_for_development: true on a development machine"))
	}
	switch c.QEMU.Accel {
	case AccelAuto, AccelKVM, AccelTCG:
	default:
		errs = append(errs, vm.Fieldf("qemu.accel", "%q is not one of auto, kvm, tcg", c.QEMU.Accel))
	}
	if selected && strings.ContainsAny(c.StateDir, ",:") {
		errs = append(errs, vm.Fieldf("state_dir", "%q must not contain ',' or ':' with the qemu driver (QEMU option syntax)", c.StateDir))
	}
	return errs
}

const qemuFix = "apt-get install qemu-system-x86 (dnf install qemu-kvm on RHEL/Rocky) or set qemu.binary"

// Checks implements vm.Provider: the QEMU binary answers --version.
func (Provider) Checks(c config.Config) []vm.Check {
	return []vm.Check{{Name: "qemu", Run: func(ctx context.Context, h vm.CheckHost) vm.CheckResult {
		return h.BinaryVersion(ctx, c.QEMU.Binary, qemuFix)
	}}}
}

// New implements vm.Provider: a Driver from the qemu section, state_dir,
// network.mode and vm.console_log_*.
func (Provider) New(c config.Config, log *slog.Logger) (vm.Driver, error) {
	d, err := New(Options{
		Binary:        c.QEMU.Binary,
		Accel:         c.QEMU.Accel,
		StateDir:      c.StateDir,
		NetworkMode:   c.Network.Mode,
		ConsoleLogDir: c.VM.ConsoleLogDir,
		Console:       vm.NewConsolePolicy(c.VM.ConsoleLogMaxBytes, c.VM.ConsoleLogKeep, c.VM.ConsoleLogMaxAge),
		Logger:        log,
	})
	if err != nil {
		return nil, err
	}
	return d, nil
}
