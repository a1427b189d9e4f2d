package image

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	_ "embed"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"
)

//go:embed init.sh
var initScript []byte

const (
	manifestFormat = 1
	// builderVersion changes whenever the recipe changes, so old outputs are
	// never mistaken for new ones.
	builderVersion = "firerunner-image/2"
	// rootfsRecipe keys the cached debootstrap tree; bump it when the tree
	// customisation below changes.
	rootfsRecipe = "rootfs/2"
)

// DefaultCmdline is the non-secret kernel command line the initramfs and agent
// expect; drivers append reboot=t (QEMU) or reboot=k (Firecracker) and, under
// TCG, tsc_early_khz=<host kHz>.
const DefaultCmdline = "console=ttyS0 panic=-1 pci=off quiet"

// CIUser is the unprivileged account that runs gitlab-runner and the job.
const (
	CIUser = "ci"
	CIUID  = 1000
)

// DefaultPackages go into the rootfs on top of debootstrap's minbase
// (which already brings bash, coreutils, tar, gzip, findutils, sed, grep...).
var DefaultPackages = []string{
	"bzip2", "ca-certificates", "curl", "git", "iproute2", "procps", "unzip", "xz-utils",
}

// DefaultModules are the kernel modules the initramfs loads (with their
// dependencies, in load order). The Debian kernel builds these as modules.
var DefaultModules = []string{
	"virtio_mmio", "virtio_blk", "virtio_net", "virtio_rng",
	"vmw_vsock_virtio_transport", "virtio_console", "ext4", "overlay",
}

// Options configure a build. Zero values pick the defaults.
type Options struct {
	// CacheDir holds the outputs ($cache/<hash>/) and the work trees ($cache/work).
	CacheDir string
	// Agent is the static firerunner-agent binary (required).
	Agent string
	// GitLabRunner is the gitlab-runner binary installed as
	// /usr/local/bin/gitlab-runner; required unless NoGitLabRunner.
	GitLabRunner   string
	NoGitLabRunner bool
	// GitLabRunnerHelper is the gitlab-runner-helper binary (upstream
	// apps/gitlab-runner-helper) the docker executor's helper image is
	// built from; HelperImageTar instead preloads a ready `docker save`
	// archive (production: the official helper image of the release).
	// Neither: no preloaded helper image.
	GitLabRunnerHelper string
	HelperImageTar     string
	// ExtraCA is an optional PEM file appended to the system trust store.
	ExtraCA string
	// Suite is the Debian suite (default bookworm); Mirror defaults to the
	// one apt is configured with.
	Suite  string
	Mirror string
	// KernelPackage defaults to what linux-image-amd64 depends on.
	KernelPackage string
	Packages      []string
	Modules       []string
	// Progress receives human-readable progress lines (nil: discard).
	Progress io.Writer
	// SourcesFiles are read to find the mirror (default the system's).
	SourcesFiles []string
}

func (o *Options) defaults() error {
	if o.CacheDir == "" {
		return errors.New("image: cache dir is required")
	}
	if o.Agent == "" {
		return errors.New("image: --agent (the static firerunner-agent binary) is required; run `make agent`")
	}
	if _, err := os.Stat(o.Agent); err != nil {
		return fmt.Errorf("image: agent binary: %w; run `make agent`", err)
	}
	if o.NoGitLabRunner {
		o.GitLabRunner = ""
	} else {
		if o.GitLabRunner == "" {
			return errors.New("image: --gitlab-runner PATH is required (or --no-gitlab-runner for a smoke-test image)")
		}
		if _, err := os.Stat(o.GitLabRunner); err != nil {
			return fmt.Errorf("image: gitlab-runner binary: %w (build it with `make gitlab-runner`, or pass --no-gitlab-runner)", err)
		}
	}
	if o.GitLabRunnerHelper != "" && o.HelperImageTar != "" {
		return errors.New("image: --gitlab-runner-helper and --helper-image-tar exclude each other")
	}
	for _, f := range []string{o.GitLabRunnerHelper, o.HelperImageTar} {
		if f != "" {
			if _, err := os.Stat(f); err != nil {
				return fmt.Errorf("image: helper: %w", err)
			}
		}
	}
	if o.HelperImageTar != "" {
		if _, err := ArchiveRepoTag(o.HelperImageTar); err != nil {
			return fmt.Errorf("image: --helper-image-tar: %w", err)
		}
	}
	if o.ExtraCA != "" {
		b, err := os.ReadFile(o.ExtraCA)
		if err != nil {
			return fmt.Errorf("image: extra CA: %w", err)
		}
		if !bytes.Contains(b, []byte("-----BEGIN CERTIFICATE-----")) {
			return fmt.Errorf("image: extra CA %s holds no PEM certificate", o.ExtraCA)
		}
	}
	if o.Suite == "" {
		o.Suite = "bookworm"
	}
	if o.Mirror == "" {
		if o.SourcesFiles == nil {
			o.SourcesFiles = systemSources()
		}
		m, err := MirrorFromSources(o.SourcesFiles, o.Suite)
		if err != nil {
			return err
		}
		o.Mirror = m
	}
	if len(o.Packages) == 0 {
		o.Packages = append(append([]string{}, DefaultPackages...), DockerPackages...)
	}
	if len(o.Modules) == 0 {
		o.Modules = DefaultModules
	}
	if o.Progress == nil {
		o.Progress = io.Discard
	}
	return nil
}

func systemSources() []string {
	files := []string{"/etc/apt/sources.list"}
	m, _ := filepath.Glob("/etc/apt/sources.list.d/*.sources")
	l, _ := filepath.Glob("/etc/apt/sources.list.d/*.list")
	return append(append(files, m...), l...)
}

// MirrorFromSources finds the Debian archive URI serving suite in apt source
// files (one-line or deb822 format), so the build uses the host's mirror.
func MirrorFromSources(files []string, suite string) (string, error) {
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		if strings.HasSuffix(f, ".sources") {
			for _, stanza := range strings.Split(string(b), "\n\n") {
				fields := map[string]string{}
				for _, line := range strings.Split(stanza, "\n") {
					if k, v, ok := strings.Cut(line, ":"); ok && !strings.HasPrefix(line, "#") && !strings.HasPrefix(line, " ") {
						fields[strings.ToLower(strings.TrimSpace(k))] = strings.TrimSpace(v)
					}
				}
				if !strings.Contains(" "+fields["types"]+" ", " deb ") || !hasWord(fields["suites"], suite) {
					continue
				}
				if uris := strings.Fields(fields["uris"]); len(uris) > 0 {
					return strings.TrimSuffix(uris[0], "/"), nil
				}
			}
			continue
		}
		for _, line := range strings.Split(string(b), "\n") {
			w := strings.Fields(line)
			if len(w) < 3 || w[0] != "deb" {
				continue
			}
			w = w[1:]
			if strings.HasPrefix(w[0], "[") { // [arch=amd64 signed-by=...]
				for len(w) > 0 && !strings.HasSuffix(w[0], "]") {
					w = w[1:]
				}
				if len(w) > 0 {
					w = w[1:]
				}
			}
			if len(w) >= 2 && w[1] == suite {
				return strings.TrimSuffix(w[0], "/"), nil
			}
		}
	}
	return "", fmt.Errorf("image: no apt source for suite %q in %v; pass a mirror explicitly", suite, files)
}

func hasWord(s, w string) bool {
	for _, f := range strings.Fields(s) {
		if f == w {
			return true
		}
	}
	return false
}

// builder carries the state of one Build.
type builder struct {
	o     Options
	work  string
	start time.Time
	step  int
}

const totalSteps = 6

func (b *builder) progress(format string, a ...any) {
	b.step++
	fmt.Fprintf(b.o.Progress, "[%d/%d %5.1fs] %s\n", b.step, totalSteps, time.Since(b.start).Seconds(), fmt.Sprintf(format, a...))
}

func (b *builder) note(format string, a ...any) {
	fmt.Fprintf(b.o.Progress, "        %s\n", fmt.Sprintf(format, a...))
}

// Build builds (or finds, when inputs are unchanged) the image and returns
// its loaded manifest. The output directory is $cache/<input-hash>; the
// $cache/latest symlink points at it.
func Build(ctx context.Context, o Options) (Manifest, error) {
	if err := o.defaults(); err != nil {
		return Manifest{}, err
	}
	b := &builder{o: o, work: filepath.Join(o.CacheDir, "work"), start: time.Now()}
	if err := os.MkdirAll(b.work, 0o755); err != nil {
		return Manifest{}, err
	}
	unlock, err := lockDir(o.CacheDir)
	if err != nil {
		return Manifest{}, err
	}
	defer unlock()
	return b.run(ctx)
}

func lockDir(dir string) (func(), error) {
	f, err := os.OpenFile(filepath.Join(dir, ".lock"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, err
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX); err != nil {
		f.Close()
		return nil, fmt.Errorf("lock %s: %w", dir, err)
	}
	return func() { f.Close() }, nil
}

func (b *builder) run(ctx context.Context) (Manifest, error) {
	o := b.o
	// 1. Resolve and pin the inputs (local apt metadata only).
	in := Inputs{Suite: o.Suite, Mirror: o.Mirror, RootfsPackages: sortedUnique(o.Packages), Modules: o.Modules}
	var err error
	in.KernelPackage = o.KernelPackage
	if err := b.resolveVersions(ctx, &in); err != nil {
		return Manifest{}, err
	}
	in.KernelRelease = strings.TrimSuffix(strings.TrimPrefix(in.KernelPackage, "linux-image-"), "-unsigned")
	in.InitSHA256 = sha256Hex(initScript)
	if in.AgentSHA256, _, err = fileSHA256(o.Agent); err != nil {
		return Manifest{}, err
	}
	if o.GitLabRunner != "" {
		if in.GitLabRunnerSHA256, _, err = fileSHA256(o.GitLabRunner); err != nil {
			return Manifest{}, err
		}
	}
	if o.ExtraCA != "" {
		if in.ExtraCASHA256, _, err = fileSHA256(o.ExtraCA); err != nil {
			return Manifest{}, err
		}
	}
	if o.GitLabRunnerHelper != "" {
		if in.HelperSHA256, _, err = fileSHA256(o.GitLabRunnerHelper); err != nil {
			return Manifest{}, err
		}
	}
	if o.HelperImageTar != "" {
		if in.HelperImageSHA256, _, err = fileSHA256(o.HelperImageTar); err != nil {
			return Manifest{}, err
		}
	}
	in.DockerModules = DockerModules
	hash := hashJSON(builderVersion, DefaultCmdline, in)[:16]
	out := filepath.Join(o.CacheDir, hash)
	b.progress("inputs: kernel %s %s, busybox %s, %s from %s -> %s", in.KernelPackage, in.KernelVersion, in.BusyboxVersion, in.Suite, in.Mirror, out)

	if m, err := Load(out); err == nil {
		b.note("image %s is up to date; nothing to build", hash)
		b.step = totalSteps - 1
		if err := b.linkLatest(hash); err != nil {
			return m, err
		}
		b.progress("done: %s", out)
		return m, nil
	}

	tmp, err := os.MkdirTemp(o.CacheDir, ".build-"+hash+"-")
	if err != nil {
		return Manifest{}, err
	}
	defer os.RemoveAll(tmp)

	// 2. Kernel: bzImage, ELF vmlinux, modules tree with modules.dep.
	kdir, err := b.kernel(ctx, in)
	if err != nil {
		return Manifest{}, fmt.Errorf("kernel: %w", err)
	}
	for _, n := range []string{ArtBzImage, ArtVMLinux} {
		if err := linkOrCopy(filepath.Join(kdir, n), filepath.Join(tmp, n)); err != nil {
			return Manifest{}, err
		}
	}
	// 3. initramfs (cached by its own inputs, so a rootfs change reuses it).
	initrdKey := hashJSON(in.KernelPackage, in.KernelVersion, in.BusyboxVersion, in.Modules, in.InitSHA256, in.AgentSHA256)[:16]
	initrd := filepath.Join(b.work, "initrd-"+initrdKey+".img")
	if _, err := os.Stat(initrd); err == nil {
		b.progress("initramfs %s (cached)", initrdKey)
	} else if err := b.initramfs(ctx, in, kdir, initrd); err != nil {
		return Manifest{}, fmt.Errorf("initramfs: %w", err)
	}
	if err := linkOrCopy(initrd, filepath.Join(tmp, ArtInitrd)); err != nil {
		return Manifest{}, err
	}
	// 4+5. rootfs tree (cached) and its ext4 image (cached by content).
	pkgs, ext4, err := b.rootfs(ctx, in)
	if err != nil {
		return Manifest{}, fmt.Errorf("rootfs: %w", err)
	}
	if err := linkOrCopy(ext4, filepath.Join(tmp, ArtRootfs)); err != nil {
		return Manifest{}, err
	}

	// 6. Manifest, then publish atomically.
	m := Manifest{
		Format: manifestFormat, Builder: builderVersion, InputHash: hash,
		Created: time.Now().UTC().Format(time.RFC3339), Inputs: in, Packages: pkgs,
		Artifacts: map[string]Artifact{}, Cmdline: DefaultCmdline,
	}
	// 5b. The Docker seed: the helper image loaded into a data-root once
	// here rather than in every VM. Best effort: without it VMs load the
	// helper image themselves.
	arts := []string{ArtVMLinux, ArtBzImage, ArtInitrd, ArtRootfs}
	if o.GitLabRunnerHelper != "" || o.HelperImageTar != "" {
		if seed, err := b.dockerSeed(ctx, tmp); err != nil {
			b.note("WARNING: no docker seed (VMs will docker load the helper image at boot): %v", err)
		} else if err := linkOrCopy(seed, filepath.Join(tmp, ArtDockerSeed)); err != nil {
			return Manifest{}, err
		} else {
			arts = append(arts, ArtDockerSeed)
		}
	}
	for _, n := range arts {
		if m.Artifacts[n], err = artifact(tmp, n); err != nil {
			return Manifest{}, err
		}
	}
	m.BuildSeconds = time.Since(b.start).Round(100 * time.Millisecond).Seconds()
	js, _ := json.MarshalIndent(m, "", "  ")
	if err := os.WriteFile(filepath.Join(tmp, ManifestFile), append(js, '\n'), 0o644); err != nil {
		return Manifest{}, err
	}
	if err := os.Chmod(tmp, 0o755); err != nil {
		return Manifest{}, err
	}
	os.RemoveAll(out) // a half-published dir from a crash
	if err := os.Rename(tmp, out); err != nil {
		return Manifest{}, err
	}
	if err := b.linkLatest(hash); err != nil {
		return Manifest{}, err
	}
	b.prune(hash)
	b.progress("done in %.1fs: %s (rootfs %s, initrd %s, vmlinux %s)", time.Since(b.start).Seconds(), out,
		mib(m.Artifacts[ArtRootfs].Size), mib(m.Artifacts[ArtInitrd].Size), mib(m.Artifacts[ArtVMLinux].Size))
	return Load(out)
}

// KeepImages is how many image directories prune keeps (newest first).
const KeepImages = 3

// prune removes all but the newest KeepImages output directories (never
// current) and the cached initrd/ext4 files no remaining image links to.
func (b *builder) prune(current string) {
	ents, _ := os.ReadDir(b.o.CacheDir)
	type img struct {
		name string
		mod  time.Time
	}
	var imgs []img
	for _, e := range ents {
		if !e.IsDir() || len(e.Name()) != 16 || e.Name() == current {
			continue
		}
		if _, err := os.Stat(filepath.Join(b.o.CacheDir, e.Name(), ManifestFile)); err != nil {
			continue
		}
		st, _ := e.Info()
		imgs = append(imgs, img{e.Name(), st.ModTime()})
	}
	sort.Slice(imgs, func(i, j int) bool { return imgs[i].mod.After(imgs[j].mod) })
	for i, im := range imgs {
		if i >= KeepImages-1 {
			b.note("prune old image %s", im.name)
			os.RemoveAll(filepath.Join(b.o.CacheDir, im.name))
		}
	}
	for _, g := range []string{"initrd-*.img", "rootfs-*.ext4", "docker-seed-*.ext4"} {
		m, _ := filepath.Glob(filepath.Join(b.work, g))
		for _, p := range m {
			var st syscall.Stat_t
			if syscall.Stat(p, &st) == nil && st.Nlink == 1 {
				os.Remove(p)
			}
		}
	}
}

func mib(n int64) string { return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20)) }

func (b *builder) linkLatest(hash string) error {
	l := filepath.Join(b.o.CacheDir, "latest")
	tmp := l + ".tmp"
	os.Remove(tmp)
	if err := os.Symlink(hash, tmp); err != nil {
		return err
	}
	return os.Rename(tmp, l)
}

// kernel downloads and unpacks the kernel package once per version.
func (b *builder) kernel(ctx context.Context, in Inputs) (string, error) {
	dir := filepath.Join(b.work, "kernel-"+in.KernelPackage+"_"+in.KernelVersion)
	if done(dir) {
		b.progress("kernel %s %s (cached)", in.KernelPackage, in.KernelVersion)
		return dir, nil
	}
	b.progress("kernel %s %s: download, unpack, depmod, extract vmlinux", in.KernelPackage, in.KernelVersion)
	os.RemoveAll(dir)
	tmp := dir + ".tmp"
	os.RemoveAll(tmp)
	if err := os.MkdirAll(filepath.Join(tmp, "deb"), 0o755); err != nil {
		return "", err
	}
	deb, err := aptDownload(ctx, tmp, in.KernelPackage, in.KernelVersion)
	if err != nil {
		return "", err
	}
	tree := filepath.Join(tmp, "tree")
	if err := run(ctx, "", "dpkg-deb", "-x", deb, tree); err != nil {
		return "", err
	}
	os.Remove(deb)
	if err := run(ctx, "", "depmod", "-b", tree, in.KernelRelease); err != nil {
		return "", err
	}
	bz := filepath.Join(tree, "boot", "vmlinuz-"+in.KernelRelease)
	if err := linkOrCopy(bz, filepath.Join(tmp, ArtBzImage)); err != nil {
		return "", err
	}
	if err := ExtractVMLinux(ctx, bz, filepath.Join(tmp, ArtVMLinux)); err != nil {
		return "", err
	}
	if err := os.Rename(tmp, dir); err != nil {
		return "", err
	}
	return dir, markDone(dir)
}

var xzMagic = []byte{0xFD, '7', 'z', 'X', 'Z', 0x00}

// ExtractVMLinux finds the xz stream inside a bzImage, decompresses it with
// xz and checks the result is an ELF file (what Firecracker and QEMU PVH boot).
func ExtractVMLinux(ctx context.Context, bzImage, out string) error {
	data, err := os.ReadFile(bzImage)
	if err != nil {
		return err
	}
	off := 0
	for {
		i := bytes.Index(data[off:], xzMagic)
		if i < 0 {
			return fmt.Errorf("%s: no decompressible xz stream yielding an ELF kernel", bzImage)
		}
		off += i
		var elf bytes.Buffer
		cmd := exec.CommandContext(ctx, "xz", "-dc", "--single-stream")
		cmd.Stdin = bytes.NewReader(data[off:])
		cmd.Stdout = &elf
		if err := cmd.Run(); err == nil && bytes.HasPrefix(elf.Bytes(), []byte("\x7fELF")) {
			return writeFileAtomic(out, elf.Bytes(), 0o644)
		}
		off++
	}
}

// initramfs writes busybox, the module closure, the agent and /init as a
// zstd-compressed newc cpio, without needing root (cpio --owner=0:0).
func (b *builder) initramfs(ctx context.Context, in Inputs, kdir, out string) error {
	b.progress("initramfs: busybox-static %s, %d modules + deps, agent", in.BusyboxVersion, len(in.Modules))
	bb, err := b.busybox(ctx, in.BusyboxVersion)
	if err != nil {
		return err
	}
	stage, err := os.MkdirTemp(b.work, "initramfs-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(stage)
	for _, d := range []string{"bin", "dev", "proc", "sys", "mnt", "etc", "lib/modules"} {
		if err := os.MkdirAll(filepath.Join(stage, d), 0o755); err != nil {
			return err
		}
	}
	if err := copyFile(bb, filepath.Join(stage, "bin/busybox"), 0o755); err != nil {
		return err
	}
	if err := os.Symlink("busybox", filepath.Join(stage, "bin/sh")); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(stage, "init"), initScript, 0o755); err != nil {
		return err
	}
	if err := copyFile(b.o.Agent, filepath.Join(stage, "firerunner-agent"), 0o755); err != nil {
		return err
	}
	mods, err := ModuleClosure(ctx, filepath.Join(kdir, "tree"), in.KernelRelease, in.Modules)
	if err != nil {
		return err
	}
	var order bytes.Buffer
	for _, m := range mods {
		name := filepath.Base(m)
		if err := copyFile(m, filepath.Join(stage, "lib/modules", name), 0o644); err != nil {
			return err
		}
		fmt.Fprintln(&order, name)
	}
	if err := os.WriteFile(filepath.Join(stage, "etc/modules.order"), order.Bytes(), 0o644); err != nil {
		return err
	}
	b.note("modules: %s", strings.TrimSpace(strings.ReplaceAll(order.String(), "\n", " ")))
	if err := writeCpio(ctx, stage, out+".tmp"); err != nil {
		os.Remove(out + ".tmp")
		return err
	}
	return os.Rename(out+".tmp", out)
}

func writeCpio(ctx context.Context, stage, out string) error {
	f, err := os.OpenFile(out, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o644)
	if err != nil {
		return err
	}
	defer f.Close()
	// Fixed mtimes make the initramfs bit-for-bit reproducible.
	script := `set -o pipefail; find . -exec touch -h -d @0 {} +; find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc --owner=0:0 --reproducible | zstd -q -15 -T0`
	cmd := exec.CommandContext(ctx, "bash", "-c", script)
	cmd.Dir = stage
	cmd.Stdout = f
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("cpio: %w: %s", err, strings.TrimSpace(stderr.String()))
	}
	return f.Close()
}

func (b *builder) busybox(ctx context.Context, version string) (string, error) {
	dir := filepath.Join(b.work, "busybox-"+version)
	bin := filepath.Join(dir, "busybox")
	if done(dir) {
		return bin, nil
	}
	os.RemoveAll(dir)
	tmp := dir + ".tmp"
	os.RemoveAll(tmp)
	if err := os.MkdirAll(tmp, 0o755); err != nil {
		return "", err
	}
	deb, err := aptDownload(ctx, tmp, "busybox-static", version)
	if err != nil {
		return "", err
	}
	if err := run(ctx, "", "dpkg-deb", "-x", deb, filepath.Join(tmp, "x")); err != nil {
		return "", err
	}
	if err := os.Rename(filepath.Join(tmp, "x", "bin", "busybox"), filepath.Join(tmp, "busybox")); err != nil {
		return "", err
	}
	os.RemoveAll(filepath.Join(tmp, "x"))
	os.Remove(deb)
	if err := os.Rename(tmp, dir); err != nil {
		return "", err
	}
	return bin, markDone(dir)
}

// ModuleClosure lists the module files needed for mods (dependencies first,
// each once) using modprobe's own resolver over the unpacked kernel tree.
// Built-in modules yield nothing.
func ModuleClosure(ctx context.Context, root, release string, mods []string) ([]string, error) {
	seen := map[string]bool{}
	var files []string
	for _, m := range mods {
		cmd := exec.CommandContext(ctx, "modprobe", "-d", root, "-S", release, "--show-depends", m)
		outb, err := cmd.CombinedOutput()
		if err != nil {
			return nil, fmt.Errorf("modprobe --show-depends %s: %w: %s", m, err, strings.TrimSpace(string(outb)))
		}
		sc := bufio.NewScanner(bytes.NewReader(outb))
		for sc.Scan() {
			w := strings.Fields(sc.Text())
			if len(w) < 2 || w[0] != "insmod" || seen[w[1]] {
				continue // "builtin X" lines need nothing
			}
			seen[w[1]] = true
			files = append(files, w[1])
		}
	}
	return files, nil
}

// rootfs returns the rootfs package versions and the path of the ext4 image.
func (b *builder) rootfs(ctx context.Context, in Inputs) (map[string]string, string, error) {
	treeKey := hashJSON(rootfsRecipe, in.Suite, in.Mirror, in.RootfsPackages)[:16]
	base := filepath.Join(b.work, "rootfs-"+treeKey)
	tree := filepath.Join(base, "tree")
	if done(base) {
		b.progress("rootfs tree %s (cached)", treeKey)
	} else {
		b.progress("rootfs tree: debootstrap --variant=minbase %s + %s (slow, cached afterwards)", in.Suite, strings.Join(in.RootfsPackages, ","))
		if err := b.debootstrap(ctx, in, base, tree); err != nil {
			return nil, "", err
		}
	}
	pkgs, err := readPackages(filepath.Join(base, "packages.json"))
	if err != nil {
		return nil, "", err
	}
	ext4Key := hashJSON(treeKey, dockerRecipe, in.GitLabRunnerSHA256, in.ExtraCASHA256, in.HelperSHA256, in.HelperImageSHA256,
		in.DockerModules, in.KernelPackage, in.KernelVersion, in.BusyboxVersion)[:16]
	ext4 := filepath.Join(b.work, "rootfs-"+ext4Key+".ext4")
	if _, err := os.Stat(ext4); err == nil {
		b.progress("rootfs.ext4 %s (cached)", ext4Key)
		return pkgs, ext4, nil
	}
	b.progress("rootfs.ext4: install gitlab-runner/CA, Docker modules and helper image, mkfs.ext4 -d")
	if err := b.customise(base, tree); err != nil {
		return nil, "", err
	}
	if err := b.dockerAssets(ctx, in, tree); err != nil {
		return nil, "", fmt.Errorf("docker assets: %w", err)
	}
	if err := mkfsExt4(ctx, tree, ext4); err != nil {
		return nil, "", err
	}
	return pkgs, ext4, nil
}

func (b *builder) debootstrap(ctx context.Context, in Inputs, base, tree string) error {
	os.RemoveAll(base)
	if err := os.MkdirAll(base, 0o755); err != nil {
		return err
	}
	args := []string{"--variant=minbase", "--include=" + strings.Join(in.RootfsPackages, ","), in.Suite, tree, in.Mirror}
	if err := runLogged(ctx, filepath.Join(base, "debootstrap.log"), "debootstrap", args...); err != nil {
		return fmt.Errorf("debootstrap (log in %s): %w", filepath.Join(base, "debootstrap.log"), err)
	}
	// Package versions for the manifest.
	q := exec.CommandContext(ctx, "dpkg-query", "--admindir="+filepath.Join(tree, "var/lib/dpkg"), "-W", "-f", "${Package}\t${Version}\n")
	outb, err := q.Output()
	if err != nil {
		return fmt.Errorf("dpkg-query: %w", err)
	}
	pkgs := map[string]string{}
	for _, l := range strings.Split(strings.TrimSpace(string(outb)), "\n") {
		if p, v, ok := strings.Cut(l, "\t"); ok {
			pkgs[p] = v
		}
	}
	js, _ := json.MarshalIndent(pkgs, "", " ")
	if err := os.WriteFile(filepath.Join(base, "packages.json"), js, 0o644); err != nil {
		return err
	}
	if err := slim(tree); err != nil {
		return err
	}
	if err := addCIUser(tree); err != nil {
		return err
	}
	// Keep the pristine CA bundle so extra CAs are applied afresh each time.
	if err := copyFile(filepath.Join(tree, "etc/ssl/certs/ca-certificates.crt"), filepath.Join(base, "ca-certificates.crt"), 0o644); err != nil {
		return err
	}
	return markDone(base)
}

// slim drops what a CI VM never reads: docs, man pages, locales, apt lists
// and caches, logs.
func slim(tree string) error {
	for _, g := range []string{
		"usr/share/doc/*", "usr/share/man/*", "usr/share/info/*", "usr/share/locale/*",
		"usr/share/lintian/*", "var/lib/apt/lists/*", "var/cache/apt/*", "var/cache/debconf/*-old",
		"var/log/*.log", "var/log/apt/*", "var/lib/dpkg/*-old",
	} {
		m, _ := filepath.Glob(filepath.Join(tree, g))
		for _, p := range m {
			if err := os.RemoveAll(p); err != nil {
				return err
			}
		}
	}
	// The VM's resolv.conf, hostname and hosts are written by the agent.
	for _, f := range []string{"etc/resolv.conf", "etc/hostname"} {
		os.Remove(filepath.Join(tree, f))
	}
	return nil
}

// addCIUser adds the unprivileged CI account without chroot tricks.
func addCIUser(tree string) error {
	add := func(file, line, prefix string) error {
		p := filepath.Join(tree, file)
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		if bytes.Contains(b, []byte("\n"+prefix)) || bytes.HasPrefix(b, []byte(prefix)) {
			return nil
		}
		st, _ := os.Stat(p)
		return os.WriteFile(p, append(b, []byte(line+"\n")...), st.Mode().Perm())
	}
	id := strconv.Itoa(CIUID)
	for _, e := range [][3]string{
		{"etc/passwd", CIUser + ":x:" + id + ":" + id + ":FireRunner CI:/home/" + CIUser + ":/bin/bash", CIUser + ":"},
		{"etc/group", CIUser + ":x:" + id + ":", CIUser + ":"},
		{"etc/shadow", CIUser + ":!:19000:0:99999:7:::", CIUser + ":"},
		{"etc/gshadow", CIUser + ":!::", CIUser + ":"},
	} {
		if err := add(e[0], e[1], e[2]); err != nil {
			return err
		}
	}
	home := filepath.Join(tree, "home", CIUser)
	for _, d := range []string{home, filepath.Join(home, "builds"), filepath.Join(home, "cache")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return err
		}
		if err := os.Chown(d, CIUID, CIUID); err != nil {
			return err
		}
	}
	return nil
}

// customise (re)applies the per-build files on the cached tree.
func (b *builder) customise(base, tree string) error {
	grb := filepath.Join(tree, "usr/local/bin/gitlab-runner")
	os.Remove(grb)
	if b.o.GitLabRunner != "" {
		// 0711 root: the CI user can run it but not read it, which makes the
		// running gitlab-runner non-dumpable, so the job (same uid) cannot read
		// its memory, fds or environ (see internal/agent).
		if err := copyFile(b.o.GitLabRunner, grb, 0o711); err != nil {
			return err
		}
	}
	extra := filepath.Join(tree, "usr/local/share/ca-certificates/firerunner-extra.crt")
	os.Remove(extra)
	bundle, err := os.ReadFile(filepath.Join(base, "ca-certificates.crt"))
	if err != nil {
		return err
	}
	if b.o.ExtraCA != "" {
		pem, err := os.ReadFile(b.o.ExtraCA)
		if err != nil {
			return err
		}
		if err := os.WriteFile(extra, pem, 0o644); err != nil {
			return err
		}
		bundle = append(append(bundle, '\n'), pem...)
	}
	return os.WriteFile(filepath.Join(tree, "etc/ssl/certs/ca-certificates.crt"), bundle, 0o644)
}

// mkfsExt4 makes a read-only-use ext4 (no journal, no reserved blocks) from
// the tree without mounting anything.
func mkfsExt4(ctx context.Context, tree, out string) error {
	used, err := duBytes(tree)
	if err != nil {
		return err
	}
	sizeMiB := used*12/10/(1<<20) + 64
	tmp := out + ".tmp"
	os.Remove(tmp)
	if err := run(ctx, "", "mkfs.ext4", "-q", "-F", "-L", RootLabel, "-m", "0", "-i", "8192",
		"-O", "^has_journal", "-E", "lazy_itable_init=0,lazy_journal_init=0", "-d", tree, tmp, fmt.Sprintf("%dM", sizeMiB)); err != nil {
		os.Remove(tmp)
		return err
	}
	if err := os.Chmod(tmp, 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, out)
}

func duBytes(dir string) (int64, error) {
	var n int64
	err := filepath.Walk(dir, func(_ string, fi os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		n += (fi.Size() + 4095) / 4096 * 4096
		return nil
	})
	return n, err
}

func readPackages(path string) (map[string]string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var m map[string]string
	return m, json.Unmarshal(b, &m)
}

// resolveVersions pins the kernel package and the kernel and busybox
// versions apt would fetch. apt-cache takes seconds on a loaded host, so the
// answer is memoised until apt's package lists change.
func (b *builder) resolveVersions(ctx context.Context, in *Inputs) error {
	var stamp []string
	for _, p := range []string{"/var/lib/apt/lists", "/var/cache/apt/pkgcache.bin", "/etc/apt/preferences.d"} {
		if st, err := os.Stat(p); err == nil {
			stamp = append(stamp, fmt.Sprintf("%s:%d:%d", p, st.ModTime().UnixNano(), st.Size()))
		}
	}
	memo := filepath.Join(b.work, "apt-resolve-"+hashJSON(stamp, in.KernelPackage)[:16]+".json")
	if js, err := os.ReadFile(memo); err == nil {
		var r Inputs
		if json.Unmarshal(js, &r) == nil && r.KernelVersion != "" {
			in.KernelPackage, in.KernelVersion, in.BusyboxVersion = r.KernelPackage, r.KernelVersion, r.BusyboxVersion
			return nil
		}
	}
	var err error
	if in.KernelPackage == "" {
		if in.KernelPackage, err = kernelPackage(ctx); err != nil {
			return err
		}
	}
	if in.KernelVersion, err = aptVersion(ctx, in.KernelPackage); err != nil {
		return err
	}
	if in.BusyboxVersion, err = aptVersion(ctx, "busybox-static"); err != nil {
		return err
	}
	js, _ := json.Marshal(Inputs{KernelPackage: in.KernelPackage, KernelVersion: in.KernelVersion, BusyboxVersion: in.BusyboxVersion})
	return writeFileAtomic(memo, js, 0o644)
}

// kernelPackage resolves the linux-image-amd64 metapackage to the concrete
// kernel package apt would install.
func kernelPackage(ctx context.Context) (string, error) {
	outb, err := exec.CommandContext(ctx, "apt-cache", "depends", "linux-image-amd64").Output()
	if err != nil {
		return "", fmt.Errorf("apt-cache depends linux-image-amd64: %w (is apt-get update done?)", err)
	}
	for _, l := range strings.Split(string(outb), "\n") {
		l = strings.TrimSpace(l)
		if p, ok := strings.CutPrefix(l, "Depends: "); ok && strings.HasPrefix(p, "linux-image-") {
			return p, nil
		}
	}
	return "", errors.New("apt-cache: linux-image-amd64 depends on no linux-image-* package")
}

// aptVersion is the candidate version apt would fetch.
func aptVersion(ctx context.Context, pkg string) (string, error) {
	outb, err := exec.CommandContext(ctx, "apt-cache", "show", "--no-all-versions", pkg).Output()
	if err != nil {
		return "", fmt.Errorf("apt-cache show %s: %w (is apt-get update done?)", pkg, err)
	}
	for _, l := range strings.Split(string(outb), "\n") {
		if v, ok := strings.CutPrefix(l, "Version: "); ok {
			return strings.TrimSpace(v), nil
		}
	}
	return "", fmt.Errorf("apt-cache show %s: no Version", pkg)
}

// aptDownload fetches pkg=version into dir and returns the .deb path.
func aptDownload(ctx context.Context, dir, pkg, version string) (string, error) {
	if err := run(ctx, dir, "apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", pkg+"="+version); err != nil {
		return "", err
	}
	m, _ := filepath.Glob(filepath.Join(dir, pkg+"_*.deb"))
	if len(m) != 1 {
		return "", fmt.Errorf("apt-get download %s: expected one .deb, found %v", pkg, m)
	}
	return m[0], nil
}

func run(ctx context.Context, dir, name string, args ...string) error {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Dir = dir
	outb, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, tail(outb, 800))
	}
	return nil
}

func runLogged(ctx context.Context, log, name string, args ...string) error {
	f, err := os.Create(log)
	if err != nil {
		return err
	}
	defer f.Close()
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Stdout, cmd.Stderr = f, f
	if err := cmd.Run(); err != nil {
		b, _ := os.ReadFile(log)
		return fmt.Errorf("%w: %s", err, tail(b, 800))
	}
	return nil
}

func tail(b []byte, n int) string {
	if len(b) > n {
		b = b[len(b)-n:]
	}
	return strings.TrimSpace(string(b))
}

func done(dir string) bool {
	_, err := os.Stat(filepath.Join(dir, ".done"))
	return err == nil
}

func markDone(dir string) error {
	return os.WriteFile(filepath.Join(dir, ".done"), nil, 0o644)
}

func linkOrCopy(src, dst string) error {
	os.Remove(dst)
	if err := os.Link(src, dst); err == nil {
		return nil
	}
	st, err := os.Stat(src)
	if err != nil {
		return err
	}
	return copyFile(src, dst, st.Mode().Perm())
}

func copyFile(src, dst string, mode os.FileMode) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	os.Remove(dst)
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_EXCL|os.O_WRONLY, mode)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	if err := out.Close(); err != nil {
		return err
	}
	return os.Chmod(dst, mode) // umask-proof
}

func writeFileAtomic(path string, b []byte, mode os.FileMode) error {
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, b, mode); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

func sha256Hex(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

func hashJSON(v ...any) string {
	b, err := json.Marshal(v)
	if err != nil {
		panic(err)
	}
	return sha256Hex(b)
}

func sortedUnique(s []string) []string {
	m := map[string]bool{}
	var out []string
	for _, x := range s {
		if !m[x] {
			m[x] = true
			out = append(out, x)
		}
	}
	sort.Strings(out)
	return out
}
