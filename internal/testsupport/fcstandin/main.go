package fcstandin

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/firerunner/firerunner/internal/guestconfig"
)

// Environment the stand-in processes read. The real jailer clears the
// environment; the stand-in jailer passes FCSTANDIN_* through (test plumbing
// only, the driver never relies on environment).
const (
	EnvSpecs      = "FCSTANDIN_SPECS"       // swagger spec paths, os.PathListSeparator-separated
	EnvLogDir     = "FCSTANDIN_LOG_DIR"     // request logs: <dir>/<vm id>.jsonl
	EnvRoot       = "FCSTANDIN_ROOT"        // jail root (set by the stand-in jailer)
	EnvCgroupRoot = "FCSTANDIN_CGROUP_ROOT" // fake cgroup v2 root for the stand-in jailer
	// EnvAPI makes the stand-in firecracker an older release: it answers
	// an operation its spec version (e.g. "1.4.1") lacks with 400 "Invalid
	// request method", as Firecracker does. Unset: the newest spec's.
	EnvAPI = "FCSTANDIN_API"
	// EnvJailerHang makes the stand-in jailer hang after building the
	// chroot, as a jailer stuck on a cgroup or mount would.
	EnvJailerHang = "FCSTANDIN_JAILER_HANG"
	// EnvTapDir is where the lock files that stand for the host's taps
	// live (Server.TapDir).
	EnvTapDir = "FCSTANDIN_TAP_DIR"
	// EnvUID is "uid:gid" the stand-in jailer was told to drop to (it does
	// not drop them; Server.UID/GID).
	EnvUID = "FCSTANDIN_UID"
)

// Guest commands (guestconfig.Config.Command) the emulated guest understands.
const (
	CmdHang = "fcstandin-hang" // the guest never powers off
	CmdExit = "fcstandin-exit" // ["fcstandin-exit", "N"]: the workload exits N
)

// Dispatch runs the stand-in when the current executable was invoked as
// "firecracker" or "jailer" (by basename) and never returns in that case.
// A test binary calls it first thing in TestMain.
func Dispatch() {
	name := filepath.Base(os.Args[0])
	switch {
	case name == "firecracker",
		// Exec'd by the stand-in jailer under the canonical file's name
		// (e.g. firecracker.test, the test binary itself), as the real
		// jailer does.
		os.Getenv(EnvRoot) != "" && strings.Contains(name, "firecracker"):
		os.Exit(runFirecracker(os.Args[1:]))
	case name == "jailer":
		os.Exit(runJailer(os.Args[1:]))
	}
}

func fail(format string, a ...any) int {
	fmt.Fprintf(os.Stderr, "fcstandin: "+format+"\n", a...)
	return 1
}

// runFirecracker emulates `firecracker --api-sock P --id ID`.
func runFirecracker(args []string) int {
	sock, id := "/run/firecracker.socket", "anonymous-instance"
	for i := 0; i < len(args); i++ {
		name, val, hasVal := strings.Cut(args[i], "=")
		next := func() string {
			if hasVal {
				return val
			}
			i++
			if i < len(args) {
				return args[i]
			}
			return ""
		}
		switch name {
		case "--api-sock":
			sock = next()
		case "--id":
			id = next()
		case "--start-time-us", "--start-time-cpu-us", "--parent-cpu-time-us", "--seccomp-filter", "--level", "--log-path", "--metrics-path", "--http-api-max-payload-size", "--mmds-size-limit", "--module":
			next()
		case "--no-seccomp", "--boot-timer", "--show-level", "--show-log-origin", "--enable-pci":
		default:
			// Firecracker rejects unknown arguments; so must its stand-in.
			return fail("firecracker: unknown argument %q", args[i])
		}
	}
	specs := filepath.SplitList(os.Getenv(EnvSpecs))
	checker, err := LoadChecker(specs...)
	if err != nil {
		return fail("firecracker: %v (set %s)", err, EnvSpecs)
	}
	checker.Optional = map[string]bool{}
	for _, o := range NewerOptional {
		checker.Optional[o] = true
	}
	checker.OptionalFields = NewerOptionalFields
	root := os.Getenv(EnvRoot)
	if root == "" {
		root = "/"
	}
	var logW io.Writer
	guestLog := ""
	if d := os.Getenv(EnvLogDir); d != "" {
		guestLog = filepath.Join(d, id+".guest.jsonl")
		f, err := os.OpenFile(filepath.Join(d, id+".jsonl"), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
		if err != nil {
			return fail("firecracker: request log: %v", err)
		}
		defer f.Close()
		logW = f
	}
	srv := NewServer(checker, id, root, logW)
	srv.API = os.Getenv(EnvAPI)
	srv.OnStart = emulateGuest
	srv.TapDir, srv.ExitOnLoadFailure, srv.guestLog = os.Getenv(EnvTapDir), true, guestLog
	if u, g, ok := strings.Cut(os.Getenv(EnvUID), ":"); ok {
		srv.UID, _ = strconv.Atoi(u)
		srv.GID, _ = strconv.Atoi(g)
	}
	if err := srv.Serve(srv.Resolve(sock)); err != nil {
		return fail("firecracker: %v", err)
	}
	return 0
}

// emulateGuest plays the guest after InstanceStart: it reads the config drive
// the way the guest agent does, prints the console markers on the serial
// console (Firecracker's stdout) and powers off, which ends the VMM when the
// kernel command line has reboot=k.
func emulateGuest(s *Server) {
	time.Sleep(20 * time.Millisecond)
	out := os.Stdout
	fmt.Fprintln(out, "[    0.000000] Linux version 6.1.0-fcstandin (emulated guest by fcstandin)")
	fmt.Fprintln(out, "[    0.100000] Run /init as init process")
	var cfg *guestconfig.Config
	for _, d := range s.Drives() {
		p, _ := d["path_on_host"].(string)
		f, err := os.Open(s.Resolve(p))
		if err != nil {
			continue
		}
		c, err := guestconfig.Decode(f)
		f.Close()
		if err == nil {
			cfg = &c
			break
		}
	}
	if cfg == nil {
		fmt.Fprintln(out, "FIRERUNNER-AGENT: no config drive found")
		fmt.Fprintln(out, "Kernel panic - not syncing: Attempted to kill init!")
		powerOff(s)
		return
	}
	fmt.Fprintln(out, guestconfig.MarkerAgentStart)
	s.mu.Lock()
	s.guest = cfg
	s.mu.Unlock()
	if cfg.Warm {
		// gitlab-runner started and blocked on its config: the state a
		// pool's snapshot is taken in.
		fmt.Fprintln(out, guestconfig.MarkerJobStart)
		s.mu.Lock()
		s.guestWarm = true
		s.mu.Unlock()
		fmt.Fprintln(out, guestconfig.MarkerWarm)
		s.guestEvent(GuestEvent{Event: "warm", Hostname: cfg.Hostname, MachineID: cfg.MachineID})
		s.runWarm(*cfg, false)
		return
	}
	code := 0
	if len(cfg.Command) > 0 {
		switch cfg.Command[0] {
		case CmdHang:
			select {} // a guest that never ends; the driver must kill it
		case CmdExit:
			if len(cfg.Command) > 1 {
				code, _ = strconv.Atoi(cfg.Command[1])
			}
		}
	}
	fmt.Fprintln(out, guestconfig.MarkerJobStart)
	fmt.Fprintln(out, guestconfig.MarkerJobEnd)
	fmt.Fprintf(out, "%s%d\n", guestconfig.ExitMarker, code)
	fmt.Fprintln(out, guestconfig.MarkerPowerOff)
	powerOff(s)
}

func powerOff(s *Server) {
	if !regexp.MustCompile(`(^|\s)reboot=k(\s|$)`).MatchString(s.BootArgs()) {
		// Without reboot=k the guest's reboot does not end Firecracker.
		fmt.Fprintln(os.Stdout, "fcstandin: guest rebooted without reboot=k; VMM keeps running")
		select {}
	}
	os.Stdout.Sync()
	os.Exit(0)
}

// JailerArgs is the parsed jailer command line.
type JailerArgs struct {
	ID, ExecFile, ChrootBase, CgroupVersion, ParentCgroup, NetNS string
	UID, GID                                                     int
	Cgroups, ResourceLimits                                      []string
	Daemonize, NewPIDNS                                          bool
	Extra                                                        []string // after "--", for firecracker
}

var jailIDRe = regexp.MustCompile(`^[a-zA-Z0-9-]{1,64}$`)

// ParseJailerArgs parses and validates a jailer command line as the jailer does.
func ParseJailerArgs(args []string) (JailerArgs, error) {
	j := JailerArgs{ChrootBase: "/srv/jailer", CgroupVersion: "1"}
	seen := map[string]bool{}
	for i := 0; i < len(args); i++ {
		a := args[i]
		if a == "--" {
			j.Extra = args[i+1:]
			break
		}
		next := func() (string, error) {
			i++
			if i >= len(args) {
				return "", fmt.Errorf("%s needs a value", a)
			}
			return args[i], nil
		}
		var v string
		var err error
		switch a {
		case "--daemonize":
			j.Daemonize = true
			continue
		case "--new-pid-ns":
			j.NewPIDNS = true
			continue
		case "--id", "--exec-file", "--uid", "--gid", "--chroot-base-dir", "--cgroup-version", "--cgroup", "--parent-cgroup", "--netns", "--resource-limit":
			if v, err = next(); err != nil {
				return j, err
			}
		default:
			return j, fmt.Errorf("unknown argument %q", a)
		}
		seen[a] = true
		switch a {
		case "--id":
			j.ID = v
		case "--exec-file":
			j.ExecFile = v
		case "--uid":
			j.UID, err = strconv.Atoi(v)
		case "--gid":
			j.GID, err = strconv.Atoi(v)
		case "--chroot-base-dir":
			j.ChrootBase = v
		case "--cgroup-version":
			j.CgroupVersion = v
		case "--cgroup":
			if !strings.Contains(v, "=") {
				err = fmt.Errorf("--cgroup %q: want <file>=<value>", v)
			}
			j.Cgroups = append(j.Cgroups, v)
		case "--parent-cgroup":
			j.ParentCgroup = v
		case "--netns":
			j.NetNS = v
		case "--resource-limit":
			j.ResourceLimits = append(j.ResourceLimits, v)
		}
		if err != nil {
			return j, fmt.Errorf("%s: %w", a, err)
		}
	}
	for _, req := range []string{"--id", "--exec-file", "--uid", "--gid"} {
		if !seen[req] {
			return j, fmt.Errorf("missing required argument %s", req)
		}
	}
	if !jailIDRe.MatchString(j.ID) {
		return j, fmt.Errorf("invalid --id %q", j.ID)
	}
	if !strings.Contains(filepath.Base(j.ExecFile), "firecracker") {
		return j, fmt.Errorf("--exec-file %q: the file name must contain \"firecracker\"", j.ExecFile)
	}
	if j.CgroupVersion != "1" && j.CgroupVersion != "2" {
		return j, fmt.Errorf("--cgroup-version %q: must be 1 or 2", j.CgroupVersion)
	}
	if !filepath.IsAbs(j.ChrootBase) {
		return j, fmt.Errorf("--chroot-base-dir %q must be absolute", j.ChrootBase)
	}
	return j, nil
}

// ChrootDir is <chroot_base>/<exec_file_name>/<id>/root, as the jailer
// builds it: from the canonical paths (realpath) of --chroot-base-dir and
// --exec-file, so a symlinked firecracker gets a jail named after the
// file it points to (Canonical does that; ParseJailerArgs does not).
func (j JailerArgs) ChrootDir() string {
	return filepath.Join(j.ChrootBase, filepath.Base(j.ExecFile), j.ID, "root")
}

// Canonical resolves --exec-file and --chroot-base-dir as the jailer does
// (std::fs::canonicalize): both must exist, and the jail, its pid file and
// the default parent cgroup are named after the resolved exec file.
func (j JailerArgs) Canonical() (JailerArgs, error) {
	exec, err := filepath.EvalSymlinks(j.ExecFile)
	if err != nil {
		return j, fmt.Errorf("failed to canonicalize --exec-file %s: %w", j.ExecFile, err)
	}
	if fi, err := os.Stat(exec); err != nil || !fi.Mode().IsRegular() {
		return j, fmt.Errorf("--exec-file %s is not a file", exec)
	}
	base, err := filepath.EvalSymlinks(j.ChrootBase)
	if err != nil {
		return j, fmt.Errorf("failed to canonicalize --chroot-base-dir %s: %w", j.ChrootBase, err)
	}
	if j.ExecFile, err = filepath.Abs(exec); err != nil {
		return j, err
	}
	if j.ChrootBase, err = filepath.Abs(base); err != nil {
		return j, err
	}
	if !strings.Contains(filepath.Base(j.ExecFile), "firecracker") {
		return j, fmt.Errorf("--exec-file %q: the file name must contain \"firecracker\"", j.ExecFile)
	}
	return j, nil
}

// runJailer emulates the jailer: validates its arguments, builds the chroot
// directory, copies the exec file into it, applies cgroup settings to a fake
// cgroup root, and starts firecracker (in a new PID namespace when asked and
// possible). It does not chroot or drop privileges: the stand-in firecracker
// resolves API paths inside the jail root instead.
func runJailer(args []string) int {
	j, err := ParseJailerArgs(args)
	if err != nil {
		return fail("jailer: %v", err)
	}
	if j, err = j.Canonical(); err != nil {
		return fail("jailer: %v", err)
	}
	chroot := j.ChrootDir()
	if err := os.MkdirAll(chroot, 0o755); err != nil {
		return fail("jailer: %v", err)
	}
	name := filepath.Base(j.ExecFile)
	dst := filepath.Join(chroot, name)
	if err := linkOrCopy(j.ExecFile, dst); err != nil {
		return fail("jailer: copy exec file: %v", err)
	}
	if cg := os.Getenv(EnvCgroupRoot); cg != "" {
		parent := j.ParentCgroup
		if parent == "" {
			parent = name
		}
		dir := filepath.Join(cg, parent, j.ID)
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return fail("jailer: cgroup: %v", err)
		}
		// Real cgroup dirs hold interface files yet rmdir works; a fake one
		// must stay empty for that, so the settings go to a sibling record.
		rec, _ := json.Marshal(map[string]any{"version": j.CgroupVersion, "settings": j.Cgroups})
		if err := os.WriteFile(dir+".cgroup.json", rec, 0o600); err != nil {
			return fail("jailer: cgroup: %v", err)
		}
	}
	if os.Geteuid() == 0 {
		if err := os.Chown(chroot, j.UID, j.GID); err != nil {
			return fail("jailer: chown chroot: %v", err)
		}
	}
	if os.Getenv(EnvJailerHang) != "" {
		fmt.Fprintln(os.Stderr, "fcstandin: jailer: hanging (FCSTANDIN_JAILER_HANG)")
		select {}
	}
	env := []string{EnvRoot + "=" + chroot, fmt.Sprintf("%s=%d:%d", EnvUID, j.UID, j.GID)}
	for _, kv := range os.Environ() {
		if strings.HasPrefix(kv, "FCSTANDIN_") && !strings.HasPrefix(kv, EnvRoot+"=") && !strings.HasPrefix(kv, EnvUID+"=") {
			env = append(env, kv)
		}
	}
	now := strconv.FormatInt(time.Now().UnixMicro(), 10)
	fcArgs := append([]string{"./" + name, "--id=" + j.ID, "--start-time-us=" + now, "--start-time-cpu-us=0"}, j.Extra...)
	cmd := &exec.Cmd{Path: dst, Args: fcArgs, Dir: chroot, Env: env, Stdin: os.Stdin, Stdout: os.Stdout, Stderr: os.Stderr}
	if j.Daemonize {
		devnull, err := os.OpenFile(os.DevNull, os.O_RDWR, 0)
		if err != nil {
			return fail("jailer: %v", err)
		}
		cmd.Stdin, cmd.Stdout, cmd.Stderr = devnull, devnull, devnull
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if !j.NewPIDNS {
		// The jailer execs firecracker in place: same pid.
		if err := syscall.Exec(dst, fcArgs, env); err != nil {
			return fail("jailer: exec: %v", err)
		}
		return 1
	}
	if os.Geteuid() == 0 {
		cmd.SysProcAttr.Cloneflags = syscall.CLONE_NEWPID
	}
	if err := cmd.Start(); err != nil {
		return fail("jailer: spawn: %v", err)
	}
	if err := os.WriteFile(filepath.Join(chroot, name+".pid"), []byte(strconv.Itoa(cmd.Process.Pid)), 0o644); err != nil {
		return fail("jailer: pid file: %v", err)
	}
	return 0
}

func linkOrCopy(src, dst string) error {
	src, err := filepath.EvalSymlinks(src)
	if err != nil {
		return err
	}
	if err := os.Link(src, dst); err == nil {
		return nil
	}
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o755)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

// ReadLog reads a request log written by a stand-in.
func ReadLog(path string) ([]Record, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var recs []Record
	for _, line := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		if line == "" {
			continue
		}
		var r Record
		if err := json.Unmarshal([]byte(line), &r); err != nil {
			return nil, fmt.Errorf("%s: %w", path, err)
		}
		recs = append(recs, r)
	}
	return recs, nil
}
