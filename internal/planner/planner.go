// Package planner decides, with no side effects, which VMs FireRunner should
// start, retarget or stop: from the jobs waiting in GitLab, the live VMs and
// the host's capacity, under GitLab's rule that a runner takes any pending
// job whose tags are a subset of its own.
//
// Each VM carries one runner that runs one job. A VM is idle until its
// runner picks a job; an idle VM may take any waiting job its tags cover,
// not only the one it was started for. So the planner matches waiting jobs
// to idle VMs as a maximum bipartite matching (Kuhn's augmenting paths;
// jobs with a VM of their own first, each trying that VM first), and then:
//   - a job left without a VM takes a surplus idle VM of the same size,
//     whose runner is retargeted to the job's tags (no new runner: GitLab
//     caps runner creation), or else gets a new VM while capacity allows, in
//     strict FIFO order so a large job cannot starve;
//   - a surplus idle VM that no job can use is stopped;
//   - a job of a size that has a pool takes one of its warm VMs (booted,
//     no runner yet) before a cold VM is started, and pools are refilled
//     toward min_idle (more while jobs of that size keep coming, up to
//     max_idle) with the capacity jobs leave free.
package planner

import (
	"fmt"

	"github.com/firerunner/firerunner/internal/tags"
)

// Job is a FireRunner job GitLab still holds pending, with no runner of any
// kind on it yet.
type Job struct {
	ID int64
	// Pool: a runner serves only jobs of its pool (a project runner only
	// its project's jobs), whatever the tags.
	Pool             string
	Tags             tags.Set
	VCPUs, MemoryMiB int
	// Ready is false while the job backs off after a failed attempt: it may
	// take an idle VM, but no new VM is started for it.
	Ready bool
	// Pooled: a pool's shared runner takes it (runners.mode pooled), so it
	// never gets a VM of its own (cold or warm): it is demand for its
	// pool, whose VMs take it from GitLab themselves.
	Pooled bool
}

// VM is a live VM of this host (every one holds capacity).
type VM struct {
	ID               string
	ForJob           int64 // the job it was started (or last retargeted) for
	Pool             string
	Tags             tags.Set
	VCPUs, MemoryMiB int
	// Idle: its runner has picked no job and it is not being stopped, so it
	// may still take any job its tags cover.
	Idle bool
	// Warm: a pool's VM with no job (and no runner) yet. Not Idle. Once
	// Booted (gitlab-runner waiting for its config) it may be assigned any
	// waiting job of its size; while it boots it only counts for the pool.
	Warm, Booted bool
	// Shared: it polls GitLab on its pool's shared runner. Idle ones take
	// jobs like any idle VM, but are never retargeted (the runner is
	// shared) nor stopped as surplus (they are the pool's warm VMs: they
	// end by themselves at the pool's idle timeout); they count toward the
	// pool's idle VMs.
	Shared bool
}

// Pool keeps warm VMs of one size.
type Pool struct {
	VCPUs, MemoryMiB int
	MinIdle, MaxIdle int // MaxIdle < MinIdle means MinIdle
}

// Capacity is what VMs may use in total; MaxVMs 0 means no VM-count limit.
type Capacity struct {
	VCPUs, MemoryMiB, MaxVMs int
}

// Input is everything the planner looks at. Jobs are in FIFO order.
type Input struct {
	Jobs     []Job
	VMs      []VM
	Capacity Capacity
	NoStarts bool // draining: no new VMs
	Pools    []Pool
}

// Assign gives a pool's warm VM a waiting job.
type Assign struct {
	VMID  string
	JobID int64
}

// Refill boots a warm VM for a pool.
type Refill struct {
	VCPUs, MemoryMiB int
}

// Start asks for a new VM (and runner) with the job's tags and size.
type Start struct {
	JobID            int64
	Tags             tags.Set
	VCPUs, MemoryMiB int
}

// Retarget gives a surplus idle VM's runner a waiting job's tags.
type Retarget struct {
	VMID  string
	JobID int64
	Tags  tags.Set
}

// Plan is the planner's decision.
type Plan struct {
	Assigned map[int64]string // job → idle VM expected to take it
	Retarget []Retarget
	Assign   []Assign
	Start    []Start
	Refill   []Refill
	Stop     []string // surplus idle VMs
	TooBig   []int64  // jobs larger than the host's total capacity
	Waiting  []int64  // jobs without a VM: waiting for capacity (or backing off)
}

func (p Plan) String() string {
	return fmt.Sprintf("assigned=%d retarget=%d warm=%d start=%d refill=%d stop=%d too_big=%d waiting=%d",
		len(p.Assigned), len(p.Retarget), len(p.Assign), len(p.Start), len(p.Refill), len(p.Stop), len(p.TooBig), len(p.Waiting))
}

// Decide computes the plan.
func Decide(in Input) Plan {
	p := Plan{Assigned: map[int64]string{}}
	idle := []int{} // indexes into in.VMs
	for i, v := range in.VMs {
		if v.Idle {
			idle = append(idle, i)
		}
	}
	// Candidate VMs per job: its own VM first, then in input order.
	cands := make([][]int, len(in.Jobs))
	for ji, j := range in.Jobs {
		for _, own := range []bool{true, false} {
			for _, vi := range idle {
				v := in.VMs[vi]
				if (v.ForJob == j.ID) == own && v.Pool == j.Pool && v.Tags.Covers(j.Tags) {
					cands[ji] = append(cands[ji], vi)
				}
			}
		}
	}
	vmJob := map[int]int{} // VM index → job index
	jobVM := make([]int, len(in.Jobs))
	for ji := range jobVM {
		jobVM[ji] = -1
	}
	// Jobs whose own VM can take them go first, so that each keeps it
	// unless a larger matching needs otherwise: records then say "the VM
	// made for this job ran it" whenever that is possible.
	order := make([]int, 0, len(in.Jobs))
	for _, own := range []bool{true, false} {
		for ji, j := range in.Jobs {
			if hasOwn := len(cands[ji]) > 0 && in.VMs[cands[ji][0]].ForJob == j.ID; hasOwn == own {
				order = append(order, ji)
			}
		}
	}
	for _, ji := range order {
		augment(ji, cands, vmJob, jobVM, map[int]bool{})
	}
	var surplus []int
	var polling []int // shared VMs no job in this plan is expected to take
	for _, vi := range idle {
		if _, ok := vmJob[vi]; !ok {
			if in.VMs[vi].Shared {
				polling = append(polling, vi)
			} else {
				surplus = append(surplus, vi)
			}
		}
	}
	used := Capacity{}
	for _, v := range in.VMs {
		used.VCPUs += v.VCPUs
		used.MemoryMiB += v.MemoryMiB
		used.MaxVMs++
	}
	var warm []int // pools' VMs without a job, oldest first
	for i, v := range in.VMs {
		if v.Warm {
			warm = append(warm, i)
		}
	}
	booted := func(vi int) bool { return in.VMs[vi].Booted }
	demand := map[[2]int]int{} // jobs per size that needed a VM in this plan
	blocked := in.NoStarts
	var head *Job // the first ready job capacity kept from starting
	for ji, j := range in.Jobs {
		if vi := jobVM[ji]; vi >= 0 {
			p.Assigned[j.ID] = in.VMs[vi].ID
			continue
		}
		demand[[2]int{j.VCPUs, j.MemoryMiB}]++
		if j.VCPUs > in.Capacity.VCPUs || j.MemoryMiB > in.Capacity.MemoryMiB {
			p.TooBig = append(p.TooBig, j.ID)
			continue
		}
		if k := sameSize(in.VMs, surplus, j); k >= 0 {
			vi := surplus[k]
			surplus = append(surplus[:k], surplus[k+1:]...)
			p.Retarget = append(p.Retarget, Retarget{VMID: in.VMs[vi].ID, JobID: j.ID, Tags: j.Tags})
			p.Assigned[j.ID] = in.VMs[vi].ID
			continue
		}
		if j.Pooled {
			// Its pool's refill below boots VMs that take it themselves.
			p.Waiting = append(p.Waiting, j.ID)
			continue
		}
		if k := ofSize(in.VMs, warm, j.VCPUs, j.MemoryMiB, booted); k >= 0 && j.Ready {
			vi := warm[k]
			warm = append(warm[:k], warm[k+1:]...)
			p.Assign = append(p.Assign, Assign{VMID: in.VMs[vi].ID, JobID: j.ID})
			p.Assigned[j.ID] = in.VMs[vi].ID
			continue
		}
		if !j.Ready || blocked || !fits(in.Capacity, used, j) {
			// Strict FIFO: a ready job that does not fit blocks the ones
			// behind it, so a large job is never starved by small ones.
			if j.Ready && !blocked {
				head = &in.Jobs[ji]
			}
			blocked = blocked || j.Ready
			p.Waiting = append(p.Waiting, j.ID)
			continue
		}
		used.VCPUs += j.VCPUs
		used.MemoryMiB += j.MemoryMiB
		used.MaxVMs++
		p.Start = append(p.Start, Start{JobID: j.ID, Tags: j.Tags, VCPUs: j.VCPUs, MemoryMiB: j.MemoryMiB})
	}
	for _, vi := range surplus {
		p.Stop = append(p.Stop, in.VMs[vi].ID)
	}
	warm = yieldWarm(in, &p, warm, used, head)
	refill(in, &p, warm, polling, demand, used, blocked)
	return p
}

// yieldWarm stops idle warm VMs, newest first, when that makes room for the
// first job capacity holds back: a job waiting beats a VM waiting for one.
// It returns the warm VMs left.
func yieldWarm(in Input, p *Plan, warm []int, used Capacity, head *Job) []int {
	if head == nil || in.NoStarts {
		return warm
	}
	var stop []int
	for i := len(warm) - 1; i >= 0 && !fits(in.Capacity, used, *head); i-- {
		v := in.VMs[warm[i]]
		used.VCPUs -= v.VCPUs
		used.MemoryMiB -= v.MemoryMiB
		used.MaxVMs--
		stop = append(stop, i)
	}
	if !fits(in.Capacity, used, *head) {
		return warm // stopping them all would not be enough
	}
	for _, i := range stop {
		p.Stop = append(p.Stop, in.VMs[warm[i]].ID)
		warm = append(warm[:i], warm[i+1:]...)
	}
	return warm
}

// refill keeps each pool's warm VMs at min_idle, raised by this plan's demand
// for the size up to max_idle; only with capacity no waiting job needs. Warm
// VMs beyond max_idle, of sizes without a pool, or all while draining, stop.
func refill(in Input, p *Plan, warm, polling []int, demand map[[2]int]int, used Capacity, blocked bool) {
	keep := map[[2]int]int{}
	for _, pl := range in.Pools {
		size := [2]int{pl.VCPUs, pl.MemoryMiB}
		hi := max(pl.MaxIdle, pl.MinIdle)
		keep[size] = hi
		if blocked {
			continue
		}
		have := 0
		for _, vi := range append(append([]int(nil), warm...), polling...) {
			if in.VMs[vi].VCPUs == pl.VCPUs && in.VMs[vi].MemoryMiB == pl.MemoryMiB {
				have++
			}
		}
		want := min(hi, pl.MinIdle+demand[size])
		for ; have < want; have++ {
			j := Job{VCPUs: pl.VCPUs, MemoryMiB: pl.MemoryMiB}
			if !fits(in.Capacity, used, j) {
				break
			}
			used.VCPUs += j.VCPUs
			used.MemoryMiB += j.MemoryMiB
			used.MaxVMs++
			p.Refill = append(p.Refill, Refill{VCPUs: pl.VCPUs, MemoryMiB: pl.MemoryMiB})
		}
	}
	// Newest first out: the oldest warm VMs are the readiest.
	for i := len(warm) - 1; i >= 0; i-- {
		v := in.VMs[warm[i]]
		size := [2]int{v.VCPUs, v.MemoryMiB}
		n := 0
		for _, vj := range warm[:i] {
			if in.VMs[vj].VCPUs == v.VCPUs && in.VMs[vj].MemoryMiB == v.MemoryMiB {
				n++
			}
		}
		if in.NoStarts || n >= keep[size] {
			p.Stop = append(p.Stop, v.ID)
		}
	}
}

func ofSize(vms []VM, list []int, vcpus, mem int, ok func(int) bool) int {
	for k, vi := range list {
		if vms[vi].VCPUs == vcpus && vms[vi].MemoryMiB == mem && ok(vi) {
			return k
		}
	}
	return -1
}

// augment is one step of Kuhn's algorithm: find a VM for job ji, moving
// already matched jobs to other VMs they fit where needed.
func augment(ji int, cands [][]int, vmJob map[int]int, jobVM []int, seen map[int]bool) bool {
	for _, vi := range cands[ji] {
		if seen[vi] {
			continue
		}
		seen[vi] = true
		other, taken := vmJob[vi]
		if !taken || augment(other, cands, vmJob, jobVM, seen) {
			vmJob[vi], jobVM[ji] = ji, vi
			return true
		}
	}
	return false
}

func sameSize(vms []VM, surplus []int, j Job) int {
	for k, vi := range surplus {
		if vms[vi].VCPUs == j.VCPUs && vms[vi].MemoryMiB == j.MemoryMiB && vms[vi].Pool == j.Pool {
			return k
		}
	}
	return -1
}

func fits(c, used Capacity, j Job) bool {
	return used.VCPUs+j.VCPUs <= c.VCPUs && used.MemoryMiB+j.MemoryMiB <= c.MemoryMiB &&
		(c.MaxVMs == 0 || used.MaxVMs+1 <= c.MaxVMs)
}
