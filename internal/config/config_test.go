package config

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func valid() Config {
	c := Default()
	c.GitLab.URL = "https://gitlab.example.com"
	return c
}

func TestDefaultsNeedOnlyTheGitLabURL(t *testing.T) {
	if err := Default().Validate(); err == nil || !strings.Contains(err.Error(), "gitlab.url") {
		t.Fatalf("default config without gitlab.url: %v", err)
	}
	if err := valid().Validate(); err != nil {
		t.Fatalf("defaults + url: %v", err)
	}
}

// Every bad field is reported at once, each naming its field.
func TestValidateListsEveryBadField(t *testing.T) {
	c := valid()
	c.LogLevel = "chatty"
	c.Runners.MaximumTimeout = 5 * time.Minute
	c.Runners.Scope = "group" // without group_id
	c.VM.Driver = "vbox"
	c.Network.MTU = 100
	c.Network.AllowHostPorts = []int{0, 70000}
	err := c.Validate()
	fe, ok := err.(FieldErrors)
	if !ok {
		t.Fatalf("want FieldErrors, got %T %v", err, err)
	}
	for _, field := range []string{"log_level", "runners.maximum_timeout", "runners.group_id", "vm.driver", "network.mtu", "network.allow_host_ports"} {
		if !strings.Contains(err.Error(), field+":") {
			t.Errorf("error does not name %s:\n%v", field, err)
		}
	}
	if len(fe) < 6 {
		t.Errorf("want at least 6 field errors, got %d", len(fe))
	}
}

func TestParse(t *testing.T) {
	for _, tc := range []struct {
		name, yaml, wantErr string
	}{
		{"empty file keeps defaults but needs url", "", "gitlab.url"},
		{"minimal", "gitlab:\n  url: https://gitlab.example.com\n", ""},
		{"unknown field", "gitlab:\n  url: https://g.example.com\n  tokn_file: /x\n", "tokn_file"},
		{"bad duration", "gitlab:\n  url: https://g.example.com\nlimits:\n  job_max_duration: soon\n", "soon"},
		{"user network with firecracker", "gitlab:\n  url: https://g.example.com\nnetwork:\n  mode: user\n", "network.mode"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := Default()
			err := Parse([]byte(tc.yaml), &c)
			if tc.wantErr == "" && err != nil {
				t.Fatalf("unexpected error: %v", err)
			}
			if tc.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tc.wantErr)) {
				t.Fatalf("want error containing %q, got %v", tc.wantErr, err)
			}
		})
	}
}

func TestReadSecret(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "secret")
	if err := os.WriteFile(p, []byte("  s3cret\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if s, err := ReadSecret(p); err != nil || s != "s3cret" {
		t.Fatalf("ReadSecret = %q, %v", s, err)
	}
	if err := os.Chmod(p, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := ReadSecret(p); err == nil || !strings.Contains(err.Error(), "0600") {
		t.Fatalf("world-readable secret accepted: %v", err)
	}
	empty := filepath.Join(dir, "empty")
	if err := os.WriteFile(empty, []byte("\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := ReadSecret(empty); err == nil {
		t.Fatal("empty secret accepted")
	}
	if _, err := ReadSecret(filepath.Join(dir, "missing")); err == nil {
		t.Fatal("missing secret accepted")
	}
}
