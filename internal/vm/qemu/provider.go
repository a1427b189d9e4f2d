package qemu

import (
	"context"
	"fmt"
	"log/slog"
	"os/exec"
	"strings"

	"github.com/firerunner/firerunner/internal/config"
	"github.com/firerunner/firerunner/internal/image"
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

// Checks implements vm.Provider: the QEMU binary answers --version, and
// kvm-guest says which accelerator jobs get and why.
func (Provider) Checks(c config.Config) []vm.Check {
	return []vm.Check{
		{Name: "qemu", Run: func(ctx context.Context, h vm.CheckHost) vm.CheckResult {
			return h.BinaryVersion(ctx, c.QEMU.Binary, qemuFix)
		}},
		{Name: "kvm-guest", Run: func(ctx context.Context, h vm.CheckHost) vm.CheckResult {
			return accelCheck(ctx, h, c)
		}},
	}
}

const kvmGuestFix = "use a host whose KVM runs guests (bare metal, or a VM with nested VT-x/AMD-V exposed); on this host jobs run several times slower under TCG"

// accelCheck runs the driver's own boot probe (probeKVMOn, as accel: auto
// does before the first VM) on the image's real kernel: a tiny guest that
// only halts runs fine on nested KVM that hangs Linux guests, so nothing
// less tells which accelerator jobs get.
func accelCheck(ctx context.Context, h vm.CheckHost, c config.Config) vm.CheckResult {
	if c.QEMU.Accel == AccelTCG {
		return vm.CheckResult{Status: vm.CheckPass, Detail: "jobs get TCG (software emulation): qemu.accel is tcg, so KVM is not probed"}
	}
	m, err := image.Load(c.VM.ImageDir)
	if err != nil {
		return vm.CheckResult{Status: vm.CheckSkip, Detail: fmt.Sprintf("skipped: no guest kernel to boot (see the image check): %v", err)}
	}
	bin, err := exec.LookPath(c.QEMU.Binary)
	if err != nil {
		return vm.CheckResult{Status: vm.CheckSkip, Detail: fmt.Sprintf("skipped: no QEMU to boot the guest kernel with (see the qemu check): %v", err)}
	}
	kernel := m.VMImage().Kernel
	r := probeKVMOn(ctx, h, bin, kernel)
	switch {
	case r.accel == AccelKVM:
		return vm.CheckResult{Status: vm.CheckPass, Detail: fmt.Sprintf("jobs get KVM (qemu.accel %s): the guest kernel %s booted under KVM to its root-mount panic", c.QEMU.Accel, kernel)}
	case c.QEMU.Accel == AccelKVM:
		return vm.CheckResult{Status: vm.CheckFail, Fix: "set qemu.accel: auto (TCG where KVM cannot run guests), or " + kvmGuestFix,
			Detail: fmt.Sprintf("qemu.accel is kvm, but KVM cannot boot the guest kernel %s, so jobs would never start: %s", kernel, r.reason)}
	default:
		return vm.CheckResult{Status: vm.CheckWarn, Fix: kvmGuestFix,
			Detail: fmt.Sprintf("jobs get TCG (software emulation), not KVM: %s", r.reason)}
	}
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
