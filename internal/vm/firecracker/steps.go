package firecracker

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	sdk "github.com/firecracker-microvm/firecracker-go-sdk"
	fcclient "github.com/firecracker-microvm/firecracker-go-sdk/client"
	"github.com/firecracker-microvm/firecracker-go-sdk/client/models"
	ops "github.com/firecracker-microvm/firecracker-go-sdk/client/operations"
	"github.com/go-openapi/strfmt"
	"github.com/sirupsen/logrus"

	"github.com/firerunner/firerunner/internal/guestconfig"
	"github.com/firerunner/firerunner/internal/vm"
)

// Step names (the SDK's fcinit.* steps are reused as they are).
const (
	StepPrepareVMDir   = "firerunner.PrepareVMDir"
	StepPrepareJail    = "firerunner.PrepareJail"
	StepStartVMM       = "firerunner.StartVMM"
	StepAddEntropy     = "firerunner.AddEntropyDevice"
	StepLimitSerial    = "firerunner.LimitSerialConsole"
	StepAddVsock       = "firerunner.AddVsockDevice"
	StepLoadSnapshot   = "firerunner.LoadSnapshot"
	StepInstanceStart  = "InstanceStart" // run by sdk.Machine.Start after the chain
	driveIDRootfs      = "rootfs"
	driveIDConfigDrive = "config"
	driveIDScratch     = "scratch"
)

// boot is one VM start (or snapshot load) in progress.
type boot struct {
	d        *Driver
	spec     vm.Spec
	bootArgs string
	jailed   bool
	dir      string // per-VM state dir
	socket   string // API socket, host path
	snap     *Snapshot
	snapMeta *snapshotMeta
	resume   bool
	exec     string // jailed: the canonical firecracker path (resolveExec)
	uid, gid int    // jailed: the VMM's user (vmmUser)

	created bool // the state dir is ours to clean up on failure
	vr      *vmRun
	meta    vm.Meta
	logger  *logrus.Entry
}

func (d *Driver) newBoot(spec vm.Spec, bootArgs string) (*boot, error) {
	b := &boot{d: d, spec: spec, bootArgs: bootArgs, jailed: d.opts.UseJailer, dir: d.sd.Path(spec.ID)}
	b.socket = filepath.Join(b.dir, socketFile)
	if b.jailed {
		// Resolved once for this VM (recorded by prepareVMDir): the jail,
		// socket, pid file and cgroup all follow from it.
		exec, err := d.resolveExec()
		if err != nil {
			return nil, fmt.Errorf("vm %s: %w", spec.ID, err)
		}
		b.exec = exec
		b.socket = filepath.Join(d.jailDirOf(filepath.Base(exec), spec.ID), "root", jailSocket)
		if b.uid, b.gid, err = d.vmmUser(spec); err != nil {
			return nil, err
		}
	}
	if len(b.socket) >= 108 {
		return nil, fmt.Errorf("vm %s: API socket path %s is longer than a Unix socket allows (107 bytes); shorten state_dir or chroot_base", spec.ID, b.socket)
	}
	b.logger = sdkLogger(d.log.With("vm", spec.ID))
	return b, nil
}

// sdkConfig is the SDK configuration with host paths; PrepareJail rewrites
// the paths to jail paths.
func (b *boot) sdkConfig() sdk.Config {
	s := b.spec
	cfg := sdk.Config{
		VMID:            s.ID,
		SocketPath:      b.socket,
		LogPath:         filepath.Join(b.dir, logFile),
		LogLevel:        b.d.opts.LogLevel,
		MetricsPath:     filepath.Join(b.dir, metricsFile),
		KernelImagePath: s.Image.Kernel,
		InitrdPath:      s.Image.Initrd,
		KernelArgs:      b.bootArgs,
		MachineCfg: models.MachineConfiguration{
			VcpuCount:  sdk.Int64(int64(s.VCPUs)),
			MemSizeMib: sdk.Int64(int64(s.MemoryMiB)),
			Smt:        sdk.Bool(false),
		},
		// The base image is shared by every VM and never written: the guest
		// overlays a tmpfs on it. The config drive is per VM, also read-only.
		Drives: []models.Drive{
			{DriveID: sdk.String(driveIDRootfs), PathOnHost: sdk.String(s.Image.Rootfs), IsRootDevice: sdk.Bool(true), IsReadOnly: sdk.Bool(true)},
			{DriveID: sdk.String(driveIDConfigDrive), PathOnHost: sdk.String(filepath.Join(b.dir, vm.ConfigDrive)), IsRootDevice: sdk.Bool(false), IsReadOnly: sdk.Bool(true)},
		},
		// No signal forwarding: the VMM outlives this process by design.
		ForwardSignals: []os.Signal{},
		Seccomp:        sdk.SeccompConfig{Enabled: true},
	}
	if s.ScratchDiskBytes > 0 {
		// Per-VM scratch disk (Docker's data-root), read-write, sparse,
		// destroyed with the VM's directory.
		cfg.Drives = append(cfg.Drives, models.Drive{DriveID: sdk.String(driveIDScratch),
			PathOnHost: sdk.String(filepath.Join(b.dir, vm.ScratchDisk)), IsRootDevice: sdk.Bool(false), IsReadOnly: sdk.Bool(false)})
	}
	if n := s.Network; n != nil {
		cfg.NetworkInterfaces = sdk.NetworkInterfaces{{
			StaticConfiguration: &sdk.StaticNetworkConfiguration{HostDevName: n.TapName, MacAddress: n.MAC},
		}}
	}
	if b.snap != nil {
		// Devices come from the snapshot; only the files they name must exist.
		cfg.Drives = nil
		cfg.NetworkInterfaces = nil
		cfg.Snapshot = sdk.SnapshotConfig{SnapshotPath: b.snap.StatePath, ResumeVM: b.resume,
			MemBackend: &models.MemoryBackend{BackendType: sdk.String(models.MemoryBackendBackendTypeFile), BackendPath: sdk.String(b.snap.MemPath)}}
	}
	return cfg
}

// Steps returns the names of the boot chain, in order, for a fresh boot
// (snapshot false) or a snapshot restore. Tests and logs use it.
func (d *Driver) Steps(snapshot bool) []string {
	b := &boot{d: d, jailed: d.opts.UseJailer}
	if snapshot {
		b.snap = &Snapshot{}
	}
	h := b.handlers()
	var names []string
	for _, x := range append(h.validation, h.init...) {
		names = append(names, x.Name)
	}
	if !snapshot {
		names = append(names, StepInstanceStart)
	}
	return names
}

type chain struct{ validation, init []sdk.Handler }

// handlers is the boot as a chain of small named steps, in the SDK's style.
// The SDK's own StartVMM is replaced: it kills the VMM when the Start context
// ends and cannot adopt a jailer that exits after spawning Firecracker into a
// new PID namespace.
func (b *boot) handlers() chain {
	var c chain
	if b.snap != nil {
		c.validation = []sdk.Handler{sdk.LoadSnapshotConfigValidationHandler}
	} else {
		c.validation = []sdk.Handler{sdk.ConfigValidationHandler, sdk.NetworkConfigValidationHandler}
	}
	c.init = []sdk.Handler{{Name: StepPrepareVMDir, Fn: b.prepareVMDir}}
	if b.jailed {
		c.init = append(c.init, sdk.Handler{Name: StepPrepareJail, Fn: b.prepareJail})
	}
	c.init = append(c.init, sdk.Handler{Name: StepStartVMM, Fn: b.startVMM}, sdk.BootstrapLoggingHandler)
	if b.snap != nil {
		return c.with(sdk.Handler{Name: StepLoadSnapshot, Fn: b.loadSnapshot})
	}
	c = c.with(
		sdk.CreateMachineHandler,
		sdk.CreateBootSourceHandler,
		sdk.AttachDrivesHandler,
		sdk.CreateNetworkInterfacesHandler,
		sdk.Handler{Name: StepAddEntropy, Fn: b.addEntropy},
		sdk.Handler{Name: StepLimitSerial, Fn: b.limitSerial},
	)
	if b.spec.Guest.Warm {
		// Only a warm VM waits for an assignment: a cold one has no
		// vsock device at all.
		c = c.with(sdk.Handler{Name: StepAddVsock, Fn: b.addVsock})
	}
	return c
}

// addVsock attaches the vsock device of the assignment channel (PUT /vsock,
// pre-boot; sent raw: the SDK's model adds the deprecated vsock_id).
func (b *boot) addVsock(ctx context.Context, m *sdk.Machine) error {
	api, _ := b.d.vsockPaths(b.spec.ID, b.jailed)
	body, _ := json.Marshal(map[string]any{"guest_cid": vsockCID, "uds_path": api})
	code, fault, err := apiPut(ctx, b.socket, "/vsock", body)
	switch {
	case err != nil:
		return fmt.Errorf("PUT /vsock: %w", err)
	case code != 204:
		return fmt.Errorf("PUT /vsock: HTTP %d: %s", code, fault)
	}
	return nil
}

func (c chain) with(h ...sdk.Handler) chain {
	c.init = append(c.init, h...)
	return c
}

// run executes the chain through the SDK's Machine; Machine.Start sends
// InstanceStart after the last step (not for a snapshot restore).
func (b *boot) run(ctx context.Context) error {
	cfg := b.sdkConfig()
	client := sdk.NewClient(b.socket, b.logger, false)
	m, err := sdk.NewMachine(ctx, cfg, sdk.WithClient(client), sdk.WithLogger(b.logger))
	if err != nil {
		return err
	}
	c := b.handlers()
	m.Handlers = sdk.Handlers{
		Validation: sdk.HandlerList{}.Append(c.validation...),
		FcInit:     sdk.HandlerList{}.Append(c.init...),
	}
	if err := m.Start(ctx); err != nil {
		return err
	}
	b.vr.tl.Mark(vm.MilestoneVMMStarted)
	return nil
}

// prepareVMDir makes the per-VM directory: records (meta, firecracker.json),
// the config drive (0600, the only place the runner token goes), the console
// log and the Firecracker log/metrics files.
func (b *boot) prepareVMDir(ctx context.Context, m *sdk.Machine) error {
	d, id := b.d, b.spec.ID
	if _, err := d.sd.Create(id); err != nil {
		return err
	}
	b.created = true
	b.vr = &vmRun{tl: &vm.Timeline{}, reaped: make(chan struct{})}
	d.mu.Lock()
	d.runs[id] = b.vr
	d.mu.Unlock()
	fm := fcMeta{Jailed: b.jailed, Socket: b.socket, Vsock: b.spec.Guest.Warm}
	if n := b.spec.Network; n != nil {
		fm.GuestMAC = n.MAC
	}
	if b.snap != nil {
		fm.Restored, fm.Snapshot = true, filepath.Dir(b.snap.StatePath)
	}
	if b.jailed {
		// Recorded: everything about the VM's jail follows from this path,
		// later too (jailExec).
		name := filepath.Base(b.exec)
		fm.Exec, fm.JailDir, fm.CgroupDir = b.exec, d.jailDirOf(name, id), d.cgroupDirOf(name, id)
		fm.UID, fm.GID = b.uid, b.gid
	}
	fb, _ := json.Marshal(fm)
	if err := os.WriteFile(filepath.Join(b.dir, fcMetaFile), fb, 0o600); err != nil {
		return err
	}
	b.meta = vm.MetaFromSpec(Name, b.spec, time.Now())
	if err := d.sd.WriteMeta(b.meta); err != nil {
		return err
	}
	if err := guestconfig.WriteDrive(filepath.Join(b.dir, vm.ConfigDrive), b.spec.Guest); err != nil {
		return fmt.Errorf("write config drive: %w", err)
	}
	if b.spec.ScratchDiskBytes > 0 && b.snap == nil {
		if err := vm.CreateScratchDisk(ctx, filepath.Join(b.dir, vm.ScratchDisk), b.spec.ScratchDiskBytes, b.spec.Image.DockerSeed); err != nil {
			return err
		}
	}
	for _, f := range []string{vm.ConsoleFile, logFile, metricsFile, stderrFile} {
		if err := touch(filepath.Join(b.dir, f), -1, -1); err != nil {
			return err
		}
	}
	b.vr.tl.Mark(vm.MilestonePrepared)
	return nil
}

// touch creates an empty 0600 file, owned by uid:gid when uid >= 0.
func touch(path string, uid, gid int) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	if uid >= 0 {
		return os.Chown(path, uid, gid)
	}
	return nil
}

// prepareJail builds the jail before the jailer runs (it keeps an existing
// chroot dir): the files the API names are placed inside it (hard links,
// O(1), when on the same filesystem), per-VM files are owned by the jail
// user, and every path handed to the API becomes a jail path.
func (b *boot) prepareJail(ctx context.Context, m *sdk.Machine) error {
	d, id := b.d, b.spec.ID
	uid, gid := b.uid, b.gid
	root := d.chrootDir(id)
	if err := os.MkdirAll(root, 0o750); err != nil {
		return err
	}
	for _, sub := range []string{filepath.Dir(jailSocket), jailSnapDir} {
		p := d.inJail(id, sub)
		if err := os.Mkdir(p, 0o750); err != nil && !errors.Is(err, os.ErrExist) {
			return err
		}
		if err := os.Chown(p, uid, gid); err != nil {
			return err
		}
	}
	place := func(src, jailPath string, own bool) error {
		if !own {
			if err := readableBy(src, uid, gid); err != nil {
				return err
			}
			// Shared image files come from their copy in the chroot
			// base's mount, so the link below never crosses a mount.
			staged, err := d.stageShared(src)
			if err != nil {
				return fmt.Errorf("stage %s in the chroot base: %w", src, err)
			}
			src = staged
		}
		mode, err := placeFile(src, d.inJail(id, jailPath))
		if err != nil {
			return err
		}
		if mode == placedCopy && !own {
			b.d.log.Warn("image file copied into the jail (no hard link or reflink possible)", "vm", id, "file", jailPath, "from", src)
		}
		b.d.log.Debug("placed file in jail", "vm", id, "file", jailPath, "how", mode)
		if own {
			return os.Chown(d.inJail(id, jailPath), uid, gid)
		}
		return nil
	}
	cfg := &m.Cfg
	if b.snap == nil {
		if err := place(cfg.KernelImagePath, jailKernel, false); err != nil {
			return err
		}
		cfg.KernelImagePath = jailKernel
		if cfg.InitrdPath != "" {
			if err := place(cfg.InitrdPath, jailInitrd, false); err != nil {
				return err
			}
			cfg.InitrdPath = jailInitrd
		}
	}
	// Drive files, named by fixed jail paths (a restored snapshot reopens them).
	if err := place(b.spec.Image.Rootfs, jailRootfs, false); err != nil {
		return err
	}
	if err := place(filepath.Join(b.dir, vm.ConfigDrive), jailConfig, true); err != nil {
		return err
	}
	if b.spec.ScratchDiskBytes > 0 && b.snap == nil {
		if err := place(filepath.Join(b.dir, vm.ScratchDisk), jailScratch, true); err != nil {
			return err
		}
	}
	for i := range cfg.Drives {
		switch sdk.StringValue(cfg.Drives[i].DriveID) {
		case driveIDRootfs:
			cfg.Drives[i].PathOnHost = sdk.String(jailRootfs)
		case driveIDConfigDrive:
			cfg.Drives[i].PathOnHost = sdk.String(jailConfig)
		case driveIDScratch:
			cfg.Drives[i].PathOnHost = sdk.String(jailScratch)
		}
	}
	if b.snap != nil {
		// Root's and read-only in every jail: a hard link to the one
		// snapshot (it lives in the chroot base, on the jails' mount), never
		// given to the jail user, so no VMM can rewrite memory that backs
		// other clones. Firecracker only reads both (File::open).
		for _, f := range []struct{ src, jail string }{{b.snap.StatePath, jailSnapVM}, {b.snap.MemPath, jailSnapMem}} {
			if err := readOnlyRoot(f.src); err != nil {
				return err
			}
			mode, err := placeFile(f.src, d.inJail(id, f.jail))
			if err != nil {
				return err
			}
			if mode != placedLink {
				b.d.log.Warn("snapshot file copied into the jail (no hard link possible): keep snapshots in the chroot base's file system", "vm", id, "file", f.src, "how", mode)
				if err := os.Chmod(d.inJail(id, f.jail), 0o444); err != nil {
					return err
				}
			}
		}
		cfg.Snapshot.SnapshotPath = jailSnapVM
		cfg.Snapshot.MemBackend.BackendPath = sdk.String(jailSnapMem)
	}
	for _, f := range []struct {
		p *string
		j string
	}{{&cfg.LogPath, jailLog}, {&cfg.MetricsPath, jailMetrics}} {
		if err := touch(d.inJail(id, f.j), uid, gid); err != nil {
			return err
		}
		*f.p = f.j
	}
	return nil
}

// startVMM starts Firecracker (or the jailer), records its pid before
// anything else can fail, and waits for the API socket to answer.
func (b *boot) startVMM(ctx context.Context, m *sdk.Machine) error {
	d, id := b.d, b.spec.ID
	cmd := d.command(b.spec, b.socket, b.uid, b.gid)
	console, err := os.OpenFile(filepath.Join(b.dir, vm.ConsoleFile), os.O_WRONLY|os.O_APPEND|syscall.O_NOFOLLOW, 0)
	if err != nil {
		return err
	}
	defer console.Close()
	stderr, err := os.OpenFile(filepath.Join(b.dir, stderrFile), os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		return err
	}
	defer stderr.Close()
	// The guest's serial console is Firecracker's stdout: straight to the
	// console log file, no pipe, so it keeps working if FireRunner restarts.
	// O_APPEND lets the watcher cap the file in place (vm.ConsoleWatcher).
	cmd.Stdout, cmd.Stderr = console, stderr
	cmd.SysProcAttr = vm.SysProcAttr()
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start %s: %w", cmd.Path, err)
	}
	vr := b.vr
	vr.spawned.Store(true) // from here on vr.reaped is closed once cmd is reaped
	var proc vm.Proc
	if b.jailed {
		// With --new-pid-ns the jailer spawns Firecracker, writes its pid
		// to <chroot>/<exec_file_name>.pid and exits; Firecracker is not
		// our child, so there is nothing else to reap. The wait is bounded:
		// a jailer stuck (on a cgroup, a mount) is killed with its process
		// group and the start fails.
		werr := waitBounded(ctx, cmd, d.opts.JailerTimeout)
		close(vr.reaped)
		if werr != nil {
			return fmt.Errorf("jailer failed: %v: %s", werr, tail(filepath.Join(b.dir, stderrFile)))
		}
		if proc, err = d.jailPID(id); err != nil {
			return fmt.Errorf("jailer started no firecracker: %w", err)
		}
	} else {
		go func() {
			vr.waitErr = cmd.Wait()
			close(vr.reaped)
		}()
		if proc, err = vm.LookupProc(cmd.Process.Pid); err != nil {
			return fmt.Errorf("firecracker exited at once: %s", tail(filepath.Join(b.dir, stderrFile)))
		}
	}
	b.meta.Proc, b.meta.Argv, b.meta.Started = proc, cmd.Args, time.Now()
	if b.spec.Timeout > 0 {
		b.meta.Deadline = b.meta.Started.Add(b.spec.Timeout)
	}
	if err := d.sd.WriteMeta(b.meta); err != nil {
		return err
	}
	vr.watcher = d.opts.Console.Watch(filepath.Join(b.dir, vm.ConsoleFile), vr.tl)
	return b.waitForAPI(ctx, proc)
}

// waitBounded waits for cmd (started with its own process group) for at
// most timeout or until ctx ends; then it kills the group and reaps cmd.
func waitBounded(ctx context.Context, cmd *exec.Cmd, timeout time.Duration) error {
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	t := time.NewTimer(timeout)
	defer t.Stop()
	var why error
	select {
	case err := <-done:
		return err
	case <-t.C:
		why = fmt.Errorf("did not finish within %s; killed", timeout)
	case <-ctx.Done():
		why = fmt.Errorf("start canceled: %w; killed", ctx.Err())
	}
	_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) // Setsid: its own group
	_ = cmd.Process.Kill()
	<-done
	return why
}

// waitForAPI polls until the API socket answers GET /machine-config.
func (b *boot) waitForAPI(ctx context.Context, proc vm.Proc) error {
	client := sdk.NewClient(b.socket, b.logger, false)
	deadline := time.Now().Add(b.d.opts.SocketTimeout)
	for {
		if _, err := os.Stat(b.socket); err == nil {
			if _, err := client.GetMachineConfiguration(); err == nil {
				return nil
			}
		}
		if !proc.Alive() {
			return fmt.Errorf("firecracker exited before its API socket answered: %s", tail(filepath.Join(b.dir, stderrFile)))
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("firecracker API socket %s did not answer within %s", b.socket, b.d.opts.SocketTimeout)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// addEntropy attaches a virtio-rng device (PUT /entropy, in both API 1.4.1
// and 1.17) so the guest has good randomness before TLS. A Firecracker too
// old to know the endpoint answers 400; the VM then boots without it (the
// config drive's entropy seed still seeds the guest RNG).
func (b *boot) addEntropy(ctx context.Context, m *sdk.Machine) error {
	cl := fcclient.NewHTTPClient(strfmt.NewFormats())
	cl.SetTransport(sdk.NewUnixSocketTransport(b.socket, b.logger, false))
	params := ops.NewPutEntropyDeviceParamsWithContext(ctx).WithBody(&models.EntropyDevice{})
	params.SetTimeout(5 * time.Second)
	_, err := cl.Operations.PutEntropyDevice(params)
	var def *ops.PutEntropyDeviceDefault
	if errors.As(err, &def) && def.Code() == 400 && def.Payload != nil && strings.Contains(def.Payload.FaultMessage, "Invalid request method") {
		b.d.log.Warn("firecracker has no entropy device API; booting without virtio-rng", "vm", b.spec.ID)
		return nil
	}
	return err
}

// serialConfig is PUT /serial's body (API 1.17 SerialDevice; the SDK's
// API 1.4.1 has no such endpoint, hence no model): no serial_out_path, so
// the console stays Firecracker's stdout (the console log file), and a
// TokenBucket rate_limiter.
type serialConfig struct {
	RateLimiter tokenBucket `json:"rate_limiter"`
}

// tokenBucket is the API's TokenBucket: size tokens (bytes), refilled over
// refill_time ms, plus a one-time burst.
type tokenBucket struct {
	Size         int64 `json:"size"`
	OneTimeBurst int64 `json:"one_time_burst"`
	RefillTime   int64 `json:"refill_time"`
}

// limitSerial puts the guest's serial console behind Firecracker's rate
// limiter (PUT /serial, pre-boot): a guest flooding its UART gets its
// output dropped by the VMM instead of making it write without bound. A
// Firecracker without the endpoint or the field answers 400; the VM then
// boots without the limiter (the console log is still capped in place by
// vm.ConsoleWatcher), and the driver says so.
func (b *boot) limitSerial(ctx context.Context, m *sdk.Machine) error {
	rate := b.d.opts.SerialBytesPerSec
	if rate < 0 {
		return nil
	}
	body, _ := json.Marshal(serialConfig{RateLimiter: tokenBucket{Size: rate, RefillTime: 1000, OneTimeBurst: 4 * rate}})
	code, fault, err := apiPut(ctx, b.socket, "/serial", body)
	switch {
	case err != nil:
		return fmt.Errorf("PUT /serial: %w", err)
	case code == 204:
		return nil
	case code == 400 && (strings.Contains(fault, "Invalid request method") || strings.Contains(fault, "unknown field")):
		b.d.log.Warn("firecracker has no serial console rate limiter (PUT /serial rate_limiter, Firecracker API 1.17); booting without it",
			"vm", b.spec.ID, "fault", fault)
		return nil
	default:
		return fmt.Errorf("PUT /serial: HTTP %d: %s", code, fault)
	}
}

// apiPut sends one JSON PUT to Firecracker's API socket and returns the
// status and fault_message.
func apiPut(ctx context.Context, socket, path string, body []byte) (int, string, error) {
	return apiDo(ctx, http.MethodPut, socket, path, body)
}

// apiDo sends one JSON request to Firecracker's API socket and returns the
// status and fault_message.
func apiDo(ctx context.Context, method, socket, path string, body []byte) (int, string, error) {
	return apiDoTimeout(ctx, method, socket, path, body, 5*time.Second)
}

func apiDoTimeout(ctx context.Context, method, socket, path string, body []byte, timeout time.Duration) (int, string, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	hc := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", socket)
	}}}
	defer hc.CloseIdleConnections()
	req, err := http.NewRequestWithContext(ctx, method, "http://localhost"+path, bytes.NewReader(body))
	if err != nil {
		return 0, "", err
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Accept", "application/json")
	resp, err := hc.Do(req)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	var f struct {
		FaultMessage string `json:"fault_message"`
	}
	raw, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	_ = json.Unmarshal(raw, &f)
	return resp.StatusCode, f.FaultMessage, nil
}

// jailPID reads the pid the jailer wrote for a VM and checks it is still
// that VM's Firecracker.
func (d *Driver) jailPID(id string) (vm.Proc, error) {
	raw, err := os.ReadFile(filepath.Join(d.chrootDir(id), d.execName(id)+".pid"))
	if err != nil {
		return vm.Proc{}, err
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(raw)))
	if err != nil {
		return vm.Proc{}, fmt.Errorf("jailer pid file: %w", err)
	}
	p, err := vm.LookupProc(pid)
	if err != nil {
		return vm.Proc{}, err
	}
	if cmdline, _ := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cmdline"); !strings.Contains(string(cmdline), id) {
		return vm.Proc{}, fmt.Errorf("pid %d is not vm %s: %w", pid, id, vm.ErrProcGone)
	}
	return p, nil
}

// scanProcs finds live Firecracker processes that belong to this driver:
// argv[0] names firecracker, --id is a FireRunner VM id, and its API socket
// is in our state dir or its root is (or its jail exists) under our chroot base.
func (d *Driver) scanProcs() map[string][]vm.Proc {
	out := map[string][]vm.Proc{}
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return out
	}
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		raw, err := os.ReadFile("/proc/" + e.Name() + "/cmdline")
		if err != nil || len(raw) == 0 {
			continue
		}
		argv := strings.Split(strings.TrimRight(string(raw), "\x00"), "\x00")
		if !strings.Contains(filepath.Base(argv[0]), "firecracker") { // the jailer requires the name
			continue
		}
		id, sock := flagValue(argv, "--id"), flagValue(argv, "--api-sock")
		if !vmIDRe.MatchString(id) {
			continue
		}
		ours := strings.HasPrefix(sock, d.sd.Path(id)+string(filepath.Separator))
		if !ours && d.opts.UseJailer {
			root, _ := os.Readlink("/proc/" + e.Name() + "/root")
			_, jerr := os.Stat(d.jailDir(id))
			ours = root == d.chrootDir(id) || (sock == jailSocket && jerr == nil)
		}
		if !ours {
			continue
		}
		if p, err := vm.LookupProc(pid); err == nil {
			out[id] = append(out[id], p)
		}
	}
	return out
}

// flagValue returns the value of --name X or --name=X in argv.
func flagValue(argv []string, name string) string {
	for i, a := range argv {
		if a == name && i+1 < len(argv) {
			return argv[i+1]
		}
		if v, ok := strings.CutPrefix(a, name+"="); ok {
			return v
		}
	}
	return ""
}

func sortInstances(in []vm.Instance) {
	sort.Slice(in, func(i, j int) bool { return in[i].ID < in[j].ID })
}

// tail returns the last bytes of a (non-secret) VMM stderr file for errors.
func tail(path string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return ""
	}
	if len(b) > 512 {
		b = b[len(b)-512:]
	}
	return strings.TrimSpace(string(b))
}

// sdkLogger routes the SDK's logrus output to slog at debug level.
func sdkLogger(l interface {
	Debug(msg string, args ...any)
}) *logrus.Entry {
	lg := logrus.New()
	lg.SetOutput(slogWriter{l})
	lg.SetLevel(logrus.DebugLevel)
	lg.SetFormatter(&logrus.TextFormatter{DisableTimestamp: true, DisableQuote: true})
	return logrus.NewEntry(lg)
}

type slogWriter struct {
	l interface {
		Debug(msg string, args ...any)
	}
}

func (w slogWriter) Write(p []byte) (int, error) {
	w.l.Debug("firecracker-go-sdk", "msg", strings.TrimSpace(string(p)))
	return len(p), nil
}

var _ io.Writer = slogWriter{}
