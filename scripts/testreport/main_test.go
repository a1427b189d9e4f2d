package main

import (
	"bytes"
	"os"
	"strings"
	"testing"
)

func runReport(t *testing.T, stream string) (string, bool) {
	t.Helper()
	var out bytes.Buffer
	ok := run(strings.NewReader(stream), &out)
	return out.String(), ok
}

func file(t *testing.T, name string) string {
	t.Helper()
	b, err := os.ReadFile("testdata/" + name)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func TestMixed(t *testing.T) {
	// testdata/mixed.json: a package that does not build, one without test
	// files, and one with a passing, a skipped, a failing test and a
	// skipped subtest (real `go test -json` output).
	out, ok := runReport(t, file(t, "mixed.json"))
	if ok {
		t.Error("a run with failures reported success")
	}
	for _, want := range []string{
		"bad/b.go:1:25: undefined: x\n", // the build error
		"FAIL\ttj/bad [build failed]\n",
		"?   \ttj/none\t[no test files]\n",
		"--- SKIP: tj TestSkip: SKIPPED TestSkip: prerequisite missing: x (y)\n",
		"--- SKIP: tj TestSub/a: sub skip 1\n",
		"    a_test.go:5: boom\n        second line\n--- FAIL: TestFail (0.00s)\n",
		"FAIL\ttj\t0.003s\n",
		"\nskipped tests (2):\n  tj TestSkip: SKIPPED TestSkip: prerequisite missing: x (y)\n  tj TestSub/a: sub skip 1\n",
		"packages failed: 2\n",
		"\ntests: 3 passed, 1 failed, 2 skipped\n",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("report lacks %q:\n%s", want, out)
		}
	}
	for _, not := range []string{"hello", "=== RUN", "!!!!!!!! banner", "\nPASS\n"} {
		if strings.Contains(out, not) {
			t.Errorf("report has %q (passing tests' output and -v noise stay hidden):\n%s", not, out)
		}
	}
	if !strings.HasSuffix(out, "tests: 3 passed, 1 failed, 2 skipped\n") {
		t.Errorf("the count is not the last line:\n%s", out)
	}
}

func TestPanicShown(t *testing.T) {
	out, ok := runReport(t, file(t, "panic.json"))
	if ok {
		t.Error("a panicking test reported success")
	}
	for _, want := range []string{"panic: kaboom", "p_test.go:4 +0x4d", "FAIL\ttj/pan\t0.006s", "tests: 1 passed, 1 failed, 0 skipped"} {
		if !strings.Contains(out, want) {
			t.Errorf("report lacks %q:\n%s", want, out)
		}
	}
}

func TestAllPassing(t *testing.T) {
	stream := `{"Action":"run","Package":"p","Test":"TestA"}
{"Action":"output","Package":"p","Test":"TestA","Output":"--- PASS: TestA (0.00s)\n"}
{"Action":"pass","Package":"p","Test":"TestA"}
{"Action":"output","Package":"p","Output":"PASS\n"}
{"Action":"output","Package":"p","Output":"ok  \tp\t0.01s\n"}
{"Action":"pass","Package":"p"}
`
	out, ok := runReport(t, stream)
	if !ok || out != "ok  \tp\t0.01s\n\ntests: 1 passed, 0 failed, 0 skipped\n" {
		t.Errorf("ok=%v, report:\n%q", ok, out)
	}
}

// TestUnfinished: a test with no result (the binary was killed or timed
// out) is shown with its output and counted as failed.
func TestUnfinished(t *testing.T) {
	stream := `{"Action":"run","Package":"p","Test":"TestHang"}
{"Action":"output","Package":"p","Test":"TestHang","Output":"=== RUN   TestHang\n"}
{"Action":"output","Package":"p","Test":"TestHang","Output":"    h_test.go:9: waiting\n"}
not json: the go command said something
`
	out, ok := runReport(t, stream)
	if ok {
		t.Error("an unfinished test reported success")
	}
	for _, want := range []string{"not json: the go command said something\n", "--- INCOMPLETE: p TestHang", "h_test.go:9: waiting", "tests: 0 passed, 1 failed, 0 skipped"} {
		if !strings.Contains(out, want) {
			t.Errorf("report lacks %q:\n%s", want, out)
		}
	}
}

func TestSkipReason(t *testing.T) {
	for _, c := range []struct {
		lines []string
		want  string
	}{
		{nil, "(no reason given)"},
		{[]string{"    x_test.go:3: first\n", "    x_test.go:4: the reason\n", "        more\n"}, "the reason more"},
		{[]string{"\n", "!!!!!!!! SKIPPED banner\n", "    x_test.go:4: why\n"}, "why"},
	} {
		if got := skipReason(c.lines); got != c.want {
			t.Errorf("skipReason(%q) = %q, want %q", c.lines, got, c.want)
		}
	}
}
