package vm

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"strconv"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Proc names one host process robustly: a pid plus its start time (clock
// ticks since boot, field 22 of /proc/PID/stat), so a pid reused by another
// process after a FireRunner restart is never mistaken for our VMM.
type Proc struct {
	PID       int    `json:"pid"`
	StartTime uint64 `json:"start_time"`
}

// ErrProcGone means the process has exited (or the pid now names another process).
var ErrProcGone = errors.New("process gone")

// procStat returns the state letter and start time of pid from /proc/PID/stat.
func procStat(pid int) (state byte, start uint64, err error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0, 0, err
	}
	// comm (field 2) may contain spaces and ')': fields resume after the last ')'.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 || i+2 >= len(b) {
		return 0, 0, fmt.Errorf("/proc/%d/stat: malformed", pid)
	}
	f := bytes.Fields(b[i+2:]) // f[0] is field 3 (state)
	if len(f) < 20 {
		return 0, 0, fmt.Errorf("/proc/%d/stat: too few fields", pid)
	}
	start, err = strconv.ParseUint(string(f[19]), 10, 64) // field 22
	if err != nil {
		return 0, 0, fmt.Errorf("/proc/%d/stat: starttime: %w", pid, err)
	}
	return f[0][0], start, nil
}

// LookupProc returns the Proc for a live pid.
func LookupProc(pid int) (Proc, error) {
	if pid <= 0 {
		return Proc{}, fmt.Errorf("invalid pid %d", pid)
	}
	_, st, err := procStat(pid)
	if err != nil {
		return Proc{}, fmt.Errorf("pid %d: %w", pid, ErrProcGone)
	}
	return Proc{PID: pid, StartTime: st}, nil
}

// Alive reports whether p still runs: same pid, same start time, not a zombie.
func (p Proc) Alive() bool {
	if p.PID <= 0 {
		return false
	}
	state, st, err := procStat(p.PID)
	if err != nil || st != p.StartTime {
		return false
	}
	return state != 'Z' && state != 'X'
}

// Exists is Alive but also true for a not-yet-reaped zombie of ours.
func (p Proc) Exists() bool {
	if p.PID <= 0 {
		return false
	}
	_, st, err := procStat(p.PID)
	return err == nil && st == p.StartTime
}

// KillGroup sends SIGKILL to p's process group (VMMs are started as group
// leaders, see SysProcAttr) and to p itself. It does nothing when p is gone or
// its pid was reused, so a stale pidfile can never kill a stranger.
func (p Proc) KillGroup() error {
	if !p.Exists() {
		return nil
	}
	// pidfd pins the process: the identity check above cannot race with reuse
	// once we hold it (signals go through the fd).
	fd, err := unix.PidfdOpen(p.PID, 0)
	if err == nil {
		defer unix.Close(fd)
		if !p.Exists() {
			return nil
		}
		if pg, err := unix.Getpgid(p.PID); err == nil && pg == p.PID {
			_ = unix.Kill(-p.PID, unix.SIGKILL)
		}
		if err := unix.PidfdSendSignal(fd, unix.SIGKILL, nil, 0); err != nil && !errors.Is(err, unix.ESRCH) {
			return fmt.Errorf("kill pid %d: %w", p.PID, err)
		}
		return nil
	}
	// Kernels without pidfd (< 5.3): best effort with plain kill.
	if err := unix.Kill(-p.PID, unix.SIGKILL); err != nil && !errors.Is(err, unix.ESRCH) {
		return fmt.Errorf("kill process group %d: %w", p.PID, err)
	}
	_ = unix.Kill(p.PID, unix.SIGKILL)
	return nil
}

// WaitGone blocks until p has exited (a zombie counts as exited) or ctx ends.
// It works for processes that are not our children (VMs adopted after a
// restart), using a pidfd when the kernel has one and polling otherwise.
func (p Proc) WaitGone(ctx context.Context) error {
	if !p.Alive() {
		return nil
	}
	if fd, err := unix.PidfdOpen(p.PID, 0); err == nil {
		defer unix.Close(fd)
		if !p.Alive() { // the fd may name a reused pid; re-check identity
			return nil
		}
		for {
			// Short poll slices so ctx cancellation is honoured promptly.
			n, err := unix.Poll([]unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}, 100)
			if err != nil && !errors.Is(err, unix.EINTR) {
				break // fall back to polling below
			}
			if n > 0 || !p.Alive() {
				return nil
			}
			if ctx.Err() != nil {
				return ctx.Err()
			}
		}
	}
	t := time.NewTicker(50 * time.Millisecond)
	defer t.Stop()
	for p.Alive() {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
		}
	}
	return nil
}

// FindProcs returns the live processes whose command line contains substr
// (e.g. a VM's state dir path). Reconciliation uses it for a VMM whose
// pidfile was never written (FireRunner died between fork and write).
func FindProcs(substr string) []Proc {
	ents, err := os.ReadDir("/proc")
	if err != nil || substr == "" {
		return nil
	}
	self := os.Getpid()
	var out []Proc
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == self {
			continue
		}
		cmd, err := os.ReadFile("/proc/" + e.Name() + "/cmdline")
		if err != nil || !bytes.Contains(cmd, []byte(substr)) {
			continue
		}
		if p, err := LookupProc(pid); err == nil && p.Alive() {
			out = append(out, p)
		}
	}
	return out
}

// SysProcAttr starts a VMM in its own session and process group, detached
// from FireRunner's terminal and signals, so KillGroup reaches everything it
// spawned and a FireRunner restart does not take running VMs down with it.
func SysProcAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Setsid: true}
}
