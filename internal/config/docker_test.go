package config_test

import (
	"errors"
	"slices"
	"strings"
	"testing"

	"github.com/firerunner/firerunner/internal/config"
)

func TestDockerFields(t *testing.T) {
	c := valid()
	if c.Runners.Executor != config.ExecutorShell || c.Docker.ScratchDiskGiB != 20 || c.Docker.RegistryMirror != "" {
		t.Fatalf("defaults: executor %q, scratch %d, mirror %q", c.Runners.Executor, c.Docker.ScratchDiskGiB, c.Docker.RegistryMirror)
	}
	c.Runners.Executor = config.ExecutorDocker
	c.Docker.RegistryMirror = "http://172.30.0.1:5000"
	if err := c.Validate(drivers); err != nil {
		t.Fatalf("docker executor with a mirror: %v", err)
	}
	c.Runners.Executor = "kubernetes"
	c.Docker.ScratchDiskGiB = 0
	c.Docker.RegistryMirror = "172.30.0.1:5000"
	err := c.Validate(drivers)
	var fe config.FieldErrors
	if !errors.As(err, &fe) {
		t.Fatalf("want FieldErrors, got %v", err)
	}
	want := config.FieldErrors{
		`runners.executor: "kubernetes" is not one of shell, docker`,
		"docker.scratch_disk_gib: must be between 1 and 16384, got 0",
		`docker.registry_mirror: "172.30.0.1:5000" is not an http(s) URL of a registry (scheme://host[:port])`,
	}
	if !slices.Equal(fe, want) {
		t.Errorf("field errors:\n%q\nwant\n%q", fe, want)
	}
	c = valid()
	c.Runners.Executor, c.Runners.DefaultImage = config.ExecutorDocker, " "
	c.Docker.RegistryMirror = "https://mirror.example.com/v2/"
	err = c.Validate(drivers)
	if !errors.As(err, &fe) || len(fe) != 2 {
		t.Fatalf("empty default image and a mirror with a path: %v", err)
	}
	c = valid()
	c.Runners.Executor, c.Firecracker.SnapshotRefill = config.ExecutorDocker, true
	if err := c.Validate(drivers); !errors.As(err, &fe) || !slices.ContainsFunc(fe, func(s string) bool {
		return strings.HasPrefix(s, "firecracker.snapshot_refill: not with runners.executor docker")
	}) {
		t.Errorf("docker with snapshot refills: %v", err)
	}
	// The shell executor ignores default_image.
	c = valid()
	c.Runners.DefaultImage = ""
	if err := c.Validate(drivers); err != nil {
		t.Fatalf("shell executor without default_image: %v", err)
	}
}
