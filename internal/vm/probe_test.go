package vm

import (
	"context"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// fakeVMM writes an executable shell script standing in for a VMM.
func fakeVMM(t *testing.T, script string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "vmm")
	if err := os.WriteFile(p, []byte("#!/bin/sh\n"+script), 0o755); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestReachedRootPanic(t *testing.T) {
	for out, want := range map[string]bool{
		"[    1.2] VFS: Unable to mount root fs on unknown-block(0,0)\n":     true,
		"[    1.3] Kernel panic - not syncing: VFS: Unable to mount root fs": true,
		"qemu-system-x86_64: kvm_buf_set_msrs: Assertion failed":             false,
		"": false,
	} {
		if got := ReachedRootPanic([]byte(out)); got != want {
			t.Errorf("ReachedRootPanic(%q) = %v, want %v", out, got, want)
		}
	}
}

// TestRunBootProbe runs fake VMMs: only a root-mount panic on the console
// passes; an exit without one, a hang and a missing binary each fail with
// what happened.
func TestRunBootProbe(t *testing.T) {
	for _, tc := range []struct {
		name, script string
		timeout      time.Duration
		wantErr      string // "" = success
	}{
		{"panic then exit", "echo 'Linux version 6.1'; echo '[ 1.0] Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(0,0)'\n", time.Minute, ""},
		{"panic on stderr", "echo 'VFS: Unable to mount root fs' >&2; exit 1\n", time.Minute, ""},
		{"abort without panic", "echo 'Linux version 6.1'; echo 'qemu: kvm_buf_set_msrs: Assertion failed' >&2; kill -ABRT $$\n", time.Minute,
			`exited (signal: aborted) without a root-mount panic: "qemu: kvm_buf_set_msrs: Assertion failed"`},
		{"clean exit without panic", "echo booted\n", time.Minute, `exited (<nil>) without a root-mount panic: "booted"`},
		{"hang", "echo 'Linux version 6.1'; exec sleep 600\n", 500 * time.Millisecond, "no root-mount panic within 500ms"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := RunBootProbe(context.Background(), []string{fakeVMM(t, tc.script)}, tc.timeout)
			if tc.wantErr == "" && err != nil {
				t.Fatalf("RunBootProbe = %v, want success", err)
			}
			if tc.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tc.wantErr)) {
				t.Fatalf("RunBootProbe = %v, want an error containing %q", err, tc.wantErr)
			}
		})
	}
	if err := RunBootProbe(context.Background(), []string{"/nonexistent/vmm"}, time.Minute); err == nil || !strings.Contains(err.Error(), "boot probe: ") {
		t.Errorf("missing VMM: %v", err)
	}
	if err := RunBootProbe(context.Background(), nil, time.Minute); err == nil {
		t.Error("empty command line accepted")
	}
}

// TestRunBootProbeLeavesNothing: a VMM that does not exit after the guest's
// panic (and anything it started) is killed once the panic shows, and a
// hung one at the timeout; no process of the probe survives it.
func TestRunBootProbeLeavesNothing(t *testing.T) {
	for _, tc := range []struct {
		name, console string
		timeout       time.Duration
		ok            bool
	}{
		{"panicked, VMM stays", "echo 'Kernel panic - not syncing: VFS: Unable to mount root fs'", time.Hour, true},
		{"hung", "echo 'Linux version 6.1'", 500 * time.Millisecond, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			pidFile := filepath.Join(t.TempDir(), "pid")
			// The child is started before the console line, so it exists
			// whenever the probe decides.
			vmm := fakeVMM(t, "sleep 3600 &\necho $! > "+pidFile+"\n"+tc.console+"\nwait\n")
			err := RunBootProbe(context.Background(), []string{vmm}, tc.timeout)
			if (err == nil) != tc.ok {
				t.Fatalf("RunBootProbe = %v, want success %v", err, tc.ok)
			}
			b, err := os.ReadFile(pidFile)
			if err != nil {
				t.Fatal(err)
			}
			pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
			if err != nil {
				t.Fatal(err)
			}
			p, err := LookupProc(pid)
			if err != nil {
				return // already reaped: gone
			}
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute) // a hang guard, not a speed target
			defer cancel()
			if err := p.WaitGone(ctx); err != nil {
				_ = p.KillGroup()
				t.Fatalf("the probe's child %d outlived RunBootProbe: %v", pid, err)
			}
		})
	}
}
