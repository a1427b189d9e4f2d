package firecracker

import (
	"os"
	"testing"

	"github.com/firerunner/firerunner/internal/config"
	"github.com/firerunner/firerunner/internal/vm"
)

// vm.console_log_max_bytes reaches the driver, whose console watchers cap
// the console log Firecracker writes as its stdout (O_APPEND).
func TestProviderPassesConsolePolicy(t *testing.T) {
	bin, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	c := config.Default()
	c.Firecracker.Binary, c.Firecracker.UseJailer, c.StateDir = bin, false, t.TempDir()
	c.VM.ConsoleLogMaxBytes, c.VM.ConsoleLogKeep, c.VM.ConsoleLogMaxAge = 1<<20, 5, 0
	d, err := Provider{}.New(c, nil)
	if err != nil {
		t.Fatal(err)
	}
	if got, want := d.(*Driver).opts.Console, (vm.ConsolePolicy{MaxBytes: 1 << 20, Keep: 5, MaxAge: -1}); got != want {
		t.Errorf("console policy = %+v, want %+v", got, want)
	}
}
