package planner

import (
	"reflect"
	"slices"
	"testing"

	"github.com/firerunner/firerunner/internal/tags"
)

var (
	small  = tags.NewSet([]string{"firecracker-1cpu-1gb"})
	linux  = tags.NewSet([]string{"firecracker-1cpu-1gb", "linux"})
	big    = tags.NewSet([]string{"firecracker-4cpu-8gb"})
	capa   = Capacity{VCPUs: 4, MemoryMiB: 8192}
	capMax = Capacity{VCPUs: 64, MemoryMiB: 64 << 10, MaxVMs: 2}
)

func job(id int64, t tags.Set) Job {
	j := Job{ID: id, Tags: t, VCPUs: 1, MemoryMiB: 1024, Ready: true}
	if t.Key() == big.Key() {
		j.VCPUs, j.MemoryMiB = 4, 8192
	}
	return j
}

func vm(id string, forJob int64, t tags.Set, idle bool) VM {
	j := job(forJob, t)
	return VM{ID: id, ForJob: forJob, Tags: t, VCPUs: j.VCPUs, MemoryMiB: j.MemoryMiB, Idle: idle}
}

func TestDecide(t *testing.T) {
	notReady := job(3, small)
	notReady.Ready = false
	cases := []struct {
		name     string
		in       Input
		assigned map[int64]string
		retarget []Retarget
		start    []int64
		stop     []string
		tooBig   []int64
		waiting  []int64
		assign   []Assign
		refill   int
	}{
		{name: "new jobs get VMs in FIFO order",
			in:    Input{Jobs: []Job{job(1, small), job(2, linux)}, Capacity: capa},
			start: []int64{1, 2}},
		{name: "each job keeps the VM made for it",
			in:       Input{Jobs: []Job{job(1, small), job(2, small)}, VMs: []VM{vm("b", 2, small, true), vm("a", 1, small, true)}, Capacity: capa},
			assigned: map[int64]string{1: "a", 2: "b"}},
		{name: "the issue's subset pipeline: linux VM ran job 1; job 2 needs a linux runner, job 3's VM or job 1's serves job 3, the other is retargeted to job 2",
			in: Input{Jobs: []Job{job(2, linux), job(3, small)},
				VMs: []VM{vm("v1", 1, small, true), vm("v2", 2, linux, false), vm("v3", 3, small, true)}, Capacity: capa},
			assigned: map[int64]string{2: "v1", 3: "v3"},
			retarget: []Retarget{{VMID: "v1", JobID: 2, Tags: linux}}},
		{name: "augmenting path: job 1 moves to the plain VM so the linux VM serves job 2",
			in: Input{Jobs: []Job{job(1, small), job(2, linux)},
				VMs: []VM{vm("l", 2, linux, true), vm("s", 9, small, true)}, Capacity: capa},
			assigned: map[int64]string{1: "s", 2: "l"}},
		{name: "a job without a VM of its own does not take another job's",
			in: Input{Jobs: []Job{job(2, small), job(3, small), job(4, small)},
				VMs: []VM{vm("i", 2, small, true), vm("p", 4, small, true)}, Capacity: capa},
			assigned: map[int64]string{2: "i", 4: "p"}, start: []int64{3}},
		{name: "surplus idle VM stopped when its job ran elsewhere",
			in:       Input{Jobs: []Job{job(2, small)}, VMs: []VM{vm("a", 1, small, true), vm("b", 2, small, true)}, Capacity: capa},
			assigned: map[int64]string{2: "b"}, stop: []string{"a"}},
		{name: "busy VMs are never stopped and hold capacity",
			in:      Input{Jobs: []Job{job(5, big)}, VMs: []VM{vm("busy", 1, small, false)}, Capacity: capa},
			waiting: []int64{5}},
		{name: "too big for the host",
			in:     Input{Jobs: []Job{{ID: 1, Tags: tags.NewSet([]string{"firecracker-8cpu-1gb"}), VCPUs: 8, MemoryMiB: 1024, Ready: true}}, Capacity: capa},
			tooBig: []int64{1}},
		{name: "strict FIFO: a big job that does not fit blocks the small one behind it",
			in:      Input{Jobs: []Job{job(1, big), job(2, small)}, VMs: []VM{vm("x", 9, linux, false)}, Capacity: capa},
			waiting: []int64{1, 2}},
		{name: "a job backing off gets no new VM and blocks nobody",
			in:      Input{Jobs: []Job{notReady, job(4, small)}, Capacity: capa},
			start:   []int64{4},
			waiting: []int64{3}},
		{name: "a job backing off may still take an idle VM",
			in:       Input{Jobs: []Job{notReady}, VMs: []VM{vm("a", 3, small, true)}, Capacity: capa},
			assigned: map[int64]string{3: "a"}},
		{name: "draining: no starts, idle VMs still serve",
			in:       Input{Jobs: []Job{job(1, small), job(2, small)}, VMs: []VM{vm("a", 1, small, true)}, Capacity: capa, NoStarts: true},
			assigned: map[int64]string{1: "a"}, waiting: []int64{2}},
		{name: "a project runner serves only its project's jobs",
			in:    Input{Jobs: []Job{{ID: 1, Pool: "p1", Tags: small, VCPUs: 1, MemoryMiB: 1024, Ready: true}}, VMs: []VM{{ID: "a", ForJob: 9, Pool: "p2", Tags: small, VCPUs: 1, MemoryMiB: 1024, Idle: true}}, Capacity: capa},
			start: []int64{1}, stop: []string{"a"}},
		{name: "a job of a pooled size takes a warm VM; the pool refills",
			in: Input{Jobs: []Job{job(1, small)}, VMs: []VM{{ID: "w", VCPUs: 1, MemoryMiB: 1024, Warm: true, Booted: true}},
				Pools: []Pool{{VCPUs: 1, MemoryMiB: 1024, MinIdle: 1, MaxIdle: 1}}, Capacity: capa},
			assigned: map[int64]string{1: "w"}, assign: []Assign{{VMID: "w", JobID: 1}}, refill: 1},
		{name: "a warm VM still booting is no hit: the job boots cold, the booting VM stays for the pool",
			in: Input{Jobs: []Job{job(1, small)}, VMs: []VM{{ID: "w", VCPUs: 1, MemoryMiB: 1024, Warm: true}},
				Pools: []Pool{{VCPUs: 1, MemoryMiB: 1024, MinIdle: 1, MaxIdle: 1}}, Capacity: capa},
			start: []int64{1}},
		{name: "pool exhausted: cold start; demand raises the target up to max_idle",
			in:    Input{Jobs: []Job{job(1, small), job(2, small)}, Pools: []Pool{{VCPUs: 1, MemoryMiB: 1024, MinIdle: 0, MaxIdle: 1}}, Capacity: capa},
			start: []int64{1, 2}, refill: 1},
		{name: "no refill while a job waits for capacity",
			in: Input{Jobs: []Job{job(1, big)}, VMs: []VM{vm("x", 9, small, false)},
				Pools: []Pool{{VCPUs: 1, MemoryMiB: 1024, MinIdle: 2}}, Capacity: capa},
			waiting: []int64{1}},
		{name: "refill only within capacity",
			in:     Input{Pools: []Pool{{VCPUs: 1, MemoryMiB: 1024, MinIdle: 9}}, Capacity: capa},
			refill: 4},
		{name: "warm VMs beyond max_idle, or of a size without a pool, stop (newest first)",
			in: Input{VMs: []VM{{ID: "w1", VCPUs: 1, MemoryMiB: 1024, Warm: true}, {ID: "w2", VCPUs: 1, MemoryMiB: 1024, Warm: true},
				{ID: "b1", VCPUs: 4, MemoryMiB: 8192, Warm: true}}, Pools: []Pool{{VCPUs: 1, MemoryMiB: 1024, MinIdle: 1}}, Capacity: Capacity{VCPUs: 8, MemoryMiB: 16384}},
			stop: []string{"b1", "w2"}},
		{name: "a waiting job of another size makes an idle warm VM yield its capacity",
			in: Input{Jobs: []Job{job(1, big)}, VMs: []VM{{ID: "w", VCPUs: 1, MemoryMiB: 1024, Warm: true, Booted: true}},
				Pools: []Pool{{VCPUs: 1, MemoryMiB: 1024, MinIdle: 1}}, Capacity: capa},
			waiting: []int64{1}, stop: []string{"w"}},
		{name: "no warm VM stops when that would not make room",
			in: Input{Jobs: []Job{job(1, big)}, VMs: []VM{{ID: "w", VCPUs: 1, MemoryMiB: 1024, Warm: true, Booted: true}, vm("busy", 9, small, false)},
				Pools: []Pool{{VCPUs: 1, MemoryMiB: 1024, MinIdle: 1}}, Capacity: capa},
			waiting: []int64{1}},
		{name: "draining: warm VMs stop, nothing refills",
			in:   Input{VMs: []VM{{ID: "w", VCPUs: 1, MemoryMiB: 1024, Warm: true}}, Pools: []Pool{{VCPUs: 1, MemoryMiB: 1024, MinIdle: 2}}, Capacity: capa, NoStarts: true},
			stop: []string{"w"}},
		{name: "VM count limit",
			in:      Input{Jobs: []Job{job(1, small), job(2, small), job(3, small)}, Capacity: capMax},
			start:   []int64{1, 2},
			waiting: []int64{3}},
		{name: "retarget only to the same size; otherwise stop and start",
			in:       Input{Jobs: []Job{job(2, big)}, VMs: []VM{vm("a", 1, small, true)}, Capacity: Capacity{VCPUs: 8, MemoryMiB: 16384}},
			start:    []int64{2},
			stop:     []string{"a"},
			assigned: map[int64]string{}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			p := Decide(c.in)
			var start []int64
			for _, s := range p.Start {
				start = append(start, s.JobID)
			}
			if c.assigned == nil {
				c.assigned = map[int64]string{}
			}
			check := func(what string, got, want any) {
				t.Helper()
				if !reflect.DeepEqual(got, want) {
					t.Errorf("%s: got %v, want %v (plan %s)", what, got, want, p)
				}
			}
			check("assigned", p.Assigned, c.assigned)
			check("retarget", p.Retarget, c.retarget)
			check("start", start, c.start)
			check("stop", p.Stop, c.stop)
			check("too big", p.TooBig, c.tooBig)
			check("waiting", p.Waiting, c.waiting)
			check("assign", p.Assign, c.assign)
			check("refill", len(p.Refill), c.refill)
		})
	}
}

// TestDecideNeverStrandsAJob: whatever the VMs' tags, every waiting job
// that fits ends with a VM whose runner can take it (an assigned idle VM
// covering its tags, or a new VM with its tags), and no VM serves two jobs.
func TestDecideNeverStrandsAJob(t *testing.T) {
	sets := []tags.Set{small, linux, tags.NewSet([]string{"firecracker-1cpu-1gb", "docker"}), tags.NewSet([]string{"firecracker-1cpu-1gb", "docker", "linux"})}
	for seed := range 2000 {
		r := seed
		next := func(n int) int { r = (r*1103515245 + 12345) & 0x7fffffff; return r % n }
		var in Input
		in.Capacity = Capacity{VCPUs: 1000, MemoryMiB: 1 << 20}
		for i := range 1 + next(5) {
			in.Jobs = append(in.Jobs, job(int64(i+1), sets[next(len(sets))]))
		}
		for i := range next(6) {
			in.VMs = append(in.VMs, vm(string(rune('a'+i)), int64(1+next(6)), sets[next(len(sets))], next(3) > 0))
		}
		p := Decide(in)
		used := map[string]bool{}
		started := map[int64]bool{}
		for _, s := range p.Start {
			started[s.JobID] = true
		}
		retag := map[string]tags.Set{}
		for _, rt := range p.Retarget {
			retag[rt.VMID] = rt.Tags
		}
		for _, j := range in.Jobs {
			if started[j.ID] {
				continue
			}
			id, ok := p.Assigned[j.ID]
			if !ok {
				t.Fatalf("seed %d: job %d stranded: %s", seed, j.ID, p)
			}
			if used[id] {
				t.Fatalf("seed %d: VM %s serves two jobs", seed, id)
			}
			used[id] = true
			i := slices.IndexFunc(in.VMs, func(v VM) bool { return v.ID == id })
			vt := in.VMs[i].Tags
			if rt, ok := retag[id]; ok {
				vt = rt
			}
			if !in.VMs[i].Idle || !vt.Covers(j.Tags) || slices.Contains(p.Stop, id) {
				t.Fatalf("seed %d: job %d assigned to unusable VM %+v", seed, j.ID, in.VMs[i])
			}
		}
	}
}

// TestDecidePooled: jobs of a pool's shared runner never get a VM of their
// own; idle VMs on the shared runner take them like any idle VM, are never
// retargeted or stopped as surplus, and count toward the pool's idle VMs;
// demand beyond them refills the pool up to max_idle.
func TestDecidePooled(t *testing.T) {
	pooled := func(id int64) Job { j := job(id, small); j.Pooled = true; return j }
	shared := func(id string) VM { v := vm(id, 0, small, true); v.Shared = true; return v }
	pool := []Pool{{VCPUs: 1, MemoryMiB: 1024, MinIdle: 1, MaxIdle: 3}}
	big := Capacity{VCPUs: 16, MemoryMiB: 16 << 10}

	// Two pollers, one pooled job: one poller expected to take it, the
	// other is the pool's idle VM; nothing started, stopped or retargeted.
	p := Decide(Input{Jobs: []Job{pooled(1)}, VMs: []VM{shared("a"), shared("b")}, Capacity: big, Pools: pool})
	if len(p.Start)+len(p.Retarget)+len(p.Stop)+len(p.Refill)+len(p.Assign) != 0 || p.Assigned[1] == "" {
		t.Fatalf("with pollers: %s %+v", p, p.Assigned)
	}
	// No poller free: three pooled jobs raise the pool's target to
	// max_idle; none gets a cold VM or a warm VM assigned.
	warm := VM{ID: "w", VCPUs: 1, MemoryMiB: 1024, Warm: true, Booted: true}
	p = Decide(Input{Jobs: []Job{pooled(1), pooled(2), pooled(3)}, VMs: []VM{warm}, Capacity: big, Pools: pool})
	if len(p.Start) != 0 || len(p.Assign) != 0 || len(p.Refill) != 2 || len(p.Waiting) != 3 {
		t.Fatalf("no poller free: %s", p)
	}
	// Idle pollers beyond max_idle are not stopped (they end by
	// themselves); a one-off job the pollers' tags do not cover starts cold.
	p = Decide(Input{Jobs: []Job{job(9, linux)}, VMs: []VM{shared("a"), shared("b"), shared("c"), shared("d")}, Capacity: big, Pools: pool})
	if len(p.Stop) != 0 || len(p.Retarget) != 0 || len(p.Start) != 1 || p.Start[0].JobID != 9 {
		t.Fatalf("surplus pollers: %s", p)
	}
}
