// Package gracefulexitcmd stands in for step-runner's command helper: a
// command that gets SIGTERM on cancellation and a bounded wait for its pipes.
package gracefulexitcmd

import (
	"context"
	"os/exec"
	"syscall"
	"time"
)

// New returns a command that is sent SIGTERM when ctx ends and whose pipes
// are closed delay after that.
func New(ctx context.Context, delay time.Duration, name string, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Cancel = func() error { return cmd.Process.Signal(syscall.SIGTERM) }
	cmd.WaitDelay = delay
	return cmd
}
