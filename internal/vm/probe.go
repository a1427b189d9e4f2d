package vm

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os/exec"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// BootProbeTimeout bounds a boot probe. A working KVM boots a Debian kernel
// to its root-mount panic in ~1-2 s; nested paravirtual KVM that opens
// /dev/kvm fine but hangs ordinary guests never gets there.
const BootProbeTimeout = 15 * time.Second

// rootPanicMarkers are what a kernel prints when it booted through early
// boot but found no root file system: the probe's success.
var rootPanicMarkers = [][]byte{[]byte("Unable to mount root"), []byte("Kernel panic")}

// ReachedRootPanic reports whether a guest's console output shows its
// kernel's root-mount panic.
func ReachedRootPanic(out []byte) bool {
	for _, m := range rootPanicMarkers {
		if bytes.Contains(out, m) {
			return true
		}
	}
	return false
}

// RunBootProbe runs argv, a VMM command line that boots the real guest
// kernel with no initrd and no disk and its serial console on stdout, and
// returns nil once the kernel reaches its root-mount panic. Opening /dev/kvm
// or running a few instructions proves little: under some nested setups
// KVM runs tiny guests but hangs (or trips QEMU's kvm_buf_set_msrs
// assertion on) a real Linux kernel. Anything else within timeout is an
// error that says what happened.
//
// The VMM is killed as soon as the panic shows (with panic=-1 it would
// reboot or exit by itself, depending on the VMM), at timeout, and when
// this process dies: a probe hung on nested KVM must not outlive
// FireRunner, and reconcile cannot find it (its argv names no VM dir).
func RunBootProbe(ctx context.Context, argv []string, timeout time.Duration) error {
	if len(argv) == 0 {
		return errors.New("boot probe: no command")
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	out := &panicWatch{done: cancel}
	cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
	cmd.Stdout, cmd.Stderr = out, out
	cmd.SysProcAttr = SysProcAttr()
	// Pdeathsig fires when the forking thread exits, so pin this goroutine
	// to it until the probe is reaped.
	cmd.SysProcAttr.Pdeathsig = syscall.SIGKILL
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	cmd.Cancel = func() error { return unix.Kill(-cmd.Process.Pid, unix.SIGKILL) }
	cmd.WaitDelay = time.Second
	runErr := cmd.Run()
	b := out.bytes()
	if ReachedRootPanic(b) {
		return nil
	}
	if runErr != nil && cmd.Process == nil { // never started: not found, not executable
		return fmt.Errorf("boot probe: %w", runErr)
	}
	switch {
	case errors.Is(ctx.Err(), context.DeadlineExceeded):
		return fmt.Errorf("no root-mount panic within %s", timeout)
	case ctx.Err() != nil:
		return fmt.Errorf("boot probe interrupted: %w", ctx.Err())
	}
	last := strings.TrimSpace(string(b))
	if i := strings.LastIndexByte(last, '\n'); i >= 0 {
		last = last[i+1:]
	}
	if len(last) > 200 {
		last = last[:200]
	}
	return fmt.Errorf("%s exited (%v) without a root-mount panic: %q", argv[0], runErr, last)
}

// panicWatch collects a probe's output and calls done once the root-mount
// panic shows, so a VMM that does not exit on a guest panic does not make
// the probe wait for its timeout.
type panicWatch struct {
	mu   sync.Mutex
	buf  bytes.Buffer
	done func()
}

func (w *panicWatch) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.buf.Write(p)
	// Only the new bytes and a marker's length before them can complete
	// a marker.
	b := w.buf.Bytes()
	if ReachedRootPanic(b[max(0, len(b)-len(p)-32):]) {
		w.done()
	}
	return len(p), nil
}

func (w *panicWatch) bytes() []byte {
	w.mu.Lock()
	defer w.mu.Unlock()
	return bytes.Clone(w.buf.Bytes())
}
