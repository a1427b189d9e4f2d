package agent

import (
	"bufio"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/firerunner/firerunner/internal/guestconfig"
)

// DockerReadyTimeout bounds dockerd's start and the helper image load.
const DockerReadyTimeout = 3 * time.Minute

// prepareDocker starts Docker for a docker-executor VM (cfg.Docker set):
// it comes up beside gitlab-runner's start, and a job is taken only once
// it is ready (cold: before gitlab-runner starts, see awaitDocker; warm:
// before the VM reports itself warm). It fills in the preloaded helper
// image's name and returns the socket's group for gitlab-runner.
func (a *Agent) prepareDocker(cfg guestconfig.Config) (<-chan error, []uint32, error) {
	if cfg.Docker == nil {
		return nil, nil, nil
	}
	gid, err := DockerGID()
	if err != nil {
		return nil, nil, fmt.Errorf("docker: %w", err)
	}
	cfg.Docker.HelperImage = HelperImageName()
	mtu := 0
	if cfg.Network != nil {
		mtu = cfg.Network.MTU
	}
	return a.startDocker(cfg.Docker, mtu), []uint32{gid}, nil
}

// gateAddr is where the job gate listens: loopback, or with Docker the
// VM's own address (containers cannot reach the VM's loopback).
func gateAddr(cfg guestconfig.Config) string {
	if cfg.Docker == nil {
		return "127.0.0.1:0"
	}
	p, err := PlanNetwork(cfg.Network)
	if err != nil {
		return "127.0.0.1:0"
	}
	return net.JoinHostPort(p.Address.Addr().String(), "0")
}

// awaitDocker waits for Docker in a cold VM. In an image build's seed boot
// it then stops dockerd cleanly, reports exit 0 and says stop: no workload.
func (a *Agent) awaitDocker(cfg guestconfig.Config, ready <-chan error) (stop bool, err error) {
	if ready != nil && !cfg.Warm {
		if err := <-ready; err != nil {
			return false, fmt.Errorf("docker: %w", err)
		}
	}
	if !cfg.DockerSeed {
		return false, nil
	}
	if err := a.stopDockerForSeed(); err != nil {
		return true, fmt.Errorf("docker seed: %w", err)
	}
	fmt.Fprintf(a.Console, "%s%d\n", guestconfig.ExitMarker, 0)
	return true, nil
}

// startDocker brings Docker up in the background; the channel yields nil
// once dockerd answers and the helper image is loaded, or the error.
func (a *Agent) startDocker(d *guestconfig.Docker, mtu int) <-chan error {
	ch := make(chan error, 1)
	go func() {
		start := time.Now()
		up, err := a.dockerUp(d, mtu)
		if err == nil {
			fmt.Fprintf(a.Console, "%s %.2fs (dockerd answered after %.2fs, helper image loaded in %.2fs)\n", guestconfig.MarkerDockerReady,
				time.Since(start).Seconds(), up.Sub(start).Seconds(), time.Since(up).Seconds())
		}
		ch <- err
	}()
	return ch
}

func (a *Agent) dockerUp(d *guestconfig.Docker, mtu int) (answered time.Time, err error) {
	a.loadDockerModules()
	dev, err := FindScratchDisk(a.SysBlock, a.DevDir)
	if err != nil {
		return answered, err
	}
	if err := os.MkdirAll(DockerDataRoot, 0o710); err != nil {
		return answered, err
	}
	if err := unix.Mount(dev, DockerDataRoot, "ext4", unix.MS_NOATIME, ""); err != nil {
		return answered, fmt.Errorf("mount scratch disk %s on %s: %w", dev, DockerDataRoot, err)
	}
	if err := os.MkdirAll("/etc/docker", 0o755); err != nil {
		return answered, err
	}
	if err := os.WriteFile("/etc/docker/daemon.json", DockerDaemonConfig(d, mtu), 0o644); err != nil {
		return answered, err
	}
	logf, err := os.OpenFile("/var/log/dockerd.log", os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return answered, err
	}
	cmd := exec.Command("/usr/sbin/dockerd", "--config-file", "/etc/docker/daemon.json")
	cmd.Env = []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	exited, err := a.reaper.start(cmd)
	a.dockerd, a.dockerdExited = cmd, exited
	logf.Close()
	if err != nil {
		return answered, fmt.Errorf("start dockerd: %w", err)
	}
	c := dockerClient()
	deadline := time.Now().Add(DockerReadyTimeout)
	for {
		select {
		case ws := <-exited:
			return answered, fmt.Errorf("dockerd exited (%d): %s", exitCode(ws), logTail("/var/log/dockerd.log", 600))
		default:
		}
		if r, err := c.Get("http://docker/_ping"); err == nil {
			r.Body.Close()
			if r.StatusCode == http.StatusOK {
				break
			}
		}
		if time.Now().After(deadline) {
			return answered, fmt.Errorf("dockerd not ready after %s: %s", DockerReadyTimeout, logTail("/var/log/dockerd.log", 600))
		}
		time.Sleep(50 * time.Millisecond)
	}
	answered = time.Now()
	if d.HelperImage != "" {
		// A scratch disk copied from the image's Docker seed has it.
		if r, err := c.Get("http://docker/images/" + d.HelperImage + "/json"); err == nil {
			r.Body.Close()
			if r.StatusCode == http.StatusOK {
				a.logf("docker: helper image %s is on the scratch disk (docker seed)", d.HelperImage)
				return answered, nil
			}
		}
	}
	return answered, LoadImage(c, filepath.Join(guestconfig.DockerAssetsDir, guestconfig.HelperImageTar))
}

// stopDockerForSeed stops dockerd cleanly (SIGTERM, then waits) and
// unmounts the scratch disk, so the disk can become the image's seed.
func (a *Agent) stopDockerForSeed() error {
	if a.dockerd == nil || a.dockerd.Process == nil {
		return errors.New("dockerd is not running")
	}
	if err := a.dockerd.Process.Signal(syscall.SIGTERM); err != nil {
		return err
	}
	select {
	case <-a.dockerdExited:
	case <-time.After(2 * time.Minute):
		return errors.New("dockerd did not stop within 2 minutes")
	}
	unix.Sync()
	if err := unix.Unmount(DockerDataRoot, 0); err != nil {
		return fmt.Errorf("unmount %s: %w", DockerDataRoot, err)
	}
	unix.Sync()
	fmt.Fprintln(a.Console, guestconfig.MarkerDockerSeeded)
	return nil
}

// dockerClient talks HTTP to the Docker API socket.
func dockerClient() *http.Client {
	return &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var dl net.Dialer
			return dl.DialContext(ctx, "unix", DockerSocket)
		},
	}}
}

// LoadImage loads a `docker save` archive through the API (a missing
// archive is no error: an image without a preloaded helper).
func LoadImage(c *http.Client, archive string) error {
	f, err := os.Open(archive)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	defer f.Close()
	r, err := c.Post("http://docker/images/load?quiet=1", "application/x-tar", f)
	if err != nil {
		return fmt.Errorf("docker load %s: %w", archive, err)
	}
	defer r.Body.Close()
	sc := bufio.NewScanner(r.Body)
	for sc.Scan() {
		var m struct {
			Error string `json:"error"`
		}
		if json.Unmarshal(sc.Bytes(), &m) == nil && m.Error != "" {
			return fmt.Errorf("docker load %s: %s", archive, m.Error)
		}
	}
	if r.StatusCode != http.StatusOK {
		return fmt.Errorf("docker load %s: HTTP %d", archive, r.StatusCode)
	}
	return sc.Err()
}

// HelperImageName reads the preloaded helper image's name ("" none).
func HelperImageName() string {
	b, err := os.ReadFile(filepath.Join(guestconfig.DockerAssetsDir, guestconfig.HelperImageNameFile))
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}

// DockerGID is the docker group's gid in /etc/group (the socket's group).
func DockerGID() (uint32, error) {
	f, err := os.Open("/etc/group")
	if err != nil {
		return 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		w := strings.Split(sc.Text(), ":")
		if len(w) >= 3 && w[0] == "docker" {
			g, err := strconv.ParseUint(w[2], 10, 32)
			return uint32(g), err
		}
	}
	return 0, errors.New("no docker group in /etc/group")
}

// loadDockerModules loads the image's Docker modules in order; one that is
// already loaded (or built in) is fine, another failure is logged: dockerd
// says what it misses.
func (a *Agent) loadDockerModules() {
	dir := filepath.Join(guestconfig.DockerAssetsDir, "modules")
	b, err := os.ReadFile(filepath.Join(dir, guestconfig.DockerModulesOrder))
	if err != nil {
		a.logf("docker modules: %v", err)
		return
	}
	for _, m := range strings.Fields(string(b)) {
		f, err := os.Open(filepath.Join(dir, m))
		if err != nil {
			a.logf("docker module %s: %v", m, err)
			continue
		}
		err = unix.FinitModule(int(f.Fd()), "", 0)
		f.Close()
		if err != nil && !errors.Is(err, unix.EEXIST) {
			a.logf("docker module %s: %v", m, err)
		}
	}
}

// FindScratchDisk returns the virtio block device (sysBlock/vd*, opened
// as devDir/<name>) holding an ext4 file system labelled
// guestconfig.ScratchLabel.
func FindScratchDisk(sysBlock, devDir string) (string, error) {
	deadline := time.Now().Add(3 * time.Second)
	for {
		names, _ := filepath.Glob(filepath.Join(sysBlock, "vd*"))
		for _, n := range names {
			dev := filepath.Join(devDir, filepath.Base(n))
			if l, err := ext4Label(dev); err == nil && l == guestconfig.ScratchLabel {
				return dev, nil
			}
		}
		if time.Now().After(deadline) {
			return "", guestconfig.ErrNoScratch
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// ext4Label reads an ext2/3/4 superblock's volume name.
func ext4Label(dev string) (string, error) {
	f, err := os.Open(dev)
	if err != nil {
		return "", err
	}
	defer f.Close()
	sb := make([]byte, 1024)
	if _, err := f.ReadAt(sb, 1024); err != nil {
		return "", err
	}
	if binary.LittleEndian.Uint16(sb[0x38:]) != 0xEF53 {
		return "", errors.New("not ext4")
	}
	return strings.TrimRight(string(sb[0x78:0x88]), "\x00"), nil
}

func logTail(path string, n int64) string {
	f, err := os.Open(path)
	if err != nil {
		return err.Error()
	}
	defer f.Close()
	if st, err := f.Stat(); err == nil && st.Size() > n {
		f.Seek(st.Size()-n, io.SeekStart)
	}
	b, _ := io.ReadAll(f)
	return strings.TrimSpace(string(b))
}
