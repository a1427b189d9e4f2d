package image

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/firerunner/firerunner/internal/testenv"
)

func TestMirrorFromSources(t *testing.T) {
	dir := t.TempDir()
	deb822 := filepath.Join(dir, "debian.sources")
	os.WriteFile(deb822, []byte(`Types: deb
# comment: URIs: http://wrong
URIs: http://mirror.example/debian/
Suites: bookworm bookworm-updates
Components: main

Types: deb
URIs: http://security.example/debian-security
Suites: bookworm-security
`), 0o644)
	got, err := MirrorFromSources([]string{filepath.Join(dir, "missing.list"), deb822}, "bookworm")
	if err != nil || got != "http://mirror.example/debian" {
		t.Fatalf("deb822: %q %v", got, err)
	}
	if got, err := MirrorFromSources([]string{deb822}, "bookworm-security"); err != nil || got != "http://security.example/debian-security" {
		t.Fatalf("deb822 security: %q %v", got, err)
	}
	list := filepath.Join(dir, "sources.list")
	os.WriteFile(list, []byte("# deb http://no bookworm main\ndeb-src http://src bookworm main\ndeb [arch=amd64 signed-by=/k.gpg] http://one.example/debian bookworm main\n"), 0o644)
	if got, err := MirrorFromSources([]string{list}, "bookworm"); err != nil || got != "http://one.example/debian" {
		t.Fatalf("one-line: %q %v", got, err)
	}
	if _, err := MirrorFromSources([]string{list}, "trixie"); err == nil {
		t.Fatal("found a mirror for a suite no source serves")
	}
}

// TestExtractVMLinux builds a fake bzImage: a setup header, a decoy xz magic,
// the xz-compressed "kernel" and trailing data, as in a real bzImage.
func TestExtractVMLinux(t *testing.T) {
	testenv.XZ(t)
	dir := t.TempDir()
	elf := append([]byte("\x7fELF\x02\x01\x01"), bytes.Repeat([]byte("kernel"), 1000)...)
	cmd := exec.Command("xz", "-c", "--check=crc32")
	cmd.Stdin = bytes.NewReader(elf)
	xzb, err := cmd.Output()
	if err != nil {
		t.Fatal(err)
	}
	var bz bytes.Buffer
	bz.Write(bytes.Repeat([]byte{0x90}, 512))
	bz.Write(xzMagic) // decoy: not a valid stream
	bz.Write([]byte("garbage"))
	bz.Write(xzb)
	bz.Write(bytes.Repeat([]byte{0xAA}, 100))
	os.WriteFile(filepath.Join(dir, "bz"), bz.Bytes(), 0o644)
	out := filepath.Join(dir, "vmlinux")
	if err := ExtractVMLinux(context.Background(), filepath.Join(dir, "bz"), out); err != nil {
		t.Fatal(err)
	}
	got, _ := os.ReadFile(out)
	if !bytes.Equal(got, elf) {
		t.Fatalf("extracted %d bytes, want the %d-byte ELF", len(got), len(elf))
	}
	// A bzImage whose stream is not an ELF is refused.
	cmd = exec.Command("xz", "-c")
	cmd.Stdin = strings.NewReader("not an elf")
	notELF, _ := cmd.Output()
	os.WriteFile(filepath.Join(dir, "bz2"), append([]byte("hdr"), notELF...), 0o644)
	if err := ExtractVMLinux(context.Background(), filepath.Join(dir, "bz2"), out+"2"); err == nil {
		t.Fatal("accepted a non-ELF payload")
	}
}

func writeFakeImage(t *testing.T) string {
	dir := t.TempDir()
	m := Manifest{Format: manifestFormat, Builder: builderVersion, Artifacts: map[string]Artifact{}}
	for _, n := range []string{ArtVMLinux, ArtBzImage, ArtInitrd, ArtRootfs} {
		os.WriteFile(filepath.Join(dir, n), []byte("content of "+n), 0o644)
		a, err := artifact(dir, n)
		if err != nil {
			t.Fatal(err)
		}
		m.Artifacts[n] = a
	}
	js, _ := json.Marshal(m)
	os.WriteFile(filepath.Join(dir, ManifestFile), js, 0o644)
	return dir
}

func TestLoadVerify(t *testing.T) {
	dir := writeFakeImage(t)
	m, err := Load(dir)
	if err != nil {
		t.Fatal(err)
	}
	img := m.VMImage()
	if img.Kernel != filepath.Join(m.Dir, "vmlinux") || img.Initrd != filepath.Join(m.Dir, "initrd.img") || img.Rootfs != filepath.Join(m.Dir, "rootfs.ext4") {
		t.Fatalf("VMImage = %+v", img)
	}
	if !filepath.IsAbs(img.Kernel) {
		t.Fatal("paths must be absolute")
	}
	if err := Verify(dir); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(dir, ArtInitrd), []byte("content of initrd.imX"), 0o644) // same size
	if err := Verify(dir); err == nil || !strings.Contains(err.Error(), "initrd.img") {
		t.Fatalf("Verify after tampering: %v", err)
	}
	os.Remove(filepath.Join(dir, ArtRootfs))
	if _, err := Load(dir); err == nil {
		t.Fatal("Load accepted a missing rootfs")
	}
	if _, err := Load(t.TempDir()); err == nil {
		t.Fatal("Load accepted a dir without manifest")
	}
}

func TestOptionsRejectMissingInputs(t *testing.T) {
	dir := t.TempDir()
	agent := filepath.Join(dir, "agent")
	os.WriteFile(agent, []byte("x"), 0o755)
	for name, o := range map[string]Options{
		"no cache":         {Agent: agent, NoGitLabRunner: true},
		"no agent":         {CacheDir: dir, NoGitLabRunner: true},
		"missing agent":    {CacheDir: dir, Agent: agent + "x", NoGitLabRunner: true},
		"no runner":        {CacheDir: dir, Agent: agent},
		"missing runner":   {CacheDir: dir, Agent: agent, GitLabRunner: filepath.Join(dir, "nope")},
		"extra CA not PEM": {CacheDir: dir, Agent: agent, NoGitLabRunner: true, ExtraCA: agent},
	} {
		if err := o.defaults(); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	if _, err := Build(context.Background(), Options{CacheDir: dir, Agent: agent}); err == nil ||
		!strings.Contains(err.Error(), "--no-gitlab-runner") {
		t.Fatalf("missing runner error should name the way out: %v", err)
	}
}

func TestInitScriptContract(t *testing.T) {
	s := string(initScript)
	for _, want := range []string{"LABEL=" + RootLabel, "switch_root /mnt/root /sbin/firerunner-agent", "modules.order", "-t overlay", "ro,"} {
		if !strings.Contains(s, want) {
			t.Errorf("init script lacks %q", want)
		}
	}
	if out, err := exec.Command("sh", "-n", "-c", s).CombinedOutput(); err != nil {
		t.Fatalf("init script syntax: %v: %s", err, out)
	}
}

// TestBuiltImage checks a real image from make image ($FIRERUNNER_TEST_IMAGE).
func TestBuiltImage(t *testing.T) {
	dir := testenv.ImageDir(t)
	if err := Verify(dir); err != nil {
		t.Fatal(err)
	}
	m, err := Load(dir)
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(m.VMImage().Kernel)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	hdr := make([]byte, 4)
	if _, err := f.Read(hdr); err != nil || string(hdr) != "\x7fELF" {
		t.Fatalf("vmlinux is not ELF: %q %v", hdr, err)
	}
	if m.Inputs.KernelVersion == "" || m.Packages["git"] == "" || m.Packages["ca-certificates"] == "" {
		t.Fatalf("manifest lacks pinned versions: kernel %q git %q", m.Inputs.KernelVersion, m.Packages["git"])
	}
	if out, err := exec.Command("blkid", "-o", "value", "-s", "LABEL", m.VMImage().Rootfs).Output(); err == nil &&
		strings.TrimSpace(string(out)) != RootLabel {
		t.Fatalf("rootfs label = %q, want %s", out, RootLabel)
	}
}
