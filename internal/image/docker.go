package image

import (
	"context"
	"debug/elf"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"strings"

	"github.com/firerunner/firerunner/internal/guestconfig"
)

// DockerPackages are the Debian packages of the guest's Docker engine
// (docker.io pulls in containerd, runc, tini and iptables). debootstrap
// installs them with its fake start-stop-daemon, so no daemon starts on the
// build host.
var DockerPackages = []string{"docker.io", "iptables"}

// DockerModules are the kernel modules dockerd's default setup needs
// (bridge networking with NAT through iptables-nft, the overlay2 storage
// driver). They go into the rootfs, not the initramfs, and the agent loads
// them (with their dependencies, in order) only in VMs that run Docker.
var DockerModules = []string{
	"overlay", "bridge", "veth", "br_netfilter",
	"nf_conntrack", "nf_nat", "nf_tables", "nft_compat", "nft_chain_nat", "nft_masq",
	"xt_addrtype", "xt_conntrack", "xt_MASQUERADE", "xt_nat", "xt_tcpudp", "xt_mark",
}

// dockerSlim are files of the Docker packages a CI VM never runs (debugging
// and containerd's own CLI tools, the v1 shims dockerd 20.10 does not use).
var dockerSlim = []string{
	"usr/bin/ctr", "usr/bin/containerd-stress", "usr/bin/containerd-shim", "usr/bin/containerd-shim-runc-v1",
	"usr/bin/dnet", "usr/sbin/ovrouter", // libnetwork's test tools
}

// dockerRecipe keys the rootfs.ext4 together with its inputs; bump it when
// dockerAssets or dockerSlim change.
const dockerRecipe = "docker/2"

// HelperImageName is the tag of the helper image built from the
// gitlab-runner-helper binary (--gitlab-runner-helper).
const HelperImageName = "firerunner/gitlab-runner-helper:local"

// helperBuildScript is the helper image's gitlab-runner-build, as upstream's.
const helperBuildScript = "#!/bin/bash\numask 0000\nexec /bin/bash\n"

// dockerAssets puts the Docker kernel modules and the preloaded helper
// image into the rootfs tree (guestconfig.DockerAssetsDir).
func (b *builder) dockerAssets(ctx context.Context, in Inputs, tree string) error {
	dir := filepath.Join(tree, strings.TrimPrefix(guestconfig.DockerAssetsDir, "/"))
	os.RemoveAll(dir)
	if err := os.MkdirAll(filepath.Join(dir, "modules"), 0o755); err != nil {
		return err
	}
	for _, p := range dockerSlim {
		os.Remove(filepath.Join(tree, p))
	}
	kdir := filepath.Join(b.work, "kernel-"+in.KernelPackage+"_"+in.KernelVersion)
	mods, err := ModuleClosure(ctx, filepath.Join(kdir, "tree"), in.KernelRelease, DockerModules)
	if err != nil {
		return err
	}
	var order strings.Builder
	for _, m := range mods {
		name := filepath.Base(m)
		if err := copyFile(m, filepath.Join(dir, "modules", name), 0o644); err != nil {
			return err
		}
		order.WriteString(name + "\n")
	}
	if err := os.WriteFile(filepath.Join(dir, "modules", guestconfig.DockerModulesOrder), []byte(order.String()), 0o644); err != nil {
		return err
	}
	b.note("docker modules: %d files", len(mods))
	archive := filepath.Join(dir, guestconfig.HelperImageTar)
	switch {
	case b.o.HelperImageTar != "":
		if err := copyFile(b.o.HelperImageTar, archive, 0o644); err != nil {
			return err
		}
	case b.o.GitLabRunnerHelper != "":
		bb, err := b.busybox(ctx, in.BusyboxVersion)
		if err != nil {
			return err
		}
		stage, err := os.MkdirTemp(b.work, "helper-")
		if err != nil {
			return err
		}
		defer os.RemoveAll(stage)
		if err := HelperRoot(tree, bb, b.o.GitLabRunnerHelper, stage); err != nil {
			return fmt.Errorf("helper image: %w", err)
		}
		if err := WriteDockerArchive(archive, stage, HelperImageName, ContainerConfig{Cmd: []string{"sh"}}); err != nil {
			return fmt.Errorf("helper image: %w", err)
		}
	default:
		return nil
	}
	tag, err := ArchiveRepoTag(archive)
	if err != nil {
		return err
	}
	st, _ := os.Stat(archive)
	b.note("helper image %s: %s", tag, mib(st.Size()))
	return os.WriteFile(filepath.Join(dir, guestconfig.HelperImageNameFile), []byte(tag+"\n"), 0o644)
}

// HelperRoot stages the root filesystem of a gitlab-runner helper image in
// stage: the helper binary and gitlab-runner-build, bash and git (with
// git-remote-http and the shared libraries they load) taken from the
// Debian tree, busybox for sh and the core utilities, and the tree's CA
// bundle.
func HelperRoot(tree, busybox, helper, stage string) error {
	// The merged-/usr symlinks (bin -> usr/bin, ...) as in the tree.
	if err := mergedUsr(tree, stage); err != nil {
		return err
	}
	for _, d := range []string{"usr/bin", "etc/ssl/certs", "tmp", "root", "builds", "cache"} {
		if err := os.MkdirAll(filepath.Join(stage, d), 0o755); err != nil {
			return err
		}
	}
	if err := os.Chmod(filepath.Join(stage, "tmp"), 0o777|os.ModeSticky); err != nil {
		return err
	}
	c := &treeCopier{tree: tree, stage: stage, done: map[string]bool{}}
	for _, p := range []string{"/usr/bin/bash", "/usr/bin/git"} {
		if err := c.copy(p); err != nil {
			return err
		}
	}
	gitCore := "/usr/lib/git-core"
	ents, err := os.ReadDir(filepath.Join(tree, gitCore))
	if err != nil {
		return err
	}
	for _, e := range ents {
		n := e.Name()
		if e.Type()&os.ModeSymlink != 0 || n == "git" || strings.HasPrefix(n, "git-remote-http") ||
			n == "git-sh-setup" || n == "git-sh-i18n" || n == "git-submodule" || n == "git-http-fetch" {
			if err := c.copy(path.Join(gitCore, n)); err != nil {
				return err
			}
		}
	}
	if err := c.copyTree("/usr/share/git-core/templates"); err != nil {
		return err
	}
	if err := c.copy("/etc/ssl/certs/ca-certificates.crt"); err != nil {
		return err
	}
	if err := copyFile(helper, filepath.Join(stage, "usr/bin/gitlab-runner-helper"), 0o755); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(stage, "usr/bin/gitlab-runner-build"), []byte(helperBuildScript), 0o755); err != nil {
		return err
	}
	if err := copyFile(busybox, filepath.Join(stage, "usr/bin/busybox"), 0o755); err != nil {
		return err
	}
	list, err := exec.Command(busybox, "--list").Output()
	if err != nil {
		return fmt.Errorf("busybox --list: %w", err)
	}
	for _, a := range strings.Fields(string(list)) {
		p := filepath.Join(stage, "usr/bin", a)
		if _, err := os.Lstat(p); err == nil {
			continue // bash, git: the real ones
		}
		if err := os.Symlink("busybox", p); err != nil {
			return err
		}
	}
	for name, content := range map[string]string{
		"etc/passwd":        "root:x:0:0:root:/root:/bin/bash\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n",
		"etc/group":         "root:x:0:\nnogroup:x:65534:\n",
		"etc/nsswitch.conf": "passwd: files\ngroup: files\nhosts: files dns\n",
	} {
		if err := os.WriteFile(filepath.Join(stage, name), []byte(content), 0o644); err != nil {
			return err
		}
	}
	return nil
}

// treeCopier copies files of a Debian tree into a stage, following the
// tree's own symlinks (absolute ones resolve inside the tree) and, for ELF
// files, their interpreter and DT_NEEDED libraries.
type treeCopier struct {
	tree, stage string
	done        map[string]bool
}

var libDirs = []string{"/usr/lib/x86_64-linux-gnu", "/lib/x86_64-linux-gnu", "/usr/lib", "/lib", "/usr/lib64", "/lib64"}

// resolve follows symlinks of p (absolute, in the tree) inside the tree.
func (c *treeCopier) resolve(p string) (string, error) {
	for i := 0; i < 40; i++ {
		parts := strings.Split(strings.TrimPrefix(path.Clean(p), "/"), "/")
		cur := "/"
		changed := false
		for j, part := range parts {
			next := path.Join(cur, part)
			fi, err := os.Lstat(filepath.Join(c.tree, next))
			if err != nil {
				return "", err
			}
			if fi.Mode()&os.ModeSymlink != 0 {
				t, err := os.Readlink(filepath.Join(c.tree, next))
				if err != nil {
					return "", err
				}
				if !path.IsAbs(t) {
					t = path.Join(cur, t)
				}
				p = path.Join(append([]string{t}, parts[j+1:]...)...)
				changed = true
				break
			}
			cur = next
		}
		if !changed {
			return cur, nil
		}
	}
	return "", fmt.Errorf("%s: too many symlinks", p)
}

// copy copies the tree's file p (absolute) to the same path in the stage:
// a symlink stays a symlink (and its target is copied), an ELF file brings
// its libraries.
func (c *treeCopier) copy(p string) error {
	if c.done[p] {
		return nil
	}
	c.done[p] = true
	dir, err := c.resolve(path.Dir(p))
	if err != nil {
		return err
	}
	p = path.Join(dir, path.Base(p))
	src := filepath.Join(c.tree, p)
	fi, err := os.Lstat(src)
	if err != nil {
		return err
	}
	dst := filepath.Join(c.stage, p)
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		return err
	}
	if fi.Mode()&os.ModeSymlink != 0 {
		t, err := os.Readlink(src)
		if err != nil {
			return err
		}
		if _, err := os.Lstat(dst); err != nil {
			if err := os.Symlink(t, dst); err != nil {
				return err
			}
		}
		if !path.IsAbs(t) {
			t = path.Join(path.Dir(p), t)
		}
		return c.copy(t)
	}
	if _, err := os.Lstat(dst); err != nil {
		if err := copyFile(src, dst, fi.Mode().Perm()); err != nil {
			return err
		}
	}
	return c.copyELFDeps(src)
}

func (c *treeCopier) copyELFDeps(src string) error {
	f, err := elf.Open(src)
	if err != nil {
		return nil // not ELF: a script or data
	}
	defer f.Close()
	var deps []string
	for _, prog := range f.Progs {
		if prog.Type == elf.PT_INTERP {
			b := make([]byte, prog.Filesz)
			if _, err := prog.ReadAt(b, 0); err == nil {
				deps = append(deps, strings.TrimRight(string(b), "\x00"))
			}
		}
	}
	libs, _ := f.ImportedLibraries()
	for _, l := range libs {
		found := ""
		for _, d := range libDirs {
			if _, err := os.Stat(filepath.Join(c.tree, d, l)); err == nil {
				found = path.Join(d, l)
				break
			}
		}
		if found == "" {
			return fmt.Errorf("%s needs %s, which is not in the tree", src, l)
		}
		deps = append(deps, found)
	}
	for _, d := range deps {
		if err := c.copy(d); err != nil {
			return err
		}
	}
	return nil
}

// copyTree copies a directory of the tree (regular files and symlinks).
func (c *treeCopier) copyTree(dir string) error {
	root := filepath.Join(c.tree, dir)
	return filepath.WalkDir(root, func(p string, d os.DirEntry, err error) error {
		if err != nil {
			if errors.Is(err, os.ErrNotExist) {
				return nil
			}
			return err
		}
		rel, _ := filepath.Rel(c.tree, p)
		if d.IsDir() {
			return os.MkdirAll(filepath.Join(c.stage, rel), 0o755)
		}
		return c.copy("/" + filepath.ToSlash(rel))
	})
}

// CopyWithLibs copies files of a root filesystem tree (e.g. "/" or a
// debootstrap tree) into stage at the same paths, with the shared
// libraries and the interpreter of ELF files, resolving the tree's
// symlinks inside it. stage gets the tree's merged-/usr symlinks.
func CopyWithLibs(tree, stage string, paths ...string) error {
	if err := mergedUsr(tree, stage); err != nil {
		return err
	}
	c := &treeCopier{tree: tree, stage: stage, done: map[string]bool{}}
	for _, p := range paths {
		if err := c.copy(p); err != nil {
			return err
		}
	}
	return nil
}

// CopyLibsOf copies the interpreter and shared libraries an ELF file
// outside the tree needs from the tree into stage (see CopyWithLibs).
func CopyLibsOf(tree, stage, elfFile string) error {
	if err := mergedUsr(tree, stage); err != nil {
		return err
	}
	c := &treeCopier{tree: tree, stage: stage, done: map[string]bool{}}
	return c.copyELFDeps(elfFile)
}

// mergedUsr gives stage the tree's merged-/usr symlinks (bin -> usr/bin,
// lib64 -> usr/lib64, ...) where stage has no such entry yet, so the paths
// ELF files name (/lib64/ld-linux-x86-64.so.2) resolve as in the tree.
func mergedUsr(tree, stage string) error {
	for _, l := range []string{"bin", "sbin", "lib", "lib64"} {
		if t, err := os.Readlink(filepath.Join(tree, l)); err == nil {
			if _, err := os.Lstat(filepath.Join(stage, l)); err == nil {
				continue
			}
			if err := os.MkdirAll(filepath.Join(stage, filepath.Dir(l), t), 0o755); err != nil {
				return err
			}
			if err := os.Symlink(t, filepath.Join(stage, l)); err != nil {
				return err
			}
		}
	}
	return nil
}
