// Package guestconfig is the contract between host and guest: the per-VM
// config the drivers write to a small read-only config drive, and the console
// markers the guest agent prints that the host parses.
package guestconfig

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"regexp"
	"strings"
)

// Config is what the guest agent needs to run one job. It holds the runner
// token, so it only ever travels on the config drive (file mode 0600).
type Config struct {
	// Hostname of the guest (the VM id).
	Hostname string `json:"hostname"`
	// GitLabURL is the GitLab URL as seen from inside the VM.
	GitLabURL string `json:"gitlab_url,omitempty"`
	// RunnerToken is the glrt- authentication token of the runner to use.
	RunnerToken string `json:"runner_token,omitempty"`
	// JobTimeoutSec bounds the whole workload inside the guest.
	JobTimeoutSec int `json:"job_timeout_sec"`
	// WaitTimeoutSec is how long gitlab-runner waits for a job to arrive.
	WaitTimeoutSec int `json:"wait_timeout_sec,omitempty"`
	// JobMaxSec, when set, bounds the workload from the moment GitLab
	// hands gitlab-runner its job (a pooled VM may poll a long while
	// first); JobTimeoutSec still bounds it all.
	JobMaxSec int `json:"job_max_sec,omitempty"`
	// Network is the static guest network; nil means DHCP-less user-mode
	// defaults (QEMU slirp: 10.0.2.15/24 via 10.0.2.2).
	Network *Network `json:"network,omitempty"`
	// Env is extra environment for the workload.
	Env map[string]string `json:"env,omitempty"`
	// CACertsPEM are extra CA certificates to trust (PEM).
	CACertsPEM string `json:"ca_certs_pem,omitempty"`
	// Command, when set, is run instead of gitlab-runner (image smoke tests).
	Command []string `json:"command,omitempty"`
	// UnixTimeNano is the host clock at VM creation, to set the guest clock.
	UnixTimeNano int64 `json:"unix_time_nano"`
	// EntropySeed seeds the guest RNG before any TLS happens.
	EntropySeed []byte `json:"entropy_seed,omitempty"`
	// Warm: boot without a runner. The agent starts gitlab-runner blocked on
	// its config FIFO and waits for an Assignment on the assignment channel
	// (AssignPort); the drive then holds no token.
	Warm bool `json:"warm,omitempty"`
	// MachineID is this VM's /etc/machine-id (32 hex digits): every VM keeps
	// its own identity, even when booted from one image.
	MachineID string `json:"machine_id,omitempty"`
	// SystemID is gitlab-runner's system_id for this VM (s_ + 12
	// alphanumerics, gitlab-runner's own format), written to
	// .runner_system_id beside the runner's config before gitlab-runner
	// starts. GitLab keys a runner manager by it, so when many VMs share one
	// pooled runner, the job API's runner_manager names the VM that ran a job.
	SystemID string `json:"system_id,omitempty"`
	// Docker, when set, runs a Docker engine on the scratch disk and
	// gitlab-runner's docker executor (see docker.go); nil: shell executor.
	Docker *Docker `json:"docker,omitempty"`
	// DockerSeed (image builds only): bring Docker up on the scratch disk,
	// stop it cleanly and power off without running the workload; the disk
	// becomes the image's Docker seed (internal/image).
	DockerSeed bool `json:"docker_seed,omitempty"`
}

// systemIDPattern is gitlab-runner's own check of a .runner_system_id
// (commands/internal/configfile): anything else it silently replaces.
var systemIDPattern = regexp.MustCompile(`^[sr]_[0-9a-zA-Z]{12}$`)

// ValidSystemID reports whether id is a system_id gitlab-runner accepts.
func ValidSystemID(id string) bool { return systemIDPattern.MatchString(id) }

// Assignment is what a warm VM needs to run one job; it reaches the guest
// over the assignment channel only (never argv, a kernel command line, a
// log or the store). It holds the runner token: String redacts it.
type Assignment struct {
	GitLabURL      string `json:"gitlab_url"`
	RunnerToken    string `json:"runner_token"`
	JobTimeoutSec  int    `json:"job_timeout_sec"`
	WaitTimeoutSec int    `json:"wait_timeout_sec,omitempty"`
	JobMaxSec      int    `json:"job_max_sec,omitempty"` // Config.JobMaxSec
	// Identity, when set, replaces the identity the guest booted with: a VM
	// restored from a snapshot resumes with the identity of the VM the
	// snapshot was taken of (hostname, addresses, machine-id, RNG state), so
	// the driver sends the clone's own here (Firecracker warns that a
	// snapshot restored many times shares randomness and ids).
	Identity *Identity `json:"identity,omitempty"`
}

// Identity is what makes one VM distinct from every other booted from the
// same image or restored from the same snapshot. The agent applies it before
// gitlab-runner reads its config, so the runner's system_id (derived from
// /etc/machine-id) and every random value it draws are the clone's own.
type Identity struct {
	Hostname  string `json:"hostname"`
	MachineID string `json:"machine_id"`
	// EntropySeed is mixed into the guest's pool, and the kernel RNG is
	// then reseeded from it (RNDRESEEDCRNG), besides the VMGenID reseed
	// Firecracker triggers on restore where the guest kernel supports it.
	EntropySeed  []byte   `json:"entropy_seed"`
	UnixTimeNano int64    `json:"unix_time_nano,omitempty"`
	Network      *Network `json:"network,omitempty"`
	// MAC is the clone's guest MAC (aa:bb:cc:dd:ee:ff): the NIC restored from
	// the snapshot still has the source VM's, which the host's bridge rules
	// pin to the source's tap only.
	MAC string `json:"mac,omitempty"`
	// SystemID replaces the template's gitlab-runner system_id, which the
	// clone's memory still holds on its tmpfs: without it every clone of a
	// pooled size would be one runner manager to GitLab.
	SystemID string `json:"system_id,omitempty"`
}

// String leaves the entropy seed out: whoever knows it knows part of what
// the clone's RNG was reseeded from.
func (id Identity) String() string {
	return fmt.Sprintf("identity{host=%s machine-id=%s mac=%s seed=[redacted]}", id.Hostname, id.MachineID, id.MAC)
}

// Validate reports the first problem with an identity.
func (id Identity) Validate() error {
	if id.Hostname == "" {
		return errors.New("identity: hostname is required")
	}
	if len(id.MachineID) != 32 || strings.Trim(id.MachineID, "0123456789abcdef") != "" {
		return errors.New("identity: machine_id must be 32 lowercase hex digits")
	}
	if len(id.EntropySeed) < 32 {
		return errors.New("identity: entropy_seed must hold at least 32 bytes")
	}
	if id.MAC != "" {
		if hw, err := net.ParseMAC(id.MAC); err != nil || len(hw) != 6 {
			return fmt.Errorf("identity: mac %q is not aa:bb:cc:dd:ee:ff", id.MAC)
		}
	}
	if id.SystemID != "" && !ValidSystemID(id.SystemID) {
		return fmt.Errorf("identity: system_id %q is not gitlab-runner's format (s_ or r_ and 12 letters or digits)", id.SystemID)
	}
	return nil
}

// AssignPort is the virtio-serial port name (QEMU) of the assignment
// channel; AssignVsockPort the vsock port (Firecracker), the host at CID 2.
const (
	AssignPort      = "org.firerunner.assign"
	AssignVsockPort = 52
)

// MaxAssignment bounds what the agent reads from the channel.
const MaxAssignment = 64 << 10

// Validate reports the first problem with an assignment.
func (a Assignment) Validate() error {
	if a.RunnerToken == "" {
		return errors.New("assignment: runner_token is required")
	}
	if a.JobTimeoutSec <= 0 {
		return errors.New("assignment: job_timeout_sec must be > 0")
	}
	u, err := url.Parse(a.GitLabURL)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return fmt.Errorf("assignment: gitlab_url %q is not an http(s) URL", a.GitLabURL)
	}
	if a.Identity != nil {
		return a.Identity.Validate()
	}
	return nil
}

func (a Assignment) String() string {
	return fmt.Sprintf("assignment{url=%s token=[redacted] timeout=%ds}", a.GitLabURL, a.JobTimeoutSec)
}

// Apply puts an assignment into a warm VM's config.
func (c Config) Apply(a Assignment) Config {
	c.GitLabURL, c.RunnerToken, c.JobTimeoutSec, c.Warm = a.GitLabURL, a.RunnerToken, a.JobTimeoutSec, false
	if a.WaitTimeoutSec > 0 {
		c.WaitTimeoutSec = a.WaitTimeoutSec
	}
	if a.JobMaxSec > 0 {
		c.JobMaxSec = a.JobMaxSec
	}
	if id := a.Identity; id != nil {
		c.Hostname, c.MachineID, c.EntropySeed, c.UnixTimeNano = id.Hostname, id.MachineID, id.EntropySeed, id.UnixTimeNano
		if id.SystemID != "" {
			c.SystemID = id.SystemID
		}
		if id.Network != nil {
			c.Network = id.Network
		}
	}
	return c
}

// Network is a static IPv4 configuration for eth0.
type Network struct {
	Address string   `json:"address"` // CIDR, e.g. 172.30.0.2/24
	Gateway string   `json:"gateway"`
	DNS     []string `json:"dns,omitempty"`
	MTU     int      `json:"mtu,omitempty"`
}

// Validate reports the first problem with the config.
func (c Config) Validate() error {
	if c.JobTimeoutSec <= 0 {
		return errors.New("guest config: job_timeout_sec must be > 0")
	}
	if err := c.Docker.Validate(); err != nil {
		return err
	}
	if c.SystemID != "" && !ValidSystemID(c.SystemID) {
		return fmt.Errorf("guest config: system_id %q is not gitlab-runner's format (s_ or r_ and 12 letters or digits)", c.SystemID)
	}
	if c.Warm {
		if c.RunnerToken != "" || len(c.Command) > 0 {
			return errors.New("guest config: a warm VM's drive carries no runner token and no command")
		}
		return nil
	}
	if len(c.Command) == 0 {
		if c.RunnerToken == "" {
			return errors.New("guest config: runner_token or command is required")
		}
		u, err := url.Parse(c.GitLabURL)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			return fmt.Errorf("guest config: gitlab_url %q is not an http(s) URL", c.GitLabURL)
		}
	}
	return nil
}

// String hides the token so a Config can never leak it through a log line.
func (c Config) String() string {
	t := ""
	if c.RunnerToken != "" {
		t = "[redacted]"
	}
	return fmt.Sprintf("guestconfig{host=%s url=%s token=%s timeout=%ds warm=%v}", c.Hostname, c.GitLabURL, t, c.JobTimeoutSec, c.Warm)
}

// Drive layout: 8-byte magic, 8-byte big-endian JSON length, JSON, zero
// padding to a 4 KiB multiple (virtio-blk wants whole sectors).
var driveMagic = [8]byte{'F', 'R', 'C', 'F', 'G', 0, 'v', '1'}

const driveAlign = 4096

// MaxDriveSize bounds what the agent will read.
const MaxDriveSize = 4 << 20

// Encode renders the drive image.
func Encode(c Config) ([]byte, error) {
	js, err := json.Marshal(c)
	if err != nil {
		return nil, err
	}
	n := 16 + len(js)
	if n > MaxDriveSize {
		return nil, fmt.Errorf("guest config is %d bytes, more than %d", n, MaxDriveSize)
	}
	size := (n + driveAlign - 1) / driveAlign * driveAlign
	buf := make([]byte, size)
	copy(buf, driveMagic[:])
	binary.BigEndian.PutUint64(buf[8:16], uint64(len(js)))
	copy(buf[16:], js)
	return buf, nil
}

// WriteDrive writes the drive image to path with mode 0600; it refuses to
// overwrite an existing file so a token is never written through a symlink.
func WriteDrive(path string, c Config) error {
	b, err := Encode(c)
	if err != nil {
		return err
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	if _, err := f.Write(b); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// ErrNotConfigDrive means the device does not start with the drive magic.
var ErrNotConfigDrive = errors.New("not a firerunner config drive")

// Decode reads a drive image (a block device or file).
func Decode(r io.Reader) (Config, error) {
	var c Config
	var hdr [16]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return c, fmt.Errorf("read config drive header: %w", err)
	}
	if !bytes.Equal(hdr[:8], driveMagic[:]) {
		return c, ErrNotConfigDrive
	}
	n := binary.BigEndian.Uint64(hdr[8:16])
	if n > MaxDriveSize {
		return c, fmt.Errorf("config drive claims %d bytes, more than %d", n, MaxDriveSize)
	}
	js := make([]byte, n)
	if _, err := io.ReadFull(r, js); err != nil {
		return c, fmt.Errorf("read config drive body: %w", err)
	}
	if err := json.Unmarshal(js, &c); err != nil {
		return c, fmt.Errorf("parse config drive: %w", err)
	}
	return c, c.Validate()
}

// Console markers the agent prints on the serial console, one per line, so the
// host can build a timeline and learn the exit status without any channel
// other than the console log.
const (
	MarkerAgentStart = "FIRERUNNER-AGENT: start"    // agent running as PID 1
	MarkerJobStart   = "FIRERUNNER-JOB: start"      // workload started
	MarkerJobEnd     = "FIRERUNNER-JOB: end"        // workload ended
	ExitMarker       = "FIRERUNNER-EXIT: "          // followed by the decimal exit code
	MarkerPowerOff   = "FIRERUNNER-AGENT: poweroff" // about to power off
	MarkerWarm       = "FIRERUNNER-AGENT: warm"     // warm VM: gitlab-runner waits for its config
	MarkerAssigned   = "FIRERUNNER-AGENT: assigned" // warm VM got its assignment
)
