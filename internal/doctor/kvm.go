package doctor

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"runtime"
	"sync/atomic"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// KVM ioctl numbers (linux/kvm.h, x86_64).
const (
	kvmGetAPIVersion       = 0xAE00
	kvmCreateVM            = 0xAE01
	kvmGetVCPUMmapSize     = 0xAE04
	kvmCreateVCPU          = 0xAE41
	kvmSetUserMemoryRegion = 0x4020AE46
	kvmRun                 = 0xAE80
	kvmGetRegs             = 0x8090AE81
	kvmSetRegs             = 0x4090AE82
	kvmGetSregs            = 0x8138AE83
	kvmSetSregs            = 0x4138AE84

	kvmExitIO  = 2
	kvmExitHLT = 5

	probePort = 0x3f8
	probeByte = 'K'
)

// probeCode is a 16-bit real-mode program: mov dx,0x3f8; mov al,'K';
// out dx,al; hlt. A working KVM exits to us at the OUT, then at the HLT.
var probeCode = []byte{0xba, 0xf8, 0x03, 0xb0, probeByte, 0xee, 0xf4}

// ErrKVMHang is returned when the probe guest never reached its HLT.
var ErrKVMHang = errors.New("KVM present but cannot run guests (nested paravirtual?): the probe guest did not reach HLT")

func ioctl(fd int, req uintptr, arg uintptr) (uintptr, error) {
	r, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), req, arg)
	if e != 0 {
		return r, e
	}
	return r, nil
}

// ProbeKVM boots a 7-byte real-mode guest on dev (normally /dev/kvm) and
// checks it runs to HLT after writing one byte to the serial port. Opening
// /dev/kvm proves little: under some nested setups ordinary guests hang. The
// vCPU runs on a locked thread; on timeout the thread is signalled out of
// KVM_RUN, and if it still does not return it is abandoned (the process,
// a short-lived `firerunner doctor`, exits anyway).
func ProbeKVM(ctx context.Context, dev string, timeout time.Duration) error {
	type result struct{ err error }
	done := make(chan result, 1)
	tidc := make(chan int, 1)
	var stop atomic.Bool
	go func() {
		runtime.LockOSThread() // never unlocked: the vCPU thread is discarded
		tidc <- unix.Gettid()
		done <- result{runProbe(dev, &stop)}
	}()
	tid := <-tidc
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case r := <-done:
		return r.err
	case <-ctx.Done():
	case <-t.C:
	}
	// SIGURG is harmless to Go programs and makes KVM_RUN return EINTR.
	stop.Store(true)
	_ = unix.Tgkill(os.Getpid(), tid, unix.SIGURG)
	return fmt.Errorf("%w within %s", ErrKVMHang, timeout)
}

func runProbe(dev string, stop *atomic.Bool) error {
	kvm, err := unix.Open(dev, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("open %s: %w", dev, err)
	}
	defer unix.Close(kvm)
	v, err := ioctl(kvm, kvmGetAPIVersion, 0)
	if err != nil || v != 12 {
		return fmt.Errorf("KVM_GET_API_VERSION = %d (%v), want 12", v, err)
	}
	vmfd, err := ioctl(kvm, kvmCreateVM, 0)
	if err != nil {
		return fmt.Errorf("KVM_CREATE_VM: %w", err)
	}
	defer unix.Close(int(vmfd))

	const guestAddr, memSize = 0x1000, 0x1000
	mem, err := unix.Mmap(-1, 0, memSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_ANONYMOUS)
	if err != nil {
		return fmt.Errorf("mmap guest memory: %w", err)
	}
	defer unix.Munmap(mem)
	copy(mem, probeCode)
	region := make([]byte, 32) // struct kvm_userspace_memory_region
	binary.LittleEndian.PutUint64(region[8:], guestAddr)
	binary.LittleEndian.PutUint64(region[16:], memSize)
	binary.LittleEndian.PutUint64(region[24:], uint64(uintptr(unsafe.Pointer(&mem[0]))))
	if _, err := ioctl(int(vmfd), kvmSetUserMemoryRegion, uintptr(unsafe.Pointer(&region[0]))); err != nil {
		return fmt.Errorf("KVM_SET_USER_MEMORY_REGION: %w", err)
	}
	vcpu, err := ioctl(int(vmfd), kvmCreateVCPU, 0)
	if err != nil {
		return fmt.Errorf("KVM_CREATE_VCPU: %w", err)
	}
	defer unix.Close(int(vcpu))
	runSize, err := ioctl(kvm, kvmGetVCPUMmapSize, 0)
	if err != nil {
		return fmt.Errorf("KVM_GET_VCPU_MMAP_SIZE: %w", err)
	}
	run, err := unix.Mmap(int(vcpu), 0, int(runSize), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return fmt.Errorf("mmap kvm_run: %w", err)
	}
	defer unix.Munmap(run)

	sregs := make([]byte, 312) // struct kvm_sregs; cs is the first kvm_segment
	if _, err := ioctl(int(vcpu), kvmGetSregs, uintptr(unsafe.Pointer(&sregs[0]))); err != nil {
		return fmt.Errorf("KVM_GET_SREGS: %w", err)
	}
	binary.LittleEndian.PutUint64(sregs[0:], 0)  // cs.base
	binary.LittleEndian.PutUint16(sregs[12:], 0) // cs.selector
	if _, err := ioctl(int(vcpu), kvmSetSregs, uintptr(unsafe.Pointer(&sregs[0]))); err != nil {
		return fmt.Errorf("KVM_SET_SREGS: %w", err)
	}
	regs := make([]byte, 144) // struct kvm_regs: 18 x u64, rip is [16], rflags [17]
	binary.LittleEndian.PutUint64(regs[16*8:], guestAddr)
	binary.LittleEndian.PutUint64(regs[17*8:], 2) // bit 1 is reserved-set
	if _, err := ioctl(int(vcpu), kvmSetRegs, uintptr(unsafe.Pointer(&regs[0]))); err != nil {
		return fmt.Errorf("KVM_SET_REGS: %w", err)
	}

	sawOut := false
	for i := 0; i < 16; {
		if _, err := ioctl(int(vcpu), kvmRun, 0); err != nil {
			if errors.Is(err, unix.EINTR) {
				if stop.Load() {
					return ErrKVMHang
				}
				continue // some other signal: run on
			}
			return fmt.Errorf("KVM_RUN: %w", err)
		}
		i++
		switch reason := binary.LittleEndian.Uint32(run[8:]); reason {
		case kvmExitIO:
			// struct kvm_run.io at offset 32: direction, size, port, count, data_offset
			port := binary.LittleEndian.Uint16(run[34:])
			off := binary.LittleEndian.Uint64(run[40:])
			if run[32] != 1 || port != probePort || off >= uint64(len(run)) || run[off] != probeByte {
				return fmt.Errorf("probe guest did unexpected I/O (port %#x)", port)
			}
			sawOut = true
		case kvmExitHLT:
			if !sawOut {
				return errors.New("probe guest halted without running its code")
			}
			return nil
		default:
			return fmt.Errorf("probe guest exited with KVM exit reason %d", reason)
		}
	}
	return errors.New("probe guest did not halt")
}
