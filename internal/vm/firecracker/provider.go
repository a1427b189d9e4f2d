package firecracker

import (
	"context"
	"log/slog"
	"net/netip"
	"path/filepath"
	"strings"

	"github.com/firerunner/firerunner/internal/config"
	"github.com/firerunner/firerunner/internal/vm"
)

// Provider is the Firecracker driver's vm.Provider: it owns the firecracker
// section of the configuration, the driver's doctor checks (firecracker and
// jailer binaries), and building a Driver from the configuration. The
// daemon adds it to its driver registry.
type Provider struct{}

var (
	_ vm.Provider[config.Config]     = Provider{}
	_ vm.VMMUser[config.Config]      = Provider{}
	_ vm.VMMUserRange[config.Config] = Provider{}
)

// Name implements vm.Provider.
func (Provider) Name() string { return Name }

// Validate implements vm.Provider. The section is checked only when
// Firecracker is selected; the jailer fields only when use_jailer is on.
// The checks are those New would fail on, reported at load time with the
// file's field names.
func (Provider) Validate(c config.Config, selected bool) []vm.FieldError {
	if !selected {
		return nil
	}
	var errs []vm.FieldError
	bad := func(field, format string, a ...any) { errs = append(errs, vm.Fieldf(field, format, a...)) }
	f := c.Firecracker
	if f.Binary == "" {
		bad("firecracker.binary", "must be set")
	}
	if c.Network.Mode == "user" {
		bad("network.mode", "user-mode networking is QEMU-only; firecracker needs tap")
	}
	if c.StateDir != "" && !filepath.IsAbs(c.StateDir) {
		bad("state_dir", "%q must be an absolute path with the firecracker driver", c.StateDir)
	}
	if !levelRe.MatchString(f.LogLevel) {
		bad("firecracker.log_level", "%q is not one of Error, Warning, Info, Debug", f.LogLevel)
	}
	if _, err := BootArgs(f.ExtraBootArgs); err != nil {
		bad("firecracker.extra_boot_args", "%v", err)
	}
	if f.SerialBytesPerSec != 0 && f.SerialBytesPerSec < MinSerialBytesPerSec {
		bad("firecracker.serial_bytes_per_sec", "must be 0 (no limit) or >= %d, got %d", MinSerialBytesPerSec, f.SerialBytesPerSec)
	}
	if !f.UseJailer {
		if f.SnapshotRefill {
			bad("firecracker.snapshot_refill", "needs use_jailer: a snapshot names its device files by path, which only the jail's fixed paths make each clone's own")
		}
		return errs
	}
	if err := ValidParentCgroup(f.ParentCgroup); err != nil {
		bad("firecracker.parent_cgroup", "%v", err)
	}
	if f.MemoryOverheadMiB < MinMemoryOverheadMiB {
		bad("firecracker.memory_overhead_mib", "must be >= %d (Firecracker itself needs that much beside the guest), got %d", MinMemoryOverheadMiB, f.MemoryOverheadMiB)
	}
	if f.MemoryOverheadMiBPerGiB < MinMemoryOverheadMiBPerGiB {
		bad("firecracker.memory_overhead_mib_per_gib", "must be >= %d (KVM's page tables take about 4 MiB per GiB of guest memory), got %d", MinMemoryOverheadMiBPerGiB, f.MemoryOverheadMiBPerGiB)
	}
	if f.JailerBinary == "" {
		bad("firecracker.jailer_binary", "must be set when firecracker.use_jailer is on")
	}
	if f.Binary != "" && !strings.Contains(filepath.Base(f.Binary), "firecracker") {
		bad("firecracker.binary", "%q: the jailer requires the file name to contain \"firecracker\"", f.Binary)
	}
	if !filepath.IsAbs(f.ChrootBase) {
		bad("firecracker.chroot_base", "%q must be an absolute path", f.ChrootBase)
	}
	if f.UID <= 0 {
		bad("firecracker.uid", "must be > 0 (a jailed VMM never runs as root), got %d", f.UID)
	}
	if f.GID <= 0 {
		bad("firecracker.gid", "must be > 0 (a jailed VMM never runs as root), got %d", f.GID)
	}
	if f.VMUIDBase != 0 {
		hosts := 0
		if p, err := netip.ParsePrefix(c.Network.CIDR); err == nil && p.Addr().Is4() {
			hosts = 1 << (32 - p.Bits())
		}
		last := int64(f.VMUIDBase) + int64(hosts) - 1
		switch {
		case f.VMUIDBase < MinVMUIDBase:
			bad("firecracker.vm_uid_base", "must be 0 (every VM as firecracker.uid) or >= %d, got %d", MinVMUIDBase, f.VMUIDBase)
		case last > MaxVMUID:
			bad("firecracker.vm_uid_base", "%d + the %d addresses of network.cidr run past uid %d", f.VMUIDBase, hosts, MaxVMUID)
		case int64(f.UID) >= int64(f.VMUIDBase) && int64(f.UID) <= last, int64(f.GID) >= int64(f.VMUIDBase) && int64(f.GID) <= last:
			bad("firecracker.vm_uid_base", "the VMs' uids %d-%d include firecracker.uid/gid %d/%d", f.VMUIDBase, last, f.UID, f.GID)
		}
	}
	return errs
}

const fcFix = "install.sh --firecracker-bin PATH --jailer-bin PATH, or let install.sh download the official release (github.com/firecracker-microvm/firecracker/releases)"

// Checks implements vm.Provider: the firecracker binary is v1.8.0 or
// later, the jailer (when use_jailer is on) is the same release,
// kvm-guest boots the image's kernel under Firecracker, and snapshots
// checks what snapshot refills need (checks.go).
func (Provider) Checks(c config.Config) []vm.Check {
	return []vm.Check{
		{Name: "firecracker", Run: func(ctx context.Context, h vm.CheckHost) vm.CheckResult {
			return firecrackerCheck(ctx, h, c.Firecracker)
		}},
		{Name: "jailer", Run: func(ctx context.Context, h vm.CheckHost) vm.CheckResult {
			return jailerCheck(ctx, h, c.Firecracker)
		}},
		{Name: "kvm-guest", Run: func(ctx context.Context, h vm.CheckHost) vm.CheckResult {
			return kvmGuestCheck(ctx, h, c)
		}},
		{Name: "snapshots", Run: func(ctx context.Context, h vm.CheckHost) vm.CheckResult {
			return snapshotsCheck(ctx, h, c)
		}},
	}
}

// VMMUser implements vm.VMMUser: a jailed Firecracker runs as
// firecracker.uid/gid and opens its tap itself.
func (Provider) VMMUser(c config.Config) (uid, gid int, ok bool) {
	return c.Firecracker.UID, c.Firecracker.GID, c.Firecracker.UseJailer
}

// VMMUserRange implements vm.VMMUserRange: with firecracker.vm_uid_base,
// every jailed VM runs as a uid and gid of its own, as Firecracker's
// production guidance asks.
func (Provider) VMMUserRange(c config.Config) (base int, ok bool) {
	return c.Firecracker.VMUIDBase, c.Firecracker.UseJailer && c.Firecracker.VMUIDBase > 0 && c.Network.Mode == "tap"
}

// Bounds of the firecracker section (Validate). Per-VM uids stay below
// 2^31 (some tools take uids as signed) and clear of system accounts.
const (
	MinVMUIDBase = 1000
	MaxVMUID     = 1<<31 - 2

	MinMemoryOverheadMiB       = 16
	MinMemoryOverheadMiBPerGiB = 4
	MinSerialBytesPerSec       = 4096
)

// serialRate maps serial_bytes_per_sec (0 = no limit) to the Options field
// (0 = default, negative = no limit).
func serialRate(v int64) int64 {
	if v == 0 {
		return -1
	}
	return v
}

// New implements vm.Provider: a Driver from the firecracker section,
// state_dir and vm.console_log_max_bytes.
func (Provider) New(c config.Config, log *slog.Logger) (vm.Driver, error) {
	d, err := New(Options{
		Binary:       c.Firecracker.Binary,
		JailerBinary: c.Firecracker.JailerBinary,
		UseJailer:    c.Firecracker.UseJailer,
		UID:          c.Firecracker.UID,
		GID:          c.Firecracker.GID,
		ChrootBase:   c.Firecracker.ChrootBase,
		StateDir:     c.StateDir,

		ParentCgroup:            c.Firecracker.ParentCgroup,
		MemoryOverheadMiB:       c.Firecracker.MemoryOverheadMiB,
		MemoryOverheadMiBPerGiB: c.Firecracker.MemoryOverheadMiBPerGiB,
		ExtraBootArgs:           c.Firecracker.ExtraBootArgs,
		LogLevel:                c.Firecracker.LogLevel,
		SerialBytesPerSec:       serialRate(c.Firecracker.SerialBytesPerSec),
		VMUIDBase:               c.Firecracker.VMUIDBase,
		SnapshotRefill:          c.Firecracker.SnapshotRefill,
		Console:                 vm.NewConsolePolicy(c.VM.ConsoleLogMaxBytes, c.VM.ConsoleLogKeep, c.VM.ConsoleLogMaxAge),
		Logger:                  log,
	})
	if err != nil {
		return nil, err
	}
	return d, nil
}
