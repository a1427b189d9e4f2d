package workqueue

import (
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

func TestDedupAndRequeueWhileProcessing(t *testing.T) {
	q := New[string](Exponential(time.Millisecond, time.Second))
	q.Add("a")
	q.Add("a")
	q.Add("b")
	if q.Len() != 2 {
		t.Fatalf("len %d, want 2 (a deduplicated)", q.Len())
	}
	k, _ := q.Get()
	if k != "a" {
		t.Fatalf("got %q first", k)
	}
	q.Add("a") // while a worker holds it: not handed out twice at once
	if k2, _ := q.Get(); k2 != "b" {
		t.Fatalf("got %q, want b", k2)
	}
	if q.Len() != 0 {
		t.Fatal("a handed out while processing")
	}
	q.Done("a")
	if k3, _ := q.Get(); k3 != "a" {
		t.Fatalf("a not re-queued after Done, got %q", k3)
	}
}

func TestAddAfterEarliestWinsAndBackoffGrows(t *testing.T) {
	q := New[int](Exponential(10*time.Millisecond, 40*time.Millisecond))
	b := Exponential(10*time.Millisecond, 40*time.Millisecond)
	for n, want := range map[int]time.Duration{1: 10 * time.Millisecond, 2: 20 * time.Millisecond, 3: 40 * time.Millisecond, 9: 40 * time.Millisecond} {
		if got := b(n); got != want {
			t.Errorf("backoff(%d) = %s, want %s", n, got, want)
		}
	}
	q.AddAfter(1, time.Hour)
	q.AddAfter(1, 5*time.Millisecond)
	got := make(chan int, 1)
	go func() { k, _ := q.Get(); got <- k }()
	select {
	case k := <-got:
		if k != 1 {
			t.Fatalf("got %d", k)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the earlier AddAfter did not fire")
	}
	q.Done(1)
	q.AddRateLimited(1)
	q.AddRateLimited(1)
	if q.Failures(1) != 2 {
		t.Fatalf("failures %d", q.Failures(1))
	}
	q.Forget(1)
	if q.Failures(1) != 0 {
		t.Fatal("forget did not reset")
	}
}

// TestOneWorkerPerKey: many workers, many adds: a key is never processed by
// two workers at once, and every add is followed by a processing.
func TestOneWorkerPerKey(t *testing.T) {
	q := New[int](Exponential(time.Millisecond, time.Millisecond))
	var busy [4]atomic.Int32
	var runs atomic.Int32
	var wg sync.WaitGroup
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				k, ok := q.Get()
				if !ok {
					return
				}
				if busy[k].Add(1) != 1 {
					t.Errorf("key %d processed twice at once", k)
				}
				time.Sleep(50 * time.Microsecond)
				busy[k].Add(-1)
				runs.Add(1)
				q.Done(k)
			}
		}()
	}
	for i := range 2000 {
		q.Add(i % 4)
	}
	deadline := time.Now().Add(10 * time.Second)
	for q.Len() > 0 && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	time.Sleep(20 * time.Millisecond)
	q.ShutDown()
	wg.Wait()
	if runs.Load() < 4 {
		t.Fatalf("only %d runs", runs.Load())
	}
}
