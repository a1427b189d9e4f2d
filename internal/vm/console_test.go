package vm

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/firerunner/firerunner/internal/guestconfig"
)

func TestConsoleWatcherMarksMilestonesInOrder(t *testing.T) {
	path := filepath.Join(t.TempDir(), "console.log")
	var tl Timeline
	tl.Mark(MilestoneVMMStarted)
	w := WatchConsole(path, &tl, 5*time.Millisecond) // file does not exist yet
	defer w.Stop()

	f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	steps := []struct {
		text string
		m    Milestone
	}{
		{"[    0.000000] Linux version 6.1.0-40-amd64 (debian-kernel@lists.debian.org)\r\n", MilestoneKernel},
		{"[    1.234567] Run /init as init process\r\n", MilestoneInit},
		{guestconfig.MarkerAgentStart + "\r\n", MilestoneAgentStart},
		{guestconfig.MarkerJobStart + "\r\n", MilestoneJobStart},
		{"hello\r\n", -1},
		{guestconfig.MarkerJobEnd + "\r\n", MilestoneJobEnd},
		{guestconfig.ExitMarker + "7\r\n", MilestoneExit},
		{guestconfig.MarkerPowerOff, MilestonePowerOff}, // no newline yet
	}
	for _, s := range steps {
		if _, err := f.WriteString(s.text); err != nil {
			t.Fatal(err)
		}
		if s.m < 0 {
			continue
		}
		deadline := time.Now().Add(10 * time.Second)
		for {
			if _, ok := tl.At(s.m); ok {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("milestone %q not marked after writing %q", s.m, s.text)
			}
			time.Sleep(2 * time.Millisecond)
		}
	}
	w.Stop()
	w.Stop() // idempotent

	stages := tl.Stages()
	var got []string
	for i, s := range stages {
		got = append(got, s.Milestone.String())
		if i > 0 && s.At.Before(stages[i-1].At) {
			t.Errorf("stage %s at %v before previous %v", s.Milestone, s.At, stages[i-1].At)
		}
	}
	want := "vmm started,guest kernel,guest init,agent start,job start,job end,exit status,guest poweroff"
	if strings.Join(got, ",") != want {
		t.Errorf("stages = %s\nwant     %s", strings.Join(got, ","), want)
	}
	if s := tl.String(); !strings.Contains(s, "agent start") || strings.Count(s, "\n") != len(stages) {
		t.Errorf("String() = %q", s)
	}
}

func TestTimelineSummary(t *testing.T) {
	var tl Timeline
	t0 := time.Unix(1000, 0)
	tl.MarkAt(MilestoneImageReady, t0)
	tl.MarkAt(MilestoneVMMStarted, t0.Add(100*time.Millisecond))
	tl.MarkAt(MilestoneKernel, t0.Add(1*time.Second)) // no "Run /init": falls back
	tl.MarkAt(MilestoneAgentStart, t0.Add(5*time.Second))
	tl.MarkAt(MilestoneJobEnd, t0.Add(6*time.Second))
	tl.MarkAt(MilestoneVMMExited, t0.Add(6500*time.Millisecond))
	got := tl.Summary()
	for _, want := range []string{
		"image ready           +0.000s  (stage 0.000s)",
		"VM process started    +0.100s  (stage 0.100s)",
		"guest kernel init     +1.000s  (stage 0.900s)",
		"agent start           +5.000s  (stage 4.000s)",
		"command done          +6.000s  (stage 1.000s)",
		"VM gone               +6.500s  (stage 0.500s)",
	} {
		if !strings.Contains(got, want) {
			t.Errorf("Summary lacks %q:\n%s", want, got)
		}
	}
	var empty Timeline
	if s := empty.Summary(); strings.Count(s, "-\n") != 6 {
		t.Errorf("empty Summary = %q", s)
	}
}

func TestTimelineFirstMarkWins(t *testing.T) {
	var tl Timeline
	t0 := time.Unix(100, 0)
	if !tl.MarkAt(MilestoneKernel, t0) {
		t.Fatal("first MarkAt returned false")
	}
	if tl.MarkAt(MilestoneKernel, t0.Add(time.Second)) {
		t.Fatal("second MarkAt returned true")
	}
	if at, _ := tl.At(MilestoneKernel); !at.Equal(t0) {
		t.Fatalf("At = %v, want %v", at, t0)
	}
	tl.MarkAt(MilestoneAgentStart, t0.Add(3*time.Second))
	if d, ok := tl.Between(MilestoneKernel, MilestoneAgentStart); !ok || d != 3*time.Second {
		t.Fatalf("Between = %v %v", d, ok)
	}
	if _, ok := tl.Between(MilestoneKernel, MilestoneJobEnd); ok {
		t.Fatal("Between with an unrecorded milestone reported ok")
	}
	if tl.MarkAt(numMilestones, t0) || tl.MarkAt(-1, t0) {
		t.Fatal("out-of-range milestone accepted")
	}
}

func TestConsoleExitCode(t *testing.T) {
	long := strings.Repeat("x", 200<<10) // longer than the reader buffer
	cases := []struct {
		name string
		log  string
		code int
		ok   bool
	}{
		{"none", "Linux version\r\nhello\r\n", -1, false},
		{"crlf", "a\r\n" + guestconfig.ExitMarker + "7\r\n" + guestconfig.MarkerPowerOff + "\r\n", 7, true},
		{"no trailing newline", guestconfig.ExitMarker + "0", 0, true},
		{"last wins over job output", guestconfig.ExitMarker + "0\n" + long + "\n" + guestconfig.ExitMarker + "3\n", 3, true},
		{"mid-line is not a marker", "echo " + guestconfig.ExitMarker + "5\n", -1, false},
		{"garbage value ignored", guestconfig.ExitMarker + "abc\n", -1, false},
		{"negative", guestconfig.ExitMarker + "-1\n", -1, true},
		{"long line containing marker skipped", long + guestconfig.ExitMarker + "9\n" + guestconfig.ExitMarker + "2\n", 2, true},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			p := filepath.Join(t.TempDir(), "console.log")
			if err := os.WriteFile(p, []byte(c.log), 0o600); err != nil {
				t.Fatal(err)
			}
			code, ok, err := ConsoleExitCode(p)
			if err != nil || code != c.code || ok != c.ok {
				t.Fatalf("ConsoleExitCode = %d, %v, %v; want %d, %v", code, ok, err, c.code, c.ok)
			}
		})
	}
	if code, ok, err := ConsoleExitCode(filepath.Join(t.TempDir(), "missing")); code != -1 || ok || err != nil {
		t.Fatalf("missing file: %d %v %v", code, ok, err)
	}
}
