package firecracker

import (
	"context"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/firerunner/firerunner/internal/testsupport/fcstandin"
)

// A jailer that never exits (stuck on a cgroup or mount) fails the start
// at firecracker's jailer timeout instead of hanging it; it is killed, and
// the start leaves nothing behind.
func TestJailerTimeout(t *testing.T) {
	e := newEnv(t, true)
	t.Setenv(fcstandin.EnvJailerHang, "1")
	e.opts.JailerTimeout = 300 * time.Millisecond
	d := e.driver()
	spec := e.spec("fr-jhang1", fcstandin.CmdExit, "0")
	done := make(chan error, 1)
	go func() { done <- d.Start(context.Background(), spec) }()
	var err error
	select {
	case err = <-done:
	case <-time.After(time.Minute): // only a bound on a hang, not a timing assertion
		t.Fatal("Start still waiting for a hung jailer after a minute")
	}
	if err == nil || !strings.Contains(err.Error(), "jailer failed: did not finish within 300ms") {
		t.Fatalf("Start with a hung jailer = %v", err)
	}
	e.assertClean(d, spec.ID, 0)
	// No stand-in jailer of this VM is left running.
	ents, _ := os.ReadDir("/proc")
	for _, en := range ents {
		if _, err := strconv.Atoi(en.Name()); err != nil {
			continue
		}
		if b, _ := os.ReadFile("/proc/" + en.Name() + "/cmdline"); strings.Contains(string(b), spec.ID) {
			if st, _ := os.ReadFile("/proc/" + en.Name() + "/stat"); !strings.Contains(string(st), ") Z") {
				t.Errorf("pid %s still runs for %s: %q", en.Name(), spec.ID, strings.ReplaceAll(string(b), "\x00", " "))
			}
		}
	}
	// What the jailer said is kept beside the state, past the cleanup.
	kept, rerr := os.ReadFile(filepath.Join(e.stateDir, FailedStartsDir, spec.ID+".log"))
	if rerr != nil || !strings.Contains(string(kept), "hanging (FCSTANDIN_JAILER_HANG)") {
		t.Errorf("kept logs of the failed start: %v\n%s", rerr, kept)
	}
}

// Firecracker's own log lives in the VM's jail (or dir), which the cleanup
// of a failed start removes: a copy is kept, and the error says where.
func TestFailedStartKeepsFirecrackerLog(t *testing.T) {
	for _, jailer := range []bool{false, true} {
		e := newEnv(t, jailer)
		os.WriteFile(e.image.Kernel, []byte("MZ a bzImage"), 0o644)
		d := e.driver()
		spec := e.spec("fr-fclog1", fcstandin.CmdExit, "0")
		err := d.Start(context.Background(), spec)
		kept := filepath.Join(e.stateDir, FailedStartsDir, spec.ID+".log")
		if err == nil || !strings.Contains(err.Error(), kept) {
			t.Fatalf("jailer=%v: Start = %v; want the failure and where its logs are", jailer, err)
		}
		b, rerr := os.ReadFile(kept)
		if rerr != nil || !strings.Contains(string(b), "==> firecracker log") ||
			!strings.Contains(string(b), "The API server received a PUT request on /boot-source; answered 400") {
			t.Errorf("jailer=%v: kept log %v:\n%s", jailer, rerr, b)
		}
		if fi, err := os.Stat(kept); err != nil || fi.Mode().Perm() != 0o600 {
			t.Errorf("jailer=%v: kept log mode %v %v; want 0600", jailer, fi.Mode(), err)
		}
		e.assertClean(d, spec.ID, 0)
	}
}

// A kept log is read without following symlinks: a jailed Firecracker owns
// its jail and could put a link to a host file where its log was.
func TestFailedStartLogNoFollow(t *testing.T) {
	dir := t.TempDir()
	secret := filepath.Join(dir, "secret")
	os.WriteFile(secret, []byte("host secret"), 0o600)
	link := filepath.Join(dir, "firecracker.log")
	os.Symlink(secret, link)
	if b := tailNoFollow(link, 1<<10); len(b) != 0 {
		t.Fatalf("read %q through a symlink", b)
	}
	if b := tailNoFollow(secret, 4); string(b) != "cret" {
		t.Fatalf("tail = %q", b)
	}
}

// Against a Firecracker whose API has no PUT /serial (the SDK's 1.4.1),
// the VM boots without the console rate limiter, and the driver says so.
func TestSerialLimiterFallback(t *testing.T) {
	e := newEnv(t, false)
	t.Setenv(fcstandin.EnvAPI, "1.4.1")
	d := e.driver()
	ctx := context.Background()
	spec := e.spec("fr-oldapi1", fcstandin.CmdExit, "0")
	t.Cleanup(func() { d.Destroy(ctx, spec.ID) })
	if err := d.Start(ctx, spec); err != nil {
		t.Fatalf("Start against API 1.4.1: %v", err)
	}
	if res, err := d.Wait(ctx, spec.ID); err != nil || res.ExitCode != 0 {
		t.Fatalf("Wait = %+v %v", res, err)
	}
	recs, _ := fcstandin.ReadLog(filepath.Join(e.logDir, spec.ID+".jsonl"))
	var serial *fcstandin.Record
	for i, r := range recs {
		if r.Violation {
			t.Errorf("contract violation: %+v", r)
		}
		if r.Path == "/serial" {
			serial = &recs[i]
		}
	}
	if serial == nil || serial.Status != 400 || !strings.Contains(serial.Fault, "Invalid request method") {
		t.Fatalf("PUT /serial against 1.4.1: %+v", serial)
	}
	// The limiter can also be turned off: no PUT /serial at all.
	e.opts.SerialBytesPerSec = -1
	d2 := e.driver()
	spec2 := e.spec("fr-nolimit1", fcstandin.CmdExit, "0")
	t.Cleanup(func() { d2.Destroy(ctx, spec2.ID) })
	if err := d2.Start(ctx, spec2); err != nil {
		t.Fatal(err)
	}
	if _, err := d2.Wait(ctx, spec2.ID); err != nil {
		t.Fatal(err)
	}
	for _, r := range e.requests(spec2.ID) {
		if r.Path == "/serial" {
			t.Errorf("PUT /serial sent with the limiter off: %+v", r)
		}
	}
}

// A start that fails before any VMM process exists (here: the jail cannot
// be built) cleans up at once: the cleanup must not wait for a process
// that was never started to be reaped (it used to wait out Destroy's 30 s
// kill timeout on every such failure).
func TestStartFailureBeforeVMMCleansUpAtOnce(t *testing.T) {
	e := newEnv(t, true)
	os.Remove(e.image.Initrd)
	os.Mkdir(e.image.Initrd, 0o755) // placing a directory in the jail fails
	d := e.driver()
	spec := e.spec("fr-early1", fcstandin.CmdExit, "0")
	t0 := time.Now()
	err := d.Start(context.Background(), spec)
	took := time.Since(t0)
	if err == nil || !strings.Contains(err.Error(), "initrd.img") {
		t.Fatalf("Start = %v; want the jail's failure", err)
	}
	// A bound on a hang, far above the milliseconds this takes, far below
	// the 30 s wait it used to be.
	if took > 15*time.Second {
		t.Errorf("Start failed only after %s: the cleanup waited for a VMM that never started", took)
	}
	e.assertClean(d, spec.ID, 0)
}
