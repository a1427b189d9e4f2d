package demo

import (
	"bytes"
	"context"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netns"

	"github.com/firerunner/firerunner/internal/job"
	"github.com/firerunner/firerunner/internal/netsetup"
	"github.com/firerunner/firerunner/internal/testenv"
	"github.com/firerunner/firerunner/internal/testsupport/gitlabstandin"
	"github.com/firerunner/firerunner/internal/vm"
)

// crashTapChildEnv hands the child (this test binary, re-executed inside
// the namespace) its work dir. Not a secret.
const crashTapChildEnv = "FIRERUNNER_CRASHTEST_TAP_WORKDIR"

// TestCrashRecoveryTap is TestCrashRecovery in tap mode (production
// networking: a tap per VM on FireRunner's bridge, an address from the
// CIDR, nftables rules pinning each tap), in a network namespace the test
// creates: FireRunner is killed with SIGKILL while a job runs in its VM,
// and as a VM is being started (its tap made, its VMM not yet running).
// After each restart the job must be served and nothing left: no tap, no
// address allocation, no nft rule of a VM, besides what TestCrashRecovery
// checks. The parent checks the namespace once more after the child.
func TestCrashRecoveryTap(t *testing.T) {
	if work := os.Getenv(crashTapChildEnv); work != "" {
		crashTapChild(t, work)
		return
	}
	testenv.RequireRoot(t)
	testenv.QEMU(t)
	requireRunnerImage(t, testenv.ImageDir(t))
	for _, tool := range []string{"ip", "nft"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s is needed for the test's network namespace: %v", tool, err)
		}
	}
	work := t.TempDir()
	ns := "fr-crash-" + randHex(4)
	run(t, "ip", "netns", "add", ns)
	t.Cleanup(func() {
		if out, err := exec.Command("ip", "netns", "del", ns).CombinedOutput(); err != nil {
			t.Errorf("ip netns del %s: %v: %s", ns, err, out)
		}
	})
	run(t, "ip", "-n", ns, "link", "set", "lo", "up")
	// Runs before the namespace's removal: nothing of ours may outlive us.
	t.Cleanup(func() {
		for _, p := range vm.FindProcs(work) {
			t.Errorf("killing leftover VMM pid %d", p.PID)
			_ = p.KillGroup()
		}
	})
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(20 * time.Minute)
	if dl, ok := t.Deadline(); ok {
		deadline = dl.Add(-30 * time.Second)
	}
	ctx, cancel := context.WithDeadline(context.Background(), deadline)
	defer cancel()
	cmd := exec.CommandContext(ctx, "ip", "netns", "exec", ns, exe, "-test.run", "^TestCrashRecoveryTap$",
		"-test.v", "-test.count=1", "-test.timeout", time.Until(deadline).Round(time.Second).String())
	cmd.Env = append(os.Environ(), crashTapChildEnv+"="+work)
	cmd.Dir, _ = os.Getwd()
	var out bytes.Buffer
	pw := &prefixWriter{w: os.Stdout, prefix: "    [netns " + ns + "] "}
	cmd.Stdout = io.MultiWriter(&out, pw)
	cmd.Stderr = cmd.Stdout
	runErr := cmd.Run()
	pw.Flush()
	switch {
	case runErr != nil:
		t.Errorf("the test inside namespace %s failed: %v", ns, runErr)
	case strings.Contains(out.String(), "--- SKIP"):
		t.Errorf("the test inside namespace %s skipped; the prerequisites were found outside it", ns)
	case !strings.Contains(out.String(), "--- PASS: TestCrashRecoveryTap"):
		t.Errorf("the test inside namespace %s did not report a pass", ns)
	}
	// The namespace after everything: no tap, no allocation, no nft rule of a VM.
	links := run(t, "ip", "-n", ns, "-o", "link", "show")
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
	// No VM left: FireRunner drops the bridge table (or keeps it empty).
	rules, err := exec.Command("ip", "netns", "exec", ns, "nft", "list", "table", "bridge", netsetup.TableName).CombinedOutput()
	if (err != nil && !strings.Contains(string(rules), "No such file or directory")) || strings.Contains(string(rules), `iifname "fr-`) {
		t.Errorf("nft rules of VMs left (%v):\n%s", err, rules)
	}
}

// crashTapChild runs inside the namespace: the stand-in, FireRunner (killed
// and restarted) and QEMU all live there.
func crashTapChild(t *testing.T, work string) {
	testenv.RequireRoot(t)
	testenv.QEMU(t)
	dir := testenv.ImageDir(t)
	requireRunnerImage(t, dir)
	h := newCrashHarness(t, dir, work, "tap")
	tags := []string{"firecracker-1cpu-1gb"}
	hasTap := func(id string) bool { _, err := net.InterfaceByName(id); return err == nil }

	t.Run("KillWhileJobRunsTap", func(t *testing.T) {
		h.scenario = "T1 kill -9 mid-job (tap)"
		h.start(t)
		id := h.pipeline(t, gitlabstandin.JobSpec{Name: "long", Tags: tags,
			Script: []string{"echo started", "sleep 15", "echo finished"}})
		h.waitGitLab(t, id, 3*time.Minute, "running with 'started' in its trace", func(js gitlabstandin.JobState) bool {
			return js.Status == "running" && strings.Contains(js.Trace, "started")
		})
		rec := h.record(t, id)
		h.kill(t)
		// The VM outlives FireRunner with its tap, address and pinning rules:
		// the checks after the restart see what they look for.
		left := h.netLeftovers()
		h.say("after kill: vm %s tap %v; network: %s", rec.VMID, hasTap(rec.VMID), strings.Join(left, "; "))
		if rec.VMID == "" || !hasTap(rec.VMID) || !slices.Contains(left, "tap or address of vm "+rec.VMID) ||
			!slices.ContainsFunc(left, func(l string) bool { return strings.Contains(l, `iifname "`+rec.VMID+`"`) }) {
			t.Fatalf("at the kill, vm %q has tap %v and network %v; want its tap, address and nft rules", rec.VMID, hasTap(rec.VMID), left)
		}
		h.start(t)
		js := h.waitDone(t, id, 3*time.Minute)
		rec = h.record(t, id)
		if js.Status != "success" || !strings.Contains(CleanTrace(js.Trace), "finished") || rec.State != job.Done {
			t.Errorf("job %d: GitLab %s, record %s (%s); want success, done", id, js.Status, rec.State, rec.Reason)
		}
		h.waitClean(t, time.Minute) // the runner is deleted after the record ends
		h.checkRunnerDeleted(t, rec)
	})

	t.Run("KillWhileVMStartsTap", func(t *testing.T) {
		h.scenario = "T2 kill -9 at VM start (tap)"
		h.killBeforeVM(t, tags, "the job's tap", func(id int64) bool {
			v, ok := h.vmOf(id)
			return ok && hasTap(v.ID)
		})
		h.stop(t)
		h.waitClean(t, 30*time.Second)
	})
	h.printTimeline()
}
