package main

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"testing"

	"github.com/firerunner/firerunner/internal/testsupport/pgtest"
)

// asMain makes the test binary act as firerunner: TestCLI runs it with this
// variable set, so every case goes through the real main and os.Exit.
const asMain = "FIRERUNNER_CLI_TEST_AS_MAIN"

func TestMain(m *testing.M) {
	if os.Getenv(asMain) == "1" {
		main()
		os.Exit(0) // main returned without exiting: the command succeeded
	}
	os.Exit(pgtest.Main(m))
}

type cliResult struct {
	code           int
	stdout, stderr string
}

// firerunner runs the test binary as `firerunner args...`.
func firerunner(t *testing.T, args ...string) cliResult {
	t.Helper()
	cmd := exec.Command(os.Args[0], args...)
	cmd.Env = append(os.Environ(), asMain+"=1", "FIRERUNNER_CACHE="+t.TempDir())
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	code := 0
	if err != nil {
		var ee *exec.ExitError
		if !errors.As(err, &ee) {
			t.Fatalf("firerunner %q: %v", args, err)
		}
		code = ee.ExitCode()
	}
	return cliResult{code, out.String(), errb.String()}
}

// walk lists every command and subcommand path, e.g. "image build".
func walk(prefix string, cmds []command, visit func(path string, c command)) {
	for _, c := range cmds {
		p := strings.TrimSpace(prefix + " " + c.name)
		visit(p, c)
		walk(p, c.subs, visit)
	}
}

func registered() []command {
	var cs []command
	for _, c := range commands {
		cs = append(cs, c)
	}
	sort.Slice(cs, func(i, j int) bool { return cs[i].name < cs[j].name })
	return cs
}

type cliCase struct {
	name       string
	args       []string
	code       int
	stdoutHas  []string // each must appear on stdout
	stderrHas  []string // each must appear on stderr
	quietOut   bool     // stdout must be empty
	quietError bool     // stderr must be empty
}

// TestCLI runs every command and subcommand's help, unknown-command,
// bad-flag and bad-argument paths through the real main and checks the
// exit code and where the output went: help on stdout with exit 0, usage
// errors on stderr with exit 2, failures on stderr with exit 1.
func TestCLI(t *testing.T) {
	top := "usage: firerunner <command>"
	cases := []cliCase{
		{name: "no args", code: 2, stderrHas: []string{top, "commands:"}, quietOut: true},
		{name: "unknown command", args: []string{"bogus"}, code: 2,
			stderrHas: []string{`firerunner: unknown command "bogus"`, top}, quietOut: true},
		{name: "unknown top-level flag", args: []string{"--bogus"}, code: 2,
			stderrHas: []string{`unknown flag "--bogus"`, top}, quietOut: true},
		{name: "help of unknown command", args: []string{"help", "bogus"}, code: 2,
			stderrHas: []string{`unknown command "bogus"`, top}, quietOut: true},
		{name: "version runs", args: []string{"version"}, code: 0, stdoutHas: []string{"firerunner "}, quietError: true},
		{name: "a failing command exits 1", args: []string{"image", "verify", "--cache", "/nonexistent-firerunner-cache"}, code: 1,
			stderrHas: []string{"firerunner image verify: ", "/nonexistent-firerunner-cache/latest"}, quietOut: true},
		{name: "status of a missing state dir exits 1", args: []string{"status", "--state-dir", filepath.Join(t.TempDir(), "none")}, code: 1,
			stderrHas: []string{"firerunner status: "}, quietOut: true},
	}
	for _, h := range []string{"-h", "--help", "-help", "help"} {
		cases = append(cases, cliCase{name: "top " + h, args: []string{h}, code: 0,
			stdoutHas: []string{top, "commands:"}, quietError: true})
	}
	seen := map[string]bool{}
	walk("", registered(), func(path string, c command) {
		seen[path] = true
		words := strings.Fields(path)
		usage := "usage: firerunner " + path
		for _, h := range []string{"-h", "--help", "-help"} {
			cases = append(cases, cliCase{name: path + " " + h, args: append(words[:len(words):len(words)], h), code: 0,
				stdoutHas: []string{usage, c.summary}, quietError: true})
		}
		cases = append(cases, cliCase{name: "help " + path, args: append([]string{"help"}, words...), code: 0,
			stdoutHas: []string{usage, c.summary}, quietError: true})
		if len(c.subs) > 0 {
			cases = append(cases,
				cliCase{name: path + " alone", args: words, code: 2,
					stderrHas: []string{"usage: firerunner " + path + " <command>", "commands:"}, quietOut: true},
				cliCase{name: path + " unknown subcommand", args: append(words[:len(words):len(words)], "bogus"), code: 2,
					stderrHas: []string{"firerunner " + path + `: unknown command "bogus"`, "usage: firerunner " + path + " <command>"}, quietOut: true},
				cliCase{name: path + " help sub", args: append(words[:len(words):len(words)], "help", c.subs[0].name), code: 0,
					stdoutHas: []string{usage + " " + c.subs[0].name}, quietError: true})
			for _, s := range c.subs {
				if !strings.Contains(usageOf(t, words), "  "+s.name+" ") {
					t.Errorf("firerunner %s -h does not list subcommand %s", path, s.name)
				}
			}
			return
		}
		cases = append(cases,
			cliCase{name: path + " unknown flag", args: append(words[:len(words):len(words)], "--no-such-flag"), code: 2,
				stderrHas: []string{"firerunner " + path + ": flag provided but not defined: -no-such-flag", usage}, quietOut: true},
			cliCase{name: path + " too many args", args: append(words[:len(words):len(words)], "extra-1", "extra-2"), code: 2,
				stderrHas: []string{"firerunner " + path + ": unexpected argument", usage}, quietOut: true})
	})
	for _, want := range []string{"serve", "status", "doctor", "version", "image", "image build", "image verify", "image dir"} {
		if !seen[want] {
			t.Errorf("command %q is not registered (registered: %v)", want, seen)
		}
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			r := firerunner(t, c.args...)
			if r.code != c.code {
				t.Errorf("firerunner %q exited %d, want %d\nstdout:\n%s\nstderr:\n%s", c.args, r.code, c.code, r.stdout, r.stderr)
			}
			for _, s := range c.stdoutHas {
				if !strings.Contains(r.stdout, s) {
					t.Errorf("firerunner %q: stdout lacks %q:\n%s", c.args, s, r.stdout)
				}
			}
			for _, s := range c.stderrHas {
				if !strings.Contains(r.stderr, s) {
					t.Errorf("firerunner %q: stderr lacks %q:\n%s", c.args, s, r.stderr)
				}
			}
			if c.quietOut && r.stdout != "" {
				t.Errorf("firerunner %q: want nothing on stdout, got:\n%s", c.args, r.stdout)
			}
			if c.quietError && r.stderr != "" {
				t.Errorf("firerunner %q: want nothing on stderr, got:\n%s", c.args, r.stderr)
			}
			if strings.Contains(r.stdout+r.stderr, "flag: help requested") {
				t.Errorf("firerunner %q printed the flag package's raw help error", c.args)
			}
		})
	}
}

// usageOf returns the in-process dispatcher's help output for a command path.
func usageOf(t *testing.T, words []string) string {
	t.Helper()
	var out, errb bytes.Buffer
	if code := run(append(words[:len(words):len(words)], "-h"), &out, &errb); code != 0 {
		t.Fatalf("firerunner %q -h exited %d: %s", words, code, errb.String())
	}
	return out.String()
}

// TestCLIFlagsListed: a command's help lists every flag it defines, checked
// in process for the leaf commands whose flags are known here.
func TestCLIFlagsListed(t *testing.T) {
	for path, flags := range map[string][]string{
		"serve":        {"-config"},
		"status":       {"-config", "-state-dir", "-n", "-active", "-job"},
		"doctor":       {"-config", "-json"},
		"image build":  {"-cache", "-agent", "-gitlab-runner", "-no-gitlab-runner", "-extra-ca", "-mirror", "-out", "-print-dir"},
		"image verify": {"-cache"},
		"image dir":    {"-cache"},
	} {
		out := usageOf(t, strings.Fields(path))
		for _, f := range flags {
			if !strings.Contains(out, "  "+f+" ") && !strings.Contains(out, "  "+f+"\n") {
				t.Errorf("firerunner %s -h does not list %s:\n%s", path, f, out)
			}
		}
	}
}
