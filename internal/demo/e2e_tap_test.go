package demo

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vishvananda/netns"

	"github.com/firerunner/firerunner/internal/config"
	"github.com/firerunner/firerunner/internal/image"
	"github.com/firerunner/firerunner/internal/job"
	"github.com/firerunner/firerunner/internal/netsetup"
	"github.com/firerunner/firerunner/internal/testenv"
	"github.com/firerunner/firerunner/internal/testsupport/gitlabstandin"
	"github.com/firerunner/firerunner/internal/vm"
)

// The parent hands the child (the same test binary, re-executed inside the
// namespace) its work dir and the egress server's address. Not secrets.
const (
	tapChildEnv  = "FIRERUNNER_E2E_TAP_WORKDIR"
	tapEgressEnv = "FIRERUNNER_E2E_TAP_EGRESS"
)

// The namespace's "internet": a veth to a second namespace, on TEST-NET-1
// (192.0.2.0/24, documentation only, never routed anywhere real).
const (
	uplinkName = "uplink0" // must not look like a VM id (fr-...): those are taps
	uplinkAddr = "192.0.2.2"
	extAddr    = "192.0.2.1"
)

// TestEndToEndTap runs FireRunner with production networking (network.mode
// tap: a tap per VM on FireRunner's bridge, an address from the CIDR,
// nftables NAT and isolation) entirely inside a network namespace the test
// creates. FireRunner, QEMU and the GitLab stand-in must share that
// namespace, and a Go process cannot move all its threads into one, so the
// test re-executes itself there with `ip netns exec`. The child runs the
// pipeline; the parent checks what the namespace holds afterwards.
func TestEndToEndTap(t *testing.T) {
	if work := os.Getenv(tapChildEnv); work != "" {
		tapChild(t, work, os.Getenv(tapEgressEnv))
		return
	}
	testenv.RequireRoot(t)
	testenv.QEMU(t)
	requireRunnerImage(t, testenv.ImageDir(t))
	if _, err := exec.LookPath("ip"); err != nil {
		t.Fatalf("ip (iproute2) is needed to create the test's network namespace: %v", err)
	}
	bridge := config.Default().Network.Bridge
	_, hostBridgeErr := net.InterfaceByName(bridge) // host's state before, to prove we left it alone

	work := t.TempDir()
	suffix := randHex(4)
	ns, ext := "fr-e2e-"+suffix, "fr-e2e-x-"+suffix
	for _, n := range []string{ns, ext} {
		run(t, "ip", "netns", "add", n)
		t.Cleanup(func() {
			if out, err := exec.Command("ip", "netns", "del", n).CombinedOutput(); err != nil {
				t.Errorf("ip netns del %s: %v: %s", n, err, out)
			}
		})
		run(t, "ip", "-n", n, "link", "set", "lo", "up")
	}
	// Registered after the namespaces' removal, so it runs before it: a VMM
	// the child left behind (e.g. the child was killed) must not outlive us.
	t.Cleanup(func() {
		for _, p := range vm.FindProcs(work) {
			t.Errorf("killing leftover VMM pid %d", p.PID)
			_ = p.KillGroup()
		}
	})
	run(t, "ip", "-n", ns, "link", "add", uplinkName, "type", "veth", "peer", "name", "eth0", "netns", ext)
	run(t, "ip", "-n", ns, "addr", "add", uplinkAddr+"/24", "dev", uplinkName)
	run(t, "ip", "-n", ext, "addr", "add", extAddr+"/24", "dev", "eth0")
	run(t, "ip", "-n", ns, "link", "set", uplinkName, "up")
	run(t, "ip", "-n", ext, "link", "set", "eth0", "up")

	// The egress target: tells the caller the source address it sees, which
	// must be the uplink's (masqueraded), never a VM's.
	var egressMu sync.Mutex
	var egressFrom []string
	ln := listenInNS(t, ext, net.JoinHostPort(extAddr, "0"))
	srv := &http.Server{ReadHeaderTimeout: 10 * time.Second, Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		host, _, _ := net.SplitHostPort(r.RemoteAddr)
		egressMu.Lock()
		egressFrom = append(egressFrom, host)
		egressMu.Unlock()
		fmt.Fprintf(w, "EGRESS-FROM=%s\n", host)
	})}
	go func() { _ = srv.Serve(ln) }()
	t.Cleanup(func() { _ = srv.Close() })

	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	// The child gets our time budget minus a margin for the checks below.
	deadline := time.Now().Add(20 * time.Minute)
	if dl, ok := t.Deadline(); ok {
		deadline = dl.Add(-30 * time.Second)
	}
	ctx, cancel := context.WithDeadline(context.Background(), deadline)
	defer cancel()
	cmd := exec.CommandContext(ctx, "ip", "netns", "exec", ns, exe, "-test.run", "^TestEndToEndTap$",
		"-test.v", "-test.count=1", "-test.timeout", time.Until(deadline).Round(time.Second).String())
	cmd.Env = append(os.Environ(), tapChildEnv+"="+work, tapEgressEnv+"="+ln.Addr().String())
	cmd.Dir, _ = os.Getwd()
	var out bytes.Buffer
	pw := &prefixWriter{w: os.Stdout, prefix: "    [netns " + ns + "] "}
	cmd.Stdout = io.MultiWriter(&out, pw)
	cmd.Stderr = cmd.Stdout
	t.Logf("running the pipeline inside network namespace %s", ns)
	runErr := cmd.Run()
	pw.Flush()
	switch {
	case runErr != nil:
		t.Errorf("the test inside namespace %s failed: %v", ns, runErr)
	case strings.Contains(out.String(), "--- SKIP"):
		t.Errorf("the test inside namespace %s skipped; the prerequisites were found outside it", ns)
	case !strings.Contains(out.String(), "--- PASS: TestEndToEndTap"):
		t.Errorf("the test inside namespace %s did not report a pass", ns)
	}

	// FireRunner's network lived in the namespace: the bridge and the nft
	// table are there (bridge and tables are host setup, kept by design)...
	links := run(t, "ip", "-n", ns, "-o", "link", "show")
	if !strings.Contains(links, " "+bridge+":") {
		t.Errorf("no bridge %s in namespace %s: tap mode did not run there?\n%s", bridge, ns, links)
	}
	if out, err := exec.Command("ip", "netns", "exec", ns, "nft", "list", "table", "inet", netsetup.TableName).CombinedOutput(); err != nil {
		t.Errorf("no nft table inet %s in namespace %s: %v %s", netsetup.TableName, ns, err, out)
	}
	// ...and not on the host.
	if _, err := net.InterfaceByName(bridge); err == nil && hostBridgeErr != nil {
		t.Errorf("bridge %s appeared in the host's namespace", bridge)
	}
	// No taps, no address allocations, no VMM left.
	idRE := regexp.MustCompile(`^[0-9]+: (` + strings.Trim(vm.IDPattern, "^$") + `)[:@]`)
	for _, l := range strings.Split(links, "\n") {
		if m := idRE.FindStringSubmatch(l); m != nil {
			t.Errorf("tap %s left in namespace %s", m[1], ns)
		}
	}
	h, err := netns.GetFromName(ns)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	mgr, err := netsetup.New(tapNetwork(), filepath.Join(work, "state"), netsetup.WithNetNS(h))
	if err != nil {
		t.Fatal(err)
	}
	if ids, err := mgr.List(context.Background()); err != nil || len(ids) > 0 {
		t.Errorf("network state left for VMs %v (err %v)", ids, err)
	}
	if b, err := os.ReadFile(filepath.Join(work, "state", "network", "allocations.json")); err != nil {
		t.Errorf("no address table: the VMs never got an address from the CIDR? %v", err)
	} else if strings.Contains(string(b), "fr-") {
		t.Errorf("addresses still allocated:\n%s", b)
	}
	if ps := vm.FindProcs(work); len(ps) > 0 {
		t.Errorf("VMM processes still running: %v", ps)
	}
	// Both VMs reached the outside, NATed to the uplink's address.
	egressMu.Lock()
	defer egressMu.Unlock()
	if len(egressFrom) != 2 {
		t.Errorf("egress server saw %d requests (%v), want 2 (one per VM)", len(egressFrom), egressFrom)
	}
	for _, from := range egressFrom {
		if from != uplinkAddr {
			t.Errorf("egress server saw source %s, want the masqueraded %s", from, uplinkAddr)
		}
	}
}

// tapChild runs inside the namespace: the stand-in, FireRunner and QEMU all
// live there, and VMs talk to the stand-in through their taps and the bridge.
func tapChild(t *testing.T, work, egress string) {
	testenv.RequireRoot(t)
	testenv.QEMU(t)
	dir := testenv.ImageDir(t)
	requireRunnerImage(t, dir)
	if egress == "" {
		t.Fatalf("%s is unset", tapEgressEnv)
	}
	gw, err := TapGateway()
	if err != nil {
		t.Fatal(err)
	}
	prefix := netip.MustParsePrefix(tapNetwork().CIDR)

	// A host service on every address of the namespace but not in
	// allow_host_ports: VMs must not reach it although they reach GitLab.
	closed, err := net.Listen("tcp", "0.0.0.0:0")
	if err != nil {
		t.Fatal(err)
	}
	defer closed.Close()
	var reached atomic.Int32
	go func() {
		for {
			c, err := closed.Accept()
			if err != nil {
				return
			}
			reached.Add(1)
			c.Close()
		}
	}()
	closedURL := "http://" + net.JoinHostPort(gw.String(), strconv.Itoa(closed.Addr().(*net.TCPAddr).Port)) + "/"

	script := []string{
		`echo "NPROC=$(nproc)"`,
		`echo "ADDR=$(ip -4 -o addr show dev eth0 | awk '{print $4}')"`,
		`echo "ROUTE=$(ip -4 route show default)"`,
		`echo "HEAD=$(git rev-parse HEAD)"`,
		`curl -sS --max-time 30 http://` + egress + `/`,
		`if curl -sS --connect-timeout 3 ` + closedURL + `; then echo HOSTPORT=open; else echo HOSTPORT=closed; fi`,
	}
	jobs := []gitlabstandin.JobSpec{
		{Name: "small", Tags: []string{"firecracker-1cpu-1gb"}, Script: script},
		{Name: "large", Tags: []string{"firecracker-2cpu-2gb"}, Script: script},
	}
	// End the run well before the test binary's own timeout, so a hang still
	// ends with FireRunner's shutdown (VMs destroyed), not a panic.
	timeout := 15 * time.Minute
	if dl, ok := t.Deadline(); ok {
		timeout = max(time.Until(dl)-3*time.Minute, time.Minute)
	}
	logs := &testenv.Buffer{}
	var out bytes.Buffer
	rep, err := Run(context.Background(), Options{
		ImageDir: dir, Jobs: jobs, WorkDir: work, Out: &out, LogOut: logs, Network: "tap", Timeout: timeout,
	})
	os.Stdout.Write(out.Bytes()) // the timeline, for the CI log
	if err != nil {
		t.Fatalf("demo run: %v", err)
	}

	addrRE := regexp.MustCompile(`(?m)^ADDR=(\S+)$`)
	seen := map[netip.Addr]string{}
	for _, c := range []struct {
		name  string
		vcpus int
	}{{"small", 1}, {"large", 2}} {
		r, ok := rep.Job(c.name)
		if !ok {
			t.Fatalf("no result for job %s", c.name)
		}
		tr := CleanTrace(r.GitLab.Trace)
		if r.GitLab.Status != "success" {
			t.Errorf("%s: GitLab status %s, want success\n%s", c.name, r.GitLab.Status, tr)
			continue
		}
		if !strings.Contains(tr, "NPROC="+strconv.Itoa(c.vcpus)+"\n") {
			t.Errorf("%s: trace lacks NPROC=%d:\n%s", c.name, c.vcpus, tr)
		}
		if !strings.Contains(tr, "HEAD="+r.GitLab.SHA) {
			t.Errorf("%s: the VM did not clone the pipeline's commit %s over the tap:\n%s", c.name, r.GitLab.SHA, tr)
		}
		// The address comes from the CIDR (not QEMU's 10.0.2.15), one per VM.
		if m := addrRE.FindStringSubmatch(tr); m == nil {
			t.Errorf("%s: no eth0 address in trace:\n%s", c.name, tr)
		} else if p, err := netip.ParsePrefix(m[1]); err != nil || !prefix.Contains(p.Addr()) || p.Bits() != prefix.Bits() || p.Addr() == gw {
			t.Errorf("%s: eth0 address %s is not a VM address from %s", c.name, m[1], prefix)
		} else if other, dup := seen[p.Addr()]; dup {
			t.Errorf("%s and %s both got %s", other, c.name, p.Addr())
		} else {
			seen[p.Addr()] = c.name
		}
		if !strings.Contains(tr, "ROUTE=default via "+gw.String()+" dev eth0") {
			t.Errorf("%s: default route is not via the bridge %s:\n%s", c.name, gw, tr)
		}
		if !strings.Contains(tr, "EGRESS-FROM="+uplinkAddr+"\n") {
			t.Errorf("%s: egress to %s not NATed to %s:\n%s", c.name, egress, uplinkAddr, tr)
		}
		if !strings.Contains(tr, "HOSTPORT=closed\n") {
			t.Errorf("%s: the VM reached a host port not in allow_host_ports:\n%s", c.name, tr)
		}
		if r.Record == nil || r.Record.State != job.Done || r.Record.VCPUs != c.vcpus || r.VM == nil || r.VM.Timeline.Destroyed.IsZero() {
			t.Errorf("%s: FireRunner record %+v", c.name, r.Record)
		}
		if r.Runner.ID == 0 || r.Runner.DeletedAt.IsZero() {
			t.Errorf("%s: runner %+v: want created and deleted", c.name, r.Runner)
		}
	}
	if n := reached.Load(); n > 0 {
		t.Errorf("a closed host port accepted %d connections from VMs", n)
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
	// FireRunner logged each VM's tap attach and release.
	for _, msg := range []string{`"msg":"vm network attached"`, `"msg":"vm network released"`} {
		if n := strings.Count(logs.String(), msg); n != 2 {
			t.Errorf("FireRunner logged %s %d times, want 2", msg, n)
		}
	}
}

// tapNetwork is the network section Run uses in tap mode.
func tapNetwork() config.Network {
	n := config.Default().Network
	n.Mode = "tap"
	return n
}

func requireRunnerImage(t *testing.T, dir string) {
	t.Helper()
	m, err := image.Load(dir)
	if err != nil {
		t.Fatal(err)
	}
	if m.Inputs.GitLabRunnerSHA256 == "" {
		t.Fatalf("image %s has no gitlab-runner; build it with make image", dir)
	}
}

func run(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// listenInNS opens a TCP listener inside the named namespace. A socket keeps
// the namespace it was created in, so it can be served from any goroutine.
func listenInNS(t *testing.T, name, addr string) net.Listener {
	t.Helper()
	h, err := netns.GetFromName(name)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	type res struct {
		ln  net.Listener
		err error
	}
	c := make(chan res, 1)
	go func() {
		runtime.LockOSThread() // not unlocked on failure: Go then retires the thread
		orig, err := netns.Get()
		if err != nil {
			c <- res{err: err}
			return
		}
		defer orig.Close()
		if err := netns.Set(h); err != nil {
			c <- res{err: err}
			return
		}
		ln, lerr := net.Listen("tcp", addr)
		if err := netns.Set(orig); err != nil {
			if ln != nil {
				ln.Close()
			}
			c <- res{err: err}
			return
		}
		runtime.UnlockOSThread()
		c <- res{ln, lerr}
	}()
	r := <-c
	if r.err != nil {
		t.Fatalf("listen in namespace %s: %v", name, r.err)
	}
	t.Cleanup(func() { r.ln.Close() })
	return r.ln
}

// prefixWriter indents the child's output line by line, so `go test`'s
// output parser does not take the child's "--- PASS" lines for the parent's.
type prefixWriter struct {
	mu     sync.Mutex
	w      io.Writer
	prefix string
	buf    []byte
}

func (p *prefixWriter) Write(b []byte) (int, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.buf = append(p.buf, b...)
	for {
		i := bytes.IndexByte(p.buf, '\n')
		if i < 0 {
			return len(b), nil
		}
		fmt.Fprintf(p.w, "%s%s\n", p.prefix, p.buf[:i])
		p.buf = p.buf[i+1:]
	}
}

// Flush writes a last unterminated line.
func (p *prefixWriter) Flush() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if len(p.buf) > 0 {
		fmt.Fprintf(p.w, "%s%s\n", p.prefix, p.buf)
		p.buf = nil
	}
}
