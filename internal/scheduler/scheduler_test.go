package scheduler

import (
	"errors"
	"reflect"
	"sync"
	"testing"
)

type recorder struct {
	mu  sync.Mutex
	ids []int64
}

func (r *recorder) admit(q Request) { r.mu.Lock(); r.ids = append(r.ids, q.ID); r.mu.Unlock() }
func (r *recorder) got() []int64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]int64(nil), r.ids...)
}

func TestFIFOWaitsForCapacity(t *testing.T) {
	var rec recorder
	s := New(Capacity{VCPUs: 4, MemoryMiB: 8192, MaxVMs: 3}, rec.admit)
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(s.Enqueue(Request{ID: 1, VCPUs: 2, MemoryMiB: 4096}))
	must(s.Enqueue(Request{ID: 2, VCPUs: 2, MemoryMiB: 2048}))
	must(s.Enqueue(Request{ID: 3, VCPUs: 2, MemoryMiB: 1024})) // waits: no vCPU left
	must(s.Enqueue(Request{ID: 4, VCPUs: 1, MemoryMiB: 128}))  // waits behind 3 (strict FIFO)
	if got := rec.got(); !reflect.DeepEqual(got, []int64{1, 2}) {
		t.Fatalf("admitted %v, want [1 2]", got)
	}
	if err := s.Enqueue(Request{ID: 3, VCPUs: 2, MemoryMiB: 1024}); !errors.Is(err, ErrDuplicate) {
		t.Fatalf("duplicate enqueue: %v", err)
	}
	if err := s.Enqueue(Request{ID: 9, VCPUs: 8, MemoryMiB: 1024}); !errors.Is(err, ErrTooBig) {
		t.Fatalf("too big: %v", err)
	}
	st := s.Stats()
	if st.Queued != 2 || st.VCPUsUsed != 4 || st.MemoryMiBUsed != 6144 || st.VMs != 2 {
		t.Fatalf("stats %+v", st)
	}
	s.Release(1)
	if got := rec.got(); !reflect.DeepEqual(got, []int64{1, 2, 3}) {
		t.Fatalf("after release admitted %v", got)
	}
	// 4 needs 1 vCPU but none left (2+2 used); max VMs also 3 after it.
	s.Release(1) // idempotent
	if s.Remove(4) != true || s.Remove(4) != false {
		t.Fatal("remove")
	}
	s.Release(2)
	s.Release(3)
	if st := s.Stats(); st.VMs != 0 || st.VCPUsUsed != 0 || st.MemoryMiBUsed != 0 || st.Queued != 0 {
		t.Fatalf("not all released: %+v", st)
	}
	// MaxVMs bound.
	for i := int64(10); i < 14; i++ {
		must(s.Enqueue(Request{ID: i, VCPUs: 1, MemoryMiB: 128}))
	}
	if st := s.Stats(); st.VMs != 3 || st.Queued != 1 {
		t.Fatalf("max vms not enforced: %+v", st)
	}
	s.Close()
	s.Release(10)
	if st := s.Stats(); st.Queued != 1 {
		t.Fatalf("closed scheduler admitted: %+v", st)
	}
}

func TestHostCapacity(t *testing.T) {
	c, err := HostCapacity(0, 0, 0, 0, 0)
	if err != nil || c.VCPUs < 1 || c.MemoryMiB < 128 {
		t.Fatalf("%+v %v", c, err)
	}
	if _, err := HostCapacity(0, 0, 1000, 0, 0); err == nil {
		t.Fatal("reserve larger than host accepted")
	}
	if c, _ := HostCapacity(3, 1000, 1, 1, 2); c != (Capacity{3, 1000, 2}) {
		t.Fatalf("explicit values not used: %+v", c)
	}
}
