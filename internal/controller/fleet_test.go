package controller

import (
	"context"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/firerunner/firerunner/internal/job"
	"github.com/firerunner/firerunner/internal/planner"
	"github.com/firerunner/firerunner/internal/testsupport/pgtest"
)

func TestMain(m *testing.M) { os.Exit(pgtest.Main(m)) }

// TestOnPostgres runs controller tests, unchanged, with the store in
// PostgreSQL (fleet mode, one host): the controller must behave on it
// exactly as on SQLite. Left out: the tests that write their crash state
// or old history straight into the SQLite file (RestartResumesEverything,
// SweepPrunesOldHistory; the store suite covers pruning on PostgreSQL),
// ForgedEvents, which reads a job's status as soon as a counter moved
// (the status is written just after), and CapacityWaitIsFIFO, whose last check reads the first jobs' state
// without waiting for their "finished" hooks to be processed (it races on
// either store, more often on PostgreSQL's slower round trips).
func TestOnPostgres(t *testing.T) {
	pgtest.Shared(t)
	onPostgres = true
	defer func() { onPostgres = false }()
	for name, fn := range map[string]func(*testing.T){
		"FullLifecycle":          TestWebhookAuthThenFullLifecycle,
		"DuplicateDeliveries":    TestDuplicateDeliveriesGetOneVM,
		"CancelTearsDown":        TestCancelTearsDownPromptly,
		"RunnerOutageRetries":    TestRunnerOutageRetriesTheJob,
		"PollFindsLostWebhooks":  TestPollFindsJobsWhoseWebhookWasLost,
		"VMStartFailure":         TestVMStartFailureRetriedThenGivenUp,
		"ConcurrentWebhooks":     TestConcurrentWebhooksNeverExceedCapacity,
		"WarmPoolHit":            TestWarmPoolHit,
		"SubsetPipeline":         TestSubsetPipeline,
		"IdleVMStopped":          TestIdleVMStoppedWhenItsJobRanElsewhere,
		"TooBig":                 TestTooBig,
		"RestartAfterVMRanJob":   TestRestartAfterVMRanItsJobWhileDown,
		"HooksDuringStartAndEnd": TestHooksDuringStartupAndDrain,
	} {
		t.Run(name, fn)
	}
}

// fleetHost is one host of a test fleet: its own fake driver and
// controller, the shared PostgreSQL database and GitLab.
func fleetHost(t *testing.T, first *harness, dsn, host string, maxVMs int, mods ...func(*harness)) *harness {
	return newHarness(t, func(h *harness) {
		if first != nil {
			h.gl, h.pid = first.gl, first.pid
			h.cfg = testConfig(h.gl.URL())
		}
		h.dsn, h.host = dsn, host
		h.capa = planner.Capacity{VCPUs: 16, MemoryMiB: 64 * 1024, MaxVMs: maxVMs}
		h.cfg.State.HeartbeatInterval = 50 * time.Millisecond
		h.cfg.State.HostLease = 600 * time.Millisecond
		for _, m := range mods {
			m(h)
		}
	})
}

// live returns a host's VMs on its fake driver.
func (h *harness) live() int {
	l, _ := h.drv.List(context.Background())
	return len(l)
}

// TestFleetSharesOneQueue: two hosts with room for two VMs each; every
// webhook goes to host a. Host a claims two jobs, host b finds the
// unclaimed ones and claims two, the fifth waits; each job is claimed by
// the host whose VM serves it, and no host ever holds more than its
// capacity. Every job is served once, and nothing is left.
func TestFleetSharesOneQueue(t *testing.T) {
	dsn := pgtest.NewDatabase(t)
	a := fleetHost(t, nil, dsn, "host-a", 2)
	b := fleetHost(t, a, dsn, "host-b", 2)
	var ids []int64
	for range 5 {
		ids = append(ids, a.newJob(tag1x1))
	}
	a.eventually("four VMs, two per host", func() bool { return a.live() == 2 && b.live() == 2 })
	served := 0
	for round := 0; served < len(ids); round++ {
		if a.live() > 2 || b.live() > 2 {
			t.Fatalf("capacity exceeded: a %d, b %d VMs", a.live(), b.live())
		}
		for _, id := range ids {
			j := a.job(id)
			if j.State != job.Queued {
				continue
			}
			for _, v := range a.vms(id) {
				if v.ForJob != id || v.State != job.VMStarting || v.Timeline.Started.IsZero() {
					continue
				}
				if j.HostID != v.HostID {
					t.Fatalf("job %d claimed by %q, its VM is on %q", id, j.HostID, v.HostID)
				}
				h := a
				if v.HostID == b.host {
					h = b
				}
				if !h.vmRunning(v.ID) {
					continue
				}
				got := h.gl.request(v.RunnerID) // GitLab's rule: the oldest pending job the runner's tags cover
				if got == 0 {
					continue
				}
				id := got
				h.event(id)
				h.waitState(id, job.Running)
				// The end's hook goes to the other host: any host records it.
				other := b
				if h == b {
					other = a
				}
				other.gl.setStatus(id, "success")
				_ = h.drv.Exit(v.ID, 0)
				other.event(id)
				a.waitState(id, job.Done)
				served++
			}
		}
		if round > 2000 {
			t.Fatalf("only %d of %d jobs served", served, len(ids))
		}
		time.Sleep(5 * time.Millisecond)
	}
	for _, id := range ids {
		if j := a.job(id); j.State != job.Done || j.VMID == "" {
			t.Fatalf("job %d: %+v", id, j)
		}
		if n := len(a.vms(id)); n != 1 {
			t.Fatalf("job %d had %d VMs, want 1", id, n)
		}
	}
	for _, h := range []*harness{a, b} {
		h.eventually("no VM left on "+h.host, func() bool { return h.live() == 0 })
	}
	a.clean()
	hosts, err := a.st.Hosts(context.Background())
	if err != nil || len(hosts) != 2 || !hosts[0].Alive(time.Now()) || !hosts[1].Alive(time.Now()) {
		t.Fatalf("hosts %+v %v", hosts, err)
	}
	if !strings.Contains(a.metricsText(), `firerunner_host_info{backend="postgres",host="host-a"} 1`) {
		t.Errorf("no host_info series")
	}
}

// TestFleetReapsADeadHost: host a dies (no cleanup, no heartbeat) with one
// job running on its VM and one waiting with a VM starting. When its lease
// ends, host b reconciles: a's runners are deleted in GitLab, the running
// job fails with host_lost, the waiting job is re-queued and served by b.
// When a comes back it tears its VMs down; nothing is left.
func TestFleetReapsADeadHost(t *testing.T) {
	dsn := pgtest.NewDatabase(t)
	a := fleetHost(t, nil, dsn, "host-a", 2)
	running, waiting := a.newJob(tag1x1), a.newJob(tag1x1)
	v1, v2 := a.waitStarted(running), a.waitStarted(waiting)
	a.take(running, v1)
	a.waitState(running, job.Running)
	a.crash()

	b := fleetHost(t, a, dsn, "host-b", 2)
	j := b.waitState(running, job.Failed)
	if job.ReasonKey(j.Reason) != job.ReasonHostLost || !strings.Contains(j.Reason, "host-a") {
		t.Fatalf("running job on the dead host: reason %q", j.Reason)
	}
	for _, v := range []job.VM{v1, v2} {
		got := b.waitVMState(v.ID, job.VMStopping)
		if job.ReasonKey(got.Reason) != job.ReasonHostLost || got.Timeline.RunnerDeleted.IsZero() || !b.gl.deleted(v.RunnerID) {
			t.Fatalf("dead host's vm %s: %s %q, runner %d deleted in GitLab: %v", v.ID, got.State, got.Reason, v.RunnerID, b.gl.deleted(v.RunnerID))
		}
	}
	nv := b.waitStarted(waiting)
	if nv.HostID != "host-b" || b.job(waiting).HostID != "host-b" {
		t.Fatalf("re-queued job: vm on %s, claimed by %q", nv.HostID, b.job(waiting).HostID)
	}
	b.take(waiting, nv)
	b.waitState(waiting, job.Running)
	b.end(waiting, nv, "success")
	b.waitState(waiting, job.Done)

	// a comes back: its VMs (still on its fake host) are torn down.
	if a.live() != 2 {
		t.Fatalf("the dead host's VMs should still run until it comes back: %d", a.live())
	}
	a.start()
	a.eventually("the returned host reaped its VMs", func() bool { return a.live() == 0 })
	for _, v := range []job.VM{v1, v2} {
		a.waitVMState(v.ID, job.VMGone)
	}
	b.eventually("nothing live", func() bool {
		live, _ := b.st.ListVMs(context.Background(), true, 0)
		rs, _ := b.st.ListRunners(context.Background(), true)
		return len(live) == 0 && len(rs) == 0 && len(b.gl.runnerList()) == 0
	})
	if !strings.Contains(b.metricsText(), `firerunner_fleet_events_total{event="reaped_host",host="host-b"} 1`) {
		t.Errorf("reap not counted:\n%s", b.metricsText())
	}
	hosts, _ := b.st.Hosts(context.Background())
	for _, h := range hosts {
		if !h.Alive(time.Now()) {
			t.Errorf("host %s not alive after its return", h.ID)
		}
	}
}

// TestFleetPokeWakesOtherHosts: host a has room for one VM and gets both
// webhooks; heartbeats are a minute apart, so only a's poke (LISTEN/NOTIFY)
// can make host b plan the job a has no room for, which it does at once.
func TestFleetPokeWakesOtherHosts(t *testing.T) {
	dsn := pgtest.NewDatabase(t)
	slow := func(h *harness) {
		h.cfg.State.HeartbeatInterval, h.cfg.State.HostLease = time.Minute, 3*time.Minute
	}
	a := fleetHost(t, nil, dsn, "host-a", 1, slow)
	b := fleetHost(t, a, dsn, "host-b", 1, slow)
	j1, j2 := a.newJob(tag1x1), a.newJob(tag1x1)
	started := func(id int64) job.VM {
		var v job.VM
		a.eventually(fmt.Sprintf("a VM for job %d started on some host", id), func() bool {
			for _, x := range a.vms(id) {
				if x.ForJob == id && !x.Timeline.Started.IsZero() {
					v = x
					return true
				}
			}
			return false
		})
		return v
	}
	v1, v2 := started(j1), started(j2)
	if v1.HostID == v2.HostID || a.live() != 1 || b.live() != 1 {
		t.Fatalf("VMs on %s and %s; a runs %d, b %d", v1.HostID, v2.HostID, a.live(), b.live())
	}
}
