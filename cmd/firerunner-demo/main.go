// Command firerunner-demo runs the demo (internal/demo): the GitLab stand-in,
// a real FireRunner (QEMU driver) and a small pipeline in real microVMs.
// It is its own binary so that the production `firerunner` links no test
// double (see cmd/firerunner's TestNoTestSupportLinked). `make demo` runs it.
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

	"github.com/firerunner/firerunner/internal/cli"
	"github.com/firerunner/firerunner/internal/demo"
	"github.com/firerunner/firerunner/internal/image"
)

const (
	usageLine = "usage: firerunner-demo [flags]"
	summary   = "Run a pipeline in real microVMs against the built-in GitLab stand-in (root)."
)

// main follows internal/cli's conventions: help on stdout with exit 0, bad
// usage on stderr with exit 2, any other failure exit 1.
func main() {
	err := run(os.Args[1:])
	var he *cli.HelpError
	var ue *cli.UsageError
	switch {
	case err == nil:
	case errors.As(err, &he):
		fmt.Printf("%s\n\n%s\n\nflags:\n%s", usageLine, summary, he.Flags)
	case errors.As(err, &ue):
		fmt.Fprintf(os.Stderr, "firerunner-demo: %s\n\n%s\n\nflags:\n%s", ue.Msg, usageLine, ue.Flags)
		os.Exit(2)
	default:
		fmt.Fprintf(os.Stderr, "firerunner-demo: %v\n", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	fs := flag.NewFlagSet("firerunner-demo", flag.ContinueOnError)
	imageDir := fs.String("image", "", "guest image dir (default: the latest built image)")
	keep := fs.String("workdir", "", "keep state, logs and console logs in this directory (default: a temp dir, removed)")
	warm := fs.String("warm", "firecracker-1cpu-1gb", "size tag with a warm pool of one VM: its job runs warm, the others cold (\"\" = no pool)")
	docker := fs.Bool("docker", true, "run the jobs with the docker executor and add the docker-image and docker-build jobs (local registries, no internet); false: shell executor")
	if err := cli.Parse(fs, args); err != nil {
		return err
	}
	if err := cli.NoArgs(fs); err != nil {
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
	o := demo.Options{ImageDir: *imageDir, WorkDir: *keep, Out: os.Stdout, WarmSize: *warm, Docker: *docker}
	if *docker {
		o.Jobs = append(demo.DefaultJobs(), demo.DockerJobs()...)
	}
	rep, err := demo.Run(ctx, o)
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
