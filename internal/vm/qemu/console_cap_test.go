package qemu

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/firerunner/firerunner/internal/config"
	"github.com/firerunner/firerunner/internal/vm"
)

// TestConsoleLogCappedRealVM: a guest that floods its console keeps a
// console log under the cap while QEMU writes it (-chardev ...,append=on),
// and its exit status, printed last, still comes back; the kept copy in
// console_log_dir is capped too.
func TestConsoleLogCappedRealVM(t *testing.T) {
	e := newRealEnv(t)
	const limit = 128 << 10
	e.drv.opts.Console = vm.ConsolePolicy{MaxBytes: limit}
	keep := t.TempDir()
	e.drv.opts.ConsoleLogDir = keep
	// ~1.2 MB of output, then exit 5.
	spec := e.spec("fr-flood1", bootBudget, "seq 1 180000; echo flood-done; exit 5")
	res, console, _ := e.runVM(t, spec, nil)
	if res.ExitCode != 5 || res.Reason != "" {
		t.Fatalf("result = %+v, want exit 5 and a clean power-off\n%s", res, tail(console, 20))
	}
	// One poll interval of output may be over the cap when the VM ends.
	if len(console) > limit+64<<10 {
		t.Errorf("console log is %d bytes, cap %d", len(console), limit)
	}
	for _, want := range []string{"Linux version", vm.ConsoleCutMarker, "\n180000\r\n", "flood-done"} {
		if !strings.Contains(console, want) {
			t.Errorf("console log lacks %q\n%s", want, tail(console, 20))
		}
	}
	kept, err := os.ReadFile(filepath.Join(keep, spec.ID+".log"))
	if err != nil || len(kept) > limit || !strings.Contains(string(kept), "flood-done") {
		t.Errorf("kept copy: %d bytes, %v", len(kept), err)
	}
}

// The vm.console_log_* settings reach the driver (0 = no limit for keep
// and age).
func TestProviderPassesConsolePolicy(t *testing.T) {
	bin, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	c := config.Default()
	c.VM.Driver, c.QEMU.Binary, c.QEMU.Accel, c.Network.Mode, c.StateDir = Name, bin, AccelTCG, "user", t.TempDir()
	c.VM.ConsoleLogMaxBytes, c.VM.ConsoleLogKeep, c.VM.ConsoleLogMaxAge = 1<<20, 0, time.Hour
	d, err := Provider{}.New(c, nil)
	if err != nil {
		t.Fatal(err)
	}
	if got, want := d.(*Driver).opts.Console, (vm.ConsolePolicy{MaxBytes: 1 << 20, Keep: -1, MaxAge: time.Hour}); got != want {
		t.Errorf("console policy = %+v, want %+v", got, want)
	}
}
