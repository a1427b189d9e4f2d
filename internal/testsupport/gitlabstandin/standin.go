// Package gitlabstandin is a GitLab stand-in for tests and the demo: the REST
// API FireRunner uses, the runner API the official gitlab-runner uses, git over smart HTTP and Job Hook webhooks.
package gitlabstandin

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Version is the GitLab version the stand-in claims to be.
const Version = "19.4.0"

// Options configure a Server. The zero value is usable.
type Options struct {
	// Addr to listen on; default 127.0.0.1:0.
	Addr string
	// Dir holds the git repositories; default a temp dir removed by Close.
	Dir string
	// ExternalURL is the base URL put into job payloads and webhooks (e.g.
	// reachable from a VM); default the listener's http://host:port.
	ExternalURL string
	// ExternalHost, if set (and ExternalURL not), makes the base URL
	// http://ExternalHost:<listener port>, e.g. the host's address on a VM
	// network with Addr "0.0.0.0:0".
	ExternalHost string
	// WebhookURL receives Job Hook deliveries (empty: none); WebhookSecret is
	// sent as X-Gitlab-Token.
	WebhookURL, WebhookSecret string
	// ProjectRunnerCap / GroupRunnerCap limit a project's / group's runners
	// created or active in the past 7 days (GitLab's ci_registered_*_runners
	// plan limits; GitLab.com Free: 50): runners that exist, so deleting one
	// frees its slot, as on GitLab. 0 means 50; <0 unlimited.
	ProjectRunnerCap, GroupRunnerCap int
	// LongPoll is how long POST /jobs/request waits for a job before 204
	// (Workhorse long polling). 0 means 5s; <0 disables.
	LongPoll time.Duration
	// TraceUpdateInterval is sent as X-GitLab-Trace-Update-Interval. 0 means 3s.
	TraceUpdateInterval time.Duration
	// HardCancel cancels running jobs at once (canceled, runner aborts on
	// its next call) instead of GitLab's graceful "canceling" for runners
	// announcing cancel_gracefully (which runs after_script first).
	HardCancel bool
	// Logger for requests and deliveries; default discards.
	Logger *slog.Logger
}

// Server is a running GitLab stand-in. Typical test use:
//
//	s, _ := gitlabstandin.New(gitlabstandin.Options{WebhookURL: fr + "/webhook", WebhookSecret: sec})
//	defer s.Close()
//	s.AddToken(pat, gitlabstandin.ScopeAPI)             // FireRunner's token
//	p, _ := s.AddProject(gitlabstandin.ProjectSpec{Path: "demo/app", Files: files})
//	pl, _ := s.CreatePipeline(p.ID, gitlabstandin.JobSpec{Name: "a", Tags: tags, Script: script})
//	st, _ := s.WaitJob(ctx, pl.JobIDs[0], nil)          // terminal: st.Status, st.Trace, st.RunnerID
//	s.Cancel(id); s.Runners(); s.Runner(id); s.Deliveries(); s.Requests()
//
// Failure injection: FailNext, DropWebhooks, DuplicateWebhooks, Redeliver,
// SetRunnerCaps, RevokeToken.
type Server struct {
	opts    Options
	log     *slog.Logger
	dir     string
	tempDir bool
	ln      net.Listener
	http    *http.Server
	baseURL string

	ctx    context.Context
	cancel context.CancelFunc
	hooks  *hookSender

	mu       sync.Mutex
	changed  chan struct{} // closed and replaced on every state change
	nextID   map[string]int64
	tokens   map[string]*token
	groups   map[int64]*group
	projects map[int64]*project
	pipes    map[int64]*pipeline
	jobs     map[int64]*job
	runners  map[int64]*runner
	deleted  map[int64]*runner
	faults   []*fault
	hold     func(RunnerState) bool
	requests []Request
	after    func(Request) // AfterRequest's hook
	projCap  int
	groupCap int
}

// New starts a stand-in listening on opts.Addr.
func New(opts Options) (*Server, error) {
	s := &Server{
		opts:     opts,
		log:      opts.Logger,
		changed:  make(chan struct{}),
		nextID:   map[string]int64{},
		tokens:   map[string]*token{},
		groups:   map[int64]*group{},
		projects: map[int64]*project{},
		pipes:    map[int64]*pipeline{},
		jobs:     map[int64]*job{},
		runners:  map[int64]*runner{},
		deleted:  map[int64]*runner{},
		projCap:  capOrDefault(opts.ProjectRunnerCap),
		groupCap: capOrDefault(opts.GroupRunnerCap),
	}
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	if s.opts.LongPoll == 0 {
		s.opts.LongPoll = 5 * time.Second
	}
	if s.opts.TraceUpdateInterval == 0 {
		s.opts.TraceUpdateInterval = 3 * time.Second
	}
	s.dir = opts.Dir
	if s.dir == "" {
		d, err := os.MkdirTemp("", "gitlab-standin-")
		if err != nil {
			return nil, err
		}
		s.dir, s.tempDir = d, true
	}
	if err := os.MkdirAll(filepath.Join(s.dir, "repos"), 0o755); err != nil {
		return nil, err
	}
	addr := opts.Addr
	if addr == "" {
		addr = "127.0.0.1:0"
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		s.cleanupDir()
		return nil, err
	}
	s.ln = ln
	s.baseURL = strings.TrimSuffix(opts.ExternalURL, "/")
	if s.baseURL == "" && opts.ExternalHost != "" {
		s.baseURL = "http://" + net.JoinHostPort(opts.ExternalHost, strconv.Itoa(ln.Addr().(*net.TCPAddr).Port))
	}
	if s.baseURL == "" {
		s.baseURL = "http://" + ln.Addr().String()
	}
	s.ctx, s.cancel = context.WithCancel(context.Background())
	s.hooks = newHookSender(s.ctx, s.log, opts.WebhookURL, opts.WebhookSecret)
	s.http = &http.Server{Handler: s, ReadHeaderTimeout: 10 * time.Second}
	go func() { _ = s.http.Serve(ln) }()
	return s, nil
}

func capOrDefault(n int) int {
	if n == 0 {
		return 50
	}
	return n
}

// URL is the stand-in's base URL (what gitlab-runner's --url and client-go's base URL take).
func (s *Server) URL() string { return s.baseURL }

// Addr is the listener address.
func (s *Server) Addr() string { return s.ln.Addr().String() }

// Close stops serving, aborts long polls and pending webhook deliveries and
// removes a temporary data dir.
func (s *Server) Close() error {
	s.cancel()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	err := s.http.Shutdown(ctx)
	s.hooks.wait()
	s.cleanupDir()
	return err
}

func (s *Server) cleanupDir() {
	if s.tempDir {
		_ = os.RemoveAll(s.dir)
	}
}

// id allocates the next id of a kind; ids are distinct per kind like GitLab's.
func (s *Server) id(kind string) int64 {
	s.nextID[kind]++
	return s.nextID[kind]
}

// notify wakes waiters (long polls, WaitJob). Caller holds s.mu.
func (s *Server) notify() {
	close(s.changed)
	s.changed = make(chan struct{})
}

// Request is one HTTP request the stand-in served (for timelines and asserts).
type Request struct {
	Time   time.Time
	Method string
	Path   string
	Status int
}

// Requests returns the requests served so far.
func (s *Server) Requests() []Request {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]Request(nil), s.requests...)
}

type fault struct {
	method, prefix string
	status, left   int
	until          time.Time // FailFor: fail every match until then
}

// FailNext makes the next n requests whose method matches (empty: any) and
// whose path starts with pathPrefix (e.g. "/api/v4/user/runners") fail with
// status (429 responses carry Retry-After: 1).
func (s *Server) FailNext(method, pathPrefix string, status, n int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.faults = append(s.faults, &fault{method: method, prefix: pathPrefix, status: status, left: n})
}

// ClearFaults ends every FailNext and FailFor: GitLab recovers.
func (s *Server) ClearFaults() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.faults = nil
}

// AfterRequest sets (nil: removes) a hook called once each request's
// answer is written (before the response is complete on the wire), outside
// the stand-in's lock: a test makes something happen in GitLab right after
// a given answer (e.g. a runner taking a job just after GET
// /runners/:id/jobs said it had none).
func (s *Server) AfterRequest(fn func(Request)) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.after = fn
}

// FailFor makes every request whose method matches (empty: any) and whose
// path starts with pathPrefix fail with status for d: an outage.
func (s *Server) FailFor(method, pathPrefix string, status int, d time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.faults = append(s.faults, &fault{method: method, prefix: pathPrefix, status: status, until: time.Now().Add(d)})
}

func (s *Server) takeFault(r *http.Request) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, f := range s.faults {
		if (f.method != "" && f.method != r.Method) || !strings.HasPrefix(r.URL.Path, f.prefix) {
			continue
		}
		if time.Now().Before(f.until) {
			return f.status
		}
		if f.left > 0 {
			f.left--
			return f.status
		}
	}
	return 0
}

// HoldRunners makes job requests of runners for which hold returns true
// find no job (as if none matched) until HoldRunners(nil): a test decides
// which runner polls "first", e.g. to make a runner take another job.
func (s *Server) HoldRunners(hold func(RunnerState) bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.hold = hold
	s.notify()
}

type statusRecorder struct {
	http.ResponseWriter
	status int
}

func (w *statusRecorder) WriteHeader(code int) {
	if w.status == 0 {
		w.status = code
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *statusRecorder) Write(b []byte) (int, error) {
	if w.status == 0 {
		w.status = http.StatusOK
	}
	return w.ResponseWriter.Write(b)
}

// ServeHTTP routes to the REST API, the runner API and git smart HTTP.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	rec := &statusRecorder{ResponseWriter: w}
	start := time.Now()
	defer func() {
		req := Request{Time: start, Method: r.Method, Path: r.URL.Path, Status: rec.status}
		s.mu.Lock()
		s.requests = append(s.requests, req)
		after := s.after
		s.mu.Unlock()
		if after != nil {
			after(req)
		}
		// Never log the query: tokens may be in it.
		s.log.Debug("request", "method", r.Method, "path", r.URL.Path, "status", rec.status, "duration", time.Since(start))
	}()
	if st := s.takeFault(r); st != 0 {
		if st == http.StatusTooManyRequests {
			rec.Header().Set("Retry-After", "1")
		}
		writeJSON(rec, st, map[string]any{"message": fmt.Sprintf("%d %s (injected)", st, http.StatusText(st))})
		return
	}
	switch {
	case strings.HasPrefix(r.URL.Path, "/api/v4/"):
		s.serveAPI(rec, r)
	case strings.Contains(r.URL.Path, ".git/") || strings.HasSuffix(r.URL.Path, ".git"):
		s.serveGit(rec, r)
	default:
		writeJSON(rec, http.StatusNotFound, map[string]any{"message": "404 Not Found"})
	}
}

// ErrNotFound is returned for unknown projects, jobs and runners.
var ErrNotFound = errors.New("not found")
