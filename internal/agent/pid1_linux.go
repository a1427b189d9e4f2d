package agent

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"
	"unsafe"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/firerunner/firerunner/internal/guestconfig"
)

// Agent is the PID 1 state: where the console is and how to find things.
type Agent struct {
	Console  io.Writer
	SysBlock string // /sys/block
	DevDir   string // /dev
	reaper   *reaper
	// dockerd and its exit, when the agent started Docker (docker_linux.go).
	dockerd       *exec.Cmd
	dockerdExited <-chan unix.WaitStatus
}

// Main runs the agent as PID 1 and never returns normally: it powers off.
func Main() {
	a := &Agent{Console: os.Stdout, SysBlock: "/sys/block", DevDir: "/dev"}
	fmt.Fprintln(a.Console, guestconfig.MarkerAgentStart)
	if os.Getpid() != 1 {
		fmt.Fprintln(os.Stderr, "firerunner-agent: must run as PID 1 in the guest")
		os.Exit(2)
	}
	err := a.run()
	if err != nil {
		// No exit marker: the host sees "no exit status" plus this line.
		a.logf("error: %v", err)
	}
	a.powerOff()
}

func (a *Agent) logf(format string, args ...any) {
	fmt.Fprintf(a.Console, "FIRERUNNER-AGENT: "+format+"\n", args...)
}

func (a *Agent) run() error {
	if err := mountBase(); err != nil {
		return err
	}
	if c, err := os.OpenFile("/dev/console", os.O_WRONLY|syscall.O_NOCTTY, 0); err == nil {
		a.Console = c
	}
	a.reaper = startReaper()
	cfg, dev, err := a.findConfig(5 * time.Second)
	if err != nil {
		return err
	}
	a.logf("config from %s: %s", dev, cfg)
	for _, s := range []struct {
		name string
		fn   func(guestconfig.Config) error
	}{
		{"clock", setClock},
		{"entropy", seedEntropy},
		{"hostname", setHostname},
		{"ca-certs", writeCACerts},
		{"network", setupNetwork},
		{"machine-id", setMachineID},
		{"hardening", harden},
	} {
		if err := s.fn(cfg); err != nil {
			return fmt.Errorf("%s: %w", s.name, err)
		}
	}
	// Docker (docker executor; docker_linux.go): nil channel without.
	dockerReady, dockerGroups, err := a.prepareDocker(cfg)
	if err != nil {
		return err
	}
	w, err := BuildWorkload(cfg)
	if err != nil {
		return err
	}
	w.Groups = dockerGroups
	if stop, err := a.awaitDocker(cfg, dockerReady); stop || err != nil {
		return err
	}
	var gate *JobGate
	if w.ConfigTOML != nil {
		// gitlab-runner reaches GitLab through the gate, which lets one
		// job through: the VM runs exactly one, however the first ends.
		if gate, err = NewJobGateAt(gateAddr(cfg)); err != nil {
			return fmt.Errorf("job gate: %w", err)
		}
		defer gate.Close()
		if !cfg.Warm {
			if err := gate.SetTarget(cfg.GitLabURL); err != nil {
				return err
			}
			gated := cfg
			gated.GitLabURL = gate.URL()
			w.ConfigTOML = RunnerConfigTOML(gated)
		}
	}
	var assign func() ([]byte, limits, error)
	if cfg.Warm {
		// gitlab-runner starts now and blocks reading its config FIFO; the
		// job's runner arrives later over the assignment channel.
		assign = func() ([]byte, limits, error) {
			// Fault the rest of gitlab-runner into the page cache now, not
			// on the job's latency path: it has only run its init so far.
			if f, err := os.Open(w.Args[0]); err == nil {
				_, _ = io.Copy(io.Discard, f)
				f.Close()
			}
			if dockerReady != nil {
				if err := <-dockerReady; err != nil {
					return nil, limits{}, fmt.Errorf("docker: %w", err)
				}
			}
			fmt.Fprintln(a.Console, guestconfig.MarkerWarm)
			as, err := ReadAssignment(a.DevDir, "/sys/class/virtio-ports")
			if err != nil {
				return nil, limits{}, err
			}
			fmt.Fprintln(a.Console, guestconfig.MarkerAssigned)
			c := cfg.Apply(as)
			if as.Identity != nil {
				// A clone restored from a snapshot: take on its own
				// identity before gitlab-runner reads its config.
				if err := reidentify(c, as.Identity.MAC); err != nil {
					return nil, limits{}, fmt.Errorf("identity: %w", err)
				}
				// The template wrote its own .runner_system_id before
				// the snapshot; gitlab-runner reads it only after its
				// config, so the clone's replaces it in time and GitLab
				// sees the clone as its own runner manager.
				if c.SystemID != "" {
					if err := WriteSystemID(RunnerConfigDir, c.SystemID, w.UID, w.GID); err != nil {
						return nil, limits{}, fmt.Errorf("identity: %w", err)
					}
				}
				a.logf("identity of %s applied", c.Hostname)
			}
			if err := gate.SetTarget(c.GitLabURL); err != nil {
				return nil, limits{}, err
			}
			c.GitLabURL = gate.URL()
			return RunnerConfigTOML(c), limits{total: time.Duration(c.JobTimeoutSec) * time.Second, fromPick: time.Duration(c.JobMaxSec) * time.Second}, nil
		}
	}
	var again, picked <-chan struct{}
	if gate != nil {
		again, picked = gate.Again(), gate.Picked()
	}
	code := a.runWorkload(w, limits{total: time.Duration(cfg.JobTimeoutSec) * time.Second, fromPick: time.Duration(cfg.JobMaxSec) * time.Second},
		assign, again, picked)
	if gate != nil {
		a.closeAbandonedJob(gate, code)
	}
	fmt.Fprintf(a.Console, "%s%d\n", guestconfig.ExitMarker, code)
	return nil
}

// closeAbandonedJob reports the end of a job GitLab handed out whose end
// gitlab-runner never reported (it gave the job up after an early error,
// died, or was killed at the time limit): without it the job would stay
// "running" in GitLab until GitLab's stuck-job cleanup, an hour later.
func (a *Agent) closeAbandonedJob(gate *JobGate, code int) {
	if !gate.Abandoned() {
		return
	}
	reason, why := "runner_system_failure", "gitlab-runner ended without reporting the job's end"
	if code == TimeoutExitCode {
		reason, why = "job_execution_timeout", "the job reached FireRunner's time limit"
	}
	note := fmt.Sprintf("\x1b[31;1mFireRunner: %s; the job is marked failed (%s).\x1b[0;m", why, reason)
	// Bounded well inside the host's grace after job_max_duration (at
	// least 20 s for the smallest limits the tests use).
	ctx, cancel := context.WithTimeout(context.Background(), 12*time.Second)
	defer cancel()
	start := time.Now()
	a.logf("job %d: %s; reporting it failed (%s)", gate.JobID(), why, reason)
	if err := gate.FailJob(ctx, reason, note); err != nil {
		a.logf("job %d: reporting it failed did not work after %s: %v", gate.JobID(), time.Since(start).Round(time.Millisecond), err)
		return
	}
	a.logf("job %d: reported failed in %s", gate.JobID(), time.Since(start).Round(time.Millisecond))
}

// reidentify gives a VM restored from a snapshot the identity of the clone:
// the source's clock, RNG state, hostname, MAC, address and machine-id all
// came back with the snapshot's memory.
func reidentify(c guestconfig.Config, mac string) error {
	for _, s := range []struct {
		name string
		fn   func(guestconfig.Config) error
	}{
		{"clock", setClock},
		{"entropy", seedEntropy},
		{"reseed", reseedCRNG},
		{"hostname", setHostname},
		{"network", func(c guestconfig.Config) error { return renumber(c, mac) }},
		{"machine-id", setMachineID},
	} {
		if err := s.fn(c); err != nil {
			return fmt.Errorf("%s: %w", s.name, err)
		}
	}
	return nil
}

// reseedCRNG makes the kernel draw its next random numbers from a pool that
// now holds the clone's own seed (RNDRESEEDCRNG): crediting entropy alone
// leaves the CRNG, identical in every clone, in use until its next timed
// reseed. The VMGenID device Firecracker updates on restore does the same
// where the guest kernel has the driver; this does not depend on it.
func reseedCRNG(guestconfig.Config) error {
	f, err := os.OpenFile("/dev/urandom", os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	if _, _, e := unix.Syscall(unix.SYS_IOCTL, f.Fd(), unix.RNDRESEEDCRNG, 0); e != 0 {
		return fmt.Errorf("RNDRESEEDCRNG: %w", e)
	}
	return nil
}

// renumber moves the NIC from the snapshot source's MAC and address to the
// clone's: the host pins each tap to its own VM's MAC and address.
func renumber(c guestconfig.Config, mac string) error {
	nic, err := firstNIC()
	if err != nil {
		return err
	}
	if mac != "" {
		hw, err := net.ParseMAC(mac)
		if err != nil {
			return err
		}
		if err := netlink.LinkSetHardwareAddr(nic, hw); err != nil {
			return fmt.Errorf("mac %s: %w", mac, err)
		}
	}
	addrs, err := netlink.AddrList(nic, netlink.FAMILY_V4)
	if err != nil {
		return err
	}
	for i := range addrs {
		if err := netlink.AddrDel(nic, &addrs[i]); err != nil {
			return fmt.Errorf("drop the source's address %s: %w", addrs[i].IPNet, err)
		}
	}
	return setupNetwork(c)
}

// setMachineID gives the VM its own /etc/machine-id (the image's is shared).
func setMachineID(c guestconfig.Config) error {
	if c.MachineID == "" {
		return nil
	}
	return os.WriteFile("/etc/machine-id", []byte(c.MachineID+"\n"), 0o444)
}

func (a *Agent) findConfig(wait time.Duration) (guestconfig.Config, string, error) {
	deadline := time.Now().Add(wait)
	for {
		c, dev, err := FindConfigDrive(a.SysBlock, a.DevDir)
		if err == nil || dev != "" || time.Now().After(deadline) {
			return c, dev, err
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// mountBase mounts the API filesystems; /dev, /proc, /sys usually arrive
// already mounted from the initramfs.
func mountBase() error {
	type m struct {
		src, dst, fstype string
		flags            uintptr
		data             string
		magic            int64
	}
	const nosuid, nodev, noexec = unix.MS_NOSUID, unix.MS_NODEV, unix.MS_NOEXEC
	for _, x := range []m{
		{"proc", "/proc", "proc", nosuid | nodev | noexec, "", unix.PROC_SUPER_MAGIC},
		{"sysfs", "/sys", "sysfs", nosuid | nodev | noexec, "", unix.SYSFS_MAGIC},
		{"devtmpfs", "/dev", "devtmpfs", nosuid, "mode=0755", unix.TMPFS_MAGIC},
		{"devpts", "/dev/pts", "devpts", nosuid | noexec, "gid=5,mode=0620,ptmxmode=0666", unix.DEVPTS_SUPER_MAGIC},
		{"tmpfs", "/dev/shm", "tmpfs", nosuid | nodev, "mode=1777", unix.TMPFS_MAGIC},
		{"tmpfs", "/run", "tmpfs", nosuid | nodev, "mode=0755", unix.TMPFS_MAGIC},
		{"tmpfs", "/tmp", "tmpfs", nosuid | nodev, "mode=1777", unix.TMPFS_MAGIC},
		{"cgroup2", "/sys/fs/cgroup", "cgroup2", nosuid | nodev | noexec, "", unix.CGROUP2_SUPER_MAGIC},
	} {
		if err := os.MkdirAll(x.dst, 0o755); err != nil {
			return err
		}
		var st unix.Statfs_t
		if x.dst != "/run" && x.dst != "/tmp" && unix.Statfs(x.dst, &st) == nil && st.Type == x.magic {
			if x.dst == "/dev" || isMountPoint(x.dst) {
				continue
			}
		}
		if err := unix.Mount(x.src, x.dst, x.fstype, x.flags, x.data); err != nil && !errors.Is(err, unix.EBUSY) {
			return fmt.Errorf("mount %s: %w", x.dst, err)
		}
	}
	for l, t := range map[string]string{"/dev/fd": "/proc/self/fd", "/dev/stdin": "/proc/self/fd/0",
		"/dev/stdout": "/proc/self/fd/1", "/dev/stderr": "/proc/self/fd/2", "/dev/ptmx": "pts/ptmx"} {
		if _, err := os.Lstat(l); err != nil {
			os.Symlink(t, l)
		}
	}
	return nil
}

func isMountPoint(p string) bool {
	var a, b unix.Stat_t
	if unix.Stat(p, &a) != nil || unix.Stat(filepath.Dir(p), &b) != nil {
		return false
	}
	return a.Dev != b.Dev
}

// setClock moves the clock forward to the host's time at VM creation (the
// RTC may be missing or coarse; never move it backwards).
func setClock(c guestconfig.Config) error {
	if c.UnixTimeNano <= 0 || time.Now().UnixNano() >= c.UnixTimeNano {
		return nil
	}
	ts := unix.NsecToTimespec(c.UnixTimeNano)
	return unix.ClockSettime(unix.CLOCK_REALTIME, &ts)
}

// seedEntropy credits the host-provided seed to the kernel pool so TLS does
// not block early (RNDADDENTROPY needs CAP_SYS_ADMIN: PID 1 has it).
func seedEntropy(c guestconfig.Config) error {
	if len(c.EntropySeed) == 0 {
		return nil
	}
	f, err := os.OpenFile("/dev/urandom", os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	buf := make([]byte, 8+len(c.EntropySeed))
	*(*int32)(unsafe.Pointer(&buf[0])) = int32(8 * len(c.EntropySeed)) // entropy_count, bits
	*(*int32)(unsafe.Pointer(&buf[4])) = int32(len(c.EntropySeed))     // buf_size, bytes
	copy(buf[8:], c.EntropySeed)
	if _, _, e := unix.Syscall(unix.SYS_IOCTL, f.Fd(), unix.RNDADDENTROPY, uintptr(unsafe.Pointer(&buf[0]))); e != 0 {
		return fmt.Errorf("RNDADDENTROPY: %w", e)
	}
	return nil
}

func setHostname(c guestconfig.Config) error {
	h := c.Hostname
	if h == "" {
		h = "firerunner"
	}
	if err := unix.Sethostname([]byte(h)); err != nil {
		return err
	}
	if err := os.WriteFile("/etc/hostname", []byte(h+"\n"), 0o644); err != nil {
		return err
	}
	return os.WriteFile("/etc/hosts", []byte(Hosts(h)), 0o644)
}

// writeCACerts adds the config's CAs to the bundle git, curl and
// gitlab-runner read.
func writeCACerts(c guestconfig.Config) error {
	if c.CACertsPEM == "" {
		return nil
	}
	if err := os.MkdirAll("/usr/local/share/ca-certificates", 0o755); err != nil {
		return err
	}
	if err := os.WriteFile("/usr/local/share/ca-certificates/firerunner-config.crt", []byte(c.CACertsPEM), 0o644); err != nil {
		return err
	}
	f, err := os.OpenFile("/etc/ssl/certs/ca-certificates.crt", os.O_APPEND|os.O_WRONLY|os.O_CREATE, 0o644)
	if err != nil {
		return err
	}
	if _, err := f.WriteString("\n" + c.CACertsPEM + "\n"); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

func setupNetwork(c guestconfig.Config) error {
	p, err := PlanNetwork(c.Network)
	if err != nil {
		return err
	}
	lo, err := netlink.LinkByName("lo")
	if err != nil {
		return err
	}
	if err := netlink.LinkSetUp(lo); err != nil {
		return err
	}
	nic, err := firstNIC()
	if err != nil {
		return err
	}
	if p.MTU > 0 {
		if err := netlink.LinkSetMTU(nic, p.MTU); err != nil {
			return fmt.Errorf("mtu: %w", err)
		}
	}
	addr := &netlink.Addr{IPNet: &net.IPNet{IP: p.Address.Addr().AsSlice(), Mask: net.CIDRMask(p.Address.Bits(), 32)}}
	if err := netlink.AddrReplace(nic, addr); err != nil {
		return fmt.Errorf("address %s: %w", p.Address, err)
	}
	if err := netlink.LinkSetUp(nic); err != nil {
		return err
	}
	gw := net.IP(p.Gateway.AsSlice())
	if err := netlink.RouteReplace(&netlink.Route{LinkIndex: nic.Attrs().Index, Gw: gw}); err != nil {
		return fmt.Errorf("default route via %s: %w", gw, err)
	}
	return os.WriteFile("/etc/resolv.conf", []byte(p.ResolvConf()), 0o644)
}

// firstNIC is eth0 if present, else the first non-loopback link, waiting
// briefly for the virtio-net driver to register it.
func firstNIC() (netlink.Link, error) {
	deadline := time.Now().Add(3 * time.Second)
	for {
		if l, err := netlink.LinkByName("eth0"); err == nil {
			return l, nil
		}
		links, _ := netlink.LinkList()
		for _, l := range links {
			if l.Attrs().Flags&net.FlagLoopback == 0 && l.Type() == "device" {
				return l, nil
			}
		}
		if time.Now().After(deadline) {
			return nil, errors.New("no network interface")
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// harden keeps the job from attaching to gitlab-runner (an ancestor).
func harden(guestconfig.Config) error {
	if err := os.WriteFile("/proc/sys/kernel/yama/ptrace_scope", []byte("1"), 0o644); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return nil
}

// limits bound a workload: total from its start (a warm VM's: from its
// assignment), fromPick (0: none) from the moment GitLab hands out its job.
type limits struct{ total, fromPick time.Duration }

// runWorkload runs w as the CI user in its own session with output on the
// console, kills its whole session at the timeout and returns its exit code. For a warm VM, assign
// blocks until the assignment arrives and returns the runner config and the
// job's limits, which then start; before that the host bounds the VM's
// life (the pool's idle timeout).
//
// again is closed when gitlab-runner asks for a second job (JobGate): its
// one job is over, however it ended, and it is ended before it can take
// another; the VM then reports a clean end (exit 0). picked is closed when
// GitLab hands out the job: the fromPick limit starts then.
func (a *Agent) runWorkload(w Workload, lim limits, assign func() ([]byte, limits, error), again, picked <-chan struct{}) int {
	cmd := exec.Command(w.Args[0], w.Args[1:]...)
	if filepath.Base(w.Args[0]) == w.Args[0] {
		if p, err := lookPath(w.Args[0], w.Env); err == nil {
			cmd.Path = p
		}
	}
	cmd.Env, cmd.Dir = w.Env, w.Dir
	cmd.Stdout, cmd.Stderr = a.Console, a.Console
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Setsid:     true,
		Credential: &syscall.Credential{Uid: uint32(w.UID), Gid: uint32(w.GID), Groups: append([]uint32{}, w.Groups...)},
	}
	var fed chan error
	if w.ConfigTOML != nil {
		if err := makeConfigFIFO(w.UID, w.GID); err != nil {
			a.logf("error: runner config: %v", err)
			return 127
		}
		if err := WriteSystemID(RunnerConfigDir, w.SystemID, w.UID, w.GID); err != nil {
			a.logf("error: runner system_id: %v", err)
			return 127
		}
		defer os.Remove(RunnerConfigPath)
	}
	fmt.Fprintln(a.Console, guestconfig.MarkerJobStart)
	done, err := a.reaper.start(cmd)
	if err != nil {
		fmt.Fprintf(a.Console, "\n%s\n", guestconfig.MarkerJobEnd)
		a.logf("error: start %s: %v", w.Args[0], err)
		return 127
	}
	assigned := make(chan limits, 1)
	if w.ConfigTOML != nil {
		stop := make(chan struct{})
		defer close(stop)
		fed = make(chan error, 1)
		go func() {
			toml := w.ConfigTOML
			if assign != nil {
				t, l, err := assign()
				if err != nil {
					fed <- err
					return
				}
				toml = t
				assigned <- l
			}
			fed <- feedConfigFIFO(toml, stop)
		}()
	}
	var code int
	timeout := lim.total
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	if assign != nil {
		timer.Stop() // runs from the assignment on
	}
wait:
	for {
		select {
		case l := <-assigned:
			lim, timeout = l, l.total
			timer.Reset(timeout)
		case <-picked:
			picked = nil
			if lim.fromPick > 0 && lim.fromPick < timeout {
				// Counted from the pick now (the host counts from the
				// pick it observes, a little later).
				timeout = lim.fromPick
				timer.Reset(timeout)
			}
		case err := <-fed:
			// The FIFO is gone now: gitlab-runner has its config, no job yet.
			if err != nil {
				a.logf("runner config: %v", err)
				if assign != nil {
					unix.Kill(-cmd.Process.Pid, unix.SIGKILL)
				}
			}
			fed = nil
		case <-again:
			again = nil
			fmt.Fprintf(a.Console, "\n")
			a.logf("gitlab-runner asked for a second job; ending it (one job per VM)")
			unix.Kill(-cmd.Process.Pid, unix.SIGKILL)
			<-done
			code = 0
			break wait
		case ws := <-done:
			code = exitCode(ws)
			break wait
		case <-timer.C:
			unix.Kill(-cmd.Process.Pid, unix.SIGKILL)
			fmt.Fprintf(a.Console, "\n")
			a.logf("timeout: workload killed after %s", timeout)
			<-done
			code = TimeoutExitCode
			break wait
		}
	}
	fmt.Fprintf(a.Console, "\n%s\n", guestconfig.MarkerJobEnd)
	return code
}

// makeConfigFIFO creates the ci-only FIFO gitlab-runner reads its config from.
func makeConfigFIFO(uid, gid int) error {
	if err := os.MkdirAll(RunnerConfigDir, 0o700); err != nil {
		return err
	}
	if err := os.Chown(RunnerConfigDir, uid, gid); err != nil {
		return err
	}
	os.Remove(RunnerConfigPath)
	if err := unix.Mkfifo(RunnerConfigPath, 0o600); err != nil {
		return err
	}
	return os.Chown(RunnerConfigPath, uid, gid)
}

// feedConfigFIFO waits for gitlab-runner to open the FIFO, writes the config,
// closes (EOF for the reader) and unlinks it. It gives up when stop closes
// (the workload ended first).
func feedConfigFIFO(config []byte, stop <-chan struct{}) error {
	defer os.Remove(RunnerConfigPath)
	for {
		fd, err := unix.Open(RunnerConfigPath, unix.O_WRONLY|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
		if err == nil {
			f := os.NewFile(uintptr(fd), RunnerConfigPath)
			// Blocking writes from here: the reader is there.
			if err := unix.SetNonblock(fd, false); err != nil {
				f.Close()
				return err
			}
			_, err = f.Write(config)
			if cerr := f.Close(); err == nil {
				err = cerr
			}
			return err
		}
		if !errors.Is(err, unix.ENXIO) { // ENXIO: no reader yet
			return err
		}
		select {
		case <-stop:
			return errors.New("gitlab-runner exited before reading its config")
		case <-time.After(20 * time.Millisecond):
		}
	}
}

func lookPath(file string, env []string) (string, error) {
	for _, e := range env {
		if p, ok := strings.CutPrefix(e, "PATH="); ok {
			for _, dir := range filepath.SplitList(p) {
				c := filepath.Join(dir, file)
				if st, err := os.Stat(c); err == nil && !st.IsDir() && st.Mode()&0o111 != 0 {
					return c, nil
				}
			}
		}
	}
	return exec.LookPath(file)
}

func exitCode(ws unix.WaitStatus) int {
	switch {
	case ws.Exited():
		return ws.ExitStatus()
	case ws.Signaled():
		return 128 + int(ws.Signal())
	}
	return 255
}

// powerOff ends every process, syncs and reboots: with reboot=t (QEMU,
// run with -no-reboot) or reboot=k (Firecracker) a guest reboot makes the
// VMM process exit, which works on both (power-off needs ACPI S5 support).
func (a *Agent) powerOff() {
	unix.Kill(-1, unix.SIGTERM)
	time.Sleep(100 * time.Millisecond)
	unix.Kill(-1, unix.SIGKILL)
	unix.Sync()
	fmt.Fprintln(a.Console, guestconfig.MarkerPowerOff)
	unix.Sync()
	for {
		unix.Reboot(unix.LINUX_REBOOT_CMD_RESTART)
		time.Sleep(time.Second)
	}
}

// reaper is PID 1's zombie collector. It reaps every child, and hands the
// status of the ones the agent started to their waiters.
type reaper struct {
	mu      sync.Mutex
	waiters map[int]chan unix.WaitStatus
}

func startReaper() *reaper {
	r := &reaper{waiters: map[int]chan unix.WaitStatus{}}
	sigs := make(chan os.Signal, 16)
	signal.Notify(sigs, unix.SIGCHLD)
	go func() {
		for {
			for {
				var ws unix.WaitStatus
				pid, err := unix.Wait4(-1, &ws, unix.WNOHANG, nil)
				if err == unix.EINTR {
					continue
				}
				if pid <= 0 || err != nil {
					break
				}
				r.mu.Lock()
				if ch, ok := r.waiters[pid]; ok {
					ch <- ws
					delete(r.waiters, pid)
				}
				r.mu.Unlock()
			}
			<-sigs
		}
	}()
	return r
}

// start starts cmd with the reaper locked, so its exit cannot be reaped
// before the waiter is registered. cmd.Wait must not be called.
func (r *reaper) start(cmd *exec.Cmd) (<-chan unix.WaitStatus, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	ch := make(chan unix.WaitStatus, 1)
	r.waiters[cmd.Process.Pid] = ch
	return ch, nil
}

// ReadAssignment waits for a warm VM's assignment: on the virtio-serial port
// named guestconfig.AssignPort (QEMU), or from the host over vsock
// (Firecracker: CID 2, guestconfig.AssignVsockPort). Both are tried in one
// loop: a VM has only one of them, and the host listens on vsock only
// while it assigns a job, so a refused connect just means "not yet".
func ReadAssignment(devDir, sysPorts string) (guestconfig.Assignment, error) {
	for {
		if dev := FindAssignPort(sysPorts, devDir); dev != "" {
			f, err := os.OpenFile(dev, os.O_RDWR, 0)
			if err != nil {
				return guestconfig.Assignment{}, err
			}
			defer f.Close()
			// A virtio-serial port reads EOF while no host end is
			// connected; the host connects only when it assigns a job.
			return AcceptAssignment(&waitReader{rw: f})
		}
		fd, err := unix.Socket(unix.AF_VSOCK, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err == nil {
			if err = unix.Connect(fd, &unix.SockaddrVM{CID: unix.VMADDR_CID_HOST, Port: guestconfig.AssignVsockPort}); err == nil {
				f := os.NewFile(uintptr(fd), "vsock")
				defer f.Close()
				return AcceptAssignment(f)
			}
			unix.Close(fd)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// waitReader turns the EOF of a port whose host end is not connected (yet)
// into waiting, until the first byte arrives.
type waitReader struct {
	rw  io.ReadWriter
	got bool
}

func (w *waitReader) Read(p []byte) (int, error) {
	for {
		n, err := w.rw.Read(p)
		if n > 0 {
			w.got = true
			return n, nil
		}
		if !errors.Is(err, io.EOF) || w.got {
			return n, err
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func (w *waitReader) Write(p []byte) (int, error) { return w.rw.Write(p) }
