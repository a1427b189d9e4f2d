package daemon

import (
	"errors"
	"slices"
	"testing"

	"github.com/firerunner/firerunner/internal/config"
	"github.com/firerunner/firerunner/internal/vm"
)

// The production registry offers exactly qemu and firecracker; the test
// doubles' fake driver is not among them.
func TestDrivers(t *testing.T) {
	r := Drivers()
	if got := r.Names(); !slices.Equal(got, []string{"qemu", "firecracker"}) {
		t.Fatalf("Drivers().Names() = %q", got)
	}
	var ue *vm.UnknownDriverError
	if _, err := r.Get("fake"); !errors.As(err, &ue) || err.Error() != `unknown vm driver "fake" (known: qemu, firecracker)` {
		t.Errorf("Get(fake) = %v", err)
	}
	c := config.Default()
	c.GitLab.URL = "https://gitlab.example.com"
	c.QEMU.AllowForDevelopment = true // qemu is for development
	for _, name := range r.Names() {
		c.VM.Driver = name
		if err := c.Validate(r); err != nil {
			t.Errorf("defaults with driver %s: %v", name, err)
		}
	}
	// Only a jailed Firecracker owns its tap (network() passes it to netsetup).
	for _, tc := range []struct {
		driver string
		jailer bool
		want   bool
	}{{"firecracker", true, true}, {"firecracker", false, false}, {"qemu", true, false}} {
		p, _ := r.Get(tc.driver)
		c.Firecracker.UseJailer = tc.jailer
		got := false
		if u, ok := p.(vm.VMMUser[config.Config]); ok {
			_, _, got = u.VMMUser(c)
		}
		if got != tc.want {
			t.Errorf("%s (use_jailer %v): VMM has its own user = %v, want %v", tc.driver, tc.jailer, got, tc.want)
		}
	}
	// With firecracker.vm_uid_base, each jailed VM a user of its own.
	c.Firecracker.UseJailer, c.Firecracker.VMUIDBase = true, 200000
	p, _ := r.Get("firecracker")
	if u, ok := p.(vm.VMMUserRange[config.Config]); !ok {
		t.Error("firecracker offers no per-VM users")
	} else if base, ok := u.VMMUserRange(c); !ok || base != 200000 {
		t.Errorf("VMMUserRange = %d %v", base, ok)
	} else if c.Firecracker.VMUIDBase = 0; func() bool { _, ok := u.VMMUserRange(c); return ok }() {
		t.Error("VMMUserRange without vm_uid_base")
	}
}
