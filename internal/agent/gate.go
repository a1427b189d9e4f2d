package agent

import (
	"bytes"
	"compress/gzip"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"regexp"
	"strconv"
	"strings"
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
//
// The gate also remembers the job it let through (id and job token, in
// memory only) and whether GitLab has its end: a final update answered
// 200, or any update answered 403/404 (GitLab ended the job itself). When
// gitlab-runner is gone without either (it abandoned the job after an
// early error, crashed, or was killed at the job's timeout), FailJob
// reports the end in its place, so the job never stays "running" in
// GitLab with no VM behind it.
type JobGate struct {
	srv    *http.Server
	ln     net.Listener
	target atomic.Pointer[url.URL]
	proxy  *httputil.ReverseProxy
	taken  atomic.Bool
	again  chan struct{}
	once   sync.Once
	picked chan struct{} // closed when GitLab hands out the job
	pickMu sync.Once

	mu          sync.Mutex
	job         gatedJob
	traceNext   int64 // the next trace offset GitLab expects
	timestamped bool  // gitlab-runner writes the trace with timestamps (a patch began with one)
	closed      bool  // GitLab has the job's end
}

// gatedJob is what the gate keeps of the job payload GitLab handed out.
type gatedJob struct {
	ID    int64  `json:"id"`
	Token string `json:"token"`
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
	g := &JobGate{ln: ln, again: make(chan struct{}), picked: make(chan struct{})}
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

// Picked is closed when GitLab hands gitlab-runner its job.
func (g *JobGate) Picked() <-chan struct{} { return g.picked }

// Taken reports whether GitLab handed gitlab-runner its job.
func (g *JobGate) Taken() bool { return g.taken.Load() }

// ServeHTTP implements http.Handler.
func (g *JobGate) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	// Full duplex: the proxy's transport may still read the request body
	// (the read that sees its EOF) after GitLab's answer began. Without it
	// net/http's server closes the body when the proxy writes the response
	// header, the transport's write fails on the closed body and tears down
	// the upstream connection while the answer is copied: gitlab-runner got
	// a job payload cut short ("decoding json payload unexpected EOF"),
	// GitLab had marked the job running, and it asked for another.
	_ = http.NewResponseController(w).EnableFullDuplex()
	if g.target.Load() == nil {
		http.Error(w, "no GitLab yet", http.StatusServiceUnavailable)
		return
	}
	if m := jobUpdatePath.FindStringSubmatch(r.URL.Path); m != nil && g.isOurJob(m[1]) &&
		((r.Method == http.MethodPut && m[2] == "") || (r.Method == http.MethodPatch && m[2] != "")) {
		g.watchUpdate(w, r, m[2] != "")
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
	pw := &pickWatcher{ResponseWriter: w, picked: &g.taken}
	g.proxy.ServeHTTP(pw, r)
	if pw.code == http.StatusCreated {
		g.pickMu.Do(func() { close(g.picked) })
	}
	if pw.code == http.StatusCreated && !pw.overflow {
		// The job is known before gitlab-runner has its payload, so its
		// first update already counts.
		var j gatedJob
		if err := decodePayload(pw.Header().Get("Content-Encoding"), pw.body.Bytes(), &j); err == nil && j.ID > 0 && j.Token != "" {
			g.mu.Lock()
			g.job = j
			g.mu.Unlock()
		}
		_, _ = w.Write(pw.body.Bytes())
	}
}

// decodePayload reads a job payload as GitLab sent it: gzip-compressed
// when gitlab-runner's request accepted that (its HTTP client asks for gzip
// by default, and the gate passes the response on untouched).
func decodePayload(encoding string, b []byte, v any) error {
	var r io.Reader = bytes.NewReader(b)
	if strings.EqualFold(strings.TrimSpace(encoding), "gzip") {
		zr, err := gzip.NewReader(r)
		if err != nil {
			return err
		}
		defer zr.Close()
		r = io.LimitReader(zr, maxJobPayload)
	}
	return json.NewDecoder(r).Decode(v)
}

// jobUpdatePath matches gitlab-runner's job update (PUT) and trace
// (PATCH) requests.
var jobUpdatePath = regexp.MustCompile(`^/api/v4/jobs/([0-9]+)(/trace)?$`)

// finalStates are the states of a job update that end the job.
var finalStates = map[string]bool{"success": true, "failed": true}

// watchUpdate proxies a job update or trace patch and notes what GitLab's
// answer says about the job's end and the trace's length.
func (g *JobGate) watchUpdate(w http.ResponseWriter, r *http.Request, trace bool) {
	final := false
	if !trace && r.Body != nil {
		// The update's body is small JSON; read it to learn its state.
		b, err := io.ReadAll(io.LimitReader(r.Body, 1<<20))
		r.Body.Close()
		if err != nil {
			http.Error(w, "job gate: reading the update", http.StatusBadRequest)
			return
		}
		var u struct {
			State string `json:"state"`
		}
		final = json.Unmarshal(b, &u) == nil && finalStates[u.State]
		r.Body = io.NopCloser(bytes.NewReader(b))
		r.ContentLength = int64(len(b))
	}
	var head *headReader
	if trace && r.Body != nil {
		head = &headReader{r: r.Body}
		r.Body = head
	}
	rw := &statusWatcher{ResponseWriter: w}
	g.proxy.ServeHTTP(rw, r)
	g.mu.Lock()
	defer g.mu.Unlock()
	switch {
	case rw.code == http.StatusForbidden || rw.code == http.StatusNotFound:
		g.closed = true // GitLab no longer runs the job: nothing to report
	case final && rw.code == http.StatusOK:
		g.closed = true
	case trace && (rw.code == http.StatusAccepted || rw.code == http.StatusRequestedRangeNotSatisfiable):
		// Sticky: a patch may begin mid-line (gitlab-runner sends what
		// it has), so only a match says something.
		if rw.code == http.StatusAccepted && head != nil && timestampedLine.Match(head.buf[:head.n]) {
			g.timestamped = true
		}
		// Range: 0-N, N the trace's length in GitLab: the next offset
		// (gitlab-runner's TracePatchResponse.NewOffset reads it so).
		if _, end, ok := strings.Cut(rw.Header().Get("Range"), "-"); ok {
			if n, err := strconv.ParseInt(end, 10, 64); err == nil && n > g.traceNext {
				g.traceNext = n
			}
		}
	}
}

// timestampedLine is the start of a trace line gitlab-runner writes with
// timestamps (its log format: RFC 3339 UTC time, stream number, stream
// type O or E, "+" for a continued line).
var timestampedLine = regexp.MustCompile(`^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9:.]+Z [0-9a-f]{2}[OE]`)

// headReader keeps the first bytes read through it.
type headReader struct {
	r   io.ReadCloser
	buf [64]byte
	n   int
}

func (h *headReader) Read(p []byte) (int, error) {
	n, err := h.r.Read(p)
	h.n += copy(h.buf[h.n:], p[:n])
	return n, err
}

func (h *headReader) Close() error { return h.r.Close() }

// traceNote formats lines for the job's trace the way gitlab-runner
// writes it, so GitLab's log view parses them.
func traceNote(lines []string, timestamped bool, now time.Time) string {
	var b strings.Builder
	for _, l := range lines {
		if timestamped {
			b.WriteString(now.UTC().Format("2006-01-02T15:04:05.000000Z") + " 00O ")
		}
		b.WriteString(l)
		b.WriteString("\n")
	}
	return b.String()
}

// Abandoned reports whether GitLab handed out a job whose end it has not
// been told.
func (g *JobGate) Abandoned() bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.job.ID > 0 && !g.closed
}

// JobID is the id of the job GitLab handed out (0: none yet).
func (g *JobGate) JobID() int64 {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.job.ID
}

// FailJob ends an abandoned job in GitLab as gitlab-runner would have:
// the lines of note appended to its trace, then a final update with state
// "failed" and reason (GitLab's failure_reason, e.g.
// runner_system_failure), with the job's own token. It retries briefly;
// GitLab answering 403/404 means the job is already over, which is fine.
func (g *JobGate) FailJob(ctx context.Context, reason string, note ...string) error {
	g.mu.Lock()
	j, off, closed, stamped := g.job, g.traceNext, g.closed, g.timestamped
	g.mu.Unlock()
	if j.ID == 0 || closed {
		return nil
	}
	target := g.target.Load()
	if target == nil {
		return errors.New("job gate: no GitLab URL")
	}
	base := strings.TrimSuffix(target.String(), "/") + "/api/v4/jobs/" + strconv.FormatInt(j.ID, 10)
	// Each request bounded (the caller bounds them all): the host kills
	// the VM a grace period after the job's limit.
	client := &http.Client{Transport: g.transport(), Timeout: 4 * time.Second}
	if len(note) > 0 {
		// Best effort: a trace GitLab does not take (416: another length)
		// does not stop the final update.
		text := traceNote(note, stamped, time.Now())
		req, err := http.NewRequestWithContext(ctx, http.MethodPatch, base+"/trace", strings.NewReader(text))
		if err == nil {
			req.Header.Set("JOB-TOKEN", j.Token)
			req.Header.Set("Content-Type", "text/plain")
			req.Header.Set("Content-Range", fmt.Sprintf("%d-%d", off, off+int64(len(text))-1))
			if resp, err := client.Do(req); err == nil {
				resp.Body.Close()
			}
		}
	}
	body, _ := json.Marshal(map[string]any{"token": j.Token, "state": "failed", "failure_reason": reason})
	var last error
	for attempt := 0; attempt < 4; attempt++ {
		if attempt > 0 {
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-time.After(time.Duration(attempt) * time.Second):
			}
		}
		req, err := http.NewRequestWithContext(ctx, http.MethodPut, base, bytes.NewReader(body))
		if err != nil {
			return err
		}
		req.Header.Set("JOB-TOKEN", j.Token)
		req.Header.Set("Content-Type", "application/json")
		resp, err := client.Do(req)
		if err != nil {
			last = err
			continue
		}
		resp.Body.Close()
		switch resp.StatusCode {
		case http.StatusOK, http.StatusForbidden, http.StatusNotFound:
			g.mu.Lock()
			g.closed = true
			g.mu.Unlock()
			return nil
		}
		last = fmt.Errorf("GitLab answered %s", resp.Status)
	}
	return fmt.Errorf("job gate: reporting job %d failed: %w", j.ID, last)
}

// transport is the proxy's: the same TLS trust as gitlab-runner's requests
// (the system's, which holds the config's extra CAs), and its connections
// to GitLab, known to work.
func (g *JobGate) transport() http.RoundTripper {
	if g.proxy.Transport != nil {
		return g.proxy.Transport
	}
	return http.DefaultTransport
}

// Close stops the gate.
func (g *JobGate) Close() {
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	_ = g.srv.Shutdown(ctx)
}

// isOurJob reports whether id (decimal) is the job the gate let through.
func (g *JobGate) isOurJob(id string) bool {
	n, err := strconv.ParseInt(id, 10, 64)
	g.mu.Lock()
	defer g.mu.Unlock()
	return err == nil && n == g.job.ID && n > 0
}

// maxJobPayload bounds the copy of a job payload the gate parses; a
// payload past it (huge variables) leaves the job's end to gitlab-runner.
const maxJobPayload = 8 << 20

// pickWatcher notes a 201 to a job request (GitLab handed out a job) and
// holds back its payload (up to maxJobPayload; past it, it streams on) for
// the gate to read the job's id and token first.
type pickWatcher struct {
	http.ResponseWriter
	picked   *atomic.Bool
	code     int
	body     bytes.Buffer
	overflow bool
}

func (p *pickWatcher) WriteHeader(code int) {
	p.code = code
	if code == http.StatusCreated {
		p.picked.Store(true)
	}
	p.ResponseWriter.WriteHeader(code)
}

func (p *pickWatcher) Write(b []byte) (int, error) {
	if p.code == 0 {
		p.code = http.StatusOK
	}
	if p.code != http.StatusCreated || p.overflow {
		return p.ResponseWriter.Write(b)
	}
	if p.body.Len()+len(b) <= maxJobPayload {
		return p.body.Write(b)
	}
	p.overflow = true
	if _, err := p.ResponseWriter.Write(p.body.Bytes()); err != nil {
		return 0, err
	}
	return p.ResponseWriter.Write(b)
}

// statusWatcher notes the status of a proxied response.
type statusWatcher struct {
	http.ResponseWriter
	code int
}

func (s *statusWatcher) WriteHeader(code int) {
	s.code = code
	s.ResponseWriter.WriteHeader(code)
}

func (s *statusWatcher) Flush() {
	if f, ok := s.ResponseWriter.(http.Flusher); ok {
		f.Flush()
	}
}

func (p *pickWatcher) Flush() {
	if f, ok := p.ResponseWriter.(http.Flusher); ok {
		f.Flush()
	}
}
