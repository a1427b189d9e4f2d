package agent

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

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
			dir := t.TempDir()
			cfg := fmt.Sprintf("concurrent = 1\n[[runners]]\n  name = \"m\"\n  url = %q\n  token = %q\n  executor = \"shell\"\n  builds_dir = %q\n",
				url, r.Token, filepath.Join(dir, "builds"))
			if err := os.WriteFile(filepath.Join(dir, "config.toml"), []byte(cfg), 0o600); err != nil {
				t.Fatal(err)
			}
			cmd := exec.Command(bin, "run-single", "-c", filepath.Join(dir, "config.toml"), "-r", "m", "--max-builds", "1", "--wait-timeout", "60")
			cmd.Env = append(os.Environ(), "HOME="+dir)
			out := &testenv.Buffer{}
			cmd.Stdout, cmd.Stderr = out, out
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			defer func() {
				_ = cmd.Process.Kill()
				_ = cmd.Wait()
				// The shell executor runs a job's script in a process group
				// of its own, which outlives the killed gitlab-runner for a
				// moment and may still write in builds_dir: empty it before
				// TempDir's cleanup, which fails on a directory that fills.
				builds := filepath.Join(dir, "builds")
				for i := 0; i < 100 && os.RemoveAll(builds) != nil; i++ {
					time.Sleep(100 * time.Millisecond)
				}
				if t.Failed() {
					t.Logf("gitlab-runner:\n%s", out.String())
				}
			}()
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
			if js, _ := s.Job(second); js.Status != gitlabstandin.StatusPending || js.RunnerID != 0 {
				t.Fatalf("the second job: %s on runner %d, want pending", js.Status, js.RunnerID)
			}
			if js, _ := s.Job(pl.JobIDs[0]); js.RunnerID != r.ID {
				t.Fatalf("the first job went to runner %d", js.RunnerID)
			}
		})
	}
}
