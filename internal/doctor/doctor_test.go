package doctor

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/firerunner/firerunner/internal/config"
	"github.com/firerunner/firerunner/internal/image"
	"github.com/firerunner/firerunner/internal/vm"
	"github.com/firerunner/firerunner/internal/vm/firecracker"
	"github.com/firerunner/firerunner/internal/vm/qemu"
)

// drivers are the real providers, as daemon.Drivers lists them.
var drivers = func() *vm.Registry[config.Config] {
	r := vm.NewRegistry[config.Config]()
	r.Add(qemu.Provider{})
	r.Add(firecracker.Provider{})
	return r
}()

// goodToken is assembled so it never looks like a committed real token.
var goodToken = "glpat" + "-doctor-test-token"

// gitlab is a stand-in following the documented shape of
// GET /api/v4/personal_access_tokens/self; scopes etc. are per test.
type gitlab struct {
	self   map[string]any
	status int
}

func (g *gitlab) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	authed := r.Header.Get("PRIVATE-TOKEN") == goodToken
	switch {
	case r.Method == http.MethodGet && r.URL.Path == "/api/v4/version":
		if !authed {
			w.WriteHeader(http.StatusUnauthorized)
			fmt.Fprint(w, `{"message":"401 Unauthorized"}`)
			return
		}
		fmt.Fprint(w, `{"version":"17.0.0","revision":"abc"}`)
	case r.Method == http.MethodGet && r.URL.Path == "/api/v4/personal_access_tokens/self":
		if !authed {
			w.WriteHeader(http.StatusUnauthorized)
			fmt.Fprint(w, `{"message":"401 Unauthorized"}`)
			return
		}
		if g.status != 0 {
			w.WriteHeader(g.status)
			return
		}
		_ = json.NewEncoder(w).Encode(g.self)
	default:
		http.NotFound(w, r)
	}
}

func tokenSelfBody(scopes ...string) map[string]any {
	return map[string]any{"id": 4, "name": "firerunner", "revoked": false, "created_at": "2020-07-23T14:31:47.729Z",
		"scopes": scopes, "user_id": 24, "last_used_at": nil, "active": true, "expires_at": nil}
}

func write(t *testing.T, path, content string, mode os.FileMode) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte(content), mode); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(path, mode); err != nil {
		t.Fatal(err)
	}
}

// writeImage makes an image dir whose manifest matches its files.
func writeImage(t *testing.T, dir string) {
	t.Helper()
	arts := map[string]image.Artifact{}
	for _, n := range []string{image.ArtVMLinux, image.ArtInitrd, image.ArtRootfs, image.ArtBzImage} {
		body := "contents of " + n
		write(t, filepath.Join(dir, n), body, 0o644)
		sum := sha256.Sum256([]byte(body))
		arts[n] = image.Artifact{File: n, Size: int64(len(body)), SHA256: hex.EncodeToString(sum[:])}
	}
	m := image.Manifest{Format: 1, Artifacts: arts, Inputs: image.Inputs{KernelRelease: "6.1.0-test"}}
	b, _ := json.Marshal(m)
	write(t, filepath.Join(dir, image.ManifestFile), string(b), 0o644)
}

type fixture struct {
	env Env
	gl  *gitlab
	dir string
	// probes are the boot probes the driver's kvm-guest check ran: each
	// command line and the config file it named (read before it is removed).
	probes []probe
	// probeErr is what the faked boot probe returns.
	probeErr error
}

type probe struct {
	argv   []string
	config string
}

// versions answers --version like the real binaries of one release.
var versions = map[string]string{
	"firecracker": "Firecracker v1.12.1\n\nSupported snapshot data format versions: v5.0.0\n",
	"jailer":      "Jailer v1.12.1\n\n",
}

// healthy builds a fake host on which every check passes.
func healthy(t *testing.T) *fixture {
	t.Helper()
	root := t.TempDir()
	write(t, root+"/dev/kvm", "", 0o666)
	write(t, root+"/dev/net/tun", "", 0o666)
	write(t, root+"/proc/cpuinfo", "processor\t: 0\nflags\t\t: fpu vme de pse vmx ssse3\n\nprocessor\t: 1\nflags\t\t: fpu vmx\n", 0o444)
	write(t, root+"/proc/meminfo", "MemTotal:       65536000 kB\nMemFree:        1000 kB\n", 0o444)
	write(t, root+"/sys/fs/cgroup/cgroup.controllers", "cpuset cpu io memory hugetlb pids rdma misc\n", 0o444)
	etc := t.TempDir()
	write(t, etc+"/token", goodToken+"\n", 0o600)
	write(t, etc+"/webhook", "0123456789abcdef0123456789abcdef\n", 0o600)
	bin := t.TempDir()
	write(t, bin+"/firecracker", "#!/bin/sh\n", 0o755)
	write(t, bin+"/jailer", "#!/bin/sh\n", 0o755)
	imgDir := t.TempDir()
	writeImage(t, imgDir)

	gl := &gitlab{self: tokenSelfBody("create_runner", "manage_runner", "read_api")}
	srv := httptest.NewServer(gl)
	t.Cleanup(srv.Close)

	cfg := config.Default()
	cfg.GitLab.URL = srv.URL
	cfg.GitLab.TokenFile = etc + "/token"
	cfg.GitLab.WebhookSecretFile = etc + "/webhook"
	cfg.StateDir = t.TempDir()
	cfg.VM.ImageDir = imgDir
	cfg.Firecracker.Binary = bin + "/firecracker"
	cfg.Firecracker.JailerBinary = bin + "/jailer"
	cfg.Capacity.MaxMemoryGiBPerVM = 16
	if err := cfg.Validate(drivers); err != nil {
		t.Fatal(err)
	}
	f := &fixture{gl: gl, dir: root, env: Env{
		Config:     cfg,
		Drivers:    drivers,
		Root:       root,
		HTTPClient: srv.Client(),
		NetCheck:   func(context.Context) ([]string, error) { return nil, nil },
		Command: func(_ context.Context, bin string, args ...string) (string, error) {
			if len(args) != 1 || args[0] != "--version" {
				return "", fmt.Errorf("unexpected args %v", args)
			}
			return versions[filepath.Base(bin)], nil
		},
		NumCPU: 16,
	}}
	f.env.BootProbe = func(_ context.Context, argv []string, _ time.Duration) error {
		p := probe{argv: argv}
		if i := slices.Index(argv, "--config-file"); i >= 0 && i+1 < len(argv) {
			b, err := os.ReadFile(argv[i+1])
			if err != nil {
				t.Errorf("probe config: %v", err)
			}
			p.config = string(b)
		}
		f.probes = append(f.probes, p)
		return f.probeErr
	}
	return f
}

func find(t *testing.T, r Report, name string) Result {
	t.Helper()
	for _, c := range r.Results {
		if c.Name == name {
			return c
		}
	}
	t.Fatalf("no check %q in %+v", name, r.Results)
	return Result{}
}

func TestHealthyHostPasses(t *testing.T) {
	f := healthy(t)
	r := Run(context.Background(), f.env)
	for _, c := range r.Results {
		if c.Status != Pass && (c.Name != "jailer" || os.Geteuid() == 0) { // non-root: jailer warns

			t.Errorf("%s: %s %s (fix: %s)", c.Name, c.Status, c.Detail, c.Fix)
		}
	}
	if !r.OK {
		t.Error("report not OK")
	}
	if d := find(t, r, "firecracker").Detail; !strings.Contains(d, "Firecracker v1.12.1 (>= v1.8.0") || strings.Contains(d, "snapshot") {
		t.Errorf("version detail %q", d)
	}
	if d := find(t, r, "jailer").Detail; !strings.Contains(d, "Jailer v1.12.1, the same release as Firecracker") {
		t.Errorf("jailer detail %q", d)
	}
	if d := find(t, r, "kvm-guest").Detail; !strings.HasPrefix(d, "jobs get KVM") {
		t.Errorf("kvm-guest detail %q", d)
	}
	var text, js bytes.Buffer
	r.WriteText(&text)
	if err := r.WriteJSON(&js); err != nil {
		t.Fatal(err)
	}
	if strings.Contains(text.String()+js.String(), goodToken) {
		t.Fatal("the token leaked into the report")
	}
	var back Report
	if err := json.Unmarshal(js.Bytes(), &back); err != nil || !back.OK || len(back.Results) != len(r.Results) || back.Results[0].Status != Pass {
		t.Errorf("JSON round trip: %v %+v", err, back)
	}
}

// Each case breaks one thing on a healthy host and expects exactly that
// check to report it, with a fix.
func TestEachCheckFails(t *testing.T) {
	cases := []struct {
		check  string
		want   Status
		detail string
		breakf func(f *fixture)
	}{
		{"config", Fail, "invalid", func(f *fixture) { f.env.ConfigErr = errors.New("invalid configuration: gitlab.url") }},
		{"kvm", Fail, "missing", func(f *fixture) { os.Remove(f.dir + "/dev/kvm") }},
		{"kvm", Fail, "not usable", func(f *fixture) {
			if os.Geteuid() == 0 {
				f.env.Root = f.dir + "/nonexistent-but-dev" // root can open anything; emulate with a dir
				write(t, f.env.Root+"/proc/cpuinfo", "flags : vmx\n", 0o444)
				_ = os.MkdirAll(f.env.Root+"/dev/kvm", 0o755)
			} else {
				_ = os.Chmod(f.dir+"/dev/kvm", 0)
			}
		}},
		{"kvm-guest", Fail, "KVM cannot run the guest kernel", func(f *fixture) {
			f.probeErr = errors.New("no root-mount panic within 15s")
		}},
		{"kvm-guest", Warn, "jobs get TCG (software emulation), not KVM: kvm boot probe failed (no root-mount panic within 15s)", func(f *fixture) {
			f.env.Config.VM.Driver, f.env.Config.QEMU.Binary = "qemu", f.env.Config.Firecracker.Binary
			f.probeErr = errors.New("no root-mount panic within 15s")
		}},
		{"kvm-guest", Fail, "qemu.accel is kvm, but KVM cannot boot the guest kernel", func(f *fixture) {
			f.env.Config.VM.Driver, f.env.Config.QEMU.Binary, f.env.Config.QEMU.Accel = "qemu", f.env.Config.Firecracker.Binary, "kvm"
			f.probeErr = errors.New(`qemu-system-x86_64 exited (signal: aborted) without a root-mount panic: "kvm_buf_set_msrs: Assertion failed"`)
		}},
		{"firecracker", Fail, "older than v1.8.0", func(f *fixture) {
			versions := map[string]string{"firecracker": "Firecracker v1.7.0\n", "jailer": "Jailer v1.7.0\n"}
			f.env.Command = func(_ context.Context, bin string, _ ...string) (string, error) {
				return versions[filepath.Base(bin)], nil
			}
		}},
		{"jailer", Fail, "jailer v1.12.0 differs from Firecracker v1.12.1", func(f *fixture) {
			versions := map[string]string{"firecracker": "Firecracker v1.12.1\n", "jailer": "Jailer v1.12.0\n"}
			f.env.Command = func(_ context.Context, bin string, _ ...string) (string, error) {
				return versions[filepath.Base(bin)], nil
			}
		}},
		{"jailer", Fail, "is Firecracker's version, not Jailer's", func(f *fixture) {
			f.env.Command = func(context.Context, string, ...string) (string, error) { return "Firecracker v1.12.1\n", nil }
		}},
		{"cpu-virt", Fail, "without nested", func(f *fixture) {
			write(t, f.dir+"/proc/cpuinfo", "flags\t: fpu hypervisor sse\n", 0o444)
		}},
		{"cpu-virt", Fail, "no vmx/svm", func(f *fixture) { write(t, f.dir+"/proc/cpuinfo", "flags\t: fpu sse\n", 0o444) }},
		{"firecracker", Fail, "not found", func(f *fixture) { os.Remove(f.env.Config.Firecracker.Binary) }},
		{"firecracker", Fail, "--version failed", func(f *fixture) {
			f.env.Command = func(context.Context, string, ...string) (string, error) { return "bad", errors.New("exit status 1") }
		}},
		{"jailer", Fail, "not found", func(f *fixture) { os.Remove(f.env.Config.Firecracker.JailerBinary) }},
		{"qemu", Fail, "not found", func(f *fixture) {
			f.env.Config.VM.Driver, f.env.Config.QEMU.Binary = "qemu", "/nonexistent/qemu-system-x86_64"
		}},
		{"vm-driver", Fail, `unknown vm driver "vbox" (known: qemu, firecracker)`, func(f *fixture) { f.env.Config.VM.Driver = "vbox" }},
		{"vm-driver", Fail, "no VM drivers given", func(f *fixture) { f.env.Drivers = nil }},
		{"image", Fail, "checksum mismatch", func(f *fixture) {
			write(t, filepath.Join(f.env.Config.VM.ImageDir, image.ArtRootfs), "tampered rootfs", 0o644)
		}},
		{"image", Fail, "manifest.json", func(f *fixture) { f.env.Config.VM.ImageDir = t.TempDir() }},
		{"image", Fail, "has no Docker engine", func(f *fixture) { f.env.Config.Runners.Executor = config.ExecutorDocker }},
		{"cgroup-v2", Fail, "not mounted", func(f *fixture) { os.Remove(f.dir + "/sys/fs/cgroup/cgroup.controllers") }},
		{"cgroup-v2", Fail, "memory", func(f *fixture) { write(t, f.dir+"/sys/fs/cgroup/cgroup.controllers", "cpu pids\n", 0o444) }},
		{"tun", Fail, "missing", func(f *fixture) { os.Remove(f.dir + "/dev/net/tun") }},
		{"network", Warn, "does not exist", func(f *fixture) {
			f.env.NetCheck = func(context.Context) ([]string, error) { return []string{"bridge firerunner0 does not exist"}, nil }
		}},
		{"network", Fail, "nftables", func(f *fixture) {
			f.env.NetCheck = func(context.Context) ([]string, error) { return []string{"nftables: operation not supported"}, nil }
		}},
		{"memory", Fail, "exceeds host memory", func(f *fixture) { f.env.Config.Capacity.MemoryMiB = 70000 }},
		{"memory", Warn, "can never fit", func(f *fixture) { f.env.Config.Capacity.MaxMemoryGiBPerVM = 64 }},
		{"cpus", Warn, "host CPUs", func(f *fixture) { f.env.Config.Capacity.VCPUs = 64 }},
		{"cpus", Fail, "no vCPUs", func(f *fixture) { f.env.NumCPU = 1 }},
		{"gitlab", Fail, "unreachable", func(f *fixture) { f.env.Config.GitLab.URL = "http://127.0.0.1:1" }},
		{"gitlab", Fail, "HTTP 404", func(f *fixture) { f.env.Config.GitLab.URL += "/not-gitlab" }},
		{"gitlab-token", Fail, "lacks scopes create_runner", func(f *fixture) { f.gl.self = tokenSelfBody("read_api", "manage_runner") }},
		{"gitlab-token", Fail, "lacks scopes read_api, manage_runner", func(f *fixture) { f.gl.self = tokenSelfBody("create_runner", "read_user") }},
		{"gitlab-token", Fail, "not active", func(f *fixture) {
			f.gl.self["active"], f.gl.self["revoked"] = false, true
		}},
		{"gitlab-token", Warn, "expires on", func(f *fixture) {
			f.gl.self["expires_at"] = time.Now().Add(48 * time.Hour).Format("2006-01-02")
		}},
		{"gitlab-token", Fail, "HTTP 401", func(f *fixture) { write(t, f.env.Config.GitLab.TokenFile, "glpat-wrong", 0o600) }},
		{"gitlab-token", Fail, "mode 0644", func(f *fixture) { _ = os.Chmod(f.env.Config.GitLab.TokenFile, 0o644) }},
		{"gitlab-token", Fail, "HTTP 403", func(f *fixture) { f.gl.status = http.StatusForbidden }},
		{"webhook-secret", Fail, "mode 0640", func(f *fixture) { _ = os.Chmod(f.env.Config.GitLab.WebhookSecretFile, 0o640) }},
		{"webhook-secret", Fail, "empty", func(f *fixture) { write(t, f.env.Config.GitLab.WebhookSecretFile, "\n", 0o600) }},
		{"webhook-secret", Warn, "only 5 characters", func(f *fixture) { write(t, f.env.Config.GitLab.WebhookSecretFile, "short", 0o600) }},
	}
	for _, c := range cases {
		t.Run(c.check+"/"+c.detail, func(t *testing.T) {
			f := healthy(t)
			c.breakf(f)
			r := Run(context.Background(), f.env)
			got := find(t, r, c.check)
			if got.Status != c.want || !strings.Contains(got.Detail, c.detail) {
				t.Fatalf("%s = %s %q, want %s containing %q", c.check, got.Status, got.Detail, c.want, c.detail)
			}
			if got.Fix == "" {
				t.Errorf("%s: no fix given", c.check)
			}
			if r.OK != (c.want != Fail) { // a Warn must not fail the run; a Fail must
				t.Errorf("report OK = %v with %s %s", r.OK, c.check, got.Status)
			}
			var buf bytes.Buffer
			r.WriteText(&buf)
			if !strings.Contains(buf.String(), "fix: "+got.Fix) {
				t.Errorf("text report lacks the fix:\n%s", buf.String())
			}
		})
	}
}

// Doctor runs the checks the selected driver's provider gives after the
// image check, since its kvm-guest check boots the image's kernel.
func TestDriverChecksFollowTheDriver(t *testing.T) {
	for _, tc := range []struct {
		driver string
		want   []string
	}{
		{"firecracker", []string{"image", "firecracker", "jailer", "kvm-guest", "snapshots", "cgroup-v2"}},
		{"qemu", []string{"image", "qemu", "kvm-guest", "cgroup-v2"}},
		{"vbox", []string{"image", "vm-driver", "cgroup-v2"}},
	} {
		t.Run(tc.driver, func(t *testing.T) {
			f := healthy(t)
			f.env.Config.VM.Driver = tc.driver
			f.env.Config.QEMU.Binary = f.env.Config.Firecracker.Binary // any executable answers --version here
			r := Run(context.Background(), f.env)
			var names []string
			for _, c := range r.Results {
				names = append(names, c.Name)
			}
			i := slices.Index(names, "image")
			if i < 0 || i+len(tc.want) > len(names) || !slices.Equal(names[i:i+len(tc.want)], tc.want) {
				t.Fatalf("checks %q, want %q in a row", names, tc.want)
			}
			if tc.driver != "vbox" && find(t, r, tc.want[1]).Status != Pass {
				t.Errorf("%s check: %+v", tc.want[1], find(t, r, tc.want[1]))
			}
		})
	}
}

func TestTokenScopes(t *testing.T) {
	for _, c := range []struct {
		have   []string
		legacy bool
		miss   string
	}{
		{[]string{"api"}, false, ""},
		{[]string{"read_api", "create_runner", "manage_runner"}, false, ""},
		{[]string{"read_api", "create_runner"}, false, "manage_runner"},
		{[]string{"read_api", "manage_runner"}, true, ""},
		{[]string{"read_repository", "write_repository"}, false, "read_api,create_runner,manage_runner"},
	} {
		if got := strings.Join(missingScopes(c.have, c.legacy), ","); got != c.miss {
			t.Errorf("missingScopes(%v, legacy=%v) = %q, want %q", c.have, c.legacy, got, c.miss)
		}
	}
}

// TestKVMGuestBootsTheImageKernel: doctor's kvm-guest check is the selected
// driver's boot probe of the image's real kernel (vmlinux, no initrd, no
// disk), never a stand-in guest, and its verdict says which accelerator
// jobs get.
func TestKVMGuestBootsTheImageKernel(t *testing.T) {
	for _, driver := range []string{"firecracker", "qemu"} {
		t.Run(driver, func(t *testing.T) {
			f := healthy(t)
			f.env.Config.VM.Driver, f.env.Config.QEMU.Binary = driver, f.env.Config.Firecracker.Binary
			r := Run(context.Background(), f.env)
			if got := find(t, r, "kvm-guest"); got.Status != Pass || !strings.HasPrefix(got.Detail, "jobs get KVM") {
				t.Errorf("kvm-guest = %+v", got)
			}
			if len(f.probes) != 1 {
				t.Fatalf("%d boot probes, want 1: %+v", len(f.probes), f.probes)
			}
			p := f.probes[0]
			kernel := filepath.Join(f.env.Config.VM.ImageDir, image.ArtVMLinux)
			if real, err := filepath.EvalSymlinks(kernel); err == nil {
				kernel = real
			}
			if p.argv[0] != f.env.Config.Firecracker.Binary {
				t.Errorf("probe runs %q, want the configured VMM %q", p.argv[0], f.env.Config.Firecracker.Binary)
			}
			switch driver {
			case "qemu":
				if i := slices.Index(p.argv, "-kernel"); i < 0 || p.argv[i+1] != kernel || !slices.Contains(p.argv, "kvm") || slices.Contains(p.argv, "-initrd") {
					t.Errorf("qemu probe argv %q: want KVM booting %s without an initrd", p.argv, kernel)
				}
			case "firecracker":
				var cfg struct {
					BootSource struct {
						Kernel string `json:"kernel_image_path"`
						Initrd string `json:"initrd_path"`
					} `json:"boot-source"`
					Drives []any `json:"drives"`
				}
				if err := json.Unmarshal([]byte(p.config), &cfg); err != nil {
					t.Fatalf("probe config %q: %v", p.config, err)
				}
				if !slices.Contains(p.argv, "--no-api") || cfg.BootSource.Kernel != kernel || cfg.BootSource.Initrd != "" || len(cfg.Drives) != 0 {
					t.Errorf("firecracker probe %q with config %s: want %s without initrd or drives", p.argv, p.config, kernel)
				}
			}
		})
	}
}
