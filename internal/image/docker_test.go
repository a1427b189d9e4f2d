package image

import (
	"archive/tar"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/firerunner/firerunner/internal/testenv"
)

// The helper image from a Debian tree (the host's root here): what the
// docker executor needs (gitlab-runner-helper, gitlab-runner-build, bash,
// git with its HTTP transport, their libraries, sh), as a docker save
// archive whose tag ArchiveRepoTag reads back.
func TestHelperImageArchive(t *testing.T) {
	for _, p := range []string{"/usr/bin/git", "/usr/lib/git-core/git-remote-http", "/bin/busybox", "/usr/bin/bash"} {
		if _, err := os.Stat(p); err != nil {
			testenv.Missing(t, p, "apt-get install git busybox-static, or run make deps")
		}
	}
	dir := t.TempDir()
	helper := filepath.Join(dir, "gitlab-runner-helper")
	if err := os.WriteFile(helper, []byte("#!/bin/sh\necho helper\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	stage := filepath.Join(dir, "stage")
	if err := HelperRoot("/", "/bin/busybox", helper, stage); err != nil {
		t.Fatal(err)
	}
	archive := filepath.Join(dir, "helper.tar")
	if err := WriteDockerArchive(archive, stage, HelperImageName, ContainerConfig{Cmd: []string{"sh"}}); err != nil {
		t.Fatal(err)
	}
	if tag, err := ArchiveRepoTag(archive); err != nil || tag != HelperImageName {
		t.Fatalf("ArchiveRepoTag = %q, %v", tag, err)
	}
	// The layer's entries.
	f, err := os.Open(archive)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	entries := map[string]*tar.Header{}
	tr := tar.NewReader(f)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		if !strings.HasSuffix(h.Name, "/layer.tar") {
			continue
		}
		lr := tar.NewReader(tr)
		for {
			lh, err := lr.Next()
			if err == io.EOF {
				break
			}
			if err != nil {
				t.Fatal(err)
			}
			entries[lh.Name] = lh
		}
	}
	for _, want := range []string{"usr/bin/gitlab-runner-helper", "usr/bin/gitlab-runner-build", "usr/bin/bash", "usr/bin/git",
		"usr/lib/git-core/git-remote-http", "usr/bin/busybox", "etc/ssl/certs/ca-certificates.crt", "etc/passwd"} {
		h, ok := entries[want]
		if !ok || h.Typeflag != tar.TypeReg || h.Uid != 0 || !h.ModTime.Equal(h.ModTime.UTC()) {
			t.Errorf("layer lacks the file %s (%+v)", want, h)
		}
	}
	for link, target := range map[string]string{"usr/bin/sh": "busybox", "bin": "usr/bin", "lib64": "usr/lib64"} {
		if h, ok := entries[link]; !ok || h.Typeflag != tar.TypeSymlink || h.Linkname != target {
			t.Errorf("layer: %s is not a symlink to %s (%+v)", link, target, h)
		}
	}
	var libc bool
	for n := range entries {
		libc = libc || strings.HasPrefix(filepath.Base(n), "libc.so")
	}
	if !libc {
		t.Error("layer lacks libc: bash and git cannot run")
	}
	if h := entries["tmp/"]; h == nil || h.Mode&0o1777 != 0o1777 {
		t.Errorf("tmp is not 1777: %+v", h)
	}
}
