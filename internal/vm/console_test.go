package vm

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

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

// writeConsole plays a guest: boot lines, agent start, lines of job output
// (numbered, so gaps show), exit marker and power-off, appended with
// O_APPEND as both VMMs write, in small writes racing with the watcher.
func writeConsole(t *testing.T, path string, lines int) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	w := func(s string) {
		if _, err := f.WriteString(s); err != nil {
			t.Fatal(err)
		}
	}
	w("[    0.000000] Linux version 6.1.0-40-amd64 (debian-kernel@lists.debian.org)\r\n")
	w("[    1.234567] Run /init as init process\r\n")
	w(guestconfig.MarkerAgentStart + "\r\n")
	w(guestconfig.MarkerJobStart + "\r\n")
	for i := 0; i < lines; i++ {
		w(fmt.Sprintf("job output line %08d %s\r\n", i, strings.Repeat("x", 40)))
		if i%2000 == 0 {
			time.Sleep(time.Millisecond) // let the watcher cut mid-stream
		}
	}
	w(guestconfig.MarkerJobEnd + "\r\n")
	w(guestconfig.ExitMarker + "7\r\n")
	w(guestconfig.MarkerPowerOff + "\r\n")
}

// checkCapped checks a capped console log: under the cap (measured as
// data, holes skipped), head and cut notice present, and after the notice
// every job line up to the last one, in sequence: nothing the watcher had
// not scanned was dropped, and the markers the drivers parse are intact.
func checkCapped(t *testing.T, path string, limit int64, lines int) {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	data, err := io.ReadAll(&dataReader{f: f})
	if err != nil {
		t.Fatal(err)
	}
	if int64(len(data)) > limit {
		t.Errorf("console log holds %d bytes of data, cap %d", len(data), limit)
	}
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err == nil && st.Blocks*512 > limit+64<<10 {
		t.Errorf("console log uses %d bytes of disk, cap %d", st.Blocks*512, limit)
	}
	s := string(data)
	if !strings.HasPrefix(s, "[    0.000000] Linux version") {
		t.Errorf("head lost: %q", s[:min(len(s), 80)])
	}
	i := strings.Index(s, ConsoleCutMarker)
	if i < 0 {
		t.Fatalf("no cut notice in a log of %d lines", lines)
	}
	rest := s[i:]
	rest = rest[strings.IndexByte(rest, '\n')+1:] // the notice line and the torn line joined to it
	var want int
	if _, err := fmt.Sscanf(rest, "job output line %08d", &want); err != nil {
		t.Fatalf("tail does not start with a job line: %q", rest[:min(len(rest), 80)])
	}
	for _, l := range strings.Split(strings.TrimSuffix(rest, "\r\n"), "\r\n") {
		if strings.HasPrefix(l, "FIRERUNNER") {
			continue
		}
		var got int
		if _, err := fmt.Sscanf(l, "job output line %08d", &got); err != nil || got != want {
			t.Fatalf("tail line %q, want job line %d: bytes were lost", l, want)
		}
		want++
	}
	if want != lines {
		t.Errorf("tail ends at job line %d, want %d", want-1, lines-1)
	}
	if code, ok, err := ConsoleExitCode(path); code != 7 || !ok || err != nil {
		t.Errorf("ConsoleExitCode = %d, %v, %v; want 7", code, ok, err)
	}
}

func TestConsoleLogCapped(t *testing.T) {
	const limit, lines = 256 << 10, 60000 // ~4 MiB of job output
	run := func(t *testing.T, dir string) {
		path := filepath.Join(dir, "console.log")
		var tl Timeline
		w := WatchConsoleMax(path, &tl, time.Millisecond, limit)
		writeConsole(t, path, lines)
		w.Stop()
		dropped, err := w.Dropped()
		if err != nil || dropped < 3<<20 {
			t.Errorf("Dropped = %d, %v", dropped, err)
		}
		for _, m := range []Milestone{MilestoneKernel, MilestoneInit, MilestoneAgentStart, MilestoneJobStart, MilestoneJobEnd, MilestoneExit, MilestonePowerOff} {
			if _, ok := tl.At(m); !ok {
				t.Errorf("milestone %s not marked", m)
			}
		}
		checkCapped(t, path, limit, lines)
	}
	t.Run("collapse", func(t *testing.T) { run(t, t.TempDir()) })
	t.Run("punch", func(t *testing.T) {
		forcePunch = true
		defer func() { forcePunch = false }()
		run(t, t.TempDir())
	})
	t.Run("tmpfs", func(t *testing.T) { // no COLLAPSE_RANGE: falls back to punching
		var sfs unix.Statfs_t
		if err := unix.Statfs("/dev/shm", &sfs); err != nil || sfs.Type != unix.TMPFS_MAGIC {
			t.Skip("/dev/shm is not a tmpfs")
		}
		dir, err := os.MkdirTemp("/dev/shm", "frconsole")
		if err != nil {
			t.Skip(err)
		}
		defer os.RemoveAll(dir)
		run(t, dir)
	})
	t.Run("under the cap nothing changes", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "console.log")
		w := WatchConsoleMax(path, nil, time.Millisecond, limit)
		writeConsole(t, path, 100)
		w.Stop()
		b, _ := os.ReadFile(path)
		if strings.Contains(string(b), ConsoleCutMarker) || !strings.Contains(string(b), "job output line 00000099") {
			t.Errorf("small log changed:\n%s", b)
		}
	})
}

// Only one watcher caps a file; a second one only reads it.
func TestConsoleCapOneWatcher(t *testing.T) {
	path := filepath.Join(t.TempDir(), "console.log")
	if err := os.WriteFile(path, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	f1, _ := openConsole(path)
	defer f1.Close()
	f2, _ := openConsole(path)
	defer f2.Close()
	if newCapper(f1, 1<<20) == nil || newCapper(f2, 1<<20) != nil {
		t.Fatal("want exactly the first watcher to cap the file")
	}
}

func TestConsoleFilesNoFollow(t *testing.T) {
	dir := t.TempDir()
	target := filepath.Join(dir, "target")
	if err := os.WriteFile(target, []byte(guestconfig.ExitMarker+"3\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	link := filepath.Join(dir, "console.log")
	if err := os.Symlink(target, link); err != nil {
		t.Fatal(err)
	}
	if _, _, err := ConsoleExitCode(link); !errors.Is(err, unix.ELOOP) {
		t.Errorf("ConsoleExitCode through a symlink: %v, want ELOOP", err)
	}
	if _, err := openConsole(link); err == nil {
		t.Error("the watcher opened a console log through a symlink")
	}
	keep := filepath.Join(dir, "keep")
	if err := KeepConsoleLog(link, keep, "fr-a", ConsolePolicy{}); err == nil {
		t.Error("KeepConsoleLog copied a symlinked console log")
	}
	// A symlink planted at the copy's name is replaced, not written through.
	src := filepath.Join(dir, "real.log")
	if err := os.WriteFile(src, []byte("console text\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	victim := filepath.Join(dir, "victim")
	if err := os.WriteFile(victim, []byte("precious\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(keep, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(victim, filepath.Join(keep, "fr-b.log")); err != nil {
		t.Fatal(err)
	}
	if err := KeepConsoleLog(src, keep, "fr-b", ConsolePolicy{}); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(victim); string(b) != "precious\n" {
		t.Errorf("KeepConsoleLog wrote through a symlink: victim now %q", b)
	}
	fi, err := os.Lstat(filepath.Join(keep, "fr-b.log"))
	if err != nil || !fi.Mode().IsRegular() || fi.Mode().Perm() != 0o600 {
		t.Errorf("kept copy: %v %v", fi, err)
	}
}

func TestKeepConsoleLogCapsAndPrunes(t *testing.T) {
	dir := t.TempDir()
	keep := filepath.Join(dir, "keep")
	if err := os.MkdirAll(filepath.Join(keep, "fr-dir.log"), 0o700); err != nil { // not a file: left alone
		t.Fatal(err)
	}
	now := time.Now()
	old := func(name string, age time.Duration) {
		p := filepath.Join(keep, name)
		if err := os.WriteFile(p, []byte("old\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Chtimes(p, now.Add(-age), now.Add(-age)); err != nil {
			t.Fatal(err)
		}
	}
	old("fr-old1.log", 9*24*time.Hour) // past the age limit
	old("fr-n1.log", 1*time.Hour)
	old("fr-n2.log", 2*time.Hour)
	old("fr-n3.log", 3*time.Hour) // beyond keep=3 once the new copy is in
	old("notes.txt", 30*24*time.Hour)
	old(".fr-x.log.tmp-123", 2*time.Hour) // an interrupted copy
	if err := os.Symlink("/etc/hostname", filepath.Join(keep, "fr-link.log")); err != nil {
		t.Fatal(err)
	}

	// The source was never capped (e.g. a file system without fallocate):
	// the copy is capped anyway.
	src := filepath.Join(dir, "console.log")
	writeConsole(t, src, 20000) // ~1.3 MiB
	p := ConsolePolicy{MaxBytes: 128 << 10, Keep: 3, MaxAge: 7 * 24 * time.Hour}
	if err := KeepConsoleLog(src, keep, "fr-new", p); err != nil {
		t.Fatal(err)
	}
	checkCapped(t, filepath.Join(keep, "fr-new.log"), 128<<10, 20000)

	var names []string
	ents, _ := os.ReadDir(keep)
	for _, e := range ents {
		names = append(names, e.Name())
	}
	if got, want := strings.Join(names, ","), "fr-dir.log,fr-link.log,fr-n1.log,fr-n2.log,fr-new.log,notes.txt"; got != want {
		t.Errorf("after pruning: %s\nwant            %s", got, want)
	}
	if err := KeepConsoleLog(filepath.Join(dir, "missing"), keep, "fr-gone", p); err != nil {
		t.Errorf("missing console log: %v", err)
	}
	if err := KeepConsoleLog(src, keep, "../x", p); err == nil {
		t.Error("bad vm id accepted")
	}
	// No limits: nothing is pruned.
	if err := PruneConsoleLogs(keep, NewConsolePolicy(0, 0, 0), now.Add(365*24*time.Hour)); err != nil {
		t.Fatal(err)
	}
	if ents2, _ := os.ReadDir(keep); len(ents2) != len(ents) {
		t.Errorf("pruned without limits: %d -> %d entries", len(ents), len(ents2))
	}
}
