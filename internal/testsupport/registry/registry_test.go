package registry

import (
	"archive/tar"
	"context"
	"io"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/firerunner/firerunner/internal/testenv"
)

// TestMirrorServesFromCache pushes the test images to an upstream registry
// and pulls one through a real pull-through cache twice with skopeo: the
// first pull reaches the upstream, the second is served from the cache.
func TestMirrorServesFromCache(t *testing.T) {
	if err := Check(); err != nil {
		testenv.Missing(t, err.Error(), "apt-get install docker-registry skopeo docker.io busybox-static, or run make deps")
	}
	ctx := context.Background()
	m, err := StartMirror(ctx, t.TempDir(), 0)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	var up, mr [2]int
	for i := 0; i < 2; i++ {
		dst := t.TempDir()
		out, err := exec.CommandContext(ctx, "skopeo", "--insecure-policy", "copy", "--quiet", "--src-tls-verify=false",
			"docker://"+m.Mirror.Addr+"/library/busybox:latest", "dir:"+dst).CombinedOutput()
		if err != nil {
			t.Fatalf("pull %d through the mirror: %v: %s", i, err, out)
		}
		if ents, _ := os.ReadDir(dst); len(ents) < 3 {
			t.Fatalf("pull %d: %d files", i, len(ents))
		}
		if i == 0 {
			// The proxy commits a blob it streamed only when its own
			// upstream fetch ends (in the background); the second VM of a
			// fleet pulls seconds later, not in the same millisecond.
			// Counted after the wait: the store's own upstream GET may
			// come after skopeo has finished.
			digests := blobDigests(t, dst)
			if err := m.Mirror.WaitStored(ctx, digests, 30*time.Second); err != nil {
				t.Fatal(err)
			}
			// The upstream logs a fetch after its last byte is sent,
			// which can be after the mirror committed the blob.
			waitUpstreamFetches(t, m.Upstream, digests, 2, 10*time.Second)
		}
		up[i], mr[i] = m.Upstream.BlobGets("library/busybox"), m.Mirror.BlobGets("library/busybox")
	}
	// Pull 1: the mirror serves 2 blobs (config, layer) fetched upstream
	// (distribution 2.8 fetches a blob twice: one stream for the client,
	// one for its store). Pull 2: 2 more served, none fetched upstream.
	if mr[0] != 2 || mr[1] != 4 || up[0] == 0 || up[1] != up[0] {
		t.Errorf("blob GETs after pull 1 and 2: mirror %v (want [2 4]), upstream %v (want [n n], n > 0)\nupstream log:\n%s",
			mr, up, strings.Join(m.Upstream.Log(), "\n"))
	}
	// The same per blob, independent of when the upstream logged its
	// lines: a blob the cache did not serve would have been fetched a
	// third time (distribution streams a blob whose store is in flight
	// straight from the upstream again).
	for d, n := range upstreamBlobGets(m.Upstream) {
		if n > 2 {
			t.Errorf("blob %s fetched %d times from the upstream, want at most 2 (one stream, one store)", d[:19], n)
		}
	}
}

// waitUpstreamFetches waits until the upstream has logged n GETs of each
// digest.
func waitUpstreamFetches(t *testing.T, r *Registry, digests []string, n int, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		got, short := upstreamBlobGets(r), ""
		for _, d := range digests {
			if got["sha256:"+d] < n {
				short = d
			}
		}
		if short == "" {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("upstream logged %d GETs of blob %s within %s, want %d\n%s", got["sha256:"+short], short[:12], timeout, n,
				strings.Join(r.Log(), "\n"))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// upstreamBlobGets counts the successful blob GETs r served per digest.
func upstreamBlobGets(r *Registry) map[string]int {
	out := map[string]int{}
	for _, q := range r.Requests() {
		if i := strings.Index(q.Path, "/blobs/"); q.Method == "GET" && q.Status == 200 && i >= 0 {
			out[q.Path[i+len("/blobs/"):]]++
		}
	}
	return out
}

// blobDigests are the sha256 digests of the blobs skopeo copied into dir
// (dir: transport files are named by digest).
func blobDigests(t *testing.T, dir string) []string {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range ents {
		if n := e.Name(); len(n) == 64 && strings.Trim(n, "0123456789abcdef") == "" {
			out = append(out, n)
		}
	}
	if len(out) == 0 {
		t.Fatalf("no blobs in %s", dir)
	}
	return out
}

// layerEntries lists the entries of a one-layer docker save archive.
func layerEntries(t *testing.T, archive string) map[string]*tar.Header {
	t.Helper()
	f, err := os.Open(archive)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	out := map[string]*tar.Header{}
	tr := tar.NewReader(f)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return out
		}
		if err != nil {
			t.Fatal(err)
		}
		if strings.HasSuffix(h.Name, "/layer.tar") {
			lr := tar.NewReader(tr)
			for {
				lh, err := lr.Next()
				if err == io.EOF {
					break
				}
				if err != nil {
					t.Fatal(err)
				}
				out[lh.Name] = lh
			}
		}
	}
}

// The test images hold what their jobs run: dynamically linked binaries
// find their interpreter and libc at the paths they name.
func TestBuildImages(t *testing.T) {
	if err := Check(); err != nil {
		testenv.Missing(t, err.Error(), "apt-get install docker-registry skopeo busybox-static, or run make deps")
	}
	imgs, err := BuildImages(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	for name, want := range map[string][]string{
		ImageBusybox:   {"usr/bin/busybox", "usr/bin/sh", "bin", "tmp/"},
		ImageWeb:       {"usr/bin/httpd", "www/index.html"},
		ImageDockerCLI: {"usr/bin/docker", "lib64", "usr/lib64/ld-linux-x86-64.so.2", "usr/lib/x86_64-linux-gnu/libc.so.6"},
		ImageShell:     {"usr/bin/git", "usr/lib/git-core/git-remote-http", "lib64", "etc/ssl/certs/ca-certificates.crt"},
	} {
		e := layerEntries(t, imgs[name])
		for _, w := range want {
			if _, ok := e[w]; !ok {
				t.Errorf("%s lacks %s", name, w)
			}
		}
		if h := e["lib64"]; h != nil && (h.Typeflag != tar.TypeSymlink || h.Linkname != "usr/lib64") {
			t.Errorf("%s: lib64 is %+v, want a symlink to usr/lib64", name, h)
		}
		if h := e["tmp/"]; h == nil || h.Mode&0o1777 != 0o1777 {
			t.Errorf("%s: /tmp is not 1777: %+v", name, h)
		}
	}
}
