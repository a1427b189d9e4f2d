package main

import (
	"bytes"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"github.com/firerunner/firerunner/internal/config"
	"github.com/firerunner/firerunner/internal/daemon"
	"github.com/firerunner/firerunner/internal/store"
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
		if len(c.Firecracker.ExtraBootArgs) == 0 {
			c.Firecracker.ExtraBootArgs = nil
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

// serve refuses QEMU user-mode networking (guests reach the host's
// loopback) unless the file allows it for development; the refusal names
// the switch. With the switch, the same file gets past validation (and
// fails later, at its missing secret file).
func TestServeRefusesUserModeNetworking(t *testing.T) {
	dir := t.TempDir()
	write := func(extra string) string {
		p := filepath.Join(dir, "config.yaml")
		y := "gitlab:\n  url: https://gitlab.example.com\n  token_file: " + filepath.Join(dir, "missing-token") +
			"\nstate_dir: " + filepath.Join(dir, "state") + "\nvm:\n  driver: qemu\nqemu:\n  allow_for_development: true\nnetwork:\n  mode: user\n" + extra
		if err := os.WriteFile(p, []byte(y), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	r := firerunner(t, "serve", "--config", write(""))
	if r.code != 1 || !strings.Contains(r.stderr, "network.mode: user-mode networking lets every guest reach this host's loopback services") ||
		!strings.Contains(r.stderr, "network.allow_user_mode_for_development: true") {
		t.Fatalf("serve with network.mode user: exit %d, stderr:\n%s", r.code, r.stderr)
	}
	r = firerunner(t, "serve", "--config", write("  allow_user_mode_for_development: true\n"))
	if r.code != 1 || strings.Contains(r.stderr, "network.mode:") || !strings.Contains(r.stderr, "gitlab.token_file") {
		t.Fatalf("serve with user mode allowed: exit %d, want the missing token file as the error; stderr:\n%s", r.code, r.stderr)
	}
}

// install.sh creates the state dir with the mode the store sets at every
// start (store.DirMode), so a re-run of the installer after the daemon
// started has nothing to change (make test-install re-runs it).
func TestInstallerStateDirMode(t *testing.T) {
	b, err := os.ReadFile("../../install.sh")
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?m)^ensure_dir "\$STATEDIR" (0[0-7]{3}) (\S+) (\S+)$`).FindStringSubmatch(string(b))
	if m == nil {
		t.Fatal(`install.sh has no 'ensure_dir "$STATEDIR" MODE UID GID' line`)
	}
	if mode, _ := strconv.ParseUint(m[1], 8, 32); os.FileMode(mode) != store.DirMode || m[2] != "0" || m[3] != "0" {
		t.Errorf("install.sh makes the state dir %s %s:%s; the store sets %04o (owner root)", m[1], m[2], m[3], store.DirMode)
	}
}
