package qemu

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/firerunner/firerunner/internal/config"
	"github.com/firerunner/firerunner/internal/vm"
)

func TestProviderReadsConfig(t *testing.T) {
	bin, err := os.Executable() // any executable stands in for QEMU; New only looks it up
	if err != nil {
		t.Fatal(err)
	}
	c := config.Default()
	c.VM.Driver, c.QEMU.Binary, c.QEMU.Accel, c.Network.Mode = Name, bin, AccelTCG, "user"
	c.StateDir, c.VM.ConsoleLogDir = t.TempDir(), "/var/log/firerunner-consoles"
	// Selected without the development switch: refused, saying why.
	if errs := (Provider{}).Validate(c, true); len(errs) != 1 || errs[0].Field != "vm.driver" || !strings.Contains(errs[0].Error(), "qemu is for development") {
		t.Fatalf("Validate without allow_for_development = %v", errs)
	}
	c.QEMU.AllowForDevelopment = true
	if errs := (Provider{}).Validate(c, true); len(errs) != 0 {
		t.Fatalf("Validate = %v", errs)
	}
	d, err := Provider{}.New(c, nil)
	if err != nil {
		t.Fatal(err)
	}
	qd := d.(*Driver)
	if qd.binary != bin || qd.opts.Accel != AccelTCG || qd.opts.NetworkMode != "user" || qd.opts.ConsoleLogDir != c.VM.ConsoleLogDir ||
		qd.sd.Root != filepath.Join(c.StateDir, "vms") {
		t.Errorf("provider options = %+v", qd.opts)
	}
	// What New refuses, Validate reports first with the file's field names.
	c.QEMU.Accel, c.StateDir = "fast", "/var/lib/a:b"
	errs := (Provider{}).Validate(c, true)
	if len(errs) != 2 || errs[0].Field != "qemu.accel" || errs[1].Field != "state_dir" {
		t.Errorf("Validate = %v", errs)
	}
	if _, err := (Provider{}).New(c, nil); err == nil {
		t.Error("New accepted a bad accel")
	}
	// Not selected: only the section's own values are checked.
	c.QEMU.Binary = ""
	if errs := (Provider{}).Validate(c, false); len(errs) != 1 || errs[0].Field != "qemu.accel" {
		t.Errorf("Validate unselected = %v", errs)
	}
}

func TestProviderChecks(t *testing.T) {
	c := config.Default()
	c.QEMU.Binary = "/nonexistent/qemu-system-x86_64"
	cs := Provider{}.Checks(c)
	if len(cs) != 2 || cs[0].Name != "qemu" || cs[1].Name != "kvm-guest" { // kvm-guest: accel_check_test.go
		t.Fatalf("checks %+v", cs)
	}
	if r := cs[0].Run(context.Background(), vm.CheckHost{}); r.Status != vm.CheckFail || r.Fix == "" {
		t.Errorf("missing binary: %+v", r)
	}
}
