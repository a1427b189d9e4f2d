package vm

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// toyConfig stands in for the daemon's config.Config: a selector and one
// section per toy driver.
type toyConfig struct {
	Driver   string
	Sections map[string]string // driver name → its "binary" setting
	Level    string            // checked by every provider, selected or not
}

// toyProvider validates "<name>.binary" (set, when selected) and
// "<name>.level" (one of low, high, always).
type toyProvider struct{ name string }

func (p toyProvider) Name() string { return p.name }

func (p toyProvider) Validate(c toyConfig, selected bool) []FieldError {
	var errs []FieldError
	if selected && c.Sections[p.name] == "" {
		errs = append(errs, Fieldf(p.name+".binary", "must be set"))
	}
	if c.Level != "" && c.Level != "low" && c.Level != "high" {
		errs = append(errs, Fieldf(p.name+".level", "%q is not one of low, high", c.Level))
	}
	return errs
}

func (p toyProvider) Checks(c toyConfig) []Check {
	return []Check{{Name: p.name + "-binary", Run: func(context.Context, CheckHost) CheckResult {
		return CheckResult{Status: CheckPass, Detail: c.Sections[p.name]}
	}}}
}

func (p toyProvider) New(c toyConfig, _ *slog.Logger) (Driver, error) {
	if c.Sections[p.name] == "" {
		return nil, errors.New(p.name + ": no binary")
	}
	return toyDriver(p.name), nil
}

type toyDriver string

func (d toyDriver) Name() string                               { return string(d) }
func (toyDriver) Start(context.Context, Spec) error            { return nil }
func (toyDriver) Wait(context.Context, string) (Result, error) { return Result{}, ErrNotFound }
func (toyDriver) Destroy(context.Context, string) error        { return nil }
func (toyDriver) List(context.Context) ([]Instance, error)     { return nil, nil }

func newToyRegistry(names ...string) *Registry[toyConfig] {
	r := NewRegistry[toyConfig]()
	for _, n := range names {
		r.Add(toyProvider{n})
	}
	return r
}

func TestRegistryLookup(t *testing.T) {
	r := newToyRegistry("qemu", "firecracker")
	if got := r.Names(); !slices.Equal(got, []string{"qemu", "firecracker"}) {
		t.Fatalf("Names() = %q, want the order added", got)
	}
	cfg := toyConfig{Sections: map[string]string{"qemu": "/usr/bin/qemu", "firecracker": "/usr/bin/firecracker"}}
	for _, tc := range []struct {
		name    string
		wantErr string // "" = found
	}{
		{"qemu", ""},
		{"firecracker", ""},
		{"vbox", `unknown vm driver "vbox" (known: qemu, firecracker)`},
		{"", `unknown vm driver "" (known: qemu, firecracker)`},
		{"QEMU", `unknown vm driver "QEMU" (known: qemu, firecracker)`},
		{"fake", `unknown vm driver "fake" (known: qemu, firecracker)`},
	} {
		t.Run("name="+tc.name, func(t *testing.T) {
			p, err := r.Get(tc.name)
			d, newErr := r.New(tc.name, cfg, nil)
			checks, checksErr := r.Checks(tc.name, cfg)
			if tc.wantErr == "" {
				if err != nil || newErr != nil || checksErr != nil {
					t.Fatalf("Get/New/Checks(%q): %v / %v / %v", tc.name, err, newErr, checksErr)
				}
				if p.Name() != tc.name || d.Name() != tc.name || len(checks) != 1 || checks[0].Name != tc.name+"-binary" {
					t.Fatalf("wrong provider for %q: %s, driver %s, checks %+v", tc.name, p.Name(), d.Name(), checks)
				}
				return
			}
			for _, e := range []error{err, newErr, checksErr} {
				var ue *UnknownDriverError
				if !errors.As(e, &ue) || e.Error() != tc.wantErr {
					t.Errorf("got %T %v, want *UnknownDriverError %q", e, e, tc.wantErr)
				}
			}
		})
	}
	if _, err := newToyRegistry().Get("qemu"); err == nil || err.Error() != `unknown vm driver "qemu" (known: )` {
		t.Errorf("empty registry: %v", err)
	}
	// A provider's construction error comes back unchanged.
	if _, err := r.New("qemu", toyConfig{}, nil); err == nil || err.Error() != "qemu: no binary" {
		t.Errorf("New without a binary: %v", err)
	}
}

func TestRegistryValidate(t *testing.T) {
	r := newToyRegistry("qemu", "firecracker")
	both := map[string]string{"qemu": "q", "firecracker": "f"}
	for _, tc := range []struct {
		name string
		cfg  toyConfig
		want []string
	}{
		{"valid", toyConfig{Driver: "qemu", Sections: both}, nil},
		{"only the selected section must be complete", toyConfig{Driver: "qemu", Sections: map[string]string{"qemu": "q"}}, nil},
		{"selected section incomplete", toyConfig{Driver: "firecracker", Sections: map[string]string{"qemu": "q"}},
			[]string{"firecracker.binary: must be set"}},
		{"checks on every section, in the order added", toyConfig{Driver: "firecracker", Level: "mid"},
			[]string{`qemu.level: "mid" is not one of low, high`, "firecracker.binary: must be set", `firecracker.level: "mid" is not one of low, high`}},
		{"unknown selected: no section is selected", toyConfig{Driver: "vbox"}, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var got []string
			for _, err := range r.Validate(tc.cfg.Driver, tc.cfg) {
				var fe FieldError
				if !errors.As(err, &fe) || fe.Field == "" || !strings.HasPrefix(err.Error(), fe.Field+": ") {
					t.Errorf("%T %v is not a FieldError naming its field", err, err)
				}
				got = append(got, err.Error())
			}
			if !slices.Equal(got, tc.want) {
				t.Errorf("Validate:\n got %q\nwant %q", got, tc.want)
			}
		})
	}
}

func TestRegistryAddRejectsBadNames(t *testing.T) {
	for _, tc := range []struct {
		name  string
		names []string
		panic string
	}{
		{"duplicate", []string{"qemu", "qemu"}, "vm: driver added twice: qemu"},
		{"empty", []string{""}, "has no name"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			defer func() {
				if p := recover(); p == nil || !strings.Contains(fmt.Sprint(p), tc.panic) {
					t.Fatalf("panic = %v, want %q", p, tc.panic)
				}
			}()
			newToyRegistry(tc.names...)
		})
	}
}

func TestCheckHostBinaryVersion(t *testing.T) {
	dir := t.TempDir()
	bin := filepath.Join(dir, "vmm")
	if err := os.WriteFile(bin, []byte("#!/bin/sh\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	answer, fail := "VMM v1.2.3\n\nmore detail\n", error(nil)
	h := CheckHost{Root: dir, Command: func(_ context.Context, b string, args ...string) (string, error) {
		if b != bin || !slices.Equal(args, []string{"--version"}) {
			return "", fmt.Errorf("unexpected %s %q", b, args)
		}
		return answer, fail
	}}
	if r := h.BinaryVersion(context.Background(), bin, "fix it"); r.Status != CheckPass || r.Detail != bin+": VMM v1.2.3" || r.Fix != "" {
		t.Errorf("working binary: %+v", r)
	}
	fail = errors.New("exit status 1")
	if r := h.BinaryVersion(context.Background(), bin, "fix it"); r.Status != CheckFail || !strings.Contains(r.Detail, "--version failed") || r.Fix != "fix it" {
		t.Errorf("failing binary: %+v", r)
	}
	if r := h.BinaryVersion(context.Background(), filepath.Join(dir, "missing"), "fix it"); r.Status != CheckFail || !strings.Contains(r.Detail, "not found") {
		t.Errorf("missing binary: %+v", r)
	}
	if got := h.Path("/dev/kvm"); got != filepath.Join(dir, "dev/kvm") || h.Real() {
		t.Errorf("Path under a root = %q, Real = %v", got, h.Real())
	}
	if got := (CheckHost{}).Path("/dev/kvm"); got != "/dev/kvm" || !(CheckHost{}).Real() {
		t.Errorf("Path on the real host = %q", got)
	}
}
