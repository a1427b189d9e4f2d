package registry

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"github.com/firerunner/firerunner/internal/image"
)

// Busybox is the static busybox (Debian package busybox-static).
const Busybox = "/bin/busybox"

// DockerClient returns the docker client of Debian's docker.io package,
// unpacked (apt-get download, dpkg-deb -x: nothing installed, no daemon on
// the host) once per package version into $FIRERUNNER_CACHE/docker-client.
func DockerClient(ctx context.Context) (string, error) {
	cache := os.Getenv("FIRERUNNER_CACHE")
	if cache == "" {
		cache = "/var/cache/firerunner"
	}
	v, err := exec.CommandContext(ctx, "apt-cache", "show", "--no-all-versions", "docker.io").Output()
	if err != nil {
		return "", fmt.Errorf("apt-cache show docker.io: %w (apt-get update?)", err)
	}
	version := ""
	for _, l := range strings.Split(string(v), "\n") {
		if x, ok := strings.CutPrefix(l, "Version: "); ok {
			version = strings.TrimSpace(x)
			break
		}
	}
	if version == "" {
		return "", errors.New("apt-cache show docker.io: no version")
	}
	dir := filepath.Join(cache, "docker-client", strings.NewReplacer(":", "_", "/", "_").Replace(version))
	bin := filepath.Join(dir, "docker")
	if _, err := os.Stat(bin); err == nil {
		return bin, nil
	}
	if err := os.MkdirAll(filepath.Dir(dir), 0o755); err != nil {
		return "", err
	}
	tmp, err := os.MkdirTemp(filepath.Dir(dir), ".dl-")
	if err != nil {
		return "", err
	}
	defer os.RemoveAll(tmp)
	dl := exec.CommandContext(ctx, "apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", "docker.io="+version)
	dl.Dir = tmp
	if out, err := dl.CombinedOutput(); err != nil {
		return "", fmt.Errorf("apt-get download docker.io: %w: %s", err, out)
	}
	debs, _ := filepath.Glob(filepath.Join(tmp, "docker.io_*.deb"))
	if len(debs) != 1 {
		return "", fmt.Errorf("apt-get download docker.io: got %v", debs)
	}
	if out, err := exec.CommandContext(ctx, "dpkg-deb", "-x", debs[0], filepath.Join(tmp, "x")).CombinedOutput(); err != nil {
		return "", fmt.Errorf("dpkg-deb -x: %w: %s", err, out)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", err
	}
	if err := os.Rename(filepath.Join(tmp, "x/usr/bin/docker"), bin+".tmp"); err != nil {
		return "", err
	}
	return bin, os.Rename(bin+".tmp", bin)
}

// Test images, by their Docker Hub names: the guest's dockerd asks its
// mirror for docker.io/<name>, so the mirror's upstream must hold them under
// these repository names (library/ for official images).
const (
	// ImageBusybox is a busybox root ("image: busybox:latest").
	ImageBusybox = "busybox:latest"
	// ImageWeb serves WebPage on port 80 (busybox httpd): a service.
	ImageWeb = "frtest/web:1"
	// ImageDockerCLI is busybox plus the host's docker client (with its
	// libraries): a job image that uses the VM's Docker daemon.
	ImageDockerCLI = "frtest/docker-cli:1"
	// ImageShell is busybox plus git: the runner's default image in the
	// tests and the demo, so shell-style jobs (no image:) run unchanged.
	ImageShell = "frtest/shell:1"
)

// Git is the host's git (Debian package git) and its HTTP transport.
var Git = []string{"/usr/bin/git", "/usr/lib/git-core/git-remote-http", "/usr/lib/git-core/git-remote-https", "/etc/ssl/certs/ca-certificates.crt"}

// WebPage is what ImageWeb serves at /.
const WebPage = "hello from the web service\n"

// RepoPath is a Docker Hub name's repository path in a registry
// ("busybox:latest" -> "library/busybox:latest").
func RepoPath(name string) string {
	if !strings.Contains(strings.SplitN(name, ":", 2)[0], "/") {
		return "library/" + name
	}
	return name
}

// BuildImages writes the test images as `docker save` archives into dir and
// returns them by name (ImageBusybox, ImageWeb, ImageDockerCLI). Nothing is
// downloaded: busybox-static and the host's docker client are the sources.
func BuildImages(dir string) (map[string]string, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	out := map[string]string{}
	build := func(name string, cc image.ContainerConfig, fill func(root string) error) error {
		root, err := os.MkdirTemp(dir, "root-")
		if err != nil {
			return err
		}
		defer os.RemoveAll(root)
		if err := busyboxRoot(root); err != nil {
			return err
		}
		if fill != nil {
			if err := fill(root); err != nil {
				return err
			}
		}
		archive := filepath.Join(dir, strings.NewReplacer("/", "_", ":", "_").Replace(name)+".tar")
		if err := image.WriteDockerArchive(archive, root, "docker.io/"+RepoPath(name), cc); err != nil {
			return fmt.Errorf("image %s: %w", name, err)
		}
		out[name] = archive
		return nil
	}
	if err := build(ImageBusybox, image.ContainerConfig{Cmd: []string{"sh"}}, nil); err != nil {
		return nil, err
	}
	web := image.ContainerConfig{
		Entrypoint:   []string{"/bin/httpd", "-f", "-v", "-p", "80", "-h", "/www"},
		ExposedPorts: map[string]struct{}{"80/tcp": {}},
	}
	if err := build(ImageWeb, web, func(root string) error {
		if err := os.MkdirAll(filepath.Join(root, "www"), 0o755); err != nil {
			return err
		}
		return os.WriteFile(filepath.Join(root, "www/index.html"), []byte(WebPage), 0o644)
	}); err != nil {
		return nil, err
	}
	if err := build(ImageDockerCLI, image.ContainerConfig{Cmd: []string{"sh"}}, func(root string) error {
		client, err := DockerClient(context.Background())
		if err != nil {
			return err
		}
		b, err := os.ReadFile(client)
		if err != nil {
			return err
		}
		if err := os.WriteFile(filepath.Join(root, "usr/bin/docker"), b, 0o755); err != nil {
			return err
		}
		return image.CopyLibsOf("/", root, client)
	}); err != nil {
		return nil, err
	}
	if err := build(ImageShell, image.ContainerConfig{Cmd: []string{"sh"}}, func(root string) error {
		return image.CopyWithLibs("/", root, Git...)
	}); err != nil {
		return nil, err
	}
	return out, nil
}

// busyboxRoot makes a minimal root: busybox with its applets in /bin (the
// merged-/usr layout), /etc basics, /tmp.
func busyboxRoot(root string) error {
	for _, d := range []string{"usr/bin", "etc", "tmp", "root"} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
			return err
		}
	}
	if err := os.Chmod(filepath.Join(root, "tmp"), 0o777|os.ModeSticky); err != nil {
		return err
	}
	for _, l := range []string{"bin", "sbin"} {
		if err := os.Symlink("usr/bin", filepath.Join(root, l)); err != nil {
			return err
		}
	}
	b, err := os.ReadFile(Busybox)
	if err != nil {
		return fmt.Errorf("busybox-static: %w", err)
	}
	if err := os.WriteFile(filepath.Join(root, "usr/bin/busybox"), b, 0o755); err != nil {
		return err
	}
	list, err := exec.CommandContext(context.Background(), Busybox, "--list").Output()
	if err != nil {
		return fmt.Errorf("busybox --list: %w", err)
	}
	for _, a := range strings.Fields(string(list)) {
		if a == "busybox" {
			continue
		}
		if err := os.Symlink("busybox", filepath.Join(root, "usr/bin", a)); err != nil && !os.IsExist(err) {
			return err
		}
	}
	for name, content := range map[string]string{
		"etc/passwd":        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
		"etc/group":         "root:x:0:\nnogroup:x:65534:\n",
		"etc/nsswitch.conf": "hosts: files dns\n",
	} {
		if err := os.WriteFile(filepath.Join(root, name), []byte(content), 0o644); err != nil {
			return err
		}
	}
	return nil
}

// Mirror is the test setup of a Docker Hub stand-in and a pull-through
// cache in front of it: Upstream holds the test images under their Docker
// Hub repository names; Mirror is a real docker-registry in proxy mode
// whose remote is Upstream (what install.sh --registry-mirror configures
// with Docker Hub as the remote).
type Mirror struct {
	Upstream, Mirror *Registry
	Images           map[string]string // name -> archive
}

// StartMirror builds the test images, starts both registries under dir and
// pushes the images to the upstream. mirrorPort 0 picks a free port.
func StartMirror(ctx context.Context, dir string, mirrorPort int) (*Mirror, error) {
	if err := Check(); err != nil {
		return nil, err
	}
	imgs, err := BuildImages(filepath.Join(dir, "images"))
	if err != nil {
		return nil, err
	}
	up, err := Start(ctx, filepath.Join(dir, "upstream"), 0, "")
	if err != nil {
		return nil, err
	}
	for name, archive := range imgs {
		if err := up.Push(ctx, archive, RepoPath(name)); err != nil {
			up.Close()
			return nil, err
		}
	}
	mr, err := Start(ctx, filepath.Join(dir, "mirror"), mirrorPort, "http://"+up.Addr)
	if err != nil {
		up.Close()
		return nil, err
	}
	return &Mirror{Upstream: up, Mirror: mr, Images: imgs}, nil
}

// Close stops both registries.
func (m *Mirror) Close() {
	m.Mirror.Close()
	m.Upstream.Close()
}
