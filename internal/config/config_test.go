package config_test

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/firerunner/firerunner/internal/config"
	"github.com/firerunner/firerunner/internal/vm"
	"github.com/firerunner/firerunner/internal/vm/firecracker"
	"github.com/firerunner/firerunner/internal/vm/qemu"
)

// drivers holds the real providers, as daemon.Drivers does, so the driver
// sections are validated here with their real messages.
var drivers = func() *vm.Registry[config.Config] {
	r := vm.NewRegistry[config.Config]()
	r.Add(qemu.Provider{})
	r.Add(firecracker.Provider{})
	return r
}()

func valid() config.Config {
	c := config.Default()
	c.GitLab.URL = "https://gitlab.example.com"
	return c
}

func TestDefaultsNeedOnlyTheGitLabURL(t *testing.T) {
	var fe config.FieldErrors
	if err := config.Default().Validate(drivers); !errors.As(err, &fe) || !slices.Equal(fe, config.FieldErrors{`gitlab.url: "" is not an http(s) URL`}) {
		t.Fatalf("default config without gitlab.url: %#v", err)
	}
	if err := valid().Validate(drivers); err != nil {
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
	err := c.Validate(drivers)
	var fe config.FieldErrors
	if !errors.As(err, &fe) {
		t.Fatalf("want FieldErrors, got %T %v", err, err)
	}
	want := config.FieldErrors{
		`log_level: "chatty" is not one of debug, info, warn, error`,
		"runners.group_id: must be set when runners.scope is group",
		"runners.maximum_timeout: GitLab rejects values under 600s, got 5m0s",
		`vm.driver: "vbox" is not one of qemu, firecracker`,
		"network.mtu: must be between 576 and 9000, got 100",
		"network.allow_host_ports: 0 is not a port (1-65535)",
		"network.allow_host_ports: 70000 is not a port (1-65535)",
	}
	if !slices.Equal(fe, want) {
		t.Errorf("field errors:\n%q\nwant\n%q", fe, want)
	}
}

func TestParse(t *testing.T) {
	for _, tc := range []struct {
		name, yaml string
		field      string // a validation error: exactly this field error
		syntax     string // a YAML error: this exact line
	}{
		{"empty file keeps defaults but needs url", "", `gitlab.url: "" is not an http(s) URL`, ""},
		{"minimal", "gitlab:\n  url: https://gitlab.example.com\n", "", ""},
		{"unknown field", "gitlab:\n  url: https://g.example.com\n  tokn_file: /x\n", "", "line 3: field tokn_file not found in type config.GitLab"},
		{"bad duration", "gitlab:\n  url: https://g.example.com\nlimits:\n  job_max_duration: soon\n", "", "line 4: cannot unmarshal !!str `soon` into time.Duration"},
		{"user network with firecracker", "gitlab:\n  url: https://g.example.com\nnetwork:\n  mode: user\n  allow_user_mode_for_development: true\n", "network.mode: user-mode networking is QEMU-only; firecracker needs tap", ""},
		{"user network not allowed", "gitlab:\n  url: https://g.example.com\nvm:\n  driver: qemu\nqemu:\n  allow_for_development: true\nnetwork:\n  mode: user\n",
			"network.mode: user-mode networking lets every guest reach this host's loopback services (QEMU maps the guest's gateway 10.0.2.2 to 127.0.0.1); use tap, or set network.allow_user_mode_for_development: true on a development machine", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := config.Default()
			err := config.Parse([]byte(tc.yaml), &c, drivers)
			var fe config.FieldErrors
			switch {
			case tc.field != "":
				if !errors.As(err, &fe) || !slices.Equal(fe, config.FieldErrors{tc.field}) {
					t.Fatalf("want exactly the field error %q, got %#v", tc.field, err)
				}
			case tc.syntax != "":
				// Refused while parsing: not a field error, and it says where.
				if err == nil || errors.As(err, &fe) || !strings.HasPrefix(err.Error(), "parse config: ") || !strings.Contains(err.Error(), "\n  "+tc.syntax) {
					t.Fatalf("want the parse error %q, got %#v", tc.syntax, err)
				}
			case err != nil:
				t.Fatalf("unexpected error: %v", err)
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
	if s, err := config.ReadSecret(p); err != nil || s != "s3cret" {
		t.Fatalf("ReadSecret = %q, %v", s, err)
	}
	if err := os.Chmod(p, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := config.ReadSecret(p); err == nil || err.Error() != "secret file "+p+" has mode 0644; it must be 0600 or stricter (chmod 600 "+p+")" {
		t.Fatalf("world-readable secret accepted: %v", err)
	}
	empty := filepath.Join(dir, "empty")
	if err := os.WriteFile(empty, []byte("\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := config.ReadSecret(empty); err == nil || err.Error() != "secret file "+empty+" is empty" {
		t.Fatalf("empty secret: %v", err)
	}
	if _, err := config.ReadSecret(filepath.Join(dir, "missing")); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("missing secret: %v, want fs.ErrNotExist", err)
	}
}

// The driver sections are validated by their providers, through the
// registry, with the field names and messages of the file, and listed with
// every other bad field.
func TestDriverSections(t *testing.T) {
	for _, tc := range []struct {
		name string
		mut  func(c *config.Config)
		want []string // every line must appear; nil = valid
	}{
		{"defaults", func(c *config.Config) {}, nil},
		{"unknown driver lists the known ones", func(c *config.Config) { c.VM.Driver = "vbox" },
			[]string{`vm.driver: "vbox" is not one of qemu, firecracker`}},
		{"qemu binary", func(c *config.Config) { c.VM.Driver, c.QEMU.Binary, c.QEMU.AllowForDevelopment = "qemu", "", true },
			[]string{"qemu.binary: must be set"}},
		// QEMU runs as root without a per-VM uid or cgroup: development only.
		{"qemu without the development switch", func(c *config.Config) { c.VM.Driver = "qemu" },
			[]string{"vm.driver: qemu is for development"}},
		{"qemu with the development switch", func(c *config.Config) { c.VM.Driver, c.QEMU.AllowForDevelopment = "qemu", true }, nil},
		{"qemu accel, even with firecracker selected", func(c *config.Config) { c.QEMU.Accel = "fast" },
			[]string{`qemu.accel: "fast" is not one of auto, kvm, tcg`}},
		{"qemu state dir syntax", func(c *config.Config) {
			c.VM.Driver, c.StateDir, c.QEMU.AllowForDevelopment = "qemu", "/var/lib/a,b", true
		},
			[]string{`state_dir: "/var/lib/a,b" must not contain ',' or ':'`}},
		{"firecracker binary", func(c *config.Config) { c.Firecracker.Binary = "" },
			[]string{"firecracker.binary: must be set"}},
		{"firecracker with user networking", func(c *config.Config) { c.Network.Mode, c.Network.AllowUserModeForDevelopment = "user", true },
			[]string{"network.mode: user-mode networking is QEMU-only; firecracker needs tap"}},
		// User-mode networking maps the guest's gateway to the host's
		// loopback: refused unless the file allows it for development.
		{"qemu with user networking", func(c *config.Config) { c.VM.Driver, c.Network.Mode, c.QEMU.AllowForDevelopment = "qemu", "user", true },
			[]string{"network.mode: user-mode networking lets every guest reach this host's loopback services"}},
		{"qemu with user networking allowed for development", func(c *config.Config) {
			c.VM.Driver, c.Network.Mode, c.Network.AllowUserModeForDevelopment, c.QEMU.AllowForDevelopment = "qemu", "user", true, true
		}, nil},
		{"the development switch alone changes nothing in tap mode", func(c *config.Config) { c.Network.AllowUserModeForDevelopment = true }, nil},
		{"jailer fields", func(c *config.Config) {
			c.Firecracker.JailerBinary, c.Firecracker.ChrootBase, c.Firecracker.UID, c.Firecracker.GID = "", "jail", 0, -1
			c.Firecracker.Binary = "/usr/local/bin/fc"
		}, []string{
			"firecracker.jailer_binary: must be set when firecracker.use_jailer is on",
			`firecracker.binary: "/usr/local/bin/fc": the jailer requires the file name to contain "firecracker"`,
			`firecracker.chroot_base: "jail" must be an absolute path`,
			"firecracker.uid: must be > 0", "firecracker.gid: must be > 0",
		}},
		{"firecracker knobs", func(c *config.Config) {
			c.Firecracker.LogLevel, c.Firecracker.ExtraBootArgs, c.Firecracker.SerialBytesPerSec = "Verbose", []string{"nomodule"}, 100
			c.Firecracker.ParentCgroup, c.Firecracker.MemoryOverheadMiB, c.Firecracker.MemoryOverheadMiBPerGiB = "../escape", 8, 2
		}, []string{
			`firecracker.log_level: "Verbose" is not one of Error, Warning, Info, Debug`,
			"firecracker.extra_boot_args: boot arg nomodule breaks the guest's initramfs",
			"firecracker.serial_bytes_per_sec: must be 0 (no limit) or >= 4096, got 100",
			`firecracker.parent_cgroup: parent cgroup "../escape": empty, "." and ".." components are refused by the jailer`,
			"firecracker.memory_overhead_mib: must be >= 16",
			"firecracker.memory_overhead_mib_per_gib: must be >= 4",
		}},
		{"firecracker knobs set well", func(c *config.Config) {
			c.Firecracker.LogLevel, c.Firecracker.ExtraBootArgs, c.Firecracker.SerialBytesPerSec = "Debug", []string{"loglevel=7"}, 0
			c.Firecracker.ParentCgroup, c.Firecracker.MemoryOverheadMiB, c.Firecracker.MemoryOverheadMiBPerGiB = "system.slice/firerunner.service/vms", 128, 16
		}, nil},
		{"per-VM users from a range", func(c *config.Config) { c.Firecracker.VMUIDBase = 200000 }, nil},
		{"per-VM users: too low", func(c *config.Config) { c.Firecracker.VMUIDBase = 500 },
			[]string{"firecracker.vm_uid_base: must be 0 (every VM as firecracker.uid) or >= 1000, got 500"}},
		{"per-VM users: the range holds firecracker.uid", func(c *config.Config) { c.Firecracker.VMUIDBase = 63900 },
			[]string{"firecracker.vm_uid_base: the VMs' uids 63900-64155 include firecracker.uid/gid 64000/64000"}},
		{"per-VM users: past 2^31", func(c *config.Config) { c.Firecracker.VMUIDBase, c.Network.CIDR = 2147483000, "10.0.0.0/16" },
			[]string{"firecracker.vm_uid_base: 2147483000 + the 65536 addresses of network.cidr run past uid 2147483646"}},
		{"jailer fields unused without the jailer", func(c *config.Config) {
			c.Firecracker.UseJailer, c.Firecracker.ChrootBase, c.Firecracker.UID = false, "jail", 0
		}, nil},
		{"firecracker section unused with qemu", func(c *config.Config) {
			c.VM.Driver, c.Firecracker.Binary, c.Firecracker.ChrootBase, c.QEMU.AllowForDevelopment = "qemu", "", "jail", true
		}, nil},
		{"driver and other fields at once", func(c *config.Config) {
			c.LogLevel, c.QEMU.Accel, c.Firecracker.ChrootBase = "chatty", "fast", "jail"
		}, []string{"log_level:", "qemu.accel:", "firecracker.chroot_base:"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := valid()
			tc.mut(&c)
			err := c.Validate(drivers)
			if tc.want == nil {
				if err != nil {
					t.Fatalf("unexpected error: %v", err)
				}
				return
			}
			fe, ok := err.(config.FieldErrors)
			if !ok {
				t.Fatalf("want FieldErrors, got %T %v", err, err)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), "\n  "+w) {
					t.Errorf("missing %q in:\n%v", w, err)
				}
			}
			if len(fe) != len(tc.want) {
				t.Errorf("want %d field errors, got %d:\n%v", len(tc.want), len(fe), err)
			}
		})
	}
}

// Without a driver registry the driver cannot be checked, and says so.
func TestValidateWithoutDrivers(t *testing.T) {
	err := valid().Validate(nil)
	var fe config.FieldErrors
	if !errors.As(err, &fe) || len(fe) != 1 || !strings.HasPrefix(fe[0], "vm.driver: cannot check") {
		t.Fatalf("Validate(nil) = %v", err)
	}
}

// listen, metrics_listen and tls: addresses parse, the metrics address is
// not the webhook's, the TLS files come as a pair, and VMs can be opened
// neither port.
func TestListenersAndTLS(t *testing.T) {
	for _, tc := range []struct {
		name string
		mut  func(c *config.Config)
		want string // "" = valid
	}{
		{"defaults: metrics on listen, no tls", func(c *config.Config) {}, ""},
		{"metrics on loopback", func(c *config.Config) { c.MetricsListen = "127.0.0.1:9100" }, ""},
		{"same port on another address", func(c *config.Config) { c.Listen, c.MetricsListen = "10.0.0.1:8080", "127.0.0.1:8080" }, ""},
		{"metrics on the listen port", func(c *config.Config) { c.MetricsListen = "127.0.0.1:8080" }, `metrics_listen: "127.0.0.1:8080" must not be the listen address`},
		{"metrics_listen not host:port", func(c *config.Config) { c.MetricsListen = "9100" }, "metrics_listen: \"9100\" is not host:port"},
		{"listen not host:port", func(c *config.Config) { c.Listen = "8080" }, "listen: \"8080\" is not host:port"},
		{"listen named port", func(c *config.Config) { c.Listen = ":http" }, `listen: ":http": port "http" is not a number`},
		{"tls pair", func(c *config.Config) {
			c.TLS = config.TLS{CertFile: "/etc/firerunner/tls.crt", KeyFile: "/etc/firerunner/tls.key"}
		}, ""},
		{"tls cert without key", func(c *config.Config) { c.TLS.CertFile = "/etc/firerunner/tls.crt" }, "tls: cert_file and key_file must be set together"},
		{"tls key without cert", func(c *config.Config) { c.TLS.KeyFile = "/etc/firerunner/tls.key" }, "tls: cert_file and key_file must be set together"},
		{"metrics port opened to VMs", func(c *config.Config) { c.MetricsListen, c.Network.AllowHostPorts = "127.0.0.1:9100", []int{9100} },
			"network.allow_host_ports: 9100 is FireRunner's own metrics_listen port"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := valid()
			tc.mut(&c)
			err := c.Validate(drivers)
			if tc.want == "" && err != nil {
				t.Fatalf("unexpected error: %v", err)
			}
			if tc.want != "" && (err == nil || !strings.Contains(err.Error(), "\n  "+tc.want)) {
				t.Fatalf("want %q, got %v", tc.want, err)
			}
		})
	}
}

// TestStateBackendFields: a bad store backend, a postgres backend without
// its DSN file, and heartbeat/lease values that would reap live hosts are
// each one clear error.
func TestStateBackendFields(t *testing.T) {
	for _, tc := range []struct {
		mod  func(c *config.Config)
		want string
	}{
		{func(c *config.Config) { c.State.Backend = "mysql" }, `state.backend: "mysql" is not one of sqlite, postgres`},
		{func(c *config.Config) { c.State.Backend, c.State.PostgresDSNFile = "postgres", "" }, "state.postgres_dsn_file: must be set for backend postgres"},
		{func(c *config.Config) { c.State.HeartbeatInterval = 10 * time.Millisecond }, "state.heartbeat_interval: must be between 100ms and 1m, got 10ms"},
		{func(c *config.Config) { c.State.HostLease = 10 * time.Second }, "state.host_lease: must be at least 3 heartbeat intervals (15s), got 10s"},
	} {
		c := valid()
		tc.mod(&c)
		var fe config.FieldErrors
		if err := c.Validate(drivers); !errors.As(err, &fe) || !slices.Equal(fe, config.FieldErrors{tc.want}) {
			t.Errorf("got %v, want %q", err, tc.want)
		}
	}
	c := valid()
	c.State.Backend = "postgres"
	if err := c.Validate(drivers); err != nil {
		t.Errorf("postgres with the default DSN file: %v", err)
	}
}
