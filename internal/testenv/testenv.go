// Package testenv finds the prerequisites of FireRunner's integration tests
// (root, QEMU, the built guest image, the built gitlab-runner) and skips
// loudly when one is genuinely missing. `make test` provides all of them.
package testenv

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

// skip prints a banner to stderr (visible without -v) and skips the test.
func skip(t testing.TB, what, fix string) {
	t.Helper()
	msg := fmt.Sprintf("SKIPPED %s: prerequisite missing: %s (%s)", t.Name(), what, fix)
	fmt.Fprintf(os.Stderr, "\n!!!!!!!! %s\n\n", msg)
	t.Skip(msg)
}

// RequireRoot skips unless running as root.
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		skip(t, "root", "run as root, as CI does")
	}
}

// QEMU returns the qemu-system-x86_64 path or skips.
func QEMU(t testing.TB) string {
	t.Helper()
	p, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		skip(t, "qemu-system-x86_64", "apt-get install qemu-system-x86, or run make test")
	}
	return p
}

// ImageDir returns the built guest image directory ($FIRERUNNER_TEST_IMAGE,
// set by make test) or skips.
func ImageDir(t testing.TB) string {
	t.Helper()
	d := os.Getenv("FIRERUNNER_TEST_IMAGE")
	if d == "" {
		skip(t, "guest image", "FIRERUNNER_TEST_IMAGE is unset; run make test, which builds the image")
	}
	if _, err := os.Stat(filepath.Join(d, "manifest.json")); err != nil {
		skip(t, "guest image", fmt.Sprintf("%s has no manifest.json; run make image", d))
	}
	return d
}

// GitLabRunner returns the built gitlab-runner binary ($FIRERUNNER_TEST_GITLAB_RUNNER,
// set by make test) or skips.
func GitLabRunner(t testing.TB) string {
	t.Helper()
	p := os.Getenv("FIRERUNNER_TEST_GITLAB_RUNNER")
	if p == "" {
		skip(t, "gitlab-runner binary", "FIRERUNNER_TEST_GITLAB_RUNNER is unset; run make test, which builds it")
	}
	if _, err := os.Stat(p); err != nil {
		skip(t, "gitlab-runner binary", fmt.Sprintf("%s: %v; run make gitlab-runner", p, err))
	}
	return p
}
