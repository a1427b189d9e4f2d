// Package workqueue is a de-duplicating keyed work queue with per-key
// exponential back-off: the small equivalent of client-go's workqueue.
//
// A key is queued at most once, and handed to at most one worker at a time:
// a key added while a worker holds it is queued again when that worker calls
// Done, so the worker's reconcile always runs after the latest event. This
// is what lets any number of events (webhooks, timers, VM exits, resyncs)
// trigger one idempotent Reconcile(key).
package workqueue

import (
	"sync"
	"time"
)

// Backoff is the delay before the n-th retry (n ≥ 1) of a failing key.
type Backoff func(n int) time.Duration

// Exponential returns base·2^(n-1), capped at max.
func Exponential(base, max time.Duration) Backoff {
	return func(n int) time.Duration {
		d := base
		for i := 1; i < n && d < max; i++ {
			d *= 2
		}
		return min(d, max)
	}
}

// Queue is safe for concurrent use.
type Queue[K comparable] struct {
	mu         sync.Mutex
	cond       *sync.Cond
	queue      []K
	dirty      map[K]bool // queued or to be queued once processing ends
	processing map[K]bool
	failures   map[K]int
	waiting    map[K]time.Time // earliest pending AddAfter per key
	backoff    Backoff
	shutdown   bool
}

// New returns an empty queue whose AddRateLimited uses b.
func New[K comparable](b Backoff) *Queue[K] {
	q := &Queue[K]{dirty: map[K]bool{}, processing: map[K]bool{}, failures: map[K]int{}, waiting: map[K]time.Time{}, backoff: b}
	q.cond = sync.NewCond(&q.mu)
	return q
}

// Add queues k now unless it is already queued.
func (q *Queue[K]) Add(k K) {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.addLocked(k)
}

func (q *Queue[K]) addLocked(k K) {
	if q.shutdown || q.dirty[k] {
		return
	}
	q.dirty[k] = true
	if q.processing[k] {
		return // re-queued by Done
	}
	q.queue = append(q.queue, k)
	q.cond.Signal()
}

// AddAfter queues k after d. Of several pending delays for a key, the
// earliest wins; an Add in between makes the key run earlier as well.
func (q *Queue[K]) AddAfter(k K, d time.Duration) {
	if d <= 0 {
		q.Add(k)
		return
	}
	at := time.Now().Add(d)
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.shutdown {
		return
	}
	if w, ok := q.waiting[k]; ok && !w.After(at) {
		return
	}
	q.waiting[k] = at
	time.AfterFunc(d, func() {
		q.mu.Lock()
		defer q.mu.Unlock()
		if w, ok := q.waiting[k]; ok && w.Equal(at) {
			delete(q.waiting, k)
			q.addLocked(k)
		}
	})
}

// AddRateLimited queues k after its back-off, which grows with every call
// until Forget.
func (q *Queue[K]) AddRateLimited(k K) {
	q.mu.Lock()
	q.failures[k]++
	n := q.failures[k]
	q.mu.Unlock()
	q.AddAfter(k, q.backoff(n))
}

// Failures is how often k failed since its last Forget.
func (q *Queue[K]) Failures(k K) int {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.failures[k]
}

// Forget resets k's back-off (call after a successful reconcile).
func (q *Queue[K]) Forget(k K) {
	q.mu.Lock()
	defer q.mu.Unlock()
	delete(q.failures, k)
}

// Get blocks until a key is ready or the queue shuts down (ok=false). The
// caller must call Done(k) when finished with it.
func (q *Queue[K]) Get() (k K, ok bool) {
	q.mu.Lock()
	defer q.mu.Unlock()
	for len(q.queue) == 0 && !q.shutdown {
		q.cond.Wait()
	}
	if len(q.queue) == 0 {
		return k, false
	}
	k, q.queue = q.queue[0], q.queue[1:]
	q.processing[k] = true
	delete(q.dirty, k)
	return k, true
}

// Done ends processing of k, queueing it again if it was added meanwhile.
func (q *Queue[K]) Done(k K) {
	q.mu.Lock()
	defer q.mu.Unlock()
	delete(q.processing, k)
	if q.dirty[k] && !q.shutdown {
		q.queue = append(q.queue, k)
		q.cond.Signal()
	}
}

// Len is the number of keys ready to be handed out.
func (q *Queue[K]) Len() int {
	q.mu.Lock()
	defer q.mu.Unlock()
	return len(q.queue)
}

// ShutDown makes Get return ok=false at once. Keys still queued are dropped:
// the store holds the state, and the next start reconciles every active key.
func (q *Queue[K]) ShutDown() {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.shutdown = true
	q.queue = nil
	q.cond.Broadcast()
}
