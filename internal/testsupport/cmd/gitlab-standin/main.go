// Command gitlab-standin runs FireRunner's GitLab stand-in
// (internal/testsupport/gitlabstandin) with a seeded demo project, for manual
// testing.
//
// Secrets come from the environment, never argv: GITLAB_STANDIN_TOKEN (the
// personal access token to accept, scope api; default: generated and written
// to <data-dir>/token, mode 0600) and GITLAB_STANDIN_WEBHOOK_SECRET.
package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/firerunner/firerunner/internal/testsupport/gitlabstandin"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "gitlab-standin:", err)
		os.Exit(1)
	}
}

func run() error {
	addr := flag.String("listen", "127.0.0.1:8929", "address to listen on")
	dataDir := flag.String("data-dir", "", "directory for git repositories and the token file (default: a temp dir, removed on exit)")
	externalURL := flag.String("external-url", "", "base URL put into job payloads and webhooks (default http://<listen>)")
	externalHost := flag.String("external-host", "", "host put into URLs with the listener's port, e.g. the host's address on the VM network")
	webhookURL := flag.String("webhook-url", "", "Job Hook receiver, e.g. http://127.0.0.1:8080/webhook")
	project := flag.String("project", "demo/app", "path of the seeded demo project")
	pipeline := flag.Bool("pipeline", false, "create a pipeline from the demo project's .gitlab-ci.yml at start")
	runnerCap := flag.Int("runner-cap", 50, "runners creatable per project per 7 days (<0: unlimited)")
	verbose := flag.Bool("v", false, "log every request")
	flag.Parse()

	level := slog.LevelInfo
	if *verbose {
		level = slog.LevelDebug
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))

	if *dataDir != "" {
		if err := os.MkdirAll(*dataDir, 0o700); err != nil {
			return err
		}
	}
	srv, err := gitlabstandin.New(gitlabstandin.Options{
		Addr: *addr, Dir: *dataDir, ExternalURL: *externalURL, ExternalHost: *externalHost,
		WebhookURL: *webhookURL, WebhookSecret: os.Getenv("GITLAB_STANDIN_WEBHOOK_SECRET"),
		ProjectRunnerCap: *runnerCap, Logger: log,
	})
	if err != nil {
		return err
	}
	defer srv.Close()

	tok := os.Getenv("GITLAB_STANDIN_TOKEN")
	if tok == "" {
		tok = "glpat-" + randomToken()
		if *dataDir != "" {
			p := filepath.Join(*dataDir, "token")
			if err := os.WriteFile(p, []byte(tok+"\n"), 0o600); err != nil {
				return err
			}
			log.Info("generated a personal access token", "file", p)
		} else {
			log.Warn("no GITLAB_STANDIN_TOKEN and no --data-dir: the generated token is not stored anywhere")
		}
	}
	srv.AddToken(tok, gitlabstandin.ScopeAPI)

	p, err := srv.AddProject(gitlabstandin.ProjectSpec{
		Path: *project,
		Files: map[string]string{
			"README.md":      "# FireRunner demo project\n",
			"hello.sh":       "#!/bin/sh\necho \"hello from $(hostname): $(nproc) CPUs, $(awk '/MemTotal/ {print $2}' /proc/meminfo) kB RAM\"\n",
			".gitlab-ci.yml": demoCI,
		},
	})
	if err != nil {
		return err
	}
	info := map[string]any{"url": srv.URL(), "project_id": p.ID, "project_path": p.Path, "group_id": p.GroupID, "sha": p.HeadSHA}
	if *pipeline {
		jobs, err := gitlabstandin.ParseCIConfig([]byte(demoCI))
		if err != nil {
			return err
		}
		pl, err := srv.CreatePipeline(p.ID, jobs...)
		if err != nil {
			return err
		}
		info["pipeline_id"], info["job_ids"] = pl.ID, pl.JobIDs
	}
	b, _ := json.Marshal(info)
	fmt.Println(string(b))
	log.Info("GitLab stand-in ready", "url", srv.URL(), "project", p.Path, "project_id", p.ID,
		"webhook", strings.TrimSpace(*webhookURL))

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	<-ctx.Done()
	log.Info("shutting down")
	return nil
}

// demoCI is the seeded project's .gitlab-ci.yml; POST
// /api/v4/projects/:id/pipeline?ref=main runs it again.
const demoCI = `small:
  tags: [firecracker-1cpu-1gb]
  script: [./hello.sh]
large:
  tags: [firecracker-2cpu-2gb]
  script: [./hello.sh]
`

func randomToken() string {
	b := make([]byte, 10)
	if _, err := rand.Read(b); err != nil {
		panic(err)
	}
	return hex.EncodeToString(b)
}
