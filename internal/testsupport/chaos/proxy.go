package chaos

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"sync"
	"sync/atomic"
	"time"
)

// lockedRand is a seeded source shared by goroutines.
type lockedRand struct {
	mu sync.Mutex
	r  *rand.Rand
}

func newRand(seed uint64) *lockedRand {
	return &lockedRand{r: rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))}
}

func (l *lockedRand) Float64() float64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.r.Float64()
}

func (l *lockedRand) IntN(n int) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.r.IntN(n)
}

func (l *lockedRand) Duration(lo, hi time.Duration) time.Duration {
	if hi <= lo {
		return lo
	}
	return lo + time.Duration(l.IntN(int(hi-lo)))
}

// server is a loopback HTTP server.
type server struct {
	srv *http.Server
	url string
}

func serve(h http.Handler) (*server, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	s := &server{srv: &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second}, url: "http://" + ln.Addr().String()}
	go func() { _ = s.srv.Serve(ln) }()
	return s, nil
}

func (s *server) close() {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_ = s.srv.Shutdown(ctx)
}

// apiProxy stands between FireRunner and GitLab's REST API and fails a
// share of the calls with 500/502/503 or 429 (Retry-After: 1). Half of the
// 5xx come after GitLab did the work (the answer is lost on the way back,
// as behind a gateway that times out): a runner created anyway, a deletion
// done anyway.
type apiProxy struct {
	rp     *httputil.ReverseProxy
	rate   float64
	rnd    *lockedRand
	calls  atomic.Int64
	before atomic.Int64 // failed without reaching GitLab
	after  atomic.Int64 // failed after GitLab did the work
}

func newAPIProxy(target string, rate float64, rnd *lockedRand) (*apiProxy, error) {
	u, err := url.Parse(target)
	if err != nil {
		return nil, err
	}
	rp := httputil.NewSingleHostReverseProxy(u)
	rp.ErrorLog = log.New(io.Discard, "", 0) // a caller that gave up (its timeout) is no news
	return &apiProxy{rp: rp, rate: rate, rnd: rnd}, nil
}

func (p *apiProxy) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	p.calls.Add(1)
	if p.rnd.Float64() >= p.rate {
		p.rp.ServeHTTP(w, r)
		return
	}
	status := []int{500, 502, 503, 429}[p.rnd.IntN(4)]
	if status != http.StatusTooManyRequests && p.rnd.IntN(2) == 0 {
		p.rp.ServeHTTP(httptest.NewRecorder(), r) // done, answer lost
		p.after.Add(1)
	} else {
		p.before.Add(1)
	}
	w.Header().Set("Content-Type", "application/json")
	if status == http.StatusTooManyRequests {
		w.Header().Set("Retry-After", "1")
	}
	w.WriteHeader(status)
	fmt.Fprintf(w, `{"message":"%d %s (chaos)"}`+"\n", status, http.StatusText(status))
}

// hookProxy is the network between GitLab's webhook sender and FireRunner:
// it answers GitLab at once, drops a share of the hooks, delivers the rest
// 1 to maxCopies times, each copy after its own random delay (so hooks of a
// job arrive out of order and duplicates spread out). A copy that finds
// FireRunner down is lost: GitLab does not redeliver.
type hookProxy struct {
	target    atomic.Pointer[string]
	targets   atomic.Pointer[[]string] // a fleet: each delivery to one of them at random
	drop      float64
	maxCopies int
	maxDelay  time.Duration
	rnd       *lockedRand
	client    *http.Client
	wg        sync.WaitGroup
	closed    atomic.Bool

	received, dropped, sent, failed atomic.Int64
}

func newHookProxy(drop float64, maxCopies int, maxDelay time.Duration, rnd *lockedRand) *hookProxy {
	return &hookProxy{drop: drop, maxCopies: maxCopies, maxDelay: maxDelay, rnd: rnd,
		client: &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{MaxIdleConnsPerHost: 32}}}
}

func (p *hookProxy) setTarget(u string) { p.target.Store(&u) }

func (p *hookProxy) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	body, err := io.ReadAll(io.LimitReader(r.Body, 4<<20))
	if err != nil {
		w.WriteHeader(http.StatusBadRequest)
		return
	}
	hdr := r.Header.Clone()
	w.WriteHeader(http.StatusOK)
	p.received.Add(1)
	if p.rnd.Float64() < p.drop || p.closed.Load() {
		p.dropped.Add(1)
		return
	}
	copies := 1 + p.rnd.IntN(p.maxCopies)
	for range copies {
		delay := p.rnd.Duration(0, p.maxDelay)
		p.wg.Add(1)
		go func() {
			defer p.wg.Done()
			time.Sleep(delay)
			p.deliver(hdr, body)
		}()
	}
}

func (p *hookProxy) deliver(hdr http.Header, body []byte) {
	t := p.target.Load()
	if ts := p.targets.Load(); ts != nil && len(*ts) > 0 {
		t = &(*ts)[p.rnd.IntN(len(*ts))]
	}
	if t == nil || p.closed.Load() {
		p.failed.Add(1)
		return
	}
	req, err := http.NewRequest(http.MethodPost, *t, bytes.NewReader(body))
	if err != nil {
		p.failed.Add(1)
		return
	}
	req.Header = hdr.Clone()
	resp, err := p.client.Do(req)
	if err != nil {
		p.failed.Add(1)
		return
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode/100 != 2 {
		p.failed.Add(1)
		return
	}
	p.sent.Add(1)
}

func (p *hookProxy) close() {
	p.closed.Store(true)
	p.wg.Wait()
}
