package vm

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"strings"

	"github.com/firerunner/firerunner/internal/guestconfig"
)

// ScratchDisk is the per-VM scratch disk's file name in the VM's directory:
// a sparse file (Spec.ScratchDiskBytes) formatted ext4 with the label
// guestconfig.ScratchLabel, attached read-write. The guest keeps Docker's
// data-root on it, so images and containers live on the host's disk, not
// in guest RAM; it goes with the VM's directory when the VM is destroyed.
const ScratchDisk = "scratch.img"

// CreateScratchDisk creates path as a sparse file of size bytes and formats
// it ext4 (no reserved blocks, lazy inode tables: only the metadata is
// written, a few MiB whatever the size). With a seed (the image's Docker
// seed, an ext4 of the same label) it is a sparse copy of the seed grown
// to size instead. It refuses an existing file.
func CreateScratchDisk(ctx context.Context, path string, size int64, seed string) error {
	if size < 64<<20 {
		return fmt.Errorf("scratch disk of %d bytes: at least 64 MiB", size)
	}
	if seed != "" {
		if st, err := os.Stat(seed); err == nil && st.Size() < size {
			return scratchFromSeed(ctx, path, size, seed)
		}
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	if err := f.Truncate(size); err != nil {
		f.Close()
		os.Remove(path)
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	out, err := exec.CommandContext(ctx, "mkfs.ext4", "-q", "-F", "-L", guestconfig.ScratchLabel, "-m", "0",
		"-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard", path).CombinedOutput()
	if err != nil {
		os.Remove(path)
		return fmt.Errorf("mkfs.ext4 scratch disk: %w: %s", err, strings.TrimSpace(string(out)))
	}
	return nil
}

func scratchFromSeed(ctx context.Context, path string, size int64, seed string) error {
	if _, err := os.Lstat(path); err == nil {
		return fmt.Errorf("scratch disk %s: %w", path, os.ErrExist)
	}
	if out, err := exec.CommandContext(ctx, "cp", "--sparse=always", "--reflink=auto", seed, path).CombinedOutput(); err != nil {
		os.Remove(path)
		return fmt.Errorf("copy docker seed: %w: %s", err, strings.TrimSpace(string(out)))
	}
	if err := os.Chmod(path, 0o600); err != nil {
		os.Remove(path)
		return err
	}
	if err := os.Truncate(path, size); err != nil {
		os.Remove(path)
		return err
	}
	// The seed was checked when the image was built (e2fsck -f), so -f.
	if out, err := exec.CommandContext(ctx, "resize2fs", "-f", path).CombinedOutput(); err != nil {
		os.Remove(path)
		return fmt.Errorf("resize2fs scratch disk: %w: %s", err, strings.TrimSpace(string(out)))
	}
	return nil
}
