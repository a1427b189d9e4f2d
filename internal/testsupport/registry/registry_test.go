package registry

import (
	"context"
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
		if i > 0 {
			// The proxy stores a blob while it streams it; the second VM
			// of a fleet pulls seconds later, not in the same millisecond.
			time.Sleep(2 * time.Second)
		}
		dst := t.TempDir()
		out, err := exec.CommandContext(ctx, "skopeo", "--insecure-policy", "copy", "--quiet", "--src-tls-verify=false",
			"docker://"+m.Mirror.Addr+"/library/busybox:latest", "dir:"+dst).CombinedOutput()
		if err != nil {
			t.Fatalf("pull %d through the mirror: %v: %s", i, err, out)
		}
		if ents, _ := os.ReadDir(dst); len(ents) < 3 {
			t.Fatalf("pull %d: %d files", i, len(ents))
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
}
