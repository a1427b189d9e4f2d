package vm

import (
	"context"
	"fmt"
	"os/exec"
	"path/filepath"
	"strings"
	"time"
)

// CheckStatus is the outcome of one host check.
type CheckStatus string

// The outcomes, as `firerunner doctor` prints them.
const (
	CheckPass CheckStatus = "pass"
	CheckWarn CheckStatus = "warn"
	CheckFail CheckStatus = "fail"
	CheckSkip CheckStatus = "skip"
)

// CheckResult is what a check found and, unless it passed, how to fix it.
type CheckResult struct {
	Status CheckStatus
	Detail string
	Fix    string
}

// Check is one host check a driver needs. A Provider returns its driver's
// checks; `firerunner doctor` runs those of the selected driver among its
// own host checks.
type Check struct {
	// Name is the check's name in the report ("qemu", "jailer").
	Name string
	Run  func(ctx context.Context, h CheckHost) CheckResult
}

// CheckHost is the host as a check sees it. Doctor fills it in; tests fake
// the parts they need.
type CheckHost struct {
	// Root prefixes host paths (/dev, /proc, /sys); "" means "/".
	Root string
	// Command runs bin with args and returns its combined output; nil runs
	// it for real with a 10 s limit.
	Command func(ctx context.Context, bin string, args ...string) (string, error)
	// BootProbe boots the guest kernel with a VMM command line (see
	// RunBootProbe); nil runs RunBootProbe for real.
	BootProbe func(ctx context.Context, argv []string, timeout time.Duration) error
}

// Path is p on the checked host.
func (h CheckHost) Path(p string) string {
	if h.Root == "" {
		return p
	}
	return filepath.Join(h.Root, p)
}

// Real reports whether the checks look at this machine itself (no Root).
func (h CheckHost) Real() bool { return h.Root == "" }

// RunBootProbe runs a boot probe on the checked host (see the package's
// RunBootProbe).
func (h CheckHost) RunBootProbe(ctx context.Context, argv []string, timeout time.Duration) error {
	if h.BootProbe != nil {
		return h.BootProbe(ctx, argv, timeout)
	}
	return RunBootProbe(ctx, argv, timeout)
}

// Version runs bin --version (bin: a path, or a name looked up in PATH)
// and returns the path and the answer.
func (h CheckHost) Version(ctx context.Context, bin string) (path, out string, err error) {
	p, err := exec.LookPath(bin)
	if err != nil {
		return bin, "", fmt.Errorf("%s not found or not executable: %w", bin, err)
	}
	out, err = h.run(ctx, p, "--version")
	if err != nil {
		return p, out, fmt.Errorf("%s --version failed: %w: %s", p, err, firstLine(out))
	}
	return p, out, nil
}

func (h CheckHost) run(ctx context.Context, bin string, args ...string) (string, error) {
	if h.Command != nil {
		return h.Command(ctx, bin, args...)
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, bin, args...).CombinedOutput()
	return string(out), err
}

// BinaryVersion checks that bin (a path, or a name looked up in PATH) exists
// and answers --version. It passes with the path and the first line of the
// answer, and fails with fix otherwise.
func (h CheckHost) BinaryVersion(ctx context.Context, bin, fix string) CheckResult {
	p, out, err := h.Version(ctx, bin)
	if err != nil {
		return CheckResult{Status: CheckFail, Fix: fix, Detail: err.Error()}
	}
	return CheckResult{Status: CheckPass, Detail: fmt.Sprintf("%s: %s", p, firstLine(out))}
}

func firstLine(s string) string {
	s, _, _ = strings.Cut(strings.TrimSpace(s), "\n")
	return strings.TrimSpace(s)
}
