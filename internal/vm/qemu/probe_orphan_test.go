package qemu

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/firerunner/firerunner/internal/vm"
)

const probeHelperEnv = "FIRERUNNER_PROBE_HELPER_BINARY"

// TestProbeDiesWithFireRunner: the KVM boot probe runs up to 15 s on a host
// whose nested KVM hangs guests, at the first VM start of every FireRunner
// process. If FireRunner is killed (kill -9) meanwhile, the probe's QEMU must
// not live on: a hung guest never exits by itself, and its command line
// names no VM state dir, so reconciliation could never find it.
func TestProbeDiesWithFireRunner(t *testing.T) {
	if bin := os.Getenv(probeHelperEnv); bin != "" {
		// The FireRunner stand-in: run a probe that never finishes.
		_ = probeBoot(context.Background(), bin, "/nonexistent/vmlinux", nil, "", time.Hour)
		os.Exit(0)
	}
	dir := t.TempDir()
	pidFile := filepath.Join(dir, "probe.pid")
	// A hung QEMU: records its pid and blocks with stdout open.
	fake := filepath.Join(dir, "qemu-hangs")
	if err := os.WriteFile(fake, []byte("#!/bin/sh\necho $$ > "+pidFile+".tmp\nmv "+pidFile+".tmp "+pidFile+"\nexec sleep 600\n"), 0o700); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(os.Args[0], "-test.run=^TestProbeDiesWithFireRunner$", "-test.timeout=0")
	cmd.Env = append(os.Environ(), probeHelperEnv+"="+fake)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var probe vm.Proc
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		_ = probe.KillGroup()
	})
	deadline := time.Now().Add(time.Minute)
	for {
		b, err := os.ReadFile(pidFile)
		if err == nil {
			pid, _ := strconv.Atoi(strings.TrimSpace(string(b)))
			if probe, err = vm.LookupProc(pid); err != nil {
				t.Fatalf("probe pid %d: %v", pid, err)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the probe never started")
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	_ = cmd.Wait()
	// Bounds a hang only: the kernel signals the probe as its parent dies.
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := probe.WaitGone(ctx); err != nil {
		t.Fatalf("probe QEMU (pid %d) outlived the killed FireRunner process: %v", probe.PID, err)
	}
}
