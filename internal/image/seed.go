package image

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/firerunner/firerunner/internal/guestconfig"
	"github.com/firerunner/firerunner/internal/vm"
)

// ArtDockerSeed is the optional Docker seed artefact: a small ext4 (label
// guestconfig.ScratchLabel) holding a dockerd data-root with the helper
// image already loaded. Drivers copy it (sparse) as each VM's scratch disk
// and grow it to the configured size, so no VM spends its boot on `docker
// load` (tens of seconds under TCG).
const ArtDockerSeed = "docker-seed.ext4"

// seedRecipe keys the cached seed; bump it when the procedure changes.
const seedRecipe = "docker-seed/1"

// dockerSeed boots the just-built image once (QEMU, TCG) with a scratch
// disk and guestconfig.Config.DockerSeed: the agent starts dockerd, loads
// the helper image, stops dockerd cleanly and powers off. The disk, checked
// and shrunk, is the seed. Cached in work/ by the artefacts it came from.
func (b *builder) dockerSeed(ctx context.Context, dir string) (string, error) {
	var key []string
	for _, n := range []string{ArtVMLinux, ArtInitrd, ArtRootfs} {
		sum, _, err := fileSHA256(filepath.Join(dir, n))
		if err != nil {
			return "", err
		}
		key = append(key, sum)
	}
	out := filepath.Join(b.work, "docker-seed-"+hashJSON(seedRecipe, key)[:16]+".ext4")
	if _, err := os.Stat(out); err == nil {
		b.note("docker seed (cached)")
		return out, nil
	}
	b.note("docker seed: booting the image once to load the helper image into a data-root (about a minute under TCG)")
	start := time.Now()
	tmp, err := os.MkdirTemp(b.work, "seed-")
	if err != nil {
		return "", err
	}
	defer os.RemoveAll(tmp)
	disk := filepath.Join(tmp, "scratch.img")
	if err := vm.CreateScratchDisk(ctx, disk, 1<<30, ""); err != nil {
		return "", err
	}
	cfgPath := filepath.Join(tmp, "config.img")
	gc := guestconfig.Config{Hostname: "firerunner-seed", JobTimeoutSec: 600, Command: []string{"true"},
		UnixTimeNano: time.Now().UnixNano(), DockerSeed: true,
		Docker: &guestconfig.Docker{DefaultImage: "busybox:latest"}}
	if err := guestconfig.WriteDrive(cfgPath, gc); err != nil {
		return "", err
	}
	qemu, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		return "", fmt.Errorf("qemu-system-x86_64 (to boot the image for the docker seed): %w", err)
	}
	cmdline := DefaultCmdline + " reboot=t"
	if khz := tscKHz(); khz > 0 {
		cmdline += " tsc_early_khz=" + strconv.Itoa(khz)
	}
	consolePath := filepath.Join(tmp, "console.log")
	console, err := os.Create(consolePath)
	if err != nil {
		return "", err
	}
	defer console.Close()
	bctx, cancel := context.WithTimeout(ctx, 10*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(bctx, qemu,
		"-M", "microvm,x-option-roms=off,rtc=on", "-accel", "tcg,thread=multi", "-cpu", "max", "-m", "1024", "-smp", "2",
		"-nographic", "-no-reboot", "-no-user-config",
		"-kernel", filepath.Join(dir, ArtVMLinux), "-initrd", filepath.Join(dir, ArtInitrd), "-append", cmdline,
		"-drive", "id=root,file="+filepath.Join(dir, ArtRootfs)+",format=raw,if=none,readonly=on", "-device", "virtio-blk-device,drive=root",
		"-drive", "id=cfg,file="+cfgPath+",format=raw,if=none,readonly=on", "-device", "virtio-blk-device,drive=cfg",
		"-drive", "id=scratch,file="+disk+",format=raw,if=none", "-device", "virtio-blk-device,drive=scratch",
		"-netdev", "user,id=n0,restrict=on", "-device", "virtio-net-device,netdev=n0",
		"-device", "virtio-rng-device")
	cmd.Stdout, cmd.Stderr = console, console
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	runErr := cmd.Run()
	log, _ := os.ReadFile(consolePath)
	if runErr != nil || !bytes.Contains(log, []byte(guestconfig.MarkerDockerSeeded)) {
		return "", fmt.Errorf("docker seed boot: %v; console:\n%s", runErr, tail(log, 2000))
	}
	for _, args := range [][]string{{"e2fsck", "-f", "-y", disk}, {"resize2fs", "-M", disk}} {
		if out, err := exec.CommandContext(ctx, args[0], args[1:]...).CombinedOutput(); err != nil && !(args[0] == "e2fsck" && exitStatus(err) == 1) {
			return "", fmt.Errorf("%s: %w: %s", strings.Join(args, " "), err, out)
		}
	}
	// resize2fs -M leaves the file at its old length: cut it to the file system.
	blocks, bsize, err := ext4Size(ctx, disk)
	if err != nil {
		return "", err
	}
	if err := os.Truncate(disk, blocks*bsize); err != nil {
		return "", err
	}
	if err := os.Chmod(disk, 0o644); err != nil {
		return "", err
	}
	if err := os.Rename(disk, out); err != nil {
		return "", err
	}
	b.note("docker seed: %s in %.0fs", mib(blocks*bsize), time.Since(start).Seconds())
	return out, nil
}

func exitStatus(err error) int {
	if ee, ok := err.(*exec.ExitError); ok {
		return ee.ExitCode()
	}
	return -1
}

// ext4Size reads the block count and block size of an ext4 image.
func ext4Size(ctx context.Context, img string) (int64, int64, error) {
	out, err := exec.CommandContext(ctx, "dumpe2fs", "-h", img).Output()
	if err != nil {
		return 0, 0, fmt.Errorf("dumpe2fs %s: %w", img, err)
	}
	var blocks, bsize int64
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if !ok {
			continue
		}
		n, perr := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
		switch strings.TrimSpace(k) {
		case "Block count":
			blocks, err = n, perr
		case "Block size":
			bsize, err = n, perr
		}
		if err != nil {
			return 0, 0, err
		}
	}
	if blocks == 0 || bsize == 0 {
		return 0, 0, fmt.Errorf("dumpe2fs %s: no block count or size", img)
	}
	return blocks, bsize, nil
}

// tscKHz is the host CPU clock for tsc_early_khz (TCG guests can hang
// in TSC calibration without it); 0 when unknown.
func tscKHz() int {
	b, err := os.ReadFile("/proc/cpuinfo")
	if err != nil {
		return 0
	}
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		if k, v, ok := strings.Cut(sc.Text(), ":"); ok && strings.TrimSpace(k) == "cpu MHz" {
			if mhz, err := strconv.ParseFloat(strings.TrimSpace(v), 64); err == nil {
				return int(mhz * 1000)
			}
		}
	}
	return 0
}
