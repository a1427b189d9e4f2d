package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"

	"github.com/firerunner/firerunner/internal/demo"
	"github.com/firerunner/firerunner/internal/image"
)

func init() {
	register(command{name: "demo", summary: "run a pipeline in real microVMs against the built-in GitLab stand-in", run: runDemo})
}

func runDemo(args []string) error {
	fs := flag.NewFlagSet("demo", flag.ContinueOnError)
	imageDir := fs.String("image", "", "guest image dir (default: the latest built image)")
	keep := fs.String("workdir", "", "keep state, logs and console logs in this directory (default: a temp dir, removed)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *imageDir == "" {
		*imageDir = filepath.Join(image.DefaultCacheDir(), "latest")
	}
	if _, err := image.Load(*imageDir); err != nil {
		return fmt.Errorf("guest image: %w (build it with: make image)", err)
	}
	if os.Geteuid() != 0 {
		return errors.New("the demo boots VMs and must run as root")
	}
	if *keep != "" {
		if err := os.MkdirAll(*keep, 0o700); err != nil {
			return err
		}
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	rep, err := demo.Run(ctx, demo.Options{ImageDir: *imageDir, WorkDir: *keep, Out: os.Stdout})
	if err != nil {
		return err
	}
	if len(rep.Leftovers) > 0 {
		return fmt.Errorf("%d things were left behind", len(rep.Leftovers))
	}
	for _, j := range rep.Jobs {
		if j.Ours && j.GitLab.Status != "success" {
			return fmt.Errorf("job %q ended %s", j.Spec.Name, j.GitLab.Status)
		}
	}
	fmt.Println("\ndemo passed: every FireRunner job succeeded in its own microVM; nothing left behind")
	return nil
}
