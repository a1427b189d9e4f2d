package image

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
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

// bootImage boots the image under QEMU microvm (TCG) with the given guest
// config, with no VM driver in between, and returns the console log (CRs
// dropped) once QEMU has exited by itself.
func bootImage(t *testing.T, m Manifest, gc guestconfig.Config) string {
	t.Helper()
	qemu := testenv.QEMU(t)
	img := m.VMImage()
	dir := t.TempDir()
	cfgPath := filepath.Join(dir, "cfg.img")
	if err := guestconfig.WriteDrive(cfgPath, gc); err != nil {
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
	out, _ := os.ReadFile(consolePath)
	log := strings.ReplaceAll(string(out), "\r", "")
	t.Logf("qemu ran %s; console:\n%s", time.Since(start).Round(time.Millisecond), log)
	if ctx.Err() != nil {
		t.Fatal("qemu did not exit by itself: the guest never powered off")
	}
	if err != nil {
		t.Fatalf("qemu: %v", err)
	}
	return log
}

// wantInOrder checks that each entry is a whole console line, in order.
func wantInOrder(t *testing.T, log string, order ...string) {
	t.Helper()
	lines := strings.Split(log, "\n")
	last := -1
	for _, s := range order {
		i := -1
		for j := last + 1; j < len(lines); j++ {
			if strings.TrimSpace(lines[j]) == s {
				i = j
				break
			}
		}
		if i < 0 {
			t.Fatalf("console lacks line %q after line %d", s, last)
		}
		last = i
	}
}

func builtImage(t *testing.T) Manifest {
	m, err := Load(testenv.ImageDir(t))
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// TestBootSmoke: the initramfs finds the root, the agent reads the config
// drive, runs the command as the CI user on a read-only base with the
// network up, prints its output and exit status, and QEMU exits by itself.
// The config drive carries a runner token, as every job's does: it must
// reach neither the console nor the guest's kernel command line (which the
// command prints, so the console check covers it).
func TestBootSmoke(t *testing.T) {
	m := builtImage(t)
	token := "glrt-" + strconv.FormatInt(time.Now().UnixNano(), 36) + "SmOkEsEcReT"
	log := bootImage(t, m, guestconfig.Config{
		Hostname: "fr-smoke", JobTimeoutSec: 120, UnixTimeNano: time.Now().UnixNano(),
		EntropySeed: bytes.Repeat([]byte{7}, 64), RunnerToken: token,
		Command: []string{"sh", "-c", `echo hello from $(id -un) on $(hostname); nproc; ip -4 -o addr show dev eth0 | grep -o '10.0.2.15/24';
			test -w / && echo root-writable; echo "cmdline: $(cat /proc/cmdline)"; exit 3`},
	})
	wantInOrder(t, log, guestconfig.MarkerAgentStart, guestconfig.MarkerJobStart, "hello from ci on fr-smoke", "2",
		"10.0.2.15/24", guestconfig.MarkerJobEnd, guestconfig.ExitMarker+"3", guestconfig.MarkerPowerOff)
	if strings.Contains(log, "root-writable") {
		t.Error("the CI user can write to /")
	}
	// The kernel command line was printed, so the token check below covers it.
	cmdline := ""
	for _, l := range strings.Split(log, "\n") {
		if c, ok := strings.CutPrefix(strings.TrimSpace(l), "cmdline: "); ok {
			cmdline = c
		}
	}
	if !strings.Contains(cmdline, "console=ttyS0") {
		t.Fatalf("the guest's kernel command line was not printed (got %q)", cmdline)
	}
	// The agent logs the config it read, token redacted: it did get one.
	if !strings.Contains(log, "token=[redacted]") {
		t.Error("the agent's config line does not show a (redacted) runner token")
	}
	if strings.Contains(log, token) {
		t.Fatalf("the runner token from the config drive appeared on the console or the kernel command line %q", cmdline)
	}
}

// TestBootTimeout: a workload that hangs is killed at JobTimeoutSec, the
// agent reports 124 and still powers off.
func TestBootTimeout(t *testing.T) {
	m := builtImage(t)
	log := bootImage(t, m, guestconfig.Config{
		Hostname: "fr-hang", JobTimeoutSec: 3,
		Command: []string{"sh", "-c", "echo hanging; sleep 100000"},
	})
	wantInOrder(t, log, guestconfig.MarkerJobStart, "hanging", guestconfig.MarkerJobEnd,
		guestconfig.ExitMarker+"124", guestconfig.MarkerPowerOff)
}

func requireRunnerInImage(t *testing.T, m Manifest) {
	if m.Inputs.GitLabRunnerSHA256 == "" {
		testenv.Missing(t, "gitlab-runner in the guest image", fmt.Sprintf("image %s was built with --no-gitlab-runner; run make image", m.Dir))
	}
}

// TestBootRunnerReadsTokenFromPipe: in runner mode the agent starts the real
// gitlab-runner, which must find its token in the piped config and present
// it to GitLab (here a loopback listener reached through the slirp gateway),
// while the console never shows the full token.
func TestBootRunnerReadsTokenFromPipe(t *testing.T) {
	m := builtImage(t)
	requireRunnerInImage(t, m)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	tokens := make(chan string, 16)
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var body struct {
			Token string `json:"token"`
		}
		json.NewDecoder(r.Body).Decode(&body)
		if r.URL.Path == "/api/v4/jobs/request" {
			tokens <- body.Token
		}
		w.WriteHeader(http.StatusNoContent) // no job for you
	})}
	go srv.Serve(ln)
	defer srv.Close()
	token := "glrt-" + strconv.FormatInt(time.Now().UnixNano(), 36) + "SeCrEt"
	log := bootImage(t, m, guestconfig.Config{
		Hostname: "fr-runner", JobTimeoutSec: 120, WaitTimeoutSec: 4, RunnerToken: token,
		GitLabURL: fmt.Sprintf("http://10.0.2.2:%d", ln.Addr().(*net.TCPAddr).Port),
	})
	wantInOrder(t, log, guestconfig.MarkerJobStart, guestconfig.MarkerJobEnd, guestconfig.ExitMarker+"0", guestconfig.MarkerPowerOff)
	select {
	case got := <-tokens:
		if got != token {
			t.Fatalf("gitlab-runner presented token %q, want the configured one", got)
		}
	default:
		t.Fatal("gitlab-runner never asked for a job")
	}
	// The agent logs the config it read, token redacted: it did get one.
	if !strings.Contains(log, "token=[redacted]") {
		t.Error("the agent's config line does not show a (redacted) runner token")
	}
	if strings.Contains(log, token) {
		t.Fatal("the full runner token appeared on the console")
	}
}

// TestBootRunnerNotDumpable: gitlab-runner is installed 0711, so when the CI
// user runs it the process is non-dumpable and another ci process (the job)
// can neither read the binary nor its /proc environ or fds.
func TestBootRunnerNotDumpable(t *testing.T) {
	m := builtImage(t)
	requireRunnerInImage(t, m)
	log := bootImage(t, m, guestconfig.Config{
		Hostname: "fr-dump", JobTimeoutSec: 120,
		Command: []string{"bash", "-c", `test -r /usr/local/bin/gitlab-runner && echo binary-readable
CI_SERVER_TOKEN=glrt-ENVSECRET gitlab-runner run-single -u http://10.0.2.2:9 --executor shell --wait-timeout 60 >/dev/null 2>&1 &
pid=$!; sleep 3
test -d /proc/$pid || echo runner-not-running
cat /proc/$pid/environ 2>/dev/null | grep -a -c ENVSECRET; echo environ-rc=${PIPESTATUS[0]}
ls /proc/$pid/fd >/dev/null 2>&1 && echo fds-readable
kill $pid; exit 0`},
	})
	wantInOrder(t, log, guestconfig.MarkerJobStart, "0", "environ-rc=1", guestconfig.MarkerJobEnd, guestconfig.ExitMarker+"0")
	for _, bad := range []string{"binary-readable", "runner-not-running", "fds-readable", "ENVSECRET\n"} {
		if strings.Contains(log, bad) {
			t.Errorf("console shows %q", bad)
		}
	}
}
