package daemon

import (
	"github.com/firerunner/firerunner/internal/config"
	"github.com/firerunner/firerunner/internal/vm"
	"github.com/firerunner/firerunner/internal/vm/firecracker"
	"github.com/firerunner/firerunner/internal/vm/qemu"
)

// Drivers is the one place that lists the VM drivers FireRunner offers
// (vm.driver). Each provider owns its name, the validation of its own config
// section, its doctor checks and its construction, so a new driver is one
// line here and nothing elsewhere. The fake driver of the tests is not
// listed: tests build it directly.
func Drivers() *vm.Registry[config.Config] {
	r := vm.NewRegistry[config.Config]()
	r.Add(qemu.Provider{})
	r.Add(firecracker.Provider{})
	return r
}
