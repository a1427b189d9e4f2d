// Command testreport reads `go test -json` on stdin and prints what a
// non-verbose `go test` prints (the ok/FAIL/? line of every package, the
// output of failing tests, build errors), plus one line for every skipped
// test with its reason, as it happens. At the end it lists the skips again
// and prints a count line:
//
//	tests: 812 passed, 0 failed, 3 skipped
//
// It exits 1 if any test or package failed or did not finish, so
// `go test -json ./... | testreport` fails when go test does. `make test-go`
// runs it.
package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"regexp"
	"sort"
	"strings"
)

// event is one line of `go test -json` (cmd/test2json).
type event struct {
	Action     string
	Package    string
	ImportPath string // build-output, build-fail
	Test       string
	Output     string
}

type testKey struct{ pkg, test string }

type skip struct {
	pkg, test, reason string
}

type report struct {
	out                    io.Writer
	running                map[testKey][]string // output of tests without a result yet
	order                  []testKey
	passed, failed, skipNo int
	pkgFailed              int
	skips                  []skip
}

func newReport(out io.Writer) *report {
	return &report{out: out, running: map[testKey][]string{}}
}

// logLine is a t.Log/t.Skip line: "    file_test.go:12: message".
var logLine = regexp.MustCompile(`^\s+[^\s:]+\.go:\d+: `)

// skipReason is the last logged message of a skipped test (t.Skip's),
// with its continuation lines.
func skipReason(lines []string) string {
	var last []string
	for _, l := range lines {
		l = strings.TrimRight(l, "\n")
		switch {
		case logLine.MatchString(l):
			last = []string{strings.TrimSpace(logLine.ReplaceAllString(l, ""))}
		case len(last) > 0 && strings.HasPrefix(l, "        "):
			last = append(last, strings.TrimSpace(l))
		}
	}
	r := strings.Join(last, " ")
	if r == "" {
		return "(no reason given)"
	}
	if len(r) > 400 {
		r = r[:399] + "…"
	}
	return r
}

func (r *report) event(e event) {
	switch e.Action {
	case "build-output":
		fmt.Fprint(r.out, e.Output)
		return
	case "build-fail":
		return
	}
	if e.Test == "" {
		switch e.Action {
		case "output":
			if o := strings.TrimSpace(e.Output); o != "PASS" && o != "FAIL" {
				fmt.Fprint(r.out, e.Output)
			}
		case "fail":
			r.pkgFailed++
		}
		return
	}
	k := testKey{e.Package, e.Test}
	switch e.Action {
	case "run":
		if _, ok := r.running[k]; !ok {
			r.order = append(r.order, k)
		}
		r.running[k] = nil
	case "output":
		if _, ok := r.running[k]; !ok {
			r.order = append(r.order, k)
		}
		if !strings.HasPrefix(e.Output, "=== ") { // RUN, PAUSE, CONT, NAME: -v noise
			r.running[k] = append(r.running[k], e.Output)
		}
	case "pass":
		r.passed++
		delete(r.running, k)
	case "fail":
		r.failed++
		for _, l := range r.running[k] {
			fmt.Fprint(r.out, l)
		}
		delete(r.running, k)
	case "skip":
		s := skip{e.Package, e.Test, skipReason(r.running[k])}
		r.skipNo++
		r.skips = append(r.skips, s)
		fmt.Fprintf(r.out, "--- SKIP: %s %s: %s\n", s.pkg, s.test, s.reason)
		delete(r.running, k)
	}
}

// finish prints tests that never finished (a crash or timeout), the skips
// and the count line, and says whether everything passed.
func (r *report) finish() bool {
	incomplete := 0
	for _, k := range r.order {
		lines, ok := r.running[k]
		if !ok {
			continue
		}
		incomplete++
		fmt.Fprintf(r.out, "--- INCOMPLETE: %s %s (no result: the test binary crashed or timed out)\n", k.pkg, k.test)
		for _, l := range lines {
			fmt.Fprint(r.out, l)
		}
	}
	if len(r.skips) > 0 {
		sort.SliceStable(r.skips, func(i, j int) bool { return r.skips[i].pkg < r.skips[j].pkg })
		fmt.Fprintf(r.out, "\nskipped tests (%d):\n", len(r.skips))
		for _, s := range r.skips {
			fmt.Fprintf(r.out, "  %s %s: %s\n", s.pkg, s.test, s.reason)
		}
	}
	fmt.Fprintln(r.out)
	if incomplete > 0 {
		fmt.Fprintf(r.out, "tests that did not finish: %d\n", incomplete)
	}
	if r.pkgFailed > 0 {
		fmt.Fprintf(r.out, "packages failed: %d\n", r.pkgFailed)
	}
	fmt.Fprintf(r.out, "tests: %d passed, %d failed, %d skipped\n", r.passed, r.failed+incomplete, r.skipNo)
	return r.failed == 0 && incomplete == 0 && r.pkgFailed == 0
}

func run(in io.Reader, out io.Writer) bool {
	r := newReport(out)
	sc := bufio.NewScanner(in)
	sc.Buffer(make([]byte, 1<<20), 64<<20)
	for sc.Scan() {
		line := sc.Bytes()
		var e event
		if len(line) == 0 || line[0] != '{' || json.Unmarshal(line, &e) != nil {
			// Not test2json: the go command's own messages. Pass them on.
			fmt.Fprintf(out, "%s\n", line)
			continue
		}
		r.event(e)
	}
	if err := sc.Err(); err != nil {
		fmt.Fprintf(out, "testreport: reading go test -json: %v\n", err)
		r.finish()
		return false
	}
	return r.finish()
}

func main() {
	if len(os.Args) > 1 {
		fmt.Fprintln(os.Stderr, "usage: go test -json ./... | testreport")
		os.Exit(2)
	}
	if !run(os.Stdin, os.Stdout) {
		os.Exit(1)
	}
}
