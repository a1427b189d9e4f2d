package vm

import (
	"context"
	"encoding/binary"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/firerunner/firerunner/internal/guestconfig"
)

func ext4Label(t *testing.T, path string) string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sb := make([]byte, 1024)
	if _, err := f.ReadAt(sb, 1024); err != nil {
		t.Fatal(err)
	}
	if binary.LittleEndian.Uint16(sb[0x38:]) != 0xEF53 {
		t.Fatalf("%s: no ext4 superblock", path)
	}
	return strings.TrimRight(string(sb[0x78:0x88]), "\x00")
}

// A scratch disk is a sparse ext4 of the asked size with the label the
// guest looks for; from a seed it is the seed's file system grown to size,
// seed files included; an existing file is never overwritten.
func TestCreateScratchDisk(t *testing.T) {
	if _, err := exec.LookPath("mkfs.ext4"); err != nil {
		t.Skip("no mkfs.ext4 (e2fsprogs)")
	}
	dir := t.TempDir()
	ctx := context.Background()
	p := filepath.Join(dir, ScratchDisk)
	const size = 8 << 30
	if err := CreateScratchDisk(ctx, p, size, ""); err != nil {
		t.Fatal(err)
	}
	st, err := os.Stat(p)
	if err != nil {
		t.Fatal(err)
	}
	used := st.Sys().(*syscall.Stat_t).Blocks * 512
	if st.Size() != size || used > 256<<20 || st.Mode().Perm() != 0o600 {
		t.Errorf("scratch disk: size %d (want %d), %d bytes allocated (want sparse), mode %v", st.Size(), int64(size), used, st.Mode())
	}
	if l := ext4Label(t, p); l != guestconfig.ScratchLabel {
		t.Errorf("label %q, want %q", l, guestconfig.ScratchLabel)
	}
	if err := CreateScratchDisk(ctx, p, size, ""); err == nil {
		t.Error("an existing scratch disk was overwritten")
	}
	if err := CreateScratchDisk(ctx, filepath.Join(dir, "small"), 1<<20, ""); err == nil {
		t.Error("a 1 MiB scratch disk was accepted")
	}

	// A seed: a small file system holding a file, grown to size.
	content := t.TempDir()
	if err := os.WriteFile(filepath.Join(content, "seeded"), []byte("from the seed\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	seed := filepath.Join(dir, "seed.ext4")
	if out, err := exec.Command("mkfs.ext4", "-q", "-F", "-b", "4096", "-L", guestconfig.ScratchLabel, "-d", content, seed, "64M").CombinedOutput(); err != nil {
		t.Fatalf("mkfs seed: %v: %s", err, out)
	}
	if out, err := exec.Command("e2fsck", "-f", "-y", seed).CombinedOutput(); err != nil {
		t.Fatalf("e2fsck seed: %v: %s", err, out)
	}
	q := filepath.Join(dir, "from-seed.img")
	if err := CreateScratchDisk(ctx, q, size, seed); err != nil {
		t.Fatal(err)
	}
	if st, err := os.Stat(q); err != nil || st.Size() != size || st.Mode().Perm() != 0o600 {
		t.Fatalf("seeded scratch disk: %v %v", st, err)
	}
	out, err := exec.Command("dumpe2fs", "-h", q).Output()
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(out), "Block count:              2097152") {
		t.Errorf("seeded disk not grown to 8 GiB:\n%s", out)
	}
	cat, err := exec.Command("debugfs", "-R", "cat /seeded", q).Output()
	if err != nil || string(cat) != "from the seed\n" {
		t.Errorf("seeded disk lacks the seed's file: %q %v", cat, err)
	}
	if out, err := exec.Command("e2fsck", "-f", "-n", q).CombinedOutput(); err != nil {
		t.Errorf("seeded disk does not check clean: %v\n%s", err, out)
	}
}
