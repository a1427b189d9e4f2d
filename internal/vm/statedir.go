package vm

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"
)

// StateDir is the per-VM directory tree shared by the drivers:
// <state_dir>/vms/<id>/ holds a VM's pidfile, meta file, config drive,
// console log and sockets. Its existence is what List and reconciliation
// trust, so a VM left by a crashed FireRunner is always found again.
type StateDir struct {
	// Root is <state_dir>/vms.
	Root string
}

// File names inside a VM's directory.
const (
	PIDFile     = "vmm.pid"
	MetaFile    = "meta.json"
	ConfigDrive = "config.img"
	ConsoleFile = "console.log"
)

// NewStateDir returns the per-VM tree under the daemon's state_dir.
func NewStateDir(stateDir string) StateDir {
	return StateDir{Root: filepath.Join(stateDir, "vms")}
}

// Path is the directory of VM id (which must be a valid id).
func (s StateDir) Path(id string) string { return filepath.Join(s.Root, id) }

// File is the path of name inside VM id's directory.
func (s StateDir) File(id, name string) string { return filepath.Join(s.Root, id, name) }

// ValidID reports whether id matches IDPattern.
func ValidID(id string) bool { return validID(id) }

// ErrExists is returned by Create when the VM directory is already there.
var ErrExists = errors.New("vm state dir already exists")

// Create makes VM id's directory (0700). An existing directory is an error
// wrapping ErrExists: a VM id is never reused without a Destroy in between.
func (s StateDir) Create(id string) (string, error) {
	if !validID(id) {
		return "", fmt.Errorf("vm id %q: must match %s", id, IDPattern)
	}
	if err := os.MkdirAll(s.Root, 0o700); err != nil {
		return "", fmt.Errorf("create vm state root: %w", err)
	}
	p := s.Path(id)
	if err := os.Mkdir(p, 0o700); err != nil {
		if errors.Is(err, fs.ErrExist) {
			return "", fmt.Errorf("%s: %w", p, ErrExists)
		}
		return "", fmt.Errorf("create vm state dir: %w", err)
	}
	return p, nil
}

// Exists reports whether VM id has a directory.
func (s StateDir) Exists(id string) bool {
	fi, err := os.Stat(s.Path(id))
	return err == nil && fi.IsDir()
}

// Remove deletes VM id's directory and everything in it; a missing
// directory is not an error.
func (s StateDir) Remove(id string) error {
	if !validID(id) {
		return fmt.Errorf("vm id %q: must match %s", id, IDPattern)
	}
	if err := os.RemoveAll(s.Path(id)); err != nil {
		return fmt.Errorf("remove vm state dir: %w", err)
	}
	return nil
}

// IDs lists the VM ids that have a directory, sorted. Entries that are not
// valid VM ids are ignored (never touched by Remove).
func (s StateDir) IDs() ([]string, error) {
	ents, err := os.ReadDir(s.Root)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("list vm state dirs: %w", err)
	}
	var ids []string
	for _, e := range ents {
		if e.IsDir() && validID(e.Name()) {
			ids = append(ids, e.Name())
		}
	}
	sort.Strings(ids)
	return ids, nil
}

// Meta is the small JSON record of a running VM, written next to its
// pidfile. It holds no secrets (Spec.Guest is deliberately absent).
type Meta struct {
	ID        string         `json:"id"`
	Driver    string         `json:"driver"`
	VCPUs     int            `json:"vcpus"`
	MemoryMiB int            `json:"memory_mib"`
	Image     Image          `json:"image"`
	Network   *NetAttachment `json:"network,omitempty"`
	// Timeout and Deadline let a later FireRunner process enforce the
	// deadline of a VM it adopted; Deadline is zero when there is none.
	Timeout  time.Duration `json:"timeout"`
	Deadline time.Time     `json:"deadline,omitzero"`
	// Created is when per-VM preparation began, Started when the VMM ran.
	Created time.Time `json:"created"`
	Started time.Time `json:"started,omitzero"`
	// Proc is the VMM process (pid + start time guard against pid reuse).
	Proc Proc `json:"proc"`
	// Argv is the VMM command line (never secret by construction).
	Argv []string `json:"argv,omitempty"`
}

// MetaFromSpec copies the non-secret parts of spec.
func MetaFromSpec(driver string, spec Spec, created time.Time) Meta {
	m := Meta{
		ID: spec.ID, Driver: driver, VCPUs: spec.VCPUs, MemoryMiB: spec.MemoryMiB,
		Image: spec.Image, Timeout: spec.Timeout, Created: created,
	}
	if spec.Network != nil {
		n := *spec.Network
		m.Network = &n
	}
	return m
}

// WriteMeta atomically (temp file + rename) writes VM m.ID's meta file (0600)
// and, when m.Proc is set, its pidfile.
func (s StateDir) WriteMeta(m Meta) error {
	b, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		return err
	}
	if err := writeAtomic(s.File(m.ID, MetaFile), append(b, '\n')); err != nil {
		return fmt.Errorf("write vm meta: %w", err)
	}
	if m.Proc.PID > 0 {
		if err := writeAtomic(s.File(m.ID, PIDFile), []byte(strconv.Itoa(m.Proc.PID)+"\n")); err != nil {
			return fmt.Errorf("write vm pidfile: %w", err)
		}
	}
	return nil
}

// ReadMeta reads VM id's meta file. When the meta file lacks a process
// (crash between start and write) the pidfile is consulted.
func (s StateDir) ReadMeta(id string) (Meta, error) {
	var m Meta
	b, err := os.ReadFile(s.File(id, MetaFile))
	if err != nil {
		return m, err
	}
	if err := json.Unmarshal(b, &m); err != nil {
		return m, fmt.Errorf("parse %s: %w", s.File(id, MetaFile), err)
	}
	if m.Proc.PID == 0 {
		m.Proc, _ = s.ReadPID(id)
	}
	return m, nil
}

// ReadPID returns the VMM recorded in VM id's pidfile if it is still alive.
// A pidfile carries no start time, so the process must also mention the VM
// id in its command line (every VMM's argv names its per-VM files or id);
// otherwise the pid was reused and ErrProcGone is returned.
func (s StateDir) ReadPID(id string) (Proc, error) {
	b, err := os.ReadFile(s.File(id, PIDFile))
	if err != nil {
		return Proc{}, err
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		return Proc{}, fmt.Errorf("parse pidfile: %w", err)
	}
	p, err := LookupProc(pid)
	if err != nil {
		return Proc{}, err
	}
	cmd, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cmdline")
	if err != nil || !strings.Contains(string(cmd), id) {
		return Proc{}, fmt.Errorf("pid %d is not vm %s: %w", pid, id, ErrProcGone)
	}
	return p, nil
}

func writeAtomic(path string, b []byte) error {
	tmp := path + ".tmp"
	_ = os.Remove(tmp)
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	if _, err := f.Write(b); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}
