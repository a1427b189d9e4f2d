// Package scheduler is FireRunner's capacity-aware FIFO: jobs are admitted
// in arrival order while their vCPUs, memory and a VM slot fit; others wait.
package scheduler

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
)

// Capacity is what may be handed out to VMs at once.
type Capacity struct {
	VCPUs     int
	MemoryMiB int
	MaxVMs    int // 0 = unbounded (vCPU/memory still bound it)
}

// Fits reports whether a request of this size can ever run.
func (c Capacity) Fits(vcpus, memMiB int) bool {
	return vcpus <= c.VCPUs && memMiB <= c.MemoryMiB
}

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

// Request is one job asking for resources.
type Request struct {
	ID        int64
	VCPUs     int
	MemoryMiB int
}

// Errors from Enqueue.
var (
	ErrTooBig    = errors.New("request exceeds total capacity")
	ErrDuplicate = errors.New("request already queued or admitted")
	ErrClosed    = errors.New("scheduler closed")
)

// Stats is a snapshot for metrics and status.
type Stats struct {
	Capacity      Capacity
	Queued        int
	VMs           int
	VCPUsUsed     int
	MemoryMiBUsed int
}

// Scheduler admits requests in strict FIFO order: a large job at the head
// blocks smaller ones behind it, so it cannot starve. Admission reserves the
// resources until Release.
type Scheduler struct {
	mu       sync.Mutex
	cap      Capacity
	queue    []Request
	admitted map[int64]Request
	used     Stats
	closed   bool
	admit    func(Request)
}

// New returns a scheduler that calls admit (outside its lock, in FIFO
// order, possibly from the goroutine calling Enqueue or Release) for each
// request that got its resources.
func New(c Capacity, admit func(Request)) *Scheduler {
	return &Scheduler{cap: c, admitted: map[int64]Request{}, admit: admit}
}

// Enqueue adds a request at the tail. Requests that can never fit are refused.
func (s *Scheduler) Enqueue(r Request) error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return ErrClosed
	}
	if !s.cap.Fits(r.VCPUs, r.MemoryMiB) {
		s.mu.Unlock()
		return fmt.Errorf("%w: %d vCPUs / %d MiB > %d vCPUs / %d MiB", ErrTooBig, r.VCPUs, r.MemoryMiB, s.cap.VCPUs, s.cap.MemoryMiB)
	}
	if _, ok := s.admitted[r.ID]; ok || s.indexLocked(r.ID) >= 0 {
		s.mu.Unlock()
		return ErrDuplicate
	}
	s.queue = append(s.queue, r)
	ready := s.dispatchLocked()
	s.mu.Unlock()
	s.run(ready)
	return nil
}

// Remove drops a queued (not yet admitted) request; it reports whether it was queued.
func (s *Scheduler) Remove(id int64) bool {
	s.mu.Lock()
	i := s.indexLocked(id)
	if i < 0 {
		s.mu.Unlock()
		return false
	}
	s.queue = append(s.queue[:i], s.queue[i+1:]...)
	ready := s.dispatchLocked() // the removed one may have blocked the head
	s.mu.Unlock()
	s.run(ready)
	return true
}

// Reserve marks a request as admitted without queueing (jobs resumed after a
// restart that already hold a VM). It may exceed capacity: the VM exists.
func (s *Scheduler) Reserve(r Request) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.admitted[r.ID]; ok {
		return
	}
	s.admitted[r.ID] = r
	s.used.VMs++
	s.used.VCPUsUsed += r.VCPUs
	s.used.MemoryMiBUsed += r.MemoryMiB
}

// Release frees an admitted request's resources and admits waiting ones.
// Releasing an unknown id is a no-op (cleanup is idempotent).
func (s *Scheduler) Release(id int64) {
	s.mu.Lock()
	r, ok := s.admitted[id]
	if !ok {
		s.mu.Unlock()
		return
	}
	delete(s.admitted, id)
	s.used.VMs--
	s.used.VCPUsUsed -= r.VCPUs
	s.used.MemoryMiBUsed -= r.MemoryMiB
	ready := s.dispatchLocked()
	s.mu.Unlock()
	s.run(ready)
}

// Close stops admissions (graceful shutdown); queued requests stay queued.
func (s *Scheduler) Close() {
	s.mu.Lock()
	s.closed = true
	s.mu.Unlock()
}

// Stats returns a snapshot.
func (s *Scheduler) Stats() Stats {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := s.used
	st.Capacity = s.cap
	st.Queued = len(s.queue)
	return st
}

// Queued returns the ids waiting, head first.
func (s *Scheduler) Queued() []int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	ids := make([]int64, len(s.queue))
	for i, r := range s.queue {
		ids[i] = r.ID
	}
	return ids
}

func (s *Scheduler) indexLocked(id int64) int {
	for i, r := range s.queue {
		if r.ID == id {
			return i
		}
	}
	return -1
}

func (s *Scheduler) dispatchLocked() []Request {
	if s.closed {
		return nil
	}
	var ready []Request
	for len(s.queue) > 0 {
		h := s.queue[0]
		if s.used.VCPUsUsed+h.VCPUs > s.cap.VCPUs || s.used.MemoryMiBUsed+h.MemoryMiB > s.cap.MemoryMiB ||
			(s.cap.MaxVMs > 0 && s.used.VMs+1 > s.cap.MaxVMs) {
			break
		}
		s.queue = s.queue[1:]
		s.admitted[h.ID] = h
		s.used.VMs++
		s.used.VCPUsUsed += h.VCPUs
		s.used.MemoryMiBUsed += h.MemoryMiB
		ready = append(ready, h)
	}
	return ready
}

func (s *Scheduler) run(ready []Request) {
	for _, r := range ready {
		s.admit(r)
	}
}
