package demo

import (
	"bytes"
	"context"
	"os"
	"regexp"
	"strings"
	"sync"
	"testing"

	"github.com/firerunner/firerunner/internal/image"
	"github.com/firerunner/firerunner/internal/job"
	"github.com/firerunner/firerunner/internal/testenv"
	"github.com/firerunner/firerunner/internal/testsupport/gitlabstandin"
	"github.com/firerunner/firerunner/internal/testsupport/registry"
	"github.com/firerunner/firerunner/internal/vm"
)

// stageWatch is the demo's Out: it keeps the output and, when a job's
// "GitLab: success" line appears, calls onSuccess with the job's name.
type stageWatch struct {
	mu        sync.Mutex
	buf       bytes.Buffer
	line      []byte
	onSuccess func(name string)
}

var successLine = regexp.MustCompile(`job [0-9]+ (\S+)\s+GitLab: success`)

func (w *stageWatch) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.buf.Write(p)
	for _, c := range p {
		if c != '\n' {
			w.line = append(w.line, c)
			continue
		}
		if m := successLine.FindSubmatch(w.line); m != nil && w.onSuccess != nil {
			w.onSuccess(string(m[1]))
		}
		w.line = w.line[:0]
	}
	return len(p), nil
}

// TestDockerExecutorEndToEnd runs a pipeline with the docker executor in
// real VMs (QEMU) with the real gitlab-runner and the real Docker engine in
// each VM, pulling through a real docker-registry pull-through cache in front
// of a Docker Hub stand-in (both local, no internet):
//   - stage 1: a job with image: and a services: container reached by its
//     alias, in a warm pool VM (which reports itself warm only once Docker
//     is ready);
//   - stage 2: a job without image: (the runner's default image) running a
//     shell-style script, and a job that docker-builds the repository's
//     Dockerfile (FROM busybox) with the VM's own daemon and runs the result.
//
// The second VM pulling busybox (docker build's FROM) is served by the
// mirror: the upstream's log shows no busybox blob fetched after stage 1.
// No job pulls the helper image (it is preloaded), no runner token leaks
// into logs or the jobs' environment, nothing is left behind.
func TestDockerExecutorEndToEnd(t *testing.T) {
	testenv.RequireRoot(t)
	testenv.QEMU(t)
	dir := testenv.ImageDir(t)
	requireRunnerImage(t, dir)
	if m, err := image.Load(dir); err != nil || (m.Inputs.HelperSHA256 == "" && m.Inputs.HelperImageSHA256 == "") {
		t.Fatalf("image %s has no preloaded helper image (make image builds it from gitlab-runner-helper): %v", dir, err)
	}
	if err := registry.Check(); err != nil {
		testenv.Missing(t, err.Error(), "run make deps")
	}
	work := t.TempDir()
	mirror, err := registry.StartMirror(context.Background(), t.TempDir(), 0)
	if err != nil {
		t.Fatal(err)
	}
	defer mirror.Close()

	const leak = `if env | grep -q glrt-; then echo TOKEN-IN-JOB-ENV; fi`
	jobs := []gitlabstandin.JobSpec{
		{Name: "docker-image", Stage: "build", Tags: []string{"firecracker-1cpu-1gb"},
			Image:    &gitlabstandin.ImageSpec{Name: registry.ImageBusybox},
			Services: []gitlabstandin.ImageSpec{{Name: registry.ImageWeb, Alias: "web"}},
			Script: []string{
				`echo "IMAGE=$(busybox | head -1)"`,
				`test ! -e /etc/debian_version && echo NOT-THE-VM-ROOT`,
				`echo "SERVICE=$(wget -qO- http://web/)"`,
				`mkdir -p out && wget -qO out/page.html http://web/`,
				leak,
			},
			// Uploaded by the helper container through the job gate on
			// the VM's address; downloaded in the next stage's VMs.
			Artifacts: []string{"out/"}},
		{Name: "shell-style", Stage: "test", Tags: []string{"firecracker-1cpu-1gb"},
			Script: []string{`echo "NPROC=$(nproc)"`, `cat README.md`, `echo "HEAD=$(git rev-parse HEAD)"`, `echo "ARTIFACT=$(cat out/page.html)"`, leak}},
		{Name: "docker-build", Stage: "test", Tags: []string{"firecracker-2cpu-2gb"},
			Image: &gitlabstandin.ImageSpec{Name: registry.ImageDockerCLI},
			Script: []string{
				`docker build -t built:1 .`,
				`docker run --rm built:1`,
				`docker images --format 'IMG {{.Repository}}:{{.Tag}}'`,
				leak,
			}},
	}
	var mu sync.Mutex
	var upAfterStage1, mirrorAfterStage1 = -1, -1
	out := &stageWatch{onSuccess: func(name string) {
		if name == "docker-image" {
			mu.Lock()
			upAfterStage1, mirrorAfterStage1 = mirror.Upstream.BlobGets("library/busybox"), mirror.Mirror.BlobGets("library/busybox")
			mu.Unlock()
		}
	}}
	logs := &testenv.Buffer{}
	rep, err := Run(context.Background(), Options{
		ImageDir: dir, Jobs: jobs, WorkDir: work, Out: out, LogOut: logs, Docker: true, Mirror: mirror,
		WarmSize: "firecracker-1cpu-1gb",
	})
	os.Stdout.Write(out.buf.Bytes())
	if err != nil {
		t.Fatalf("demo run: %v", err)
	}
	trace := func(name string) string {
		t.Helper()
		r, ok := rep.Job(name)
		if !ok {
			t.Fatalf("no result for %s", name)
		}
		tr := CleanTrace(r.GitLab.Trace)
		if r.GitLab.Status != "success" {
			t.Errorf("%s: GitLab status %s, want success\n%s", name, r.GitLab.Status, tr)
		}
		if r.Record == nil || r.Record.State != job.Done {
			t.Errorf("%s: FireRunner record %+v", name, r.Record)
		}
		if r.Guest == nil {
			t.Errorf("%s: no guest timeline", name)
		} else if _, ok := r.Guest.At(vm.MilestoneDockerReady); !ok {
			t.Errorf("%s: the guest never reported Docker ready:\n%s", name, r.Guest)
		}
		if strings.Contains("\n"+tr+"\n", "\nTOKEN-IN-JOB-ENV\n") {
			t.Errorf("%s: a runner token is in the job's environment", name)
		}
		if strings.Contains(tr, "Pulling docker image "+image.HelperImageName) || strings.Contains(tr, "Pulling docker image registry.gitlab.com/gitlab-org/gitlab-runner/gitlab-runner-helper") ||
			!strings.Contains(tr, "Using helper image:  "+image.HelperImageName) {
			t.Errorf("%s: the job did not use the preloaded helper image, or pulled one:\n%s", name, tr)
		}
		return tr
	}
	want := func(name, tr string, subs ...string) {
		t.Helper()
		for _, s := range subs {
			if !strings.Contains(tr, s) {
				t.Errorf("%s: trace lacks %q:\n%s", name, s, tr)
			}
		}
	}
	want("docker-image", trace("docker-image"), "Using Docker executor", "IMAGE=BusyBox v", "NOT-THE-VM-ROOT",
		"SERVICE="+strings.TrimSpace(registry.WebPage), "Starting service "+registry.ImageWeb)
	// The warm VM: Docker was ready before it reported itself warm, and the
	// job ran there.
	if r, _ := rep.Job("docker-image"); r.VM == nil || r.VM.Timeline.Assigned.IsZero() || r.Guest == nil {
		t.Errorf("docker-image did not run in a warm pool VM: %+v", r.VM)
	} else {
		dr, ok1 := r.Guest.At(vm.MilestoneDockerReady)
		wr, ok2 := r.Guest.At(vm.MilestoneWarm)
		if !ok1 || !ok2 || wr.Before(dr) {
			t.Errorf("warm VM: docker ready %v (%v), warm %v (%v): want Docker ready first\n%s", dr, ok1, wr, ok2, r.Guest)
		}
	}
	r, _ := rep.Job("shell-style")
	want("shell-style", trace("shell-style"), "Using docker image", registry.ImageShell, "NPROC=1",
		"A repository served by the GitLab stand-in", "HEAD="+r.GitLab.SHA, "ARTIFACT="+strings.TrimSpace(registry.WebPage))
	want("docker-build", trace("docker-build"), registry.ImageDockerCLI, "built by docker build in the job's VM", "IMG built:1")

	// The mirror: busybox's blobs came from the upstream for the first VM
	// only; docker build's FROM busybox in another VM was served from the
	// mirror's cache.
	mu.Lock()
	up1, mr1 := upAfterStage1, mirrorAfterStage1
	mu.Unlock()
	up2, mr2 := mirror.Upstream.BlobGets("library/busybox"), mirror.Mirror.BlobGets("library/busybox")
	t.Logf("busybox blob GETs: upstream %d after stage 1, %d at the end; mirror %d after stage 1, %d at the end", up1, up2, mr1, mr2)
	if up1 <= 0 || mr1 <= 0 {
		t.Errorf("stage 1 did not pull busybox through the mirror from the upstream (upstream %d, mirror %d)", up1, mr1)
	}
	if up2 != up1 {
		t.Errorf("the upstream served busybox blobs again after stage 1 (%d -> %d): the second VM was not served by the mirror\n%s",
			up1, up2, strings.Join(mirror.Upstream.Log(), "\n"))
	}
	if mr2 <= mr1 {
		t.Errorf("the mirror served no busybox blob after stage 1 (%d -> %d): docker build's FROM did not pull through it", mr1, mr2)
	}
	if len(rep.Leftovers) > 0 {
		t.Errorf("left behind: %v", rep.Leftovers)
	}
	if ps := vm.FindProcs(work); len(ps) > 0 {
		t.Errorf("VMM processes still running: %v", ps)
	}
	if tok := regexp.MustCompile(`glrt-[A-Za-z0-9_-]{12,}`).FindString(logs.String()); tok != "" {
		t.Errorf("a runner token appears in FireRunner's logs")
	}
}
