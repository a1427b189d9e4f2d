// Package agent is the FireRunner guest agent: PID 1 in the VM. It reads the
// config drive, sets the guest up and runs one workload, then powers off.
//
// Who runs what, and where the runner token goes: gitlab-runner and the job
// both run as the unprivileged user `ci` (uid 1000), because `run-single` has
// no --user option and its shell executor hands its own environment to the
// job. So the token is passed neither in argv (world-readable /proc/PID/cmdline)
// nor in the environment (inherited by the job): the agent writes a config.toml
// holding it into a FIFO (/run/firerunner/config.toml, ci-only) that
// gitlab-runner reads once at start (`run-single -c FIFO -r firerunner`); the
// agent unlinks the FIFO as soon as that read is done, before any job can
// exist. gitlab-runner is installed 0711 root, so the kernel marks the
// ci-owned process non-dumpable: the job, though the same uid, cannot read its
// /proc/PID/{environ,mem,fd} or ptrace it (Yama ptrace_scope=1 as a second
// lock). The config drive device is root-only.
package agent

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"

	"github.com/firerunner/firerunner/internal/guestconfig"
)

// The CI account made by internal/image.
const (
	CIUser = "ci"
	CIUID  = 1000
	CIGID  = 1000
	CIHome = "/home/ci"
)

// GitLabRunnerPath is where internal/image installs gitlab-runner.
const GitLabRunnerPath = "/usr/local/bin/gitlab-runner"

// RunnerName names the single [[runners]] entry in the generated config.
const RunnerName = "firerunner"

// DefaultWaitTimeoutSec is how long gitlab-runner waits for its job when the
// config does not say.
const DefaultWaitTimeoutSec = 120

// TimeoutExitCode is reported when the agent kills the workload at
// JobTimeoutSec (the convention of timeout(1)).
const TimeoutExitCode = 124

// RunnerConfigDir holds the runner config FIFO (a tmpfs, owned by ci).
const RunnerConfigDir = "/run/firerunner"

// RunnerConfigPath is the FIFO gitlab-runner reads its config.toml from.
const RunnerConfigPath = RunnerConfigDir + "/config.toml"

// SystemIDPath is where gitlab-runner looks for its system_id: beside its
// config file (commands/internal/configfile reads it after the config).
const SystemIDPath = RunnerConfigDir + "/.runner_system_id"

// Workload is the process the agent runs: argv, environment, and for
// gitlab-runner the config that travels through RunnerConfigPath (never
// argv or env).
type Workload struct {
	Args       []string
	Env        []string
	Dir        string
	UID, GID   int
	Groups     []uint32 // supplementary groups (docker: the socket's group)
	ConfigTOML []byte   // nil for a plain command
	// SystemID is written to SystemIDPath before gitlab-runner starts ("":
	// gitlab-runner makes up its own).
	SystemID string
}

// BaseEnv is the environment every workload starts from.
func BaseEnv() []string {
	return []string{
		"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
		"HOME=" + CIHome, "USER=" + CIUser, "LOGNAME=" + CIUser,
		"SHELL=/bin/bash", "LANG=C.UTF-8", "TERM=dumb",
	}
}

// BuildWorkload turns the guest config into the process to run.
func BuildWorkload(c guestconfig.Config) (Workload, error) {
	if err := c.Validate(); err != nil {
		return Workload{}, err
	}
	env := BaseEnv()
	keys := make([]string, 0, len(c.Env))
	for k := range c.Env {
		if k == "" || strings.ContainsAny(k, "=\x00") {
			return Workload{}, fmt.Errorf("guest config: bad env name %q", k)
		}
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		env = append(env, k+"="+c.Env[k])
	}
	w := Workload{Env: env, Dir: CIHome, UID: CIUID, GID: CIGID}
	if len(c.Command) > 0 {
		w.Args = append([]string(nil), c.Command...)
		return w, nil
	}
	wait := c.WaitTimeoutSec
	if wait <= 0 {
		wait = DefaultWaitTimeoutSec
	}
	w.Args = []string{
		GitLabRunnerPath, "run-single",
		"--config", RunnerConfigPath,
		"--runner", RunnerName,
		"--max-builds", "1",
		"--wait-timeout", strconv.Itoa(wait),
	}
	w.ConfigTOML = RunnerConfigTOML(c)
	w.SystemID = c.SystemID
	return w, nil
}

// WriteSystemID writes gitlab-runner's .runner_system_id into dir, owned by
// the runner's user and readable only by it, so the runner manager GitLab
// records for this VM's gitlab-runner has a name the host knows.
func WriteSystemID(dir, id string, uid, gid int) error {
	if id == "" {
		return nil
	}
	if !guestconfig.ValidSystemID(id) {
		return fmt.Errorf("system_id %q is not gitlab-runner's format", id)
	}
	p := filepath.Join(dir, filepath.Base(SystemIDPath))
	os.Remove(p)
	f, err := os.OpenFile(p, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	if _, err := f.WriteString(id + "\n"); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return os.Chown(p, uid, gid)
}

// RunnerConfigTOML renders the gitlab-runner config.toml for run-single -r.
func RunnerConfigTOML(c guestconfig.Config) []byte {
	var b strings.Builder
	b.WriteString("concurrent = 1\n\n[[runners]]\n")
	kv := func(k, v string) { fmt.Fprintf(&b, "  %s = %s\n", k, tomlString(v)) }
	kv("name", RunnerName)
	kv("url", c.GitLabURL)
	kv("token", c.RunnerToken)
	if c.Docker != nil {
		dockerRunnerTOML(&b, kv, c.Docker)
		return []byte(b.String())
	}
	kv("executor", "shell")
	kv("shell", "bash")
	kv("builds_dir", CIHome+"/builds")
	kv("cache_dir", CIHome+"/cache")
	return []byte(b.String())
}

// tomlString quotes s as a TOML basic string.
func tomlString(s string) string {
	var b strings.Builder
	b.WriteByte('"')
	for _, r := range s {
		switch {
		case r == '"' || r == '\\':
			b.WriteByte('\\')
			b.WriteRune(r)
		case r < 0x20 || r == 0x7f:
			fmt.Fprintf(&b, "\\u%04X", r)
		default:
			b.WriteRune(r)
		}
	}
	b.WriteByte('"')
	return b.String()
}

// FindConfigDrive scans the virtio block devices (sysBlock/vd*) for the one
// starting with the config drive magic, opening each as devDir/<name>. Device
// order differs between VMMs, so it never trusts a name.
func FindConfigDrive(sysBlock, devDir string) (guestconfig.Config, string, error) {
	names, err := filepath.Glob(filepath.Join(sysBlock, "vd*"))
	if err != nil {
		return guestconfig.Config{}, "", err
	}
	sort.Strings(names)
	var errs []error
	for _, n := range names {
		dev := filepath.Join(devDir, filepath.Base(n))
		f, err := os.Open(dev)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		c, err := guestconfig.Decode(f)
		f.Close()
		if errors.Is(err, guestconfig.ErrNotConfigDrive) {
			continue
		}
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			errs = append(errs, fmt.Errorf("%s: %w", dev, err)) // too small to be ours
			continue
		}
		if err != nil {
			return c, dev, fmt.Errorf("config drive %s: %w", dev, err)
		}
		return c, dev, nil
	}
	errs = append(errs, fmt.Errorf("no config drive among %d block devices in %s", len(names), sysBlock))
	return guestconfig.Config{}, "", errors.Join(errs...)
}

// FindAssignPort returns the device of the assignment channel's
// virtio-serial port: the entry of sysPorts (/sys/class/virtio-ports) whose
// name is guestconfig.AssignPort, under devDir ("" when there is none).
func FindAssignPort(sysPorts, devDir string) string {
	ents, err := os.ReadDir(sysPorts)
	if err != nil {
		return ""
	}
	for _, e := range ents {
		b, err := os.ReadFile(filepath.Join(sysPorts, e.Name(), "name"))
		if err == nil && strings.TrimSpace(string(b)) == guestconfig.AssignPort {
			return filepath.Join(devDir, e.Name())
		}
	}
	return ""
}

// DecodeAssignment reads one JSON assignment (a line, or up to EOF) from r.
func DecodeAssignment(r io.Reader) (guestconfig.Assignment, error) {
	var a guestconfig.Assignment
	dec := json.NewDecoder(io.LimitReader(r, guestconfig.MaxAssignment))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&a); err != nil {
		return a, fmt.Errorf("read assignment: %w", err)
	}
	return a, a.Validate()
}

// AcceptAssignment reads an assignment from the channel and acknowledges a
// valid one ("ok\n"): the host's Assign returns only then.
func AcceptAssignment(rw io.ReadWriter) (guestconfig.Assignment, error) {
	a, err := DecodeAssignment(rw)
	if err != nil {
		return a, err
	}
	if _, err := io.WriteString(rw, "ok\n"); err != nil {
		return a, fmt.Errorf("acknowledge assignment: %w", err)
	}
	return a, nil
}
