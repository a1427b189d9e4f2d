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
// written, a few MiB whatever the size). It refuses an existing file.
func CreateScratchDisk(ctx context.Context, path string, size int64) error {
	if size < 64<<20 {
		return fmt.Errorf("scratch disk of %d bytes: at least 64 MiB", size)
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
