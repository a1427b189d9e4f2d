package qemu

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/firerunner/firerunner/internal/vm"
)

// Accelerators.
const (
	AccelAuto = "auto"
	AccelKVM  = "kvm"
	AccelTCG  = "tcg"
)

// probeTimeout bounds the KVM boot probe (see vm.BootProbeTimeout).
const probeTimeout = vm.BootProbeTimeout

var (
	probeMu    sync.Mutex
	probeCache = map[string]probeResult{} // binary + "\x00" + kernel -> result
)

type probeResult struct {
	accel  string
	reason string
}

// resolveAccel turns "auto" into "kvm" or "tcg". The probe result is cached
// per process (per binary and kernel), so only the first VM pays for it.
func resolveAccel(ctx context.Context, binary, accel, kernel string) (string, string) {
	if accel != AccelAuto {
		return accel, "configured"
	}
	key := binary + "\x00" + kernel
	probeMu.Lock()
	defer probeMu.Unlock()
	if r, ok := probeCache[key]; ok {
		return r.accel, r.reason
	}
	r := probeKVM(ctx, binary, kernel)
	if ctx.Err() == nil { // an interrupted probe proves nothing; do not cache it
		probeCache[key] = r
	}
	return r.accel, r.reason
}

// probeKVM decides whether KVM can run ordinary guests here: /dev/kvm must
// open, and a real boot must get through (nested paravirtual KVM opens
// /dev/kvm fine but hangs guest kernels).
func probeKVM(ctx context.Context, binary, kernel string) probeResult {
	return probeKVMOn(ctx, vm.CheckHost{}, binary, kernel)
}

// probeKVMOn is probeKVM on the host h sees. The driver (accel: auto) and
// doctor's kvm-guest check run this one probe, so doctor reports the
// acceleration jobs really get.
func probeKVMOn(ctx context.Context, h vm.CheckHost, binary, kernel string) probeResult {
	f, err := os.OpenFile(h.Path("/dev/kvm"), os.O_RDWR, 0)
	if err != nil {
		return probeResult{AccelTCG, "no usable /dev/kvm: " + err.Error()}
	}
	f.Close()
	if err := h.RunBootProbe(ctx, probeArgv(binary, kernel, []string{"-accel", "kvm", "-cpu", "host"}, ""), probeTimeout); err != nil {
		return probeResult{AccelTCG, "kvm boot probe failed (" + err.Error() + "); using tcg"}
	}
	return probeResult{AccelKVM, "kvm boot probe reached the kernel's root-mount panic"}
}

// probeBoot boots kernel without an initrd or disk: a working accelerator
// gets it to "VFS: Unable to mount root fs" and its panic, and with panic=-1
// and -no-reboot QEMU then exits. Anything else within timeout is a failure.
func probeBoot(ctx context.Context, binary, kernel string, accel []string, extraCmdline string, timeout time.Duration) error {
	return vm.RunBootProbe(ctx, probeArgv(binary, kernel, accel, extraCmdline), timeout)
}

// probeArgv is the QEMU command line of a boot probe (sandboxed like a VM's).
func probeArgv(binary, kernel string, accel []string, extraCmdline string) []string {
	args := append([]string{binary, "-M", "microvm,x-option-roms=off,rtc=on"}, accel...)
	return append(args, "-sandbox", Sandbox, "-m", "256", "-smp", "1", "-no-reboot", "-display", "none", "-monitor", "none",
		"-serial", "stdio", "-kernel", kernel,
		"-append", strings.TrimSpace(strings.Join(BaseKernelArgs, " ")+" "+extraCmdline))
}

// HostTSCkHz returns the host TSC frequency in kHz and where it came from.
// Under TCG the guest's rdtsc reads the host TSC, so passing this as
// tsc_early_khz spares the guest its PIT-based calibration, which hangs at
// random under TCG. Sources, best first: sysfs tsc_freq_khz (some kernels),
// the kernel log ("tsc: Refined TSC clocksource calibration", then
// "tsc: Detected ... MHz processor"), /proc/cpuinfo "cpu MHz" (may be a
// scaled current frequency, hence last).
func HostTSCkHz() (int, string, error) {
	tscOnce.Do(func() { tsc.khz, tsc.src, tsc.err = detectTSC() })
	return tsc.khz, tsc.src, tsc.err
}

// The detection is cached: the TSC frequency does not change.
var (
	tscOnce sync.Once
	tsc     struct {
		khz int
		src string
		err error
	}
)

func detectTSC() (int, string, error) {
	if b, err := os.ReadFile("/sys/devices/system/cpu/cpu0/tsc_freq_khz"); err == nil {
		if k, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil && k > 0 {
			return k, "sysfs tsc_freq_khz", nil
		}
	}
	if log, err := readKmsg(); err == nil {
		if k, src, ok := tscFromKernelLog(log); ok {
			return k, src, nil
		}
	}
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		if k, ok := tscFromCPUInfo(b); ok {
			return k, "/proc/cpuinfo cpu MHz", nil
		}
	}
	return 0, "", errors.New("host TSC frequency unknown (no tsc_freq_khz, kernel log line or cpuinfo cpu MHz)")
}

var (
	reRefined  = regexp.MustCompile(`tsc: Refined TSC clocksource calibration: ([0-9]+)\.([0-9]{1,3}) MHz`)
	reDetected = regexp.MustCompile(`tsc: Detected ([0-9]+)\.([0-9]{1,3}) MHz processor`)
	reCPUMHz   = regexp.MustCompile(`(?m)^cpu MHz\s*:\s*([0-9]+)\.?([0-9]{0,3})`)
)

func mhzToKHz(whole, frac string) (int, bool) {
	w, err := strconv.Atoi(whole)
	if err != nil || w <= 0 {
		return 0, false
	}
	frac = (frac + "000")[:3]
	f, _ := strconv.Atoi(frac)
	return w*1000 + f, true
}

func tscFromKernelLog(log []byte) (int, string, bool) {
	for _, c := range []struct {
		re  *regexp.Regexp
		src string
	}{{reRefined, "kernel log: refined TSC calibration"}, {reDetected, "kernel log: detected TSC"}} {
		if m := c.re.FindAllSubmatch(log, -1); len(m) > 0 {
			last := m[len(m)-1]
			if k, ok := mhzToKHz(string(last[1]), string(last[2])); ok {
				return k, c.src, true
			}
		}
	}
	return 0, "", false
}

func tscFromCPUInfo(b []byte) (int, bool) {
	m := reCPUMHz.FindSubmatch(b)
	if m == nil {
		return 0, false
	}
	return mhzToKHz(string(m[1]), string(m[2]))
}

// readKmsg reads the kernel log ring buffer without blocking (needs root or
// dmesg_restrict=0; the boot lines may have rotated out on old hosts).
func readKmsg() ([]byte, error) {
	fd, err := unix.Open("/dev/kmsg", unix.O_RDONLY|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	defer unix.Close(fd)
	var out bytes.Buffer
	buf := make([]byte, 8192)
	for {
		n, err := unix.Read(fd, buf)
		if errors.Is(err, unix.EPIPE) { // record overwritten while reading: skip
			continue
		}
		if err != nil || n <= 0 {
			break
		}
		// Record: "prio,seq,usec,flags;message\n" (+ continuation lines).
		rec := buf[:n]
		if i := bytes.IndexByte(rec, ';'); i >= 0 {
			rec = rec[i+1:]
		}
		sc := bufio.NewScanner(bytes.NewReader(rec))
		if sc.Scan() {
			out.Write(sc.Bytes())
			out.WriteByte('\n')
		}
	}
	if out.Len() == 0 {
		return nil, fmt.Errorf("/dev/kmsg: empty")
	}
	return out.Bytes(), nil
}
