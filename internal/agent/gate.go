package agent

import (
	"context"
	"errors"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"sync"
	"sync/atomic"
	"time"
)

// JobGate stands between gitlab-runner and GitLab (a reverse proxy on the
// guest's loopback; gitlab-runner's url points at it) and lets exactly one
// job through: once GitLab has handed gitlab-runner a job (201 to POST
// /api/v4/jobs/request), any further job request is answered "no job"
// (204) without reaching GitLab, and Again is closed so the agent ends
// gitlab-runner.
//
// Why: run-single --max-builds 1 counts a build only when it ran to its
// end. When the first job ends early (the job request's first update
// answered 403 or "canceled", NewBuild or ProcessJob failing), gitlab-runner
// asks for another job at once, and with a pool's shared runner, or a
// one-off runner whose tags cover other pending jobs, GitLab would give it
// one: a second job in a VM that must run one. gitlab-runner only asks
// again after its job is over, so ending it then kills nothing.
type JobGate struct {
	srv    *http.Server
	ln     net.Listener
	target atomic.Pointer[url.URL]
	proxy  *httputil.ReverseProxy
	taken  atomic.Bool
	again  chan struct{}
	once   sync.Once
}

// jobRequestPath is gitlab-runner's job request (common/network.go).
const jobRequestPath = "/api/v4/jobs/request"

// NewJobGate listens on a loopback port; SetTarget names GitLab before the
// first request (a warm VM learns it only with its assignment).
func NewJobGate() (*JobGate, error) { return NewJobGateAt("127.0.0.1:0") }

// NewJobGateAt listens on addr (host:port, port 0 picks one); URL names
// that address. The docker executor's containers reach GitLab through the
// runner's URL too (artifacts, caches from the helper container), so there
// it is the VM's own address, which containers reach and loopback is not.
func NewJobGateAt(addr string) (*JobGate, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, err
	}
	g := &JobGate{ln: ln, again: make(chan struct{})}
	g.proxy = &httputil.ReverseProxy{
		Rewrite: func(r *httputil.ProxyRequest) {
			r.SetURL(g.target.Load())
			r.Out.Host = r.Out.URL.Host
		},
		FlushInterval: -1, // traces and long polls pass at once
	}
	g.srv = &http.Server{Handler: g, ReadHeaderTimeout: time.Minute}
	go func() { _ = g.srv.Serve(ln) }()
	return g, nil
}

// URL is what gitlab-runner's config names as GitLab.
func (g *JobGate) URL() string { return "http://" + g.ln.Addr().String() }

// SetTarget sets GitLab's URL (http or https).
func (g *JobGate) SetTarget(gitlabURL string) error {
	u, err := url.Parse(gitlabURL)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return errors.New("job gate: GitLab URL is not an http(s) URL")
	}
	g.target.Store(u)
	return nil
}

// Again is closed when gitlab-runner asks for a second job.
func (g *JobGate) Again() <-chan struct{} { return g.again }

// Taken reports whether GitLab handed gitlab-runner its job.
func (g *JobGate) Taken() bool { return g.taken.Load() }

// ServeHTTP implements http.Handler.
func (g *JobGate) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if g.target.Load() == nil {
		http.Error(w, "no GitLab yet", http.StatusServiceUnavailable)
		return
	}
	if r.Method != http.MethodPost || r.URL.Path != jobRequestPath {
		g.proxy.ServeHTTP(w, r)
		return
	}
	if g.taken.Load() {
		g.once.Do(func() { close(g.again) })
		w.WriteHeader(http.StatusNoContent) // "no job": nothing reaches GitLab
		return
	}
	g.proxy.ServeHTTP(&pickWatcher{ResponseWriter: w, picked: &g.taken}, r)
}

// Close stops the gate.
func (g *JobGate) Close() {
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	_ = g.srv.Shutdown(ctx)
}

// pickWatcher notes a 201 to a job request: GitLab handed out a job.
type pickWatcher struct {
	http.ResponseWriter
	picked *atomic.Bool
}

func (p *pickWatcher) WriteHeader(code int) {
	if code == http.StatusCreated {
		p.picked.Store(true)
	}
	p.ResponseWriter.WriteHeader(code)
}

func (p *pickWatcher) Flush() {
	if f, ok := p.ResponseWriter.(http.Flusher); ok {
		f.Flush()
	}
}
