package planner

import (
	"bufio"
	"fmt"
	"os"
	"runtime"
	"strconv"
	"strings"
)

// HostCapacity computes the default capacity: host CPUs and memory minus a
// reserve, with explicit values (non-zero) taking precedence.
func HostCapacity(vcpus, memMiB, reserveVCPUs, reserveMemMiB, maxVMs int) (Capacity, error) {
	c := Capacity{VCPUs: vcpus, MemoryMiB: memMiB, MaxVMs: maxVMs}
	if c.VCPUs == 0 {
		c.VCPUs = runtime.NumCPU() - reserveVCPUs
	}
	if c.MemoryMiB == 0 {
		total, err := hostMemoryMiB("/proc/meminfo")
		if err != nil {
			return c, err
		}
		c.MemoryMiB = total - reserveMemMiB
	}
	if c.VCPUs < 1 || c.MemoryMiB < 128 {
		return c, fmt.Errorf("capacity after reserve is %d vCPUs / %d MiB: nothing left for VMs (lower capacity.reserve_* or set capacity.vcpus/memory_mib)", c.VCPUs, c.MemoryMiB)
	}
	return c, nil
}

func hostMemoryMiB(path string) (int, error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fs := strings.Fields(sc.Text())
		if len(fs) >= 2 && fs[0] == "MemTotal:" {
			kb, err := strconv.Atoi(fs[1])
			if err != nil {
				return 0, fmt.Errorf("%s: %w", path, err)
			}
			return kb / 1024, nil
		}
	}
	return 0, fmt.Errorf("%s: no MemTotal line", path)
}
