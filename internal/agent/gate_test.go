package agent

import (
	"bytes"
	"compress/gzip"
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/firerunner/firerunner/internal/testenv"
	"github.com/firerunner/firerunner/internal/testsupport/gitlabstandin"
)

// TestJobGateOneJobWithRealRunner: the real gitlab-runner, whose first job
// ends early (GitLab refuses the job's first update with 403: run-single
// aborts it without counting a build), asks GitLab for another job at once
// and, without the gate, gets the next pending one. Through the gate its
// second job request never reaches GitLab, the agent is told (Again), and
// the next job stays pending for another VM.
func TestJobGateOneJobWithRealRunner(t *testing.T) {
	bin := testenv.GitLabRunner(t)
	testenv.Git(t)
	for _, gated := range []bool{false, true} {
		t.Run(fmt.Sprintf("gated=%v", gated), func(t *testing.T) {
			s, err := gitlabstandin.New(gitlabstandin.Options{})
			if err != nil {
				t.Fatal(err)
			}
			defer s.Close()
			p, err := s.AddProject(gitlabstandin.ProjectSpec{Path: "g/p", Files: map[string]string{"README.md": "x\n"}})
			if err != nil {
				t.Fatal(err)
			}
			const tag = "firecracker-1cpu-1gb"
			pl, err := s.CreatePipeline(p.ID, gitlabstandin.JobSpec{Name: "a", Tags: []string{tag}, Script: []string{"true"}},
				gitlabstandin.JobSpec{Name: "b", Tags: []string{tag}, Script: []string{"true"}})
			if err != nil {
				t.Fatal(err)
			}
			r, err := s.CreateRunner(gitlabstandin.RunnerSpec{ProjectID: p.ID, Tags: []string{tag}})
			if err != nil {
				t.Fatal(err)
			}
			s.FailNext("PUT", "/api/v4/jobs/", 403, 1) // the first job's first update
			url := s.URL()
			var g *JobGate
			if gated {
				if g, err = NewJobGate(); err != nil {
					t.Fatal(err)
				}
				defer g.Close()
				if err := g.SetTarget(s.URL()); err != nil {
					t.Fatal(err)
				}
				url = g.URL()
			}
			startGatedRunner(t, bin, url, r.Token)
			second := pl.JobIDs[1]
			if !gated {
				// The hazard: the same gitlab-runner takes a second job.
				deadline := time.Now().Add(time.Minute)
				for {
					if js, _ := s.Job(second); js.RunnerID == r.ID {
						return
					}
					if time.Now().After(deadline) {
						t.Fatal("gitlab-runner did not ask for a second job after its first ended early; the gate guards nothing")
					}
					time.Sleep(20 * time.Millisecond)
				}
			}
			select {
			case <-g.Again():
			case <-time.After(time.Minute):
				t.Fatal("gitlab-runner's second job request did not reach the gate")
			}
			if !g.Taken() {
				t.Fatal("the gate did not see the first job handed out")
			}
			// GitLab answered the job's update 403: it ended the job
			// itself, so the gate has no end to report.
			if g.Abandoned() {
				t.Fatal("a job GitLab refused (403) counts as abandoned")
			}
			if js, _ := s.Job(second); js.Status != gitlabstandin.StatusPending || js.RunnerID != 0 {
				t.Fatalf("the second job: %s on runner %d, want pending", js.Status, js.RunnerID)
			}
			if js, _ := s.Job(pl.JobIDs[0]); js.RunnerID != r.ID {
				t.Fatalf("the first job went to runner %d", js.RunnerID)
			}
		})
	}
}

// TestJobGateReportsAbandonedJob: a job whose end gitlab-runner never
// reports (here: it is killed mid-job) does not stay "running" in GitLab:
// the gate knows the job and its token and reports it failed, with a note
// in its trace. A job gitlab-runner ends itself is left alone.
func TestJobGateReportsAbandonedJob(t *testing.T) {
	bin := testenv.GitLabRunner(t)
	testenv.Git(t)
	for _, tc := range []struct {
		name   string
		script string
		kill   bool
	}{
		{name: "killed-mid-job", script: "echo begun; sleep 300", kill: true},
		{name: "ends-itself", script: "echo begun"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, g, jobID, token := gatedJob1(t, tc.script)
			defer s.Close()
			defer g.Close()
			cmd, out := startGatedRunner(t, bin, g.URL(), token)
			waitJob(t, s, jobID, "its trace to show the script ran", func(js gitlabstandin.JobState) bool {
				return strings.Contains(js.Trace, "begun") && (tc.kill || js.Status == gitlabstandin.StatusSuccess)
			})
			if !tc.kill {
				// The gate notes the end when GitLab's 200 passes it back.
				for deadline := time.Now().Add(10 * time.Second); g.Abandoned() && time.Now().Before(deadline); {
					time.Sleep(20 * time.Millisecond)
				}
				if g.Abandoned() {
					t.Fatalf("gitlab-runner reported job %d's end through the gate, which still calls it abandoned\n%s", jobID, out)
				}
				if err := g.FailJob(context.Background(), "runner_system_failure", "FireRunner: x"); err != nil {
					t.Fatal(err)
				}
				if js, _ := s.Job(jobID); js.Status != gitlabstandin.StatusSuccess || strings.Contains(js.Trace, "FireRunner") {
					t.Fatalf("FailJob touched a job gitlab-runner ended: %s, trace %q", js.Status, js.Trace)
				}
				return
			}
			_ = unix.Kill(-cmd.Process.Pid, unix.SIGKILL)
			_ = cmd.Wait()
			if js, _ := s.Job(jobID); js.Status != gitlabstandin.StatusRunning {
				t.Fatalf("job %d is %s after gitlab-runner was killed, want running (nobody told GitLab)", jobID, js.Status)
			}
			if !g.Abandoned() || g.JobID() != jobID {
				t.Fatalf("gate: abandoned %v, job %d; want true, %d", g.Abandoned(), g.JobID(), jobID)
			}
			if err := g.FailJob(context.Background(), "runner_system_failure", "FireRunner: gone"); err != nil {
				t.Fatal(err)
			}
			// gitlab-runner 19 writes timestamped trace lines; the note
			// is one more line of the same format.
			js, _ := s.Job(jobID)
			if js.Status != gitlabstandin.StatusFailed || js.FailureReason != "runner_system_failure" ||
				!strings.Contains(js.Trace, "begun") || !strings.HasSuffix(js.Trace, "\n") ||
				!timestampedLine.MatchString(js.Trace[strings.LastIndex(js.Trace[:len(js.Trace)-1], "\n")+1:]) ||
				!strings.HasSuffix(js.Trace, " 00O FireRunner: gone\n") {
				t.Fatalf("job %d after FailJob: %s (%s), trace %q; want failed (runner_system_failure), the runner's trace and the note after it",
					jobID, js.Status, js.FailureReason, js.Trace)
			}
			if g.Abandoned() {
				t.Fatal("still abandoned after GitLab took its end")
			}
		})
	}
}

// TestJobGateFailJobRetries: GitLab failing the first final update (500)
// does not leave the job running; a job GitLab already ended (403) is not
// an error.
func TestJobGateFailJobRetries(t *testing.T) {
	for _, tc := range []struct {
		name   string
		status int
		want   string
	}{
		{"500-then-ok", 500, gitlabstandin.StatusFailed},
		{"already-ended", 403, gitlabstandin.StatusRunning},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, g, jobID, token := gatedJob1(t, "true")
			defer s.Close()
			defer g.Close()
			// What gitlab-runner does first: ask for a job through the gate.
			body := fmt.Sprintf(`{"token":%q,"info":{"name":"gitlab-runner"}}`, token)
			resp, err := http.Post(g.URL()+"/api/v4/jobs/request", "application/json", strings.NewReader(body))
			if err != nil {
				t.Fatal(err)
			}
			payload, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != http.StatusCreated || !strings.Contains(string(payload), fmt.Sprintf(`"id":%d`, jobID)) {
				t.Fatalf("job request through the gate: %s %s", resp.Status, payload)
			}
			if !g.Abandoned() {
				t.Fatal("the gate did not note the job it handed out")
			}
			n := 1
			if tc.status == 403 {
				n = 10 // every try: GitLab has ended the job
			}
			s.FailNext("PUT", fmt.Sprintf("/api/v4/jobs/%d", jobID), tc.status, n)
			if err := g.FailJob(context.Background(), "runner_system_failure"); err != nil {
				t.Fatal(err)
			}
			if js, _ := s.Job(jobID); js.Status != tc.want {
				t.Fatalf("job %d: %s, want %s", jobID, js.Status, tc.want)
			}
			if g.Abandoned() {
				t.Fatal("still abandoned")
			}
		})
	}
}

// gatedJob1 starts a stand-in with one pending job running script, a
// runner for it and a gate to the stand-in; it returns the job's id and
// the runner's token.
func gatedJob1(t *testing.T, script string) (*gitlabstandin.Server, *JobGate, int64, string) {
	t.Helper()
	s, err := gitlabstandin.New(gitlabstandin.Options{})
	if err != nil {
		t.Fatal(err)
	}
	p, err := s.AddProject(gitlabstandin.ProjectSpec{Path: "g/p", Files: map[string]string{"README.md": "x\n"}})
	if err != nil {
		t.Fatal(err)
	}
	const tag = "firecracker-1cpu-1gb"
	pl, err := s.CreatePipeline(p.ID, gitlabstandin.JobSpec{Name: "a", Tags: []string{tag}, Script: []string{script}})
	if err != nil {
		t.Fatal(err)
	}
	r, err := s.CreateRunner(gitlabstandin.RunnerSpec{ProjectID: p.ID, Tags: []string{tag}})
	if err != nil {
		t.Fatal(err)
	}
	g, err := NewJobGate()
	if err != nil {
		t.Fatal(err)
	}
	if err := g.SetTarget(s.URL()); err != nil {
		t.Fatal(err)
	}
	return s, g, pl.JobIDs[0], r.Token
}

// startGatedRunner runs the real gitlab-runner (run-single, shell
// executor) against url in a process group of its own; it is killed at
// the test's end.
func startGatedRunner(t *testing.T, bin, url, token string) (*exec.Cmd, *testenv.Buffer) {
	t.Helper()
	dir := t.TempDir()
	cfg := fmt.Sprintf("concurrent = 1\n[[runners]]\n  name = \"m\"\n  url = %q\n  token = %q\n  executor = \"shell\"\n  builds_dir = %q\n",
		url, token, filepath.Join(dir, "builds"))
	if err := os.WriteFile(filepath.Join(dir, "config.toml"), []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "run-single", "-c", filepath.Join(dir, "config.toml"), "-r", "m", "--max-builds", "1", "--wait-timeout", "60")
	cmd.Env = append(os.Environ(), "HOME="+dir)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	out := &testenv.Buffer{}
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = unix.Kill(-cmd.Process.Pid, unix.SIGKILL)
		_ = cmd.Wait()
		// The job's shell may outlive gitlab-runner a moment and still
		// write in builds_dir: empty it before TempDir's cleanup.
		builds := filepath.Join(dir, "builds")
		for i := 0; i < 100 && os.RemoveAll(builds) != nil; i++ {
			time.Sleep(100 * time.Millisecond)
		}
		if t.Failed() {
			t.Logf("gitlab-runner:\n%s", out.String())
		}
	})
	return cmd, out
}

// waitJob waits up to a minute for the stand-in's job id to satisfy ok.
func waitJob(t *testing.T, s *gitlabstandin.Server, id int64, what string, ok func(gitlabstandin.JobState) bool) {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for {
		js, _ := s.Job(id)
		if ok(js) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("job %d: waited a minute for %s; it is %s, trace %q", id, what, js.Status, js.Trace)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func TestTraceNote(t *testing.T) {
	now := time.Date(2026, 11, 30, 10, 58, 14, 986684000, time.UTC)
	if got, want := traceNote([]string{"a", "b"}, true, now), "2026-11-30T10:58:14.986684Z 00O a\n2026-11-30T10:58:14.986684Z 00O b\n"; got != want {
		t.Errorf("timestamped: %q, want %q", got, want)
	}
	if got, want := traceNote([]string{"a"}, false, now), "a\n"; got != want {
		t.Errorf("plain: %q, want %q", got, want)
	}
	if !timestampedLine.MatchString("2026-11-30T10:58:14.986684Z 00O+section_start") || timestampedLine.MatchString("Running with gitlab-runner") {
		t.Error("timestampedLine does not tell gitlab-runner's timestamped lines from plain ones")
	}
}

// TestDecodePayload: GitLab may gzip the job payload (gitlab-runner's
// client accepts gzip); the gate reads the job's id and token either way.
func TestDecodePayload(t *testing.T) {
	const payload = `{"id":42,"token":"glcbt-x","allow_git_fetch":true}`
	var zb bytes.Buffer
	zw := gzip.NewWriter(&zb)
	_, _ = zw.Write([]byte(payload))
	_ = zw.Close()
	for _, tc := range []struct {
		enc  string
		body []byte
	}{{"", []byte(payload)}, {"gzip", zb.Bytes()}} {
		var j gatedJob
		if err := decodePayload(tc.enc, tc.body, &j); err != nil || j.ID != 42 || j.Token != "glcbt-x" {
			t.Errorf("encoding %q: %+v, %v", tc.enc, j, err)
		}
	}
	var j gatedJob
	if err := decodePayload("gzip", []byte(payload), &j); err == nil {
		t.Error("a body that is not gzip decoded as gzip")
	}
}
