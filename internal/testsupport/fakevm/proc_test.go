package fakevm

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/firerunner/firerunner/internal/guestconfig"
	"github.com/firerunner/firerunner/internal/vm"
)

// TestMain lets the test binary play the guest: argv "fakevm-guest DIR".
func TestMain(m *testing.M) {
	if len(os.Args) == 3 && os.Args[1] == "fakevm-guest" {
		os.Exit(testGuest(os.Args[2]))
	}
	os.Exit(m.Run())
}

// testGuest reads the config drive; Command is ["exit", code, sleep].
func testGuest(dir string) int {
	f, err := os.Open(filepath.Join(dir, vm.ConfigDrive))
	if err != nil {
		fmt.Println("no config drive:", err)
		return 1
	}
	cfg, err := guestconfig.Decode(f)
	f.Close()
	if err != nil || len(cfg.Command) != 3 || cfg.Command[0] != "exit" {
		fmt.Println("bad config drive:", err, cfg)
		return 1
	}
	fmt.Println(guestconfig.MarkerAgentStart)
	d, _ := time.ParseDuration(cfg.Command[2])
	time.Sleep(d)
	fmt.Println(guestconfig.ExitMarker + cfg.Command[1])
	return 0
}

func procSpec(id, code, sleep string) vm.Spec {
	return vm.Spec{ID: id, VCPUs: 1, MemoryMiB: 256, Image: vm.Image{Kernel: "k", Initrd: "i", Rootfs: "r"},
		Guest: guestconfig.Config{JobTimeoutSec: 60, RunnerToken: "glrt-proc-test-token", Command: []string{"exit", code, sleep}}}
}

func newProc(t *testing.T, dir string) *ProcDriver {
	t.Helper()
	d, err := NewProc(ProcOptions{StateDir: dir, Guest: []string{os.Args[0], "fakevm-guest"}})
	if err != nil {
		t.Fatal(err)
	}
	return d
}

func TestProcDriverRunsAGuest(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	d := newProc(t, dir)
	if err := d.Start(ctx, procSpec("fr-exit3", "3", "0s")); err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(d.StateDir().File("fr-exit3", vm.ConfigDrive))
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("config drive: %v %v", fi, err)
	}
	r, err := d.Wait(ctx, "fr-exit3")
	if err != nil || r.ExitCode != 3 || r.Reason != "" {
		t.Fatalf("wait: %+v %v; want exit code 3 from the console", r, err)
	}
	if list, _ := d.List(ctx); len(list) != 1 || list[0].ID != "fr-exit3" || list[0].PID != 0 {
		t.Fatalf("list after exit: %+v", list)
	}
	if err := d.Destroy(ctx, "fr-exit3"); err != nil || d.StateDir().Exists("fr-exit3") {
		t.Fatalf("destroy: %v, dir left %v", err, d.StateDir().Exists("fr-exit3"))
	}
	if _, err := d.Wait(ctx, "fr-exit3"); !errors.Is(err, vm.ErrNotFound) {
		t.Fatalf("wait after destroy: %v", err)
	}
	if err := d.Destroy(ctx, "fr-exit3"); err != nil {
		t.Fatalf("second destroy: %v", err)
	}
}

// TestProcDriverKeepsVMsAcrossProcesses: a second driver on the same state
// dir (a restarted FireRunner) lists, waits for and destroys the guest the
// first one started; the token is in no argv.
func TestProcDriverKeepsVMsAcrossProcesses(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	first := newProc(t, dir)
	t.Cleanup(func() { _ = first.Destroy(ctx, "fr-long") })
	if err := first.Start(ctx, procSpec("fr-long", "0", "1h")); err != nil {
		t.Fatal(err)
	}
	again := newProc(t, dir)
	list, err := again.List(ctx)
	if err != nil || len(list) != 1 || list[0].ID != "fr-long" || list[0].PID == 0 {
		t.Fatalf("list in a new process: %+v %v", list, err)
	}
	cmd, _ := os.ReadFile("/proc/" + strconv.Itoa(list[0].PID) + "/cmdline")
	if !strings.Contains(string(cmd), "fr-long") || strings.Contains(string(cmd), "glrt-") {
		t.Fatalf("guest argv %q: want the VM dir, never the token", cmd)
	}
	wctx, cancel := context.WithTimeout(ctx, 200*time.Millisecond)
	_, err = again.Wait(wctx, "fr-long")
	cancel()
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("wait on a running adopted guest: %v, want the context's end", err)
	}
	waited := make(chan vm.Result, 1)
	go func() { r, _ := again.Wait(ctx, "fr-long"); waited <- r }()
	if err := again.Destroy(ctx, "fr-long"); err != nil {
		t.Fatal(err)
	}
	if r := <-waited; r.ExitCode != -1 || r.Reason == "" {
		t.Fatalf("adopted guest killed: %+v", r)
	}
	if p, err := vm.LookupProc(list[0].PID); err == nil && p.Alive() {
		t.Fatalf("guest %d survived Destroy", list[0].PID)
	}
	if again.StateDir().Exists("fr-long") {
		t.Fatal("vm dir left")
	}
}
