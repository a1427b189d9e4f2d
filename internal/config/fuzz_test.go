package config_test

import (
	"errors"
	"os"
	"reflect"
	"strings"
	"testing"

	"github.com/firerunner/firerunner/internal/config"
	"go.yaml.in/yaml/v3"
)

// FuzzParse feeds arbitrary bytes to the config parser as `firerunner serve`
// does (Parse over the defaults, with the real driver providers). It must never panic. A rejection names
// the problem; an accepted config validates, and written back as YAML it
// parses to the same config (nothing is read differently the second time).
func FuzzParse(f *testing.F) {
	for _, p := range []string{"../../config.example.yaml", "../../packaging/config.yaml"} {
		b, err := os.ReadFile(p)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	for _, s := range []string{
		"",
		"gitlab:\n  url: https://gitlab.example.com\n",
		"gitlab: {url: 'http://g', request_timeout: 1h30m}\nlimits: {queue_timeout: 0s}\n",
		"gitlab:\n  url: https://g\nnetwork:\n  dns: [1.1.1.1, 8.8.8.8]\n  egress: allowlist\n  egress_allow: [10.0.0.0/8, 192.0.2.1]\n",
		"gitlab:\n  url: https://g\nnetwork:\n  dns: null\n  allow_host_ports: [53, 70000]\n",
		"gitlab:\n  url: https://g\nreconcile:\n  poll_projects: [1, 2]\n  poll_groups: [-3]\n",
		"gitlab:\n  url: https://g\nvm:\n  driver: qemu\nnetwork:\n  mode: user\n",
		"gitlab:\n  url: https://g\nvm:\n  driver: qemu\nnetwork:\n  mode: user\n  allow_user_mode_for_development: true\n",
		"unknown_field: 1\n",
		"gitlab: [1, 2]\n",
		"capacity:\n  max_vcpus: 99999999999999999999\n",
		"&a [*a]\n",
		"gitlab:\n  url: https://g\n---\nlisten: ':1'\n",
		"log_level: !!binary aGVsbG8=\n",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		c := config.Default()
		err := config.Parse(b, &c, drivers)
		if err != nil {
			if err.Error() == "" {
				t.Fatal("rejection with an empty message")
			}
			var fe config.FieldErrors
			if errors.As(err, &fe) {
				if len(fe) == 0 {
					t.Fatal("FieldErrors with no field")
				}
				for _, e := range fe {
					if e == "" {
						t.Fatalf("empty field error in %q", fe)
					}
				}
			}
			return
		}
		if err := c.Validate(drivers); err != nil {
			t.Fatalf("Parse accepted a config that does not validate: %v", err)
		}
		out, err := yaml.Marshal(c)
		if err != nil {
			t.Fatalf("an accepted config does not marshal: %v", err)
		}
		again := config.Default()
		if err := config.Parse(out, &again, drivers); err != nil {
			t.Fatalf("an accepted config, written back, is rejected: %v\n%s", err, out)
		}
		if !reflect.DeepEqual(normEmpty(c), normEmpty(again)) {
			t.Fatalf("an accepted config reads differently when written back:\nfirst  %+v\nsecond %+v\nyaml:\n%s", c, again, out)
		}
		if strings.Contains(string(out), "\x00") && !strings.Contains(string(b), "\x00") {
			t.Fatal("a NUL byte appeared from nowhere")
		}
	})
}

// normEmpty treats nil and empty lists alike (`dns: []` and `dns: null`
// mean the same).
func normEmpty(c config.Config) config.Config {
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
	if len(c.Pools) == 0 {
		c.Pools = nil
	}
	if len(c.Firecracker.ExtraBootArgs) == 0 {
		c.Firecracker.ExtraBootArgs = nil
	}
	return c
}
