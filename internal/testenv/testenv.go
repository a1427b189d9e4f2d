// Package testenv finds the prerequisites of FireRunner's integration tests
// (root, QEMU, the built guest image, the built gitlab-runner, tools such as
// git, xz and promtool). When one is missing the test skips loudly, or, with
// FIRERUNNER_TEST_REQUIRE=1 (set by `make test`, so CI never goes green on
// skipped tests), fails.
package testenv

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

// RequireEnv is the variable that turns a missing prerequisite into a
// failure. `make test` sets it to 1.
const RequireEnv = "FIRERUNNER_TEST_REQUIRE"

// Required reports whether missing prerequisites fail tests
// (FIRERUNNER_TEST_REQUIRE=1) instead of skipping them.
func Required() bool { return os.Getenv(RequireEnv) == "1" }

// Missing reports that the test's prerequisite what is missing, with fix
// telling how to provide it. Under FIRERUNNER_TEST_REQUIRE=1 the test fails;
// otherwise it prints a banner to stderr (visible without -v) and skips.
// Either way the test stops here.
func Missing(t testing.TB, what, fix string) {
	t.Helper()
	if Required() {
		t.Fatalf("prerequisite missing: %s (%s); %s=1 makes this a failure, not a skip", what, fix, RequireEnv)
	}
	msg := fmt.Sprintf("SKIPPED %s: prerequisite missing: %s (%s)", t.Name(), what, fix)
	fmt.Fprintf(os.Stderr, "\n!!!!!!!! %s\n\n", msg)
	t.Skip(msg)
}

// RequireRoot skips (or fails, see Missing) unless running as root.
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		Missing(t, "root", "run as root, as CI does")
	}
}

// Tool returns the path of the program name on $PATH, or skips (or fails,
// see Missing) with fix as the remedy.
func Tool(t testing.TB, name, fix string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		Missing(t, name, fix)
	}
	return p
}

// QEMU returns the qemu-system-x86_64 path.
func QEMU(t testing.TB) string {
	t.Helper()
	return Tool(t, "qemu-system-x86_64", "apt-get install qemu-system-x86, or run make deps")
}

// Git returns the git path.
func Git(t testing.TB) string {
	t.Helper()
	return Tool(t, "git", "apt-get install git, or run make deps")
}

// XZ returns the xz path.
func XZ(t testing.TB) string {
	t.Helper()
	return Tool(t, "xz", "apt-get install xz-utils, or run make deps")
}

// Promtool returns the path of Prometheus's promtool.
func Promtool(t testing.TB) string {
	t.Helper()
	return Tool(t, "promtool", "apt-get install prometheus, or run make deps")
}

// ImageDir returns the built guest image directory ($FIRERUNNER_TEST_IMAGE,
// set by make test).
func ImageDir(t testing.TB) string {
	t.Helper()
	d := os.Getenv("FIRERUNNER_TEST_IMAGE")
	if d == "" {
		Missing(t, "guest image", "FIRERUNNER_TEST_IMAGE is unset; run make test, which builds the image")
	}
	if _, err := os.Stat(filepath.Join(d, "manifest.json")); err != nil {
		Missing(t, "guest image", fmt.Sprintf("%s has no manifest.json; run make image", d))
	}
	return d
}

// GitLabRunner returns the built gitlab-runner binary
// ($FIRERUNNER_TEST_GITLAB_RUNNER, set by make test).
func GitLabRunner(t testing.TB) string {
	t.Helper()
	p := os.Getenv("FIRERUNNER_TEST_GITLAB_RUNNER")
	if p == "" {
		Missing(t, "gitlab-runner binary", "FIRERUNNER_TEST_GITLAB_RUNNER is unset; run make test, which builds it")
	}
	if _, err := os.Stat(p); err != nil {
		Missing(t, "gitlab-runner binary", fmt.Sprintf("%s: %v; run make gitlab-runner", p, err))
	}
	return p
}
