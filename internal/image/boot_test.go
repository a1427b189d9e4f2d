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
	"testing"
	"time"

	"github.com/firerunner/firerunner/internal/guestconfig"
	"github.com/firerunner/firerunner/internal/testenv"
)

// hostTSCkHz reads the host CPU clock for tsc_early_khz (TCG boots hang on
// TSC calibration without it).
func hostTSCkHz(t *testing.T) int {
	b, err := os.ReadFile("/proc/cpuinfo")
	if err != nil {
		t.Fatal(err)
	}
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		if k, v, ok := strings.Cut(sc.Text(), ":"); ok && strings.TrimSpace(k) == "cpu MHz" {
			mhz, err := strconv.ParseFloat(strings.TrimSpace(v), 64)
			if err == nil {
				return int(mhz * 1000)
			}
		}
	}
	t.Fatal("no cpu MHz in /proc/cpuinfo")
	return 0
}

// TestBootSmoke boots the built image under QEMU microvm (TCG), with no VM
// driver in between: the initramfs must find the root, the agent must read
// the config drive, run the command as the CI user with its output on the
// console, report its exit status and make QEMU exit by itself.
func TestBootSmoke(t *testing.T) {
	qemu := testenv.QEMU(t)
	m, err := Load(testenv.ImageDir(t))
	if err != nil {
		t.Fatal(err)
	}
	img := m.VMImage()
	dir := t.TempDir()
	cfgPath := filepath.Join(dir, "cfg.img")
	if err := guestconfig.WriteDrive(cfgPath, guestconfig.Config{
		Hostname: "fr-smoke", JobTimeoutSec: 120, UnixTimeNano: time.Now().UnixNano(),
		EntropySeed: bytes.Repeat([]byte{7}, 64),
		Command: []string{"sh", "-c", `echo hello from $(id -un) on $(hostname); nproc; ip -4 -o addr show dev eth0 | grep -o '10.0.2.15/24';
			test -w / && echo root-writable; cat /proc/cmdline | grep -c glrt- ; exit 3`},
	}); err != nil {
		t.Fatal(err)
	}
	consolePath := filepath.Join(dir, "console.log")
	console, err := os.Create(consolePath)
	if err != nil {
		t.Fatal(err)
	}
	defer console.Close()
	cmdline := fmt.Sprintf("%s reboot=t tsc_early_khz=%d", m.Cmdline, hostTSCkHz(t))
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, qemu,
		"-M", "microvm,x-option-roms=off,rtc=on", "-accel", "tcg", "-cpu", "max", "-m", "512", "-smp", "2",
		"-nographic", "-no-reboot", "-no-user-config",
		"-kernel", img.Kernel, "-initrd", img.Initrd, "-append", cmdline,
		"-drive", "id=root,file="+img.Rootfs+",format=raw,if=none,readonly=on", "-device", "virtio-blk-device,drive=root",
		"-drive", "id=cfg,file="+cfgPath+",format=raw,if=none,readonly=on", "-device", "virtio-blk-device,drive=cfg",
		"-netdev", "user,id=n0", "-device", "virtio-net-device,netdev=n0",
		"-device", "virtio-rng-device")
	cmd.Stdout, cmd.Stderr = console, console
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	start := time.Now()
	err = cmd.Run()
	took := time.Since(start)
	out, _ := os.ReadFile(consolePath)
	log := strings.ReplaceAll(string(out), "\r", "")
	t.Logf("qemu ran %s; console:\n%s", took.Round(time.Millisecond), log)
	if ctx.Err() != nil {
		t.Fatal("qemu did not exit by itself: the guest never powered off")
	}
	if err != nil {
		t.Fatalf("qemu: %v", err)
	}
	lines := strings.Split(log, "\n")
	idx := func(s string) int {
		for i, l := range lines {
			if strings.TrimSpace(l) == s {
				return i
			}
		}
		return -1
	}
	order := []string{guestconfig.MarkerAgentStart, guestconfig.MarkerJobStart, "hello from ci on fr-smoke", "2",
		"10.0.2.15/24", "0", guestconfig.MarkerJobEnd, guestconfig.ExitMarker + "3", guestconfig.MarkerPowerOff}
	last := -1
	for _, s := range order {
		i := idx(s)
		if i < 0 || i < last {
			t.Fatalf("console lacks %q in order (index %d after %d)", s, i, last)
		}
		last = i
	}
	if strings.Contains(log, "root-writable") {
		t.Error("the CI user can write to /")
	}
}
