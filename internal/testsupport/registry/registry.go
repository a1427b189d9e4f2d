// Package registry runs the real CNCF distribution registry (Debian's
// docker-registry) for tests, the demo and the benchmark, and builds small
// container images with no internet: from busybox-static, or from host
// binaries with their shared libraries. A Registry started with a remote is
// a pull-through cache of it, as `install.sh --registry-mirror` sets one up.
package registry

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Binary is the distribution registry's path (Debian package docker-registry).
const Binary = "/usr/bin/docker-registry"

// Registry is one running docker-registry process.
type Registry struct {
	// Addr is host:port on 127.0.0.1.
	Addr string
	dir  string
	cmd  *exec.Cmd
	done chan struct{}
	mu   sync.Mutex
	log  []string
}

// Start runs a registry storing in dir/data and listening on 127.0.0.1:port
// (port 0: a free one). With remote (an http(s) URL) it is a pull-through
// cache of that registry.
func Start(ctx context.Context, dir string, port int, remote string) (*Registry, error) {
	if err := os.MkdirAll(filepath.Join(dir, "data"), 0o755); err != nil {
		return nil, err
	}
	if port == 0 {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		port = l.Addr().(*net.TCPAddr).Port
		l.Close()
	}
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	cfg := fmt.Sprintf(`version: 0.1
log:
  level: info
  formatter: text
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: %s
  delete:
    enabled: true
http:
  addr: %s
`, filepath.Join(dir, "data"), addr)
	if remote != "" {
		cfg += "proxy:\n  remoteurl: " + remote + "\n"
	}
	cfgPath := filepath.Join(dir, "config.yml")
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o644); err != nil {
		return nil, err
	}
	cmd := exec.Command(Binary, "serve", cfgPath)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	out, err := cmd.StderrPipe()
	if err != nil {
		return nil, err
	}
	cmd.Stdout = cmd.Stderr
	logf, err := os.Create(filepath.Join(dir, "registry.log"))
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		logf.Close()
		return nil, fmt.Errorf("start %s: %w", Binary, err)
	}
	r := &Registry{Addr: addr, dir: dir, cmd: cmd, done: make(chan struct{})}
	go func() {
		defer close(r.done)
		defer logf.Close()
		sc := bufio.NewScanner(out)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			fmt.Fprintln(logf, sc.Text())
			r.mu.Lock()
			r.log = append(r.log, sc.Text())
			r.mu.Unlock()
		}
		_ = cmd.Wait()
	}()
	deadline := time.Now().Add(30 * time.Second)
	for {
		resp, err := http.Get("http://" + addr + "/v2/")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return r, nil
			}
		}
		select {
		case <-r.done:
			return nil, fmt.Errorf("docker-registry exited: %s", r.tail(20))
		case <-ctx.Done():
			r.Close()
			return nil, ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			r.Close()
			return nil, fmt.Errorf("docker-registry at %s not answering: %s", addr, r.tail(20))
		}
	}
}

// Close stops the registry.
func (r *Registry) Close() {
	if r.cmd.Process != nil {
		_ = syscall.Kill(-r.cmd.Process.Pid, syscall.SIGKILL)
	}
	<-r.done
}

// Dir is the registry's directory (config, data, registry.log).
func (r *Registry) Dir() string { return r.dir }

// Log returns the registry's log lines so far (access log included).
func (r *Registry) Log() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]string(nil), r.log...)
}

func (r *Registry) tail(n int) string {
	l := r.Log()
	if len(l) > n {
		l = l[len(l)-n:]
	}
	return strings.Join(l, "\n")
}

var accessLine = regexp.MustCompile(`"(GET|HEAD) (/v2/[^ ]+) HTTP/[0-9.]+" ([0-9]{3}) ([0-9]+)`)

// Request is one access-log entry.
type Request struct {
	Method, Path string
	Status       int
	Bytes        int64
}

// Requests parses the access log: every GET and HEAD under /v2/.
func (r *Registry) Requests() []Request {
	var out []Request
	for _, l := range r.Log() {
		m := accessLine.FindStringSubmatch(l)
		if m == nil {
			continue
		}
		var q Request
		q.Method, q.Path = m[1], m[2]
		fmt.Sscan(m[3], &q.Status)
		fmt.Sscan(m[4], &q.Bytes)
		out = append(out, q)
	}
	return out
}

// BlobGets counts successful GETs of blobs of repository repo (e.g.
// "library/busybox"): image layers and configs served.
func (r *Registry) BlobGets(repo string) int {
	n := 0
	for _, q := range r.Requests() {
		if q.Method == "GET" && q.Status == 200 && strings.HasPrefix(q.Path, "/v2/"+repo+"/blobs/sha256:") {
			n++
		}
	}
	return n
}

// Push copies a `docker save` archive into the registry as ref
// ("repo:tag") with skopeo (plain HTTP, no signature policy).
func (r *Registry) Push(ctx context.Context, archive, ref string) error {
	out, err := exec.CommandContext(ctx, "skopeo", "--insecure-policy", "copy", "--quiet", "--dest-tls-verify=false",
		"docker-archive:"+archive, "docker://"+r.Addr+"/"+ref).CombinedOutput()
	if err != nil {
		return fmt.Errorf("skopeo copy %s -> %s/%s: %w: %s", archive, r.Addr, ref, err, strings.TrimSpace(string(out)))
	}
	return nil
}

// ErrMissing is returned by Check when a host tool is absent.
var ErrMissing = errors.New("missing")

// Check reports the host tools this package needs (docker-registry, skopeo).
func Check() error {
	var miss []string
	if _, err := os.Stat(Binary); err != nil {
		miss = append(miss, "docker-registry (Debian package docker-registry)")
	}
	if _, err := exec.LookPath("skopeo"); err != nil {
		miss = append(miss, "skopeo")
	}
	if len(miss) > 0 {
		return fmt.Errorf("%w: %s (make deps installs them)", ErrMissing, strings.Join(miss, ", "))
	}
	return nil
}

// WaitStored waits until the registry holds each blob (sha256 hex digests)
// in its storage. A pull-through cache stores a blob it streams to a client
// in the background and commits it only when the upstream fetch is done, so
// a second pull right after the first can still reach the upstream; a test
// of "the second pull is served from the cache" waits for this instead of
// guessing a delay.
func (r *Registry) WaitStored(ctx context.Context, digests []string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for _, d := range digests {
		if len(d) != 64 {
			return fmt.Errorf("registry: %q is not a sha256 hex digest", d)
		}
		p := filepath.Join(r.dir, "data", "docker", "registry", "v2", "blobs", "sha256", d[:2], d, "data")
		for {
			if _, err := os.Stat(p); err == nil {
				break
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("registry: blob %s not stored within %s", d[:12], timeout)
			}
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-time.After(50 * time.Millisecond):
			}
		}
	}
	return nil
}
