package image

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
)

// DefaultCacheDir is $FIRERUNNER_CACHE/images, else /var/cache/firerunner/images.
func DefaultCacheDir() string {
	if c := os.Getenv("FIRERUNNER_CACHE"); c != "" {
		return filepath.Join(c, "images")
	}
	return "/var/cache/firerunner/images"
}

// The `firerunner image` subcommands (registered in cmd/firerunner, which
// applies internal/cli's conventions); progress goes to stderr, results to
// stdout.

// VerifyCLI runs `firerunner image verify [--cache DIR] [IMAGE-DIR]`.
func VerifyCLI(args []string) error {
	fs := flag.NewFlagSet("image verify", flag.ContinueOnError)
	cache := fs.String("cache", DefaultCacheDir(), "image cache directory (default image: DIR/latest)")
	if err := cli.Parse(fs, args); err != nil {
		return err
	}
	if err := cli.MaxArgs(fs, 1); err != nil {
		return err
	}
	dir := fs.Arg(0)
	if dir == "" {
		dir = filepath.Join(*cache, "latest")
	}
	if err := Verify(dir); err != nil {
		return err
	}
	fmt.Printf("image %s: all artefacts match the manifest\n", dir)
	return nil
}

// DirCLI runs `firerunner image dir [--cache DIR]`.
func DirCLI(args []string) error {
	fs := flag.NewFlagSet("image dir", flag.ContinueOnError)
	cache := fs.String("cache", DefaultCacheDir(), "image cache directory")
	if err := cli.Parse(fs, args); err != nil {
		return err
	}
	if err := cli.NoArgs(fs); err != nil {
		return err
	}
	m, err := Load(filepath.Join(*cache, "latest"))
	if err != nil {
		return err
	}
	fmt.Println(m.Dir)
	return nil
}

// BuildCLI runs `firerunner image build [flags]`.
func BuildCLI(args []string) error {
	fs := flag.NewFlagSet("image build", flag.ContinueOnError)
	var o Options
	fs.StringVar(&o.CacheDir, "cache", DefaultCacheDir(), "image cache directory (outputs in DIR/<input-hash>, DIR/latest)")
	fs.StringVar(&o.Agent, "agent", "", "static firerunner-agent binary (make agent)")
	fs.StringVar(&o.GitLabRunner, "gitlab-runner", "", "gitlab-runner binary for /usr/local/bin/gitlab-runner")
	fs.BoolVar(&o.NoGitLabRunner, "no-gitlab-runner", false, "build a smoke-test image without gitlab-runner")
	fs.StringVar(&o.GitLabRunnerHelper, "gitlab-runner-helper", "", "gitlab-runner-helper binary: build the docker executor's helper image from it and preload it")
	fs.StringVar(&o.HelperImageTar, "helper-image-tar", "", "preload this `docker save` archive as the helper image (e.g. the official gitlab-runner-helper of your release)")
	fs.StringVar(&o.ExtraCA, "extra-ca", "", "PEM file of extra CA certificates to trust")
	fs.StringVar(&o.Mirror, "mirror", "", "Debian mirror (default: the one in the apt sources)")
	out := fs.String("out", "", "also create a symlink at this path pointing to the image directory")
	printDir := fs.Bool("print-dir", false, "print only the image directory on stdout (progress goes to stderr)")
	if err := cli.Parse(fs, args); err != nil {
		return err
	}
	if err := cli.NoArgs(fs); err != nil {
		return err
	}
	if os.Geteuid() != 0 {
		return errors.New("image build needs root (debootstrap, file ownership in the rootfs)")
	}
	if err := os.MkdirAll(o.CacheDir, 0o755); err != nil {
		return err
	}
	o.Progress = os.Stderr
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	m, err := Build(ctx, o)
	if err != nil {
		return err
	}
	if *out != "" {
		tmp := *out + ".tmp"
		os.Remove(tmp)
		if err := os.Symlink(m.Dir, tmp); err != nil {
			return err
		}
		if err := os.Rename(tmp, *out); err != nil {
			return err
		}
	}
	if *printDir {
		fmt.Println(m.Dir)
	} else {
		img := m.VMImage()
		fmt.Printf("image %s\n  kernel %s\n  initrd %s\n  rootfs %s\n  cmdline %q (+ reboot=t|k, tsc_early_khz= under TCG)\n",
			m.Dir, img.Kernel, img.Initrd, img.Rootfs, m.Cmdline)
	}
	return nil
}
