package firecracker

import (
	"errors"
	"fmt"
	"strings"
)

// DefaultBootArgs is the guest kernel command line. It is explicit because
// Firecracker's default ("reboot=k panic=1 pci=off nomodule 8250.nr_uarts=0
// i8042...") carries nomodule, which stops the Debian kernel's initramfs from
// loading virtio modules, and disables the serial console we log from.
// reboot=k makes the guest's final reboot end the Firecracker process.
var DefaultBootArgs = []string{
	"console=ttyS0",
	"reboot=k",
	"panic=-1", // reboot (so exit) at once on a guest panic
	"pci=off",
	"i8042.noaux",
	"i8042.nomux",
	"i8042.nopnp",
	"i8042.dumbkbd",
}

// MaxCmdline is Firecracker's x86_64 kernel command line limit (bytes,
// including the terminating NUL).
const MaxCmdline = 2048

// cmdlineReserve is what Firecracker appends itself: "root=/dev/vda ro" plus
// one "virtio_mmio.device=4K@0x...:N" (~40 bytes) per virtio device. We keep
// room for 8 devices.
const cmdlineReserve = 24 + 8*48

// BootArgs joins the default and extra arguments and validates the result:
// no nomodule, nothing secret (never the runner token), and short enough
// that Firecracker's own additions still fit in MaxCmdline.
func BootArgs(extra []string, secrets ...string) (string, error) {
	args := append(append([]string{}, DefaultBootArgs...), extra...)
	for _, a := range args {
		if a == "" || strings.ContainsAny(a, " \t\n\"") {
			return "", fmt.Errorf("boot arg %q: must be one non-empty token without whitespace or quotes", a)
		}
		if a == "nomodule" {
			return "", errors.New("boot arg nomodule breaks the guest's initramfs (it cannot load virtio modules)")
		}
	}
	s := strings.Join(args, " ")
	for _, sec := range secrets {
		if sec != "" && strings.Contains(s, sec) {
			return "", errors.New("boot args contain a secret; secrets travel only on the config drive")
		}
	}
	if max := MaxCmdline - 1 - cmdlineReserve; len(s) > max {
		return "", fmt.Errorf("boot args are %d bytes; at most %d fit (Firecracker's command line limit is %d bytes including what it appends)", len(s), max, MaxCmdline)
	}
	return s, nil
}
