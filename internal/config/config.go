// Package config loads and validates FireRunner's YAML configuration. Every
// field has a documented default; Validate reports every bad field at once.
package config

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"net/url"
	"os"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"go.yaml.in/yaml/v3"

	"github.com/firerunner/firerunner/internal/tags"
)

// DefaultPath is where `firerunner serve` looks without --config.
const DefaultPath = "/etc/firerunner/config.yaml"

// Config is the whole daemon configuration. See config.example.yaml at the
// repository root for the documented file; both must change together.
type Config struct {
	// Listen is the address of the HTTP server: /webhook, and /metrics,
	// /healthz, /readyz unless MetricsListen is set.
	Listen string `yaml:"listen"`
	// MetricsListen, when set, is a separate address (e.g. 127.0.0.1:9100)
	// for /metrics, /healthz and /readyz, which then are not served on
	// Listen; "" = served on Listen.
	MetricsListen string `yaml:"metrics_listen"`
	// TLS, when configured, makes Listen serve HTTPS.
	TLS TLS `yaml:"tls"`
	// LogLevel is debug, info, warn or error.
	LogLevel string `yaml:"log_level"`
	// StateDir holds the SQLite store and per-VM directories.
	StateDir string `yaml:"state_dir"`
	// HostID names this host in runner descriptions; reconciliation deletes
	// only runners carrying it. "" = the machine's hostname.
	HostID string `yaml:"host_id"`

	State       State       `yaml:"state"`
	GitLab      GitLab      `yaml:"gitlab"`
	Runners     Runners     `yaml:"runners"`
	Reconcile   Reconcile   `yaml:"reconcile"`
	Capacity    Capacity    `yaml:"capacity"`
	Limits      Limits      `yaml:"limits"`
	VM          VM          `yaml:"vm"`
	Network     Network     `yaml:"network"`
	QEMU        QEMU        `yaml:"qemu"`
	Firecracker Firecracker `yaml:"firecracker"`
	// Docker configures the guest's Docker engine (runners.executor docker).
	Docker Docker `yaml:"docker"`
	// Pools keep warm VMs ready per size class; none by default.
	Pools []Pool `yaml:"pools"`
}

// Pool keeps warm VMs of one size booted to "agent ready", gitlab-runner
// started and blocked on its config, so a job of that size gets a VM in
// well under a second. Warm VMs hold their vCPUs and memory.
type Pool struct {
	// Size is a size tag, e.g. firecracker-2cpu-4gb.
	Size string `yaml:"size"`
	// MinIdle warm VMs are kept ready.
	MinIdle int `yaml:"min_idle"`
	// MaxIdle bounds warm VMs when demand raises the target; 0 = MinIdle.
	// Extra demand boots cold.
	MaxIdle int `yaml:"max_idle"`
	// IdleTimeout recycles a warm VM older than this; 0 = 30m.
	IdleTimeout time.Duration `yaml:"idle_timeout"`
}

// State is how long the store keeps history.
type State struct {
	// Retention: ended jobs (with their transitions), gone VMs and deleted
	// runners whose records last changed longer ago are removed by the
	// periodic sweep; 0 = keep everything. Active jobs, live VMs and what
	// an active job's timeline shows are never removed.
	Retention time.Duration `yaml:"retention"`
	// Backend is the store's database: sqlite (one host, the store in
	// state_dir) or postgres (a fleet of hosts sharing one queue).
	Backend string `yaml:"backend"`
	// PostgresDSNFile holds the PostgreSQL connection string (it may carry
	// a password: mode 0600 or stricter, never logged); backend postgres.
	PostgresDSNFile string `yaml:"postgres_dsn_file"`
	// HeartbeatInterval is how often a fleet host renews its lease,
	// re-checks the other hosts' and looks for unclaimed jobs.
	HeartbeatInterval time.Duration `yaml:"heartbeat_interval"`
	// HostLease is how long a fleet host counts as alive after its last
	// heartbeat; when it ends, another host reconciles its jobs.
	HostLease time.Duration `yaml:"host_lease"`
}

// PruneBefore is the cutoff of state retention at now: records last
// changed before it go; the zero time (retention 0) keeps everything.
func (s State) PruneBefore(now time.Time) time.Time {
	if s.Retention <= 0 {
		return time.Time{}
	}
	return now.Add(-s.Retention)
}

// MinRetention is the smallest state.retention other than 0.
const MinRetention = time.Hour

// TLS is the optional built-in TLS of the Listen server (the webhook).
// Both files or neither; the key file must be mode 0600 or stricter. The
// files are re-read when they change, so a renewed certificate needs no
// restart.
type TLS struct {
	// CertFile is the PEM certificate chain (leaf first).
	CertFile string `yaml:"cert_file"`
	// KeyFile is the PEM private key of the leaf certificate (0600).
	KeyFile string `yaml:"key_file"`
}

// Enabled reports whether Listen serves HTTPS.
func (t TLS) Enabled() bool { return t.CertFile != "" || t.KeyFile != "" }

// GitLab is how FireRunner reaches GitLab and authenticates webhooks.
type GitLab struct {
	// URL of the GitLab instance, e.g. https://gitlab.example.com.
	URL string `yaml:"url"`
	// GuestURL is GitLab's URL as seen from inside a VM; default URL.
	GuestURL string `yaml:"guest_url"`
	// TokenFile holds the API token (scopes: create_runner + manage_runner +
	// read_api, or api). Must be mode 0600 or stricter.
	TokenFile string `yaml:"token_file"`
	// WebhookSecretFile holds the X-Gitlab-Token secret. Mode 0600 or stricter.
	WebhookSecretFile string `yaml:"webhook_secret_file"`
	// RequestTimeout bounds one API request.
	RequestTimeout time.Duration `yaml:"request_timeout"`
	// MaxRetries bounds retries of a request on 5xx, 429 and timeouts.
	MaxRetries int `yaml:"max_retries"`
	// WebhookMaxBody is the largest accepted webhook body in bytes.
	WebhookMaxBody int64 `yaml:"webhook_max_body"`
}

// Runners says how runners are made for jobs.
type Runners struct {
	// Mode is "oneoff" (one runner created per job, deleted after it) or
	// "pooled": each pool gets one runner, created once and shared by the
	// pool's VMs, which take jobs of exactly the pool's size tag from GitLab
	// themselves; other jobs get one-off runners. Pooled needs scope group
	// or instance.
	Mode string `yaml:"mode"`
	// Scope is project (runner locked to the job's project), group or instance.
	Scope string `yaml:"scope"`
	// GroupID is required for scope group.
	GroupID int64 `yaml:"group_id"`
	// Registration is "create" (POST /user/runners, GitLab >= 15.10) or
	// "legacy" (POST /runners with a registration token, older GitLab).
	Registration string `yaml:"registration"`
	// RegistrationTokenFile holds the legacy registration token.
	RegistrationTokenFile string `yaml:"registration_token_file"`
	// MaximumTimeout is the runner's maximum_timeout; GitLab rejects < 600s.
	MaximumTimeout time.Duration `yaml:"maximum_timeout"`
	// DescriptionPrefix starts every runner description; reconciliation only
	// ever deletes runners whose description starts with it.
	DescriptionPrefix string `yaml:"description_prefix"`
	// Executor is gitlab-runner's executor in the VM: "shell" (the job runs
	// as user ci on the VM's Debian root; `image:` and `services:` are
	// ignored) or "docker" (a Docker engine in the VM runs the job in its
	// `image:`, with its `services:`; see docs/docker.md).
	Executor string `yaml:"executor"`
	// DefaultImage is the docker executor's image for jobs without `image:`.
	DefaultImage string `yaml:"default_image"`
}

// Docker configures the Docker engine in docker-executor VMs.
type Docker struct {
	// ScratchDiskGiB is the size of each VM's scratch disk (Docker's
	// data-root): a sparse file on the host in the VM's directory, so it
	// costs only what the job writes, and it is destroyed with the VM.
	ScratchDiskGiB int `yaml:"scratch_disk_gib"`
	// RegistryMirror is the guest dockerd's registry-mirrors entry, e.g.
	// the host's pull-through cache (install.sh --registry-mirror);
	// "" = pull from Docker Hub directly.
	RegistryMirror string `yaml:"registry_mirror"`
}

// Executors are the values of runners.executor.
const (
	ExecutorShell  = "shell"
	ExecutorDocker = "docker"
)

// MaxScratchDiskGiB bounds docker.scratch_disk_gib.
const MaxScratchDiskGiB = 16384

// Reconcile configures the backstop poll and the reconcile loop.
type Reconcile struct {
	// Interval between reconcile passes (store vs. GitLab vs. host).
	Interval time.Duration `yaml:"interval"`
	// PollProjects are project ids whose pending jobs are listed each pass,
	// to catch jobs whose webhook was lost.
	PollProjects []int64 `yaml:"poll_projects"`
	// PollGroups are group ids whose projects are polled the same way.
	PollGroups []int64 `yaml:"poll_groups"`
}

// Capacity is what FireRunner may hand out on this host.
type Capacity struct {
	// VCPUs in total for all VMs; 0 = host CPUs minus ReserveVCPUs.
	VCPUs int `yaml:"vcpus"`
	// MemoryMiB in total for all VMs; 0 = host memory minus ReserveMemoryMiB.
	MemoryMiB int `yaml:"memory_mib"`
	// ReserveVCPUs and ReserveMemoryMiB are kept for the host.
	ReserveVCPUs     int `yaml:"reserve_vcpus"`
	ReserveMemoryMiB int `yaml:"reserve_memory_mib"`
	// MaxVCPUsPerVM and MaxMemoryGiBPerVM bound one job's size tag.
	MaxVCPUsPerVM     int `yaml:"max_vcpus_per_vm"`
	MaxMemoryGiBPerVM int `yaml:"max_memory_gib_per_vm"`
	// MaxVMs bounds concurrent VMs; 0 = no bound beyond vCPU/memory.
	MaxVMs int `yaml:"max_vms"`
}

// Limits are per-job deadlines.
type Limits struct {
	// JobMaxDuration kills a VM that runs longer (runner deleted, job failed).
	JobMaxDuration time.Duration `yaml:"job_max_duration"`
	// VMStartTimeout fails a VM whose runner has not picked a job by then.
	VMStartTimeout time.Duration `yaml:"vm_start_timeout"`
	// DrainTimeout is how long SIGTERM waits for running VMs before cleanup.
	DrainTimeout time.Duration `yaml:"drain_timeout"`
	// QueueTimeout fails a job that waited this long for capacity; 0 = never.
	QueueTimeout time.Duration `yaml:"queue_timeout"`
	// StartAttempts bounds the attempts to get a job a VM whose runner takes
	// it (runner creation, VM start, start timeout); after the last failed
	// one the job is failed with its reason. GitLab keeps it pending.
	StartAttempts int `yaml:"start_attempts"`
	// RetryBackoff is the wait after the first failed attempt; it doubles
	// with each further one, up to 2 minutes.
	RetryBackoff time.Duration `yaml:"retry_backoff"`
}

// VM selects the driver and the guest image.
type VM struct {
	// Driver names a driver of the daemon's registry: "qemu" or "firecracker".
	Driver string `yaml:"driver"`
	// ImageDir holds a built guest image (manifest.json, vmlinux, initrd, rootfs).
	ImageDir string `yaml:"image_dir"`
	// ConsoleLogDir keeps a copy of each VM's console log; "" = do not keep.
	ConsoleLogDir string `yaml:"console_log_dir"`
	// ConsoleLogMaxBytes caps each VM's live console log: past it, the
	// middle is cut and the head and the newest output are kept (>= 64 KiB).
	ConsoleLogMaxBytes int64 `yaml:"console_log_max_bytes"`
	// ConsoleLogKeep is how many copies ConsoleLogDir keeps (newest first);
	// 0 = no count limit.
	ConsoleLogKeep int `yaml:"console_log_keep"`
	// ConsoleLogMaxAge removes copies in ConsoleLogDir older than this;
	// 0 = no age limit.
	ConsoleLogMaxAge time.Duration `yaml:"console_log_max_age"`
}

// Network is the VM network shared by both drivers.
type Network struct {
	// Mode is "user" (QEMU user-mode networking, development only) or "tap"
	// (tap per VM on a FireRunner bridge with NAT; production).
	Mode string `yaml:"mode"`
	// AllowUserModeForDevelopment must be true for Mode "user": QEMU's
	// user-mode networking forwards the guest's gateway address to the
	// host's 127.0.0.1, so every job could reach the host's loopback
	// services (FireRunner's own listener included). Development only.
	AllowUserModeForDevelopment bool `yaml:"allow_user_mode_for_development"`
	// Bridge is the bridge device name.
	Bridge string `yaml:"bridge"`
	// CIDR is the VM subnet; the first address is the bridge/gateway.
	CIDR string `yaml:"cidr"`
	// MTU of bridge and taps.
	MTU int `yaml:"mtu"`
	// DNS servers handed to guests.
	DNS []string `yaml:"dns"`
	// Egress is "allow_all" or "allowlist" (only EgressAllow CIDRs).
	Egress string `yaml:"egress"`
	// EgressAllow lists IPv4 CIDRs or addresses: the only destinations with
	// egress allowlist, and the exceptions to DenyPrivate.
	EgressAllow []string `yaml:"egress_allow"`
	// DenyPrivate drops egress from VMs to private and internal ranges
	// (RFC 1918 10/8, 172.16/12, 192.168/16, CGNAT 100.64/10, link-local
	// 169.254/16) except EgressAllow and DNS (port 53) to the DNS servers.
	DenyPrivate bool `yaml:"deny_private"`
	// AllowHostPorts are host TCP/UDP ports VMs may reach on the bridge
	// (gateway) address only (tap mode), e.g. a DNS resolver or a GitLab on
	// this host. Every other host port and every other host address is
	// closed to VMs; FireRunner's own listen port can never be opened.
	AllowHostPorts []int `yaml:"allow_host_ports"`
}

// QEMU configures the qemu driver; internal/vm/qemu's Provider validates it.
type QEMU struct {
	// Binary is the qemu-system-x86_64 path.
	Binary string `yaml:"binary"`
	// Accel is auto (KVM if a boot probe works, else TCG), kvm or tcg.
	Accel string `yaml:"accel"`
	// AllowForDevelopment must be true for vm.driver qemu: QEMU runs as
	// FireRunner's user (root) without a per-VM uid or cgroup, only
	// inside its seccomp sandbox, so the driver is for development.
	AllowForDevelopment bool `yaml:"allow_for_development"`
}

// Firecracker configures the firecracker driver; internal/vm/firecracker's
// Provider validates it.
type Firecracker struct {
	// Binary and JailerBinary are the firecracker and jailer paths.
	Binary       string `yaml:"binary"`
	JailerBinary string `yaml:"jailer_binary"`
	// UseJailer runs each VM under the jailer (chroot, uid/gid, cgroups).
	UseJailer bool `yaml:"use_jailer"`
	// UID and GID the jailer drops to.
	UID int `yaml:"uid"`
	GID int `yaml:"gid"`
	// ChrootBase is the jailer's --chroot-base-dir.
	ChrootBase string `yaml:"chroot_base"`
	// ParentCgroup is the jailer's --parent-cgroup: VMs' cgroups go under
	// <cgroup mount>/<parent_cgroup>/<vm id>; "" = the jailer's default
	// (the firecracker file's name).
	ParentCgroup string `yaml:"parent_cgroup"`
	// MemoryOverheadMiB and MemoryOverheadMiBPerGiB size each VM cgroup's
	// memory.max beyond the guest's memory: a fixed part for Firecracker
	// and a part per GiB of guest memory for KVM's page tables.
	MemoryOverheadMiB       int `yaml:"memory_overhead_mib"`
	MemoryOverheadMiBPerGiB int `yaml:"memory_overhead_mib_per_gib"`
	// ExtraBootArgs are appended to the guest kernel command line.
	ExtraBootArgs []string `yaml:"extra_boot_args"`
	// LogLevel is Firecracker's own log level: Error, Warning, Info, Debug.
	LogLevel string `yaml:"log_level"`
	// SerialBytesPerSec rate-limits the guest's serial console in
	// Firecracker (output past it is dropped); 0 = no limit.
	SerialBytesPerSec int64 `yaml:"serial_bytes_per_sec"`
	// VMUIDBase, when not 0, gives every jailed VM a uid and gid of its
	// own: the VM whose address is host number i of network.cidr runs as
	// VMUIDBase+i (its tap belongs to it). 0 = every VM runs as UID/GID.
	VMUIDBase int `yaml:"vm_uid_base"`
	// SnapshotRefill lets pools refill by restoring a snapshot of a booted
	// warm VM of the size instead of booting (jailer only): each clone
	// gets its own tap, memory file link and identity. Off by default:
	// Firecracker ships snapshots as a developer preview.
	SnapshotRefill bool `yaml:"snapshot_refill"`
}

// Default returns the configuration used for every field the file omits.
func Default() Config {
	return Config{
		Listen:   ":8080",
		LogLevel: "info",
		StateDir: "/var/lib/firerunner",
		State: State{Retention: 14 * 24 * time.Hour, Backend: "sqlite", PostgresDSNFile: "/etc/firerunner/.postgres_dsn",
			HeartbeatInterval: 5 * time.Second, HostLease: 30 * time.Second},
		GitLab: GitLab{
			TokenFile:         "/etc/firerunner/.gitlab_token",
			WebhookSecretFile: "/etc/firerunner/.webhook_secret",
			RequestTimeout:    15 * time.Second,
			MaxRetries:        5,
			WebhookMaxBody:    1 << 20,
		},
		Runners: Runners{
			Mode:              "oneoff",
			Scope:             "project",
			Registration:      "create",
			MaximumTimeout:    time.Hour,
			DescriptionPrefix: "firerunner",
			Executor:          ExecutorShell,
			DefaultImage:      "debian:bookworm-slim",
		},
		Docker:    Docker{ScratchDiskGiB: 20},
		Reconcile: Reconcile{Interval: 30 * time.Second},
		Capacity: Capacity{
			ReserveVCPUs:      1,
			ReserveMemoryMiB:  2048,
			MaxVCPUsPerVM:     32,
			MaxMemoryGiBPerVM: 64,
		},
		Limits: Limits{
			JobMaxDuration: time.Hour,
			VMStartTimeout: 5 * time.Minute,
			DrainTimeout:   10 * time.Minute,
			StartAttempts:  5,
			RetryBackoff:   2 * time.Second,
		},
		VM: VM{Driver: "firecracker", ImageDir: "/var/lib/firerunner/image",
			ConsoleLogMaxBytes: 8 << 20, ConsoleLogKeep: 100, ConsoleLogMaxAge: 7 * 24 * time.Hour},
		Network: Network{
			Mode:        "tap",
			Bridge:      "firerunner0",
			CIDR:        "172.30.0.0/24",
			MTU:         1500,
			Egress:      "allow_all",
			DenyPrivate: true,
		},
		QEMU:  QEMU{Binary: "qemu-system-x86_64", Accel: "auto"},
		Pools: []Pool{},
		Firecracker: Firecracker{
			Binary:       "/usr/local/bin/firecracker",
			JailerBinary: "/usr/local/bin/jailer",
			UseJailer:    true,
			UID:          64000,
			GID:          64000,
			ChrootBase:   "/srv/jailer",

			MemoryOverheadMiB:       64,
			MemoryOverheadMiBPerGiB: 8,
			LogLevel:                "Warning",
			SerialBytesPerSec:       256 << 10,
		},
	}
}

// boundsErrors checks the console log bounds (vm.console_log_*) and the
// network isolation lists (network.egress_allow, network.dns).
func (c Config) boundsErrors() FieldErrors {
	var errs FieldErrors
	bad := func(field, format string, a ...any) {
		errs = append(errs, field+": "+fmt.Sprintf(format, a...))
	}
	if c.VM.ConsoleLogMaxBytes < MinConsoleLogMaxBytes {
		bad("vm.console_log_max_bytes", "must be >= %d (64 KiB), got %d", MinConsoleLogMaxBytes, c.VM.ConsoleLogMaxBytes)
	}
	if c.VM.ConsoleLogKeep < 0 {
		bad("vm.console_log_keep", "must not be negative, got %d", c.VM.ConsoleLogKeep)
	}
	if c.VM.ConsoleLogMaxAge < 0 {
		bad("vm.console_log_max_age", "must not be negative, got %s", c.VM.ConsoleLogMaxAge)
	}
	for _, s := range c.Network.EgressAllow {
		if _, err := ParseIPv4Prefix(s); err != nil {
			bad("network.egress_allow", "%v", err)
		}
	}
	for _, s := range c.Network.DNS {
		if ip, err := netip.ParseAddr(s); err != nil || !ip.Is4() {
			bad("network.dns", "%q is not an IPv4 address", s)
		}
	}
	return errs
}

// MinConsoleLogMaxBytes is the smallest vm.console_log_max_bytes.
const MinConsoleLogMaxBytes = 64 << 10

// ParseIPv4Prefix parses a network.egress_allow entry: an IPv4 CIDR or a
// single IPv4 address (a /32). The result is masked.
func ParseIPv4Prefix(s string) (netip.Prefix, error) {
	p, err := netip.ParsePrefix(s)
	if err != nil {
		ip, err2 := netip.ParseAddr(s)
		if err2 != nil {
			return netip.Prefix{}, fmt.Errorf("%q is not an IPv4 CIDR or address", s)
		}
		p = netip.PrefixFrom(ip, ip.BitLen())
	}
	if !p.Addr().Is4() {
		return netip.Prefix{}, fmt.Errorf("%q is not IPv4", s)
	}
	return p.Masked(), nil
}

// Load reads path over the defaults, rejects unknown fields and validates,
// the VM driver sections through drivers.
func Load(path string, drivers Drivers) (Config, error) {
	c := Default()
	b, err := os.ReadFile(path)
	if err != nil {
		return c, fmt.Errorf("read config: %w", err)
	}
	if err := Parse(b, &c, drivers); err != nil {
		return c, fmt.Errorf("%s: %w", path, err)
	}
	return c, nil
}

// Parse decodes YAML into c (which should hold the defaults) and validates,
// the VM driver sections through drivers.
func Parse(b []byte, c *Config, drivers Drivers) error {
	dec := yaml.NewDecoder(bytes.NewReader(b))
	dec.KnownFields(true)
	if err := dec.Decode(c); err != nil && !errors.Is(err, io.EOF) { // empty file: all defaults
		return fmt.Errorf("parse config: %w", err)
	}
	return c.Validate(drivers)
}

// FieldErrors lists every invalid field, one per line.
type FieldErrors []string

func (e FieldErrors) Error() string {
	return "invalid configuration:\n  " + strings.Join(e, "\n  ")
}

// Drivers is what validation needs to know about the VM drivers: the
// daemon's driver registry (daemon.Drivers) provides it. Config names no
// driver itself: each driver validates its own section (qemu, firecracker),
// so adding a driver touches no switch here.
type Drivers interface {
	// Names lists the drivers vm.driver may name.
	Names() []string
	// Validate checks every driver's section, and for the selected driver
	// what it needs from the rest of c. Each error reads "field: problem".
	Validate(selected string, c Config) []error
}

// Validate checks every field and returns FieldErrors naming each bad one,
// the VM driver sections' included (through drivers).
func (c Config) Validate(drivers Drivers) error {
	var errs FieldErrors
	bad := func(field, format string, a ...any) {
		errs = append(errs, field+": "+fmt.Sprintf(format, a...))
	}
	if c.Listen == "" {
		bad("listen", "must be set, e.g. :8080")
	} else if _, _, err := splitAddr(c.Listen); err != nil {
		bad("listen", "%v", err)
	}
	if c.MetricsListen != "" {
		if mh, mp, err := splitAddr(c.MetricsListen); err != nil {
			bad("metrics_listen", "%v", err)
		} else if lh, lp, err := splitAddr(c.Listen); err == nil && mp != 0 && mp == lp && (mh == lh || wildcard(mh) || wildcard(lh)) {
			bad("metrics_listen", "%q must not be the listen address %q (set it to another port, or leave it empty to serve /metrics on listen)", c.MetricsListen, c.Listen)
		}
	}
	if (c.TLS.CertFile == "") != (c.TLS.KeyFile == "") {
		bad("tls", "cert_file and key_file must be set together (got cert_file %q, key_file %q)", c.TLS.CertFile, c.TLS.KeyFile)
	}
	switch c.LogLevel {
	case "debug", "info", "warn", "error":
	default:
		bad("log_level", "%q is not one of debug, info, warn, error", c.LogLevel)
	}
	if c.StateDir == "" {
		bad("state_dir", "must be set")
	}
	if r := c.State.Retention; r < 0 || (r > 0 && r < MinRetention) {
		bad("state.retention", "must be 0 (keep everything) or >= %s, got %s", MinRetention, r)
	}
	switch c.State.Backend {
	case "sqlite":
	case "postgres":
		if c.State.PostgresDSNFile == "" {
			bad("state.postgres_dsn_file", "must be set for backend postgres")
		}
	default:
		bad("state.backend", "%q is not one of sqlite, postgres", c.State.Backend)
	}
	if hb := c.State.HeartbeatInterval; hb < 100*time.Millisecond || hb > time.Minute {
		bad("state.heartbeat_interval", "must be between 100ms and 1m, got %s", hb)
	} else if c.State.HostLease < 3*hb {
		// A lease shorter than a few heartbeats expires on one slow
		// database round trip: a live host would be reaped.
		bad("state.host_lease", "must be at least 3 heartbeat intervals (%s), got %s", 3*hb, c.State.HostLease)
	}
	if u, err := url.Parse(c.GitLab.URL); err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		bad("gitlab.url", "%q is not an http(s) URL", c.GitLab.URL)
	}
	if c.GitLab.GuestURL != "" {
		if u, err := url.Parse(c.GitLab.GuestURL); err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			bad("gitlab.guest_url", "%q is not an http(s) URL", c.GitLab.GuestURL)
		}
	}
	if c.GitLab.TokenFile == "" {
		bad("gitlab.token_file", "must be set")
	}
	if c.GitLab.WebhookSecretFile == "" {
		bad("gitlab.webhook_secret_file", "must be set")
	}
	if c.GitLab.RequestTimeout <= 0 {
		bad("gitlab.request_timeout", "must be > 0")
	}
	if c.GitLab.MaxRetries < 0 || c.GitLab.MaxRetries > 20 {
		bad("gitlab.max_retries", "must be between 0 and 20, got %d", c.GitLab.MaxRetries)
	}
	if c.GitLab.WebhookMaxBody < 1024 {
		bad("gitlab.webhook_max_body", "must be >= 1024 bytes, got %d", c.GitLab.WebhookMaxBody)
	}
	switch c.Runners.Mode {
	case "oneoff":
	case "pooled":
		if c.Runners.Scope == "project" {
			bad("runners.mode", "pooled needs runners.scope group or instance: a project runner serves only its project, and a pool's VMs get their runner before any job names a project")
		}
	default:
		bad("runners.mode", "%q is not one of oneoff, pooled", c.Runners.Mode)
	}
	switch c.Runners.Scope {
	case "project", "instance":
	case "group":
		if c.Runners.GroupID <= 0 {
			bad("runners.group_id", "must be set when runners.scope is group")
		}
	default:
		bad("runners.scope", "%q is not one of project, group, instance", c.Runners.Scope)
	}
	switch c.Runners.Registration {
	case "create":
	case "legacy":
		if c.Runners.RegistrationTokenFile == "" {
			bad("runners.registration_token_file", "must be set when runners.registration is legacy")
		}
	default:
		bad("runners.registration", "%q is not one of create, legacy", c.Runners.Registration)
	}
	if c.Runners.MaximumTimeout < 10*time.Minute {
		bad("runners.maximum_timeout", "GitLab rejects values under 600s, got %s", c.Runners.MaximumTimeout)
	}
	if c.Runners.DescriptionPrefix == "" {
		bad("runners.description_prefix", "must be set (reconciliation uses it to find our runners)")
	}
	switch c.Runners.Executor {
	case ExecutorShell:
	case ExecutorDocker:
		if d := c.Runners.DefaultImage; strings.TrimSpace(d) == "" || strings.ContainsAny(d, " \t\n\"\\") {
			bad("runners.default_image", "%q is not an image reference (needed by the docker executor)", d)
		}
	default:
		bad("runners.executor", "%q is not one of shell, docker", c.Runners.Executor)
	}
	if c.Docker.ScratchDiskGiB < 1 || c.Docker.ScratchDiskGiB > MaxScratchDiskGiB {
		bad("docker.scratch_disk_gib", "must be between 1 and %d, got %d", MaxScratchDiskGiB, c.Docker.ScratchDiskGiB)
	}
	if c.Runners.Executor == ExecutorDocker && c.Firecracker.SnapshotRefill {
		bad("firecracker.snapshot_refill", "not with runners.executor docker yet: a snapshot clone would need its own copy of the template's scratch disk (Docker's data-root)")
	}
	if m := c.Docker.RegistryMirror; m != "" {
		if u, err := url.Parse(m); err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || (u.Path != "" && u.Path != "/") || u.RawQuery != "" || u.User != nil {
			bad("docker.registry_mirror", "%q is not an http(s) URL of a registry (scheme://host[:port])", m)
		}
	}
	if c.Reconcile.Interval < time.Second {
		bad("reconcile.interval", "must be >= 1s, got %s", c.Reconcile.Interval)
	}
	if c.Capacity.VCPUs < 0 || c.Capacity.MemoryMiB < 0 || c.Capacity.ReserveVCPUs < 0 || c.Capacity.ReserveMemoryMiB < 0 || c.Capacity.MaxVMs < 0 {
		bad("capacity", "values must not be negative")
	}
	if c.Capacity.MaxVCPUsPerVM < 1 {
		bad("capacity.max_vcpus_per_vm", "must be >= 1")
	}
	if c.Capacity.MaxMemoryGiBPerVM < 1 {
		bad("capacity.max_memory_gib_per_vm", "must be >= 1")
	}
	if c.Limits.JobMaxDuration <= 0 {
		bad("limits.job_max_duration", "must be > 0")
	}
	if c.Limits.VMStartTimeout <= 0 {
		bad("limits.vm_start_timeout", "must be > 0")
	}
	seenPool := map[string]bool{}
	for i, p := range c.Pools {
		f := fmt.Sprintf("pools[%d]", i)
		size, ok, err := tags.Parse([]string{p.Size}, tags.Limits{MaxVCPUs: c.Capacity.MaxVCPUsPerVM, MaxMemoryGiB: c.Capacity.MaxMemoryGiBPerVM})
		switch {
		case err != nil || !ok:
			bad(f+".size", "%q is not a valid size tag (firecracker-{N}cpu-{M}gb within capacity.max_*_per_vm)", p.Size)
		case seenPool[size.Tag()]:
			bad(f+".size", "%q has a pool already", p.Size)
		default:
			seenPool[size.Tag()] = true
		}
		if p.MinIdle < 0 || p.MaxIdle < 0 || (p.MaxIdle != 0 && p.MaxIdle < p.MinIdle) {
			bad(f, "need 0 <= min_idle <= max_idle (or max_idle 0), got %d and %d", p.MinIdle, p.MaxIdle)
		}
		if p.IdleTimeout < 0 || (p.IdleTimeout > 0 && p.IdleTimeout < time.Second) {
			bad(f+".idle_timeout", "must be 0 (30m) or >= 1s, got %s", p.IdleTimeout)
		}
	}
	if c.Limits.StartAttempts < 1 {
		bad("limits.start_attempts", "must be >= 1, got %d", c.Limits.StartAttempts)
	}
	if c.Limits.RetryBackoff < 0 {
		bad("limits.retry_backoff", "must be >= 0, got %s", c.Limits.RetryBackoff)
	}
	if c.HostID != "" && !hostIDPattern.MatchString(c.HostID) {
		bad("host_id", "must be 1-63 characters of a-z, 0-9, '.', '-', starting with a letter or digit, got %q", c.HostID)
	}
	if c.Limits.DrainTimeout < 0 || c.Limits.QueueTimeout < 0 {
		bad("limits", "timeouts must not be negative")
	}
	if drivers == nil {
		bad("vm.driver", "cannot check %q: no VM drivers given", c.VM.Driver)
	} else if names := drivers.Names(); !slices.Contains(names, c.VM.Driver) {
		bad("vm.driver", "%q is not one of %s", c.VM.Driver, strings.Join(names, ", "))
	}
	if c.VM.ImageDir == "" {
		bad("vm.image_dir", "must be set")
	}
	switch c.Network.Mode {
	case "user": // QEMU only: the firecracker driver refuses it (its Validate)
		if !c.Network.AllowUserModeForDevelopment {
			bad("network.mode", "user-mode networking lets every guest reach this host's loopback services (QEMU maps the guest's gateway 10.0.2.2 to 127.0.0.1); "+
				"use tap, or set network.allow_user_mode_for_development: true on a development machine")
		}
	case "tap":
		if c.Network.Bridge == "" || len(c.Network.Bridge) > 15 {
			bad("network.bridge", "must be 1-15 characters")
		}
		if c.Network.CIDR == "" {
			bad("network.cidr", "must be set in tap mode")
		}
	default:
		bad("network.mode", "%q is not one of user, tap", c.Network.Mode)
	}
	if c.Network.MTU < 576 || c.Network.MTU > 9000 {
		bad("network.mtu", "must be between 576 and 9000, got %d", c.Network.MTU)
	}
	switch c.Network.Egress {
	case "allow_all", "allowlist":
	default:
		bad("network.egress", "%q is not one of allow_all, allowlist", c.Network.Egress)
	}
	errs = append(errs, c.boundsErrors()...)
	for _, p := range c.Network.AllowHostPorts {
		if p < 1 || p > 65535 {
			bad("network.allow_host_ports", "%d is not a port (1-65535)", p)
		} else if _, lp, err := net.SplitHostPort(c.Listen); err == nil && lp == strconv.Itoa(p) {
			bad("network.allow_host_ports", "%d is FireRunner's own listen port, which VMs must never reach", p)
		} else if _, mp, err := net.SplitHostPort(c.MetricsListen); err == nil && mp == strconv.Itoa(p) {
			bad("network.allow_host_ports", "%d is FireRunner's own metrics_listen port, which VMs must never reach", p)
		}
	}
	if drivers != nil {
		for _, err := range drivers.Validate(c.VM.Driver, c) {
			errs = append(errs, err.Error())
		}
	}
	if len(errs) > 0 {
		return errs
	}
	return nil
}

// splitAddr parses a listen address, host:port with a numeric port (0 =
// any free port).
func splitAddr(a string) (host string, port int, err error) {
	h, p, err := net.SplitHostPort(a)
	if err != nil {
		return "", 0, fmt.Errorf("%q is not host:port (e.g. :8080 or 127.0.0.1:9100): %v", a, err)
	}
	n, err := strconv.ParseUint(p, 10, 16)
	if err != nil {
		return "", 0, fmt.Errorf("%q: port %q is not a number 0-65535", a, p)
	}
	return h, int(n), nil
}

// wildcard reports whether a listen host means every address.
func wildcard(h string) bool { return h == "" || h == "0.0.0.0" || h == "::" }

var hostIDPattern = regexp.MustCompile(`^[a-z0-9][a-z0-9.-]{0,62}$`)

// HostIdentity is host_id, or the machine's lower-cased hostname.
func (c Config) HostIdentity() (string, error) {
	if c.HostID != "" {
		return c.HostID, nil
	}
	h, err := os.Hostname()
	if err != nil {
		return "", fmt.Errorf("host_id is empty and the hostname is unknown: %w", err)
	}
	if h = strings.ToLower(h); !hostIDPattern.MatchString(h) {
		return "", fmt.Errorf("host_id is empty and the hostname %q is not a valid host id: set host_id", h)
	}
	return h, nil
}

// GuestGitLabURL is the URL VMs use to reach GitLab.
func (c Config) GuestGitLabURL() string {
	if c.GitLab.GuestURL != "" {
		return c.GitLab.GuestURL
	}
	return c.GitLab.URL
}

// ReadSecret reads a secret file, refusing files readable by group or others.
func ReadSecret(path string) (string, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return "", fmt.Errorf("secret file: %w", err)
	}
	if fi.Mode().Perm()&0o077 != 0 {
		return "", fmt.Errorf("secret file %s has mode %04o; it must be 0600 or stricter (chmod 600 %s)", path, fi.Mode().Perm(), path)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return "", fmt.Errorf("secret file: %w", err)
	}
	s := strings.TrimSpace(string(b))
	if s == "" {
		return "", fmt.Errorf("secret file %s is empty", path)
	}
	return s, nil
}

// RunnerRequestBudget is GitLab's limit of job requests per runner per
// minute (POST /jobs/request); all VMs polling on one pooled runner share it.
const RunnerRequestBudget = 2000

// PollsPerMinute is what one idle gitlab-runner run-single sends: one job
// request every 3 s (common.CheckInterval; check_interval is ignored).
const PollsPerMinute = 20

// Warnings lists what is valid but unwise, for the log at start: pooled
// pools whose pollers could exceed the job-request budget their shared
// runner has in GitLab.
func (c Config) Warnings() []string {
	if c.Runners.Mode != "pooled" {
		return nil
	}
	var out []string
	sum := 0
	for i, p := range c.Pools {
		n := max(p.MaxIdle, p.MinIdle)
		sum += n
		if n*PollsPerMinute > RunnerRequestBudget {
			out = append(out, fmt.Sprintf("pools[%d] (%s): up to %d idle VMs poll one shared runner, %d job requests/min, over GitLab's %d per runner: GitLab answers 429 and they take jobs late; keep max_idle at %d or below",
				i, p.Size, n, n*PollsPerMinute, RunnerRequestBudget, RunnerRequestBudget/PollsPerMinute))
		}
	}
	if sum*PollsPerMinute > RunnerRequestBudget && len(c.Pools) > 1 {
		out = append(out, fmt.Sprintf("pools: up to %d idle VMs in all poll GitLab from this host, %d job requests/min (GitLab allows %d per runner; a host's address may be limited too)",
			sum, sum*PollsPerMinute, RunnerRequestBudget))
	}
	return out
}

// PoolIdleTimeout is a pool's idle timeout with its default.
func (p Pool) PoolIdleTimeout() time.Duration {
	if p.IdleTimeout == 0 {
		return 30 * time.Minute
	}
	return p.IdleTimeout
}
