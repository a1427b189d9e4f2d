package main

import (
	"os/exec"
	"slices"
	"strings"
	"testing"
)

const module = "github.com/firerunner/firerunner"

// notInProduction are the package trees the production binary must never
// link: test doubles (GitLab and Firecracker stand-ins, the fake VM driver,
// test prerequisites) and the demo, which starts the GitLab stand-in.
var notInProduction = []string{
	module + "/internal/testsupport",
	module + "/internal/testenv",
	module + "/internal/demo",
}

// deps lists the packages pkg links (go list -deps, test files excluded).
func deps(t *testing.T, pkg string) []string {
	t.Helper()
	goBin, err := exec.LookPath("go")
	if err != nil {
		t.Fatalf("the go command is needed to list %s's dependencies: %v", pkg, err)
	}
	cmd := exec.Command(goBin, "list", "-deps", "-f", "{{.ImportPath}}", pkg)
	cmd.Dir = "../.." // the module root
	out, err := cmd.Output()
	if err != nil {
		if ee, ok := err.(*exec.ExitError); ok {
			t.Fatalf("go list -deps %s: %v\n%s", pkg, err, ee.Stderr)
		}
		t.Fatalf("go list -deps %s: %v", pkg, err)
	}
	return strings.Fields(string(out))
}

// forbidden returns the packages of list under notInProduction.
func forbidden(list []string) []string {
	var bad []string
	for _, p := range list {
		for _, prefix := range notInProduction {
			if p == prefix || strings.HasPrefix(p, prefix+"/") {
				bad = append(bad, p)
			}
		}
	}
	return bad
}

// TestNoTestSupportLinked fails when bin/firerunner links a test double or
// the demo. The demo binary (cmd/firerunner-demo) links the GitLab stand-in
// by design; it is checked too, to show that the check finds such a link.
func TestNoTestSupportLinked(t *testing.T) {
	prod := deps(t, "./cmd/firerunner")
	if !slices.Contains(prod, module+"/internal/daemon") {
		t.Fatalf("go list -deps ./cmd/firerunner does not list internal/daemon; the listing is incomplete:\n%s", strings.Join(prod, "\n"))
	}
	if bad := forbidden(prod); len(bad) > 0 {
		t.Errorf("the production binary links test support or the demo; move the import into a _test.go file or cmd/firerunner-demo:\n  %s",
			strings.Join(bad, "\n  "))
	}
	if bad := forbidden(deps(t, "./cmd/firerunner-demo")); !slices.Contains(bad, module+"/internal/testsupport/gitlabstandin") {
		t.Errorf("the check misses the demo binary's link to the GitLab stand-in; it reported %v", bad)
	}
}

// TestVMIndependentOfConfig keeps internal/vm free of internal/config: the
// driver providers (internal/vm/qemu, internal/vm/firecracker) read their
// config sections, and vm.Registry takes the config type as a parameter.
// Code in internal/vm that wants config values takes them as plain fields
// filled in by a provider.
func TestVMIndependentOfConfig(t *testing.T) {
	list := deps(t, "./internal/vm")
	if !slices.Contains(list, module+"/internal/guestconfig") {
		t.Fatalf("go list -deps ./internal/vm does not list internal/guestconfig; the listing is incomplete:\n%s", strings.Join(list, "\n"))
	}
	if slices.Contains(list, module+"/internal/config") {
		t.Errorf("internal/vm links internal/config; pass the values in from the driver's Provider instead")
	}
}
