package main

import (
	"bytes"
	"os"
	"reflect"
	"testing"

	"github.com/firerunner/firerunner/internal/config"
	"github.com/firerunner/firerunner/internal/daemon"
	"go.yaml.in/yaml/v3"
)

// TestExampleConfigIsTheDefaults keeps config.example.yaml and
// config.Default() in step: the documented file must spell out exactly the
// defaults, field by field.
func TestExampleConfigIsTheDefaults(t *testing.T) {
	b, err := os.ReadFile("../../config.example.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var got config.Config
	dec := yaml.NewDecoder(bytes.NewReader(b))
	dec.KnownFields(true)
	if err := dec.Decode(&got); err != nil {
		t.Fatalf("config.example.yaml: %v", err)
	}
	want := config.Default()
	// Empty lists in the example decode as empty, not nil.
	norm := func(c *config.Config) {
		if len(c.Reconcile.PollProjects) == 0 {
			c.Reconcile.PollProjects = nil
		}
		if len(c.Reconcile.PollGroups) == 0 {
			c.Reconcile.PollGroups = nil
		}
		if len(c.Network.DNS) == 0 {
			c.Network.DNS = nil
		}
		if len(c.Network.EgressAllow) == 0 {
			c.Network.EgressAllow = nil
		}
		if len(c.Network.AllowHostPorts) == 0 {
			c.Network.AllowHostPorts = nil
		}
	}
	norm(&got)
	norm(&want)
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("config.example.yaml differs from config.Default():\n got %+v\nwant %+v", got, want)
	}
	// With the one required field set, it is a valid configuration.
	got.GitLab.URL = "https://gitlab.example.com"
	if err := got.Validate(daemon.Drivers()); err != nil {
		t.Fatal(err)
	}
}
