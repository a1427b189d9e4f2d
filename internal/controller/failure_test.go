package controller

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"math/rand/v2"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/firerunner/firerunner/internal/guestconfig"
	"github.com/firerunner/firerunner/internal/job"
	"github.com/firerunner/firerunner/internal/planner"
	"github.com/firerunner/firerunner/internal/store"
	"github.com/firerunner/firerunner/internal/testsupport/fakevm"
	"github.com/firerunner/firerunner/internal/testsupport/gitlabstandin"
	"github.com/firerunner/firerunner/internal/vm"
)

// Failure paths: every failed step of a job's start is a failed attempt
// that gives back what it held (its runner in GitLab, its capacity, its
// network), and nothing FireRunner cannot finish is forgotten.

// attemptReasons returns the reasons of a job's failed attempts, in order.
func attemptReasons(t *testing.T, st *store.Store, id int64) []string {
	t.Helper()
	tr, err := st.Transitions(context.Background(), id)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, x := range tr {
		if x.Object == "job" && strings.Contains(x.Reason, "(attempt ") {
			out = append(out, x.Reason)
		}
	}
	return out
}

// checkAttemptVMs checks that every VM record of job id is gone, stopped
// for reason, its runner created and deleted in GitLab, and returns them.
func (h *harness) checkAttemptVMs(id int64, n int, reason string) []job.VM {
	h.t.Helper()
	vs := h.vms(id)
	if len(vs) != n {
		h.t.Fatalf("job %d: %d vm records, want %d", id, len(vs), n)
	}
	inGitLab := map[int64]bool{}
	for _, r := range h.gl.runnerList() {
		inGitLab[r.ID] = true
	}
	for _, v := range vs {
		if v.State != job.VMGone || job.ReasonKey(v.Reason) != reason || v.RunnerID == 0 || v.Timeline.Destroyed.IsZero() ||
			v.Timeline.RunnerDeleted.IsZero() || inGitLab[v.RunnerID] || !h.gl.deleted(v.RunnerID) {
			h.t.Errorf("vm %s of job %d: %s %q runner %d (in GitLab %v), destroyed %v, runner deleted %v; want gone (%s), runner deleted",
				v.ID, id, v.State, v.Reason, v.RunnerID, inGitLab[v.RunnerID], !v.Timeline.Destroyed.IsZero(), !v.Timeline.RunnerDeleted.IsZero(), reason)
		}
	}
	return vs
}

// TestVMStartFailureRetriedThenGivenUp: the driver cannot start the VM. Each
// start is a failed attempt: the VM record goes, its runner is deleted and
// its capacity freed before the next attempt (the host fits exactly one VM,
// so the next attempt cannot even be planned otherwise); after
// limits.start_attempts the job fails with the last reason, and the
// capacity serves the next job.
func TestVMStartFailureRetriedThenGivenUp(t *testing.T) {
	var failing atomic.Bool
	failing.Store(true)
	var mu sync.Mutex
	var atStart []string // what GitLab and the store held at each Start
	h := newHarness(t, func(h *harness) {
		h.capa = planner.Capacity{VCPUs: 2, MemoryMiB: 4096}
		h.cfg.Limits.StartAttempts = 3
		h.cfg.Limits.RetryBackoff = 10 * time.Millisecond
		h.drv = fakevm.New(fakevm.Options{StartError: func(s vm.Spec) error {
			var rs []int64
			for _, r := range h.gl.runnerList() {
				rs = append(rs, r.ID)
			}
			live, err := h.st.ListVMs(context.Background(), true, 0)
			mu.Lock()
			atStart = append(atStart, fmt.Sprintf("runners %v, live vms %d (%v)", rs, len(live), err))
			mu.Unlock()
			if failing.Load() {
				return errors.New("fake: open /dev/kvm: permission denied")
			}
			return nil
		}})
	})
	id := h.newJob(tag2x4)
	j := h.waitState(id, job.Failed)
	want := job.ReasonAttempts + ": 3 attempts failed, the last: " + job.ReasonVMStart + ": fake: open /dev/kvm: permission denied"
	if j.Reason != want || j.Attempts != 3 || j.VMID != "" || j.RunnerID != 0 {
		t.Fatalf("job: %s %q attempts %d vm %q runner %d; want failed %q after 3 attempts", j.State, j.Reason, j.Attempts, j.VMID, j.RunnerID, want)
	}
	if r := attemptReasons(t, h.st, id); len(r) != 2 || !strings.HasPrefix(r[0], job.ReasonVMStart+": ") || !strings.HasSuffix(r[1], "(attempt 2)") {
		t.Fatalf("retries in the timeline: %q", r)
	}
	h.eventually("the last attempt's VM cleaned up", func() bool {
		live, _ := h.st.ListVMs(context.Background(), true, 0)
		return len(live) == 0
	})
	vs := h.checkAttemptVMs(id, 3, job.ReasonVMStart)
	// At each start GitLab held exactly that attempt's runner and the store
	// exactly its VM: the attempts before had given theirs back.
	var wantAt []string
	for _, v := range vs {
		wantAt = append(wantAt, fmt.Sprintf("runners [%d], live vms 1 (<nil>)", v.RunnerID))
	}
	mu.Lock()
	got := slices.Clone(atStart)
	mu.Unlock()
	slices.Sort(wantAt)
	slices.Sort(got)
	if !slices.Equal(got, wantAt) {
		t.Errorf("at each start: %q, want %q", got, wantAt)
	}
	if n := h.gl.createdCount(); n != 3 || len(h.gl.runnerList()) != 0 || len(h.drv.Specs()) != 0 {
		t.Fatalf("runners created %d, left %d; vms running %d", n, len(h.gl.runnerList()), len(h.drv.Specs()))
	}
	for _, want := range []string{`firerunner_job_attempts_failed_total{reason="vm_start"} 3`,
		`firerunner_jobs_finished_total{outcome="failed",reason="attempts"} 1`, `firerunner_vcpus_in_use 0`} {
		h.eventually("metric "+want, func() bool { return strings.Contains(h.metricsText(), want) })
	}
	// The capacity the failed attempts held is free: the next job runs
	// (the given-up job's user cancels it, or GitLab would hand it to the
	// next runner whose tags cover it: it is older).
	h.gl.setStatus(id, "canceled")
	failing.Store(false)
	next := h.newJob(tag2x4)
	v := h.waitStarted(next)
	h.take(next, v)
	h.end(next, v, "success")
	h.waitState(next, job.Done)
	h.clean()
}

// TestRunnerDeletionOutage: GitLab refuses to delete a runner for a long
// time. The VM is destroyed at once; the deletion is retried with back-off;
// the VM record stays stopping and keeps holding its own capacity (no more:
// the next job of the same size still fits) until GitLab recovers, then
// everything ends.
func TestRunnerDeletionOutage(t *testing.T) {
	h := newHarness(t, func(h *harness) { h.capa = planner.Capacity{VCPUs: 4, MemoryMiB: 8192} })
	a := h.newJob(tag2x4)
	va := h.waitStarted(a)
	h.take(a, va)
	h.waitVMState(va.ID, job.VMBusy)
	h.gl.failUntil("delete_runner", http.StatusInternalServerError)
	h.end(a, va, "success")
	if j := h.waitState(a, job.Done); j.Reason != job.ReasonSucceeded {
		t.Fatalf("job %d: %q", a, j.Reason)
	}
	// The client tries 4 times per reconcile (1 + 3 retries): 12 calls are
	// three reconciles, each after a longer back-off.
	h.eventually("runner deletion retried by three reconciles", func() bool { return h.gl.callCount("delete_runner") >= 12 })
	v := h.vm(va.ID)
	if v.State != job.VMStopping || v.Timeline.Destroyed.IsZero() || !v.Timeline.RunnerDeleted.IsZero() || h.vmRunning(va.ID) {
		t.Fatalf("vm during the outage: %s, destroyed %v, runner deleted %v, on host %v; want stopping, destroyed, runner not deleted",
			v.State, !v.Timeline.Destroyed.IsZero(), !v.Timeline.RunnerDeleted.IsZero(), h.vmRunning(va.ID))
	}
	if rs := h.gl.runnerList(); len(rs) != 1 || rs[0].ID != va.RunnerID {
		t.Fatalf("runners in GitLab during the outage: %+v", rs)
	}
	h.eventually("the third failure logged", func() bool { return strings.Contains(h.logs.String(), "key=vm/"+va.ID+" failures=3") })
	// The stopping record holds 2 of 4 vCPUs: one more 2-vCPU job fits, a
	// second one waits.
	b := h.newJob(tag2x4)
	vb := h.waitStarted(b)
	c := h.newJob(tag2x4)
	h.waitState(c, job.Queued)
	h.eventually("queue depth 1", func() bool { return strings.Contains(h.metricsText(), "firerunner_queue_depth 1") })
	if len(h.vms(c)) != 0 {
		t.Fatal("a job got a VM beyond the capacity the stopping VM holds")
	}
	if m := h.metricsText(); !strings.Contains(m, "firerunner_vcpus_in_use 4") || !strings.Contains(m, `firerunner_vms{state="stopping"} 1`) {
		t.Fatalf("capacity gauges during the outage:\n%s", grep(m, "in_use")+"\n"+grep(m, "firerunner_vms{"))
	}
	// GitLab recovers: the next pass (the periodic sweep) deletes the
	// runner, the record ends and its capacity goes to the waiting job.
	h.gl.clearFailures()
	h.c.ReconcileOnce(context.Background())
	if v := h.waitVMState(va.ID, job.VMGone); v.Reason != job.ReasonRanJob || v.Timeline.RunnerDeleted.IsZero() {
		t.Fatalf("vm after the outage: %q, runner deleted %v", v.Reason, !v.Timeline.RunnerDeleted.IsZero())
	}
	vc := h.waitStarted(c)
	// In job order: GitLab hands a runner the oldest pending job its tags
	// fit, so c's runner asking first would get b (a map's order is random).
	for _, x := range []struct {
		id int64
		v  job.VM
	}{{b, vb}, {c, vc}} {
		id, v := x.id, x.v
		h.take(id, v)
		h.end(id, v, "success")
		h.waitState(id, job.Done)
	}
	h.clean()
}

// TestGetJobRetriesExhausted: reading a new job fails with 5xx beyond the
// client's own retries. The job stays new (no VM, no runner) and its
// reconcile is retried with back-off until GitLab answers.
func TestGetJobRetriesExhausted(t *testing.T) {
	h := newHarness(t, nil)
	h.gl.failUntil("get_job", http.StatusBadGateway)
	id := h.newJob(tag2x4)
	// 1 + 3 retries per reconcile: 8 calls are two reconciles.
	h.eventually("two reconciles of the job", func() bool { return h.gl.callCount("get_job") >= 8 })
	if j := h.job(id); j.State != job.New || len(h.vms(id)) != 0 || h.gl.createdCount() != 0 {
		t.Fatalf("job during the outage: %s, %d vms, %d runners; want new, none", j.State, len(h.vms(id)), h.gl.createdCount())
	}
	h.eventually("the second failure logged", func() bool { return strings.Contains(h.logs.String(), fmt.Sprintf("key=job/%d failures=2", id)) })
	if m := h.metricsText(); !strings.Contains(m, `firerunner_gitlab_api_errors_total{op="get_job",status="502"}`) {
		t.Fatalf("api errors not counted:\n%s", grep(m, "api_errors"))
	}
	// No sweep, no new hook: the back-off alone brings it back.
	h.gl.clearFailures()
	v := h.waitStarted(id)
	if j := h.job(id); j.State != job.Queued || j.Attempts != 0 || j.SizeTag != tag2x4 {
		t.Fatalf("job after the outage: %+v", j)
	}
	h.take(id, v)
	h.end(id, v, "success")
	h.waitState(id, job.Done)
	h.clean()
}

// TestTooBig: a valid size larger than the host's total capacity (in vCPUs
// or in memory) fails the job record at once: no runner, no VM, no attempt;
// GitLab keeps the job pending for other runners. Smaller jobs are served.
func TestTooBig(t *testing.T) {
	h := newHarness(t, func(h *harness) { h.capa = planner.Capacity{VCPUs: 4, MemoryMiB: 8192} })
	cpu := h.newJob("firecracker-8cpu-4gb")
	mem := h.newJob("firecracker-2cpu-16gb")
	fits := h.newJob("firecracker-4cpu-8gb")
	for id, want := range map[int64]string{
		cpu: "too_big: 8 vCPUs / 4096 MiB is more than the host's 4 vCPUs / 8192 MiB",
		mem: "too_big: 2 vCPUs / 16384 MiB is more than the host's 4 vCPUs / 8192 MiB",
	} {
		j := h.waitState(id, job.Failed)
		if j.Reason != want || j.Attempts != 0 || len(h.vms(id)) != 0 {
			t.Errorf("job %d: %q, attempts %d, vms %d; want %q, none", id, j.Reason, j.Attempts, len(h.vms(id)), want)
		}
		if got := transitions(t, h.st, id, "job"); got != "new>queued>failed" {
			t.Errorf("job %d transitions %s", id, got)
		}
		if st := h.gl.job(id).Status; st != "pending" {
			t.Errorf("job %d is %s in GitLab; FireRunner must leave it pending", id, st)
		}
	}
	v := h.waitStarted(fits)
	if n := h.gl.createdCount(); n != 1 {
		t.Fatalf("%d runners created, want 1 (for the job that fits)", n)
	}
	h.eventually("too_big counted", func() bool {
		return strings.Contains(h.metricsText(), `firerunner_jobs_finished_total{outcome="failed",reason="too_big"} 2`)
	})
	h.take(fits, v)
	h.end(fits, v, "success")
	h.waitState(fits, job.Done)
	h.clean()
}

// TestMemoryBoundCapacity: memory, not vCPUs, limits the host: 16 vCPUs
// but 8 GiB fit two 1-vCPU 4-GiB VMs; the third job waits until one ends.
func TestMemoryBoundCapacity(t *testing.T) {
	const tag = "firecracker-1cpu-4gb"
	h := newHarness(t, func(h *harness) { h.capa = planner.Capacity{VCPUs: 16, MemoryMiB: 8192} })
	a, b, c := h.newJob(tag), h.newJob(tag), h.newJob(tag)
	h.waitState(c, job.Queued)
	h.eventually("queue depth 1", func() bool { return strings.Contains(h.metricsText(), "firerunner_queue_depth 1") })
	var running, waiting []int64
	vms := map[int64]job.VM{}
	for _, id := range []int64{a, b, c} {
		if vs := h.vms(id); len(vs) > 0 {
			running = append(running, id)
			vms[id] = h.waitStarted(id)
		} else {
			waiting = append(waiting, id)
		}
	}
	if len(running) != 2 || len(waiting) != 1 {
		t.Fatalf("running %v, waiting %v: want two VMs and one job waiting for memory", running, waiting)
	}
	m := h.metricsText()
	for _, want := range []string{"firerunner_memory_mib_in_use 8192", "firerunner_vcpus_in_use 2", "firerunner_vms_running 2"} {
		if !strings.Contains(m, want) {
			t.Errorf("metric %s missing:\n%s", want, grep(m, "_in_use"))
		}
	}
	first := running[0]
	h.take(first, vms[first])
	h.end(first, vms[first], "success")
	h.waitState(first, job.Done)
	vms[waiting[0]] = h.waitStarted(waiting[0])
	for _, id := range []int64{running[1], waiting[0]} {
		h.take(id, vms[id])
		h.end(id, vms[id], "success")
		h.waitState(id, job.Done)
	}
	h.clean()
}

// testNet is an in-memory Network: an address per VM from 172.30.0.0/24
// and a "tap" per attached VM. An Attach that fails leaves its address
// allocated and no tap, the half-done state a real Attach can leave when
// creating the tap or its nft rules fails.
type testNet struct {
	mu         sync.Mutex
	addrs      map[string]netip.Addr
	taps       map[string]bool
	calls      int
	released   []string
	failAttach func(call int) error
}

func newTestNet(fail func(call int) error) *testNet {
	return &testNet{addrs: map[string]netip.Addr{}, taps: map[string]bool{}, failAttach: fail}
}

func (n *testNet) Attach(_ context.Context, id string) (*vm.NetAttachment, *guestconfig.Network, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.calls++
	ip, ok := n.addrs[id]
	if !ok { // the lowest free address, like netsetup
		used := map[netip.Addr]bool{}
		for _, a := range n.addrs {
			used[a] = true
		}
		for ip = netip.MustParseAddr("172.30.0.2"); used[ip]; ip = ip.Next() {
		}
		n.addrs[id] = ip
	}
	if n.failAttach != nil {
		if err := n.failAttach(n.calls); err != nil {
			return nil, nil, err
		}
	}
	n.taps[id] = true
	return &vm.NetAttachment{TapName: id, MAC: "02:fc:ac:1e:00:02"},
		&guestconfig.Network{Address: netip.PrefixFrom(ip, 24).String(), Gateway: "172.30.0.1", MTU: 1500}, nil
}

func (n *testNet) Release(_ context.Context, id string) error {
	n.mu.Lock()
	defer n.mu.Unlock()
	delete(n.addrs, id)
	delete(n.taps, id)
	n.released = append(n.released, id)
	return nil
}

func (n *testNet) List(context.Context) ([]string, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	var out []string
	for id := range n.addrs {
		out = append(out, id)
	}
	for id := range n.taps {
		if _, ok := n.addrs[id]; !ok {
			out = append(out, id)
		}
	}
	sort.Strings(out)
	return out, nil
}

// TestTapAttachFailure: the VM's network cannot be set up. That is a failed
// attempt: the VM is never started, its half-made network state (an
// allocated address) is released, its runner deleted, its capacity freed;
// the next attempt gets a network and runs the job.
func TestTapAttachFailure(t *testing.T) {
	n := newTestNet(func(call int) error {
		if call == 1 {
			return errors.New("create tap: operation not permitted")
		}
		return nil
	})
	h := newHarness(t, func(h *harness) {
		h.net = n
		h.capa = planner.Capacity{VCPUs: 2, MemoryMiB: 4096}
		h.cfg.Limits.RetryBackoff = 10 * time.Millisecond
	})
	id := h.newJob(tag2x4)
	v := h.waitStarted(id)
	var failed job.VM
	for _, x := range h.vms(id) {
		if x.ID != v.ID {
			failed = x
		}
	}
	if failed.ID == "" {
		t.Fatalf("no failed attempt: %+v", h.vms(id))
	}
	if failed.State != job.VMGone || failed.Reason != job.ReasonNetwork+": create tap: operation not permitted" || failed.Timeline.RunnerDeleted.IsZero() {
		t.Fatalf("failed attempt's vm: %s %q, runner deleted %v", failed.State, failed.Reason, !failed.Timeline.RunnerDeleted.IsZero())
	}
	if slices.ContainsFunc(h.gl.runnerList(), func(r gitlabstandin.RunnerState) bool { return r.ID == failed.RunnerID }) {
		t.Fatalf("runner %d of the failed attempt left in GitLab", failed.RunnerID)
	}
	ids, _ := n.List(context.Background())
	n.mu.Lock()
	released := slices.Contains(n.released, failed.ID)
	n.mu.Unlock()
	if !slices.Equal(ids, []string{v.ID}) || !released {
		t.Fatalf("network state %v (want only %s), failed attempt's released: %v", ids, v.ID, released)
	}
	specs := h.drv.Specs()
	if len(specs) != 1 || specs[0].ID != v.ID || specs[0].Network == nil || specs[0].Network.TapName != v.ID || specs[0].Guest.Network == nil {
		t.Fatalf("vm starts: %+v; want only the second attempt's, with its network", specs)
	}
	if j := h.job(id); j.Attempts != 1 || len(attemptReasons(t, h.st, id)) != 1 || !strings.HasPrefix(attemptReasons(t, h.st, id)[0], job.ReasonNetwork+": ") {
		t.Fatalf("attempts %d: %q", j.Attempts, attemptReasons(t, h.st, id))
	}
	h.take(id, v)
	h.end(id, v, "success")
	h.waitState(id, job.Done)
	h.clean()
	if ids, _ := n.List(context.Background()); len(ids) != 0 {
		t.Fatalf("network state left: %v", ids)
	}
	if !strings.Contains(h.metricsText(), `firerunner_job_attempts_failed_total{reason="network"} 1`) {
		t.Fatal("network attempt not counted")
	}
}

// capDriver wraps the fake driver and checks, at every Start, that the VMs
// holding resources (from their Start until their Destroy) stay within
// the capacity, on the host and in the store.
type capDriver struct {
	*fakevm.Driver
	capa planner.Capacity
	live func() ([]job.VM, error) // the store's live VM records

	mu         sync.Mutex
	held       map[string]vm.Spec
	peak       planner.Capacity
	starts     int
	violations []string
}

func over(use, capa planner.Capacity) bool {
	return use.VCPUs > capa.VCPUs || use.MemoryMiB > capa.MemoryMiB || (capa.MaxVMs > 0 && use.MaxVMs > capa.MaxVMs)
}

func (d *capDriver) Start(ctx context.Context, s vm.Spec) error {
	recs, err := d.live()
	d.mu.Lock()
	d.starts++
	d.held[s.ID] = s
	var host, planned planner.Capacity
	for _, x := range d.held {
		host.VCPUs, host.MemoryMiB, host.MaxVMs = host.VCPUs+x.VCPUs, host.MemoryMiB+x.MemoryMiB, host.MaxVMs+1
	}
	for _, v := range recs {
		planned.VCPUs, planned.MemoryMiB, planned.MaxVMs = planned.VCPUs+v.VCPUs, planned.MemoryMiB+v.MemoryMiB, planned.MaxVMs+1
	}
	if over(host, d.capa) || over(planned, d.capa) || err != nil {
		d.violations = append(d.violations, fmt.Sprintf("start of %s: on the host %+v, live records %+v (%v), capacity %+v", s.ID, host, planned, err, d.capa))
	}
	d.peak = planner.Capacity{VCPUs: max(d.peak.VCPUs, host.VCPUs), MemoryMiB: max(d.peak.MemoryMiB, host.MemoryMiB), MaxVMs: max(d.peak.MaxVMs, host.MaxVMs)}
	d.mu.Unlock()
	if err := d.Driver.Start(ctx, s); err != nil {
		d.mu.Lock()
		delete(d.held, s.ID)
		d.mu.Unlock()
		return err
	}
	return nil
}

func (d *capDriver) Destroy(ctx context.Context, id string) error {
	if err := d.Driver.Destroy(ctx, id); err != nil {
		return err
	}
	d.mu.Lock()
	delete(d.held, id)
	d.mu.Unlock()
	return nil
}

// TestConcurrentWebhooksNeverExceedCapacity: many jobs of mixed sizes, their
// hooks sent concurrently and twice each, each VM's runner taking the
// oldest job its tags cover as GitLab does. At every VM start, the VMs
// holding resources fit the capacity, on the host and in the store.
func TestConcurrentWebhooksNeverExceedCapacity(t *testing.T) {
	const jobs = 40
	sizes := []string{tag1x1, tag2x4, "firecracker-4cpu-8gb", "firecracker-1cpu-2gb"}
	capa := planner.Capacity{VCPUs: 6, MemoryMiB: 12 * 1024, MaxVMs: 4}
	var cd *capDriver
	var h *harness
	var sawWaiting atomic.Bool
	var wg sync.WaitGroup
	hookErrs := make(chan error, 4*jobs)
	send := func(id int64, status string, body []byte) {
		req, _ := http.NewRequest(http.MethodPost, h.web.URL+"/webhook", bytes.NewReader(body))
		req.Header.Set("X-Gitlab-Token", testSecret)
		req.Header.Set("X-Gitlab-Event", "Job Hook")
		resp, err := http.DefaultClient.Do(req)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode != http.StatusOK {
				err = fmt.Errorf("job %d %s: HTTP %d", id, status, resp.StatusCode)
			}
		}
		if err != nil {
			hookErrs <- err
		}
	}
	post := func(id int64, status string) {
		body, err := h.gl.JobHook(id)
		if err != nil {
			hookErrs <- err
			return
		}
		send(id, status, body)
	}
	// GitLab's side of each VM: its runner takes the oldest pending job its
	// tags cover (maybe not the one it was made for), runs it a moment,
	// succeeds; the guest powers off.
	runVM := func(s vm.Spec) {
		defer wg.Done()
		for !cd.Running(s.ID) {
			time.Sleep(100 * time.Microsecond)
		}
		h.c.mu.Lock()
		if h.c.waiting > 0 {
			sawWaiting.Store(true)
		}
		h.c.mu.Unlock()
		id, jobToken, err := h.gl.requestWith(s.Guest.RunnerToken)
		if err != nil {
			hookErrs <- err
			return
		}
		if id == 0 {
			return // nothing for it: the plan stops it as idle
		}
		post(id, "running")
		time.Sleep(time.Duration(rand.IntN(3000)) * time.Microsecond)
		if err := h.gl.finishWith(id, jobToken, "success"); err != nil {
			hookErrs <- err
		}
		_ = cd.Exit(s.ID, 0)
		post(id, "success")
	}
	h = newHarness(t, func(h *harness) {
		h.capa = capa
		cd = &capDriver{capa: capa, held: map[string]vm.Spec{},
			live: func() ([]job.VM, error) { return h.st.ListVMs(context.Background(), true, 0) }}
		cd.Driver = fakevm.New(fakevm.Options{OnStart: func(s vm.Spec) { wg.Add(1); go runVM(s) }})
		h.drv, h.driver = cd.Driver, cd
	})
	var ids []int64
	for i := range jobs {
		ids = append(ids, h.gl.newJob(h.pid, sizes[i%len(sizes)]))
	}
	var senders sync.WaitGroup
	pending := map[int64][]byte{}
	next := make(chan int64, 2*jobs)
	for _, id := range ids {
		pending[id] = h.gl.hook(id)
		next <- id
		next <- id // every hook delivered twice
	}
	close(next)
	for range 8 {
		senders.Add(1)
		go func() {
			defer senders.Done()
			for id := range next {
				send(id, "pending", pending[id])
			}
		}()
	}
	senders.Wait()
	for _, id := range ids {
		if j := h.waitState(id, job.Done); j.VMID == "" {
			t.Errorf("job %d done without a VM of ours", id)
		}
	}
	h.clean()
	wg.Wait()
	close(hookErrs)
	for err := range hookErrs {
		t.Error(err)
	}
	cd.mu.Lock()
	defer cd.mu.Unlock()
	for _, v := range cd.violations {
		t.Error(v)
	}
	t.Logf("%d VM starts for %d jobs; peak on the host %+v of %+v", cd.starts, jobs, cd.peak, capa)
	// The check bit: capacity was the limit (jobs waited for it) and VMs ran
	// side by side.
	if cd.peak.MaxVMs < 2 || !sawWaiting.Load() {
		t.Fatalf("capacity never bound: peak %+v, jobs waiting at a start: %v", cd.peak, sawWaiting.Load())
	}
}

// scanState reads every file under the harness's state dir (the SQLite
// database, its WAL and shared memory) and fails if any holds one of
// secrets. control must be found somewhere: it proves the scan reads what
// the store wrote.
func (h *harness) scanState(when, control string, secrets ...string) {
	h.t.Helper()
	var files []string
	found := false
	err := filepath.WalkDir(h.dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		files = append(files, fmt.Sprintf("%s (%d bytes)", filepath.Base(p), len(b)))
		for _, s := range secrets {
			if bytes.Contains(b, []byte(s)) {
				h.t.Errorf("%s: %s holds a secret (%.10s…)", when, p, s)
			}
		}
		found = found || bytes.Contains(b, []byte(control))
		return nil
	})
	if err != nil {
		h.t.Fatal(err)
	}
	if !found || !slices.ContainsFunc(files, func(f string) bool { return strings.HasPrefix(f, store.FileName+" ") }) {
		h.t.Fatalf("%s: scanned %v and did not find %q: the scan does not see the store", when, files, control)
	}
	h.t.Logf("%s: scanned %s", when, strings.Join(files, ", "))
}

// TestRunnerTokenNeverStored: the runner's token exists only in memory and
// on the VM's config drive. The store's files (database, WAL) never hold
// it (nor the API token or the webhook secret): while the VM runs, after
// the job, and after shutdown's final checkpoint.
func TestRunnerTokenNeverStored(t *testing.T) {
	h := newHarness(t, nil)
	id := h.newJob(tag2x4, "linux")
	v := h.waitStarted(id)
	tok := h.drv.Specs()[0].Guest.RunnerToken
	if !strings.HasPrefix(tok, "glrt-") {
		t.Fatalf("the VM got no runner token: %q", tok)
	}
	secrets := []string{tok, h.gl.token, testSecret}
	h.scanState("vm running", v.ID, secrets...)
	h.take(id, v)
	h.end(id, v, "success")
	h.waitState(id, job.Done)
	h.clean()
	h.scanState("job done", v.ID, secrets...)
	h.stop()
	h.scanState("after shutdown", v.ID, secrets...)
}
