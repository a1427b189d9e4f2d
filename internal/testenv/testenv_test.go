package testenv

import (
	"bytes"
	"os"
	"os/exec"
	"strings"
	"testing"
)

const helperEnv = "FIRERUNNER_TESTENV_HELPER"

// TestHelperMissingTool is run by TestMissing in a child process; on its
// own it does nothing.
func TestHelperMissingTool(t *testing.T) {
	if os.Getenv(helperEnv) != "1" {
		return
	}
	Tool(t, "firerunner-no-such-tool", "install it")
	t.Log("REACHED AFTER MISSING") // never: Missing stops the test
}

// TestMissing: a missing prerequisite skips with a banner, and with
// FIRERUNNER_TEST_REQUIRE=1 it fails instead.
func TestMissing(t *testing.T) {
	for _, c := range []struct {
		require  string
		fail     bool
		want     string
		stderrOK string
	}{
		{"", false, "--- SKIP: TestHelperMissingTool", "!!!!!!!! SKIPPED TestHelperMissingTool: prerequisite missing: firerunner-no-such-tool (install it)"},
		{"0", false, "--- SKIP: TestHelperMissingTool", "!!!!!!!! SKIPPED"},
		{"1", true, "--- FAIL: TestHelperMissingTool", ""},
	} {
		cmd := exec.Command(os.Args[0], "-test.run", "^TestHelperMissingTool$", "-test.v", "-test.count=1")
		env := []string{helperEnv + "=1"}
		for _, e := range os.Environ() {
			if !strings.HasPrefix(e, RequireEnv+"=") {
				env = append(env, e)
			}
		}
		if c.require != "" {
			env = append(env, RequireEnv+"="+c.require)
		}
		cmd.Env = env
		var out, errb bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &errb
		err := cmd.Run()
		if (err != nil) != c.fail {
			t.Errorf("%s=%q: run error %v, want failure %v\n%s%s", RequireEnv, c.require, err, c.fail, out.String(), errb.String())
		}
		if !strings.Contains(out.String(), c.want) {
			t.Errorf("%s=%q: output lacks %q:\n%s", RequireEnv, c.require, c.want, out.String())
		}
		if !strings.Contains(out.String(), "prerequisite missing: firerunner-no-such-tool (install it)") {
			t.Errorf("%s=%q: output does not say what is missing:\n%s", RequireEnv, c.require, out.String())
		}
		if strings.Contains(out.String(), "REACHED AFTER MISSING") {
			t.Errorf("%s=%q: the test went on after Missing", RequireEnv, c.require)
		}
		if !strings.Contains(errb.String(), c.stderrOK) {
			t.Errorf("%s=%q: stderr lacks the banner %q:\n%s", RequireEnv, c.require, c.stderrOK, errb.String())
		}
	}
}
