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
	p, err := exec.LookPath(bin)
	if err != nil {
		return CheckResult{Status: CheckFail, Fix: fix, Detail: fmt.Sprintf("%s not found or not executable: %v", bin, err)}
	}
	out, err := h.run(ctx, p, "--version")
	if err != nil {
		return CheckResult{Status: CheckFail, Fix: fix, Detail: fmt.Sprintf("%s --version failed: %v: %s", p, err, firstLine(out))}
	}
	return CheckResult{Status: CheckPass, Detail: fmt.Sprintf("%s: %s", p, firstLine(out))}
}

func firstLine(s string) string {
	s, _, _ = strings.Cut(strings.TrimSpace(s), "\n")
	return strings.TrimSpace(s)
}
