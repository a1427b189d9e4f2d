// Package image builds the FireRunner guest image (Debian kernel, busybox
// initramfs, ext4 rootfs) into a cached, versioned directory with a manifest.
package image

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"

	"github.com/firerunner/firerunner/internal/vm"
)

// Cache layout ($FIRERUNNER_CACHE/images):
//
//	<input-hash>/{vmlinux,bzImage,initrd.img,rootfs.ext4,manifest.json}  one image (read-only use)
//	latest -> <input-hash>                                               the last image built
//	work/kernel-<pkg>_<ver>/    unpacked kernel deb + depmod, bzImage, vmlinux
//	work/busybox-<ver>/         busybox from busybox-static
//	work/rootfs-<key>/tree      debootstrap tree (the slow part, reused)
//	work/rootfs-<key>.ext4, work/initrd-<key>.img  artefacts hard-linked into images
//
// The guest agent lives in the initramfs (init copies it into the overlay),
// so changing the agent rebuilds only the initramfs (seconds), never the rootfs.

// ManifestFile is the manifest's name inside an image directory.
const ManifestFile = "manifest.json"

// Artefact names (keys of Manifest.Artifacts); the file names are the same.
const (
	ArtVMLinux = "vmlinux"     // ELF kernel extracted from the bzImage
	ArtBzImage = "bzImage"     // the Debian vmlinuz as shipped
	ArtInitrd  = "initrd.img"  // busybox + modules + agent, newc cpio, zstd
	ArtRootfs  = "rootfs.ext4" // read-only root, label RootLabel
)

// RootLabel is the ext4 label the initramfs looks for.
const RootLabel = "frroot"

// Manifest describes one built image: what went in and what came out.
type Manifest struct {
	Format    int    `json:"format"`
	Builder   string `json:"builder"`
	InputHash string `json:"input_hash"`
	Created   string `json:"created"`
	// Inputs are everything the input hash covers.
	Inputs Inputs `json:"inputs"`
	// Packages are the Debian package versions in the rootfs.
	Packages map[string]string `json:"packages"`
	// Artifacts maps artefact name to file and checksum.
	Artifacts map[string]Artifact `json:"artifacts"`
	// Cmdline is the non-secret kernel command line the image expects; drivers
	// add reboot= (k for Firecracker, t for QEMU) and tsc_early_khz= under TCG.
	Cmdline string `json:"cmdline"`
	// BuildSeconds is how long the build took (0 when nothing was rebuilt).
	BuildSeconds float64 `json:"build_seconds"`

	// Dir is the absolute image directory (set by Load, not stored).
	Dir string `json:"-"`
}

// Inputs are the pinned inputs of a build.
type Inputs struct {
	Suite              string   `json:"suite"`
	Mirror             string   `json:"mirror"`
	RootfsPackages     []string `json:"rootfs_packages"`
	KernelPackage      string   `json:"kernel_package"`
	KernelVersion      string   `json:"kernel_version"`
	KernelRelease      string   `json:"kernel_release"`
	BusyboxVersion     string   `json:"busybox_version"`
	Modules            []string `json:"modules"`
	InitSHA256         string   `json:"init_sha256"`
	AgentSHA256        string   `json:"agent_sha256"`
	GitLabRunnerSHA256 string   `json:"gitlab_runner_sha256,omitempty"`
	HelperSHA256       string   `json:"gitlab_runner_helper_sha256,omitempty"`
	HelperImageSHA256  string   `json:"helper_image_tar_sha256,omitempty"`
	DockerModules      []string `json:"docker_modules"`
	ExtraCASHA256      string   `json:"extra_ca_sha256,omitempty"`
}

// Artifact is one output file.
type Artifact struct {
	File   string `json:"file"`
	Size   int64  `json:"size"`
	SHA256 string `json:"sha256"`
}

// Load reads dir/manifest.json and checks that every artefact file exists.
func Load(dir string) (Manifest, error) {
	var m Manifest
	abs, err := filepath.Abs(dir)
	if err != nil {
		return m, err
	}
	if r, err := filepath.EvalSymlinks(abs); err == nil {
		abs = r
	}
	b, err := os.ReadFile(filepath.Join(abs, ManifestFile))
	if err != nil {
		return m, fmt.Errorf("image %s: %w (run `firerunner image build`)", dir, err)
	}
	if err := json.Unmarshal(b, &m); err != nil {
		return m, fmt.Errorf("image %s: bad manifest: %w", dir, err)
	}
	if m.Format != manifestFormat {
		return m, fmt.Errorf("image %s: manifest format %d, want %d (rebuild the image)", dir, m.Format, manifestFormat)
	}
	m.Dir = abs
	for _, name := range []string{ArtVMLinux, ArtInitrd, ArtRootfs} {
		a, ok := m.Artifacts[name]
		if !ok {
			return m, fmt.Errorf("image %s: manifest lacks %s", dir, name)
		}
		if _, err := os.Stat(filepath.Join(abs, a.File)); err != nil {
			return m, fmt.Errorf("image %s: %w", dir, err)
		}
	}
	return m, nil
}

// VMImage returns the absolute artefact paths the drivers boot.
func (m Manifest) VMImage() vm.Image {
	img := vm.Image{
		Kernel: filepath.Join(m.Dir, m.Artifacts[ArtVMLinux].File),
		Initrd: filepath.Join(m.Dir, m.Artifacts[ArtInitrd].File),
		Rootfs: filepath.Join(m.Dir, m.Artifacts[ArtRootfs].File),
	}
	if a, ok := m.Artifacts[ArtDockerSeed]; ok {
		img.DockerSeed = filepath.Join(m.Dir, a.File)
	}
	return img
}

// HasDocker reports whether the image was built with the Docker engine
// (runners.executor docker needs it); images of builder 1 were not.
func (m Manifest) HasDocker() bool { return len(m.Inputs.DockerModules) > 0 }

// BzImage returns the absolute path of the compressed kernel.
func (m Manifest) BzImage() string {
	return filepath.Join(m.Dir, m.Artifacts[ArtBzImage].File)
}

// Verify loads the image in dir and checks every artefact's size and sha256.
func Verify(dir string) error {
	m, err := Load(dir)
	if err != nil {
		return err
	}
	var errs []error
	names := make([]string, 0, len(m.Artifacts))
	for n := range m.Artifacts {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		a := m.Artifacts[n]
		sum, size, err := fileSHA256(filepath.Join(m.Dir, a.File))
		switch {
		case err != nil:
			errs = append(errs, fmt.Errorf("%s: %w", n, err))
		case size != a.Size || sum != a.SHA256:
			errs = append(errs, fmt.Errorf("%s: checksum mismatch (size %d sha256 %s, manifest says %d %s)", n, size, sum, a.Size, a.SHA256))
		}
	}
	return errors.Join(errs...)
}

func fileSHA256(path string) (string, int64, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", 0, err
	}
	defer f.Close()
	h := sha256.New()
	n, err := io.Copy(h, f)
	if err != nil {
		return "", 0, err
	}
	return hex.EncodeToString(h.Sum(nil)), n, nil
}

func artifact(dir, name string) (Artifact, error) {
	sum, size, err := fileSHA256(filepath.Join(dir, name))
	return Artifact{File: name, Size: size, SHA256: sum}, err
}
