package qemu

import (
	"fmt"
	"strconv"
	"strings"

	"github.com/firerunner/firerunner/internal/guestconfig"
	"github.com/firerunner/firerunner/internal/vm"
)

// launch is everything argv construction needs besides the spec. It holds
// file paths and host facts only: the guest config (and its token) is never
// an input here, so it cannot reach argv or the kernel command line.
type launch struct {
	accel       string // "kvm" or "tcg"
	tscKHz      int    // host TSC kHz; used under TCG
	consoleLog  string
	configDrive string
	scratchDisk string // "" = none
	vhostNet    bool   // tap + KVM + /dev/vhost-net
	extraKernel []string
	assignSock  string // warm VM: the assignment channel's Unix socket ("" = none)
}

// BaseKernelArgs are the kernel parameters of every QEMU guest: serial
// console, reboot by triple fault (with -no-reboot QEMU then exits),
// reboot at once on panic, and no time wasted probing the PCI bus and PS/2
// controller microvm does not have. Kernel messages stay on (no "quiet"):
// they feed the boot timeline and cost no measurable CPU time.
var BaseKernelArgs = []string{"console=ttyS0", "reboot=t", "panic=-1", "pci=off",
	"i8042.noaux", "i8042.nomux", "i8042.nopnp", "i8042.dumbkbd"}

// kernelCmdline is the guest's kernel command line (non-secret by construction).
func kernelCmdline(l launch) string {
	args := append([]string{}, BaseKernelArgs...)
	if l.accel == AccelTCG && l.tscKHz > 0 {
		// Without it TCG guests hang at random in TSC calibration.
		args = append(args, "tsc_early_khz="+strconv.Itoa(l.tscKHz))
	}
	args = append(args, l.extraKernel...)
	return strings.Join(args, " ")
}

// qemuArgs builds the qemu-system-x86_64 arguments (without argv[0]).
func qemuArgs(spec vm.Spec, l launch) []string {
	a := []string{
		// Never -nodefaults on microvm: it drops the ISA serial console.
		"-M", "microvm,x-option-roms=off,rtc=on",
	}
	switch l.accel {
	case AccelKVM:
		a = append(a, "-accel", "kvm", "-cpu", "host")
	default:
		// Multi-threaded TCG: one host thread per vCPU.
		a = append(a, "-accel", "tcg,thread=multi", "-cpu", "max")
	}
	a = append(a,
		// QEMU's seccomp filter: no obsolete system calls, no setuid and
		// friends, no fork/exec, no changing priorities or affinities. A
		// guest that escapes into QEMU gets that much less of the host.
		"-sandbox", Sandbox,
		"-smp", strconv.Itoa(spec.VCPUs),
		"-m", strconv.Itoa(spec.MemoryMiB),
		// The guest agent powers off or reboots when done; either way the
		// qemu process must exit.
		"-no-reboot",
		"-display", "none", "-monitor", "none",
		// append=on: the console log is opened O_APPEND, so after the
		// watcher cuts the middle out of it (vm.ConsoleWatcher) QEMU's
		// next write lands at the new end of the file, not at its old
		// offset.
		"-chardev", "file,id=console,path="+escapeOpt(l.consoleLog)+",append=on",
		"-serial", "chardev:console",
		"-kernel", spec.Image.Kernel, // ELF vmlinux: PVH boot
		"-initrd", spec.Image.Initrd,
		"-append", kernelCmdline(l),
		// Shared base image, read-only: the guest overlays a tmpfs on it,
		// so a VM's writable root costs nothing to prepare.
		"-drive", "id=root,file="+escapeOpt(spec.Image.Rootfs)+",format=raw,if=none,readonly=on",
		"-device", "virtio-blk-device,drive=root",
		"-drive", "id=config,file="+escapeOpt(l.configDrive)+",format=raw,if=none,readonly=on",
		"-device", "virtio-blk-device,drive=config",
		"-device", "virtio-rng-device",
	)
	if l.scratchDisk != "" {
		// Per-VM scratch disk (Docker's data-root), sparse, destroyed with
		// the VM: nothing on it must survive a host crash, hence no flushes.
		a = append(a, "-drive", "id=scratch,file="+escapeOpt(l.scratchDisk)+",format=raw,if=none,cache=unsafe,discard=unmap",
			"-device", "virtio-blk-device,drive=scratch")
	}
	if l.assignSock != "" {
		// Warm VM: the job's runner arrives later on a virtio-serial port
		// whose host end is a Unix socket in the VM's 0700 state dir.
		a = append(a, "-device", "virtio-serial-device",
			"-chardev", "socket,id=assign,path="+escapeOpt(l.assignSock)+",server=on,wait=off",
			"-device", "virtserialport,chardev=assign,name="+guestconfig.AssignPort)
	}
	nic := "virtio-net-device,netdev=net0"
	if spec.Network != nil {
		nd := "tap,id=net0,ifname=" + spec.Network.TapName + ",script=no,downscript=no"
		if l.vhostNet {
			nd += ",vhost=on"
		}
		a = append(a, "-netdev", nd)
		if spec.Network.MAC != "" {
			nic += ",mac=" + spec.Network.MAC
		}
	} else {
		// Development networking: the guest is 10.0.2.15 and reaches the
		// host's loopback at 10.0.2.2.
		a = append(a, "-netdev", "user,id=net0")
	}
	return append(a, "-device", nic)
}

// Sandbox is every QEMU's -sandbox (seccomp) setting.
const Sandbox = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"

// escapeOpt doubles commas, QEMU's escape inside an option value.
func escapeOpt(s string) string { return strings.ReplaceAll(s, ",", ",,") }

// checkNet validates a spec's network against the driver's network mode.
func checkNet(spec vm.Spec, mode string) error {
	if spec.Network == nil {
		if mode == "tap" {
			return fmt.Errorf("vm %s: network mode tap needs a tap device (Spec.Network)", spec.ID)
		}
		return nil
	}
	t := spec.Network.TapName
	if t == "" || len(t) > 15 || strings.ContainsAny(t, ",=/ \t\n") {
		return fmt.Errorf("vm %s: invalid tap name %q", spec.ID, t)
	}
	if m := spec.Network.MAC; m != "" && !validMAC(m) {
		return fmt.Errorf("vm %s: invalid MAC %q", spec.ID, m)
	}
	return nil
}

func validMAC(m string) bool {
	if len(m) != 17 {
		return false
	}
	for i, c := range m {
		if i%3 == 2 {
			if c != ':' {
				return false
			}
		} else if !strings.ContainsRune("0123456789abcdefABCDEF", c) {
			return false
		}
	}
	return true
}
