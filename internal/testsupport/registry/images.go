package registry

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"github.com/firerunner/firerunner/internal/image"
)

// Busybox is the static busybox (Debian package busybox-static).
const Busybox = "/bin/busybox"

// DockerClient is the Debian docker.io package's client.
const DockerClient = "/usr/bin/docker"

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
)

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
		if _, err := os.Stat(DockerClient); err != nil {
			return fmt.Errorf("the docker client (Debian package docker.io): %w", err)
		}
		return image.CopyWithLibs("/", root, DockerClient)
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
	if err := os.Chmod(filepath.Join(root, "tmp"), 0o1777); err != nil {
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
