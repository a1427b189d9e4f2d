package demo

import (
	"bufio"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/firerunner/firerunner/internal/config"
	"github.com/firerunner/firerunner/internal/guestconfig"
	"github.com/firerunner/firerunner/internal/job"
	"github.com/firerunner/firerunner/internal/testenv"
	"github.com/firerunner/firerunner/internal/testsupport/gitlabstandin"
	"github.com/firerunner/firerunner/internal/vm"
)

// BenchmarkWarmPool (make bench-pool) measures, with real QEMU VMs and the
// real gitlab-runner: webhook → the job's runner's first job request on a
// warm hit (p50, p95 over 10 jobs, one at a time, the pool refilled between
// jobs), job pending → picked in pooled mode (the VM already polls), the
// same on the cold path, the pool's refill time (VM planned →
// guest ready with gitlab-runner waiting for its config) and the RSS of an
// idle warm VM's VMM.
func BenchmarkWarmPool(b *testing.B) {
	testenv.RequireRoot(b)
	testenv.QEMU(b)
	dir := testenv.ImageDir(b)
	const warmJobs, coldJobs, pooledJobs = 10, 3, 5
	var warm, cold, refill, pooled []time.Duration
	var rss []int
	accel := "?"
	for i := 0; i < b.N; i++ {
		r := newBenchRig(b, dir, func(cfg *config.Config) {
			cfg.Pools = []config.Pool{{Size: small, MinIdle: 1, MaxIdle: 1, IdleTimeout: time.Hour}}
		})
		for range warmJobs {
			w := r.waitWarmReady(b)
			refill = append(refill, w.ready.Sub(w.vm.Timeline.Planned))
			if kb := vmmRSSKiB(r.o.WorkDir, w.vm.ID); kb > 0 {
				rss = append(rss, kb)
			}
			id := r.pipeline(gitlabstandin.JobSpec{Name: "warm", Tags: []string{small}, Script: []string{"true"}})[0]
			if _, rec := r.waitDone(id); rec.VMID != w.vm.ID {
				b.Fatalf("job %d ran on %s, not on the warm VM %s", id, rec.VMID, w.vm.ID)
			}
			warm = append(warm, r.firstRequest(id))
		}
		if m := regexp.MustCompile(`"accel":"([a-z]+)"`).FindStringSubmatch(r.logs.String()); m != nil {
			accel = strings.ToUpper(m[1])
		}
		r.stop()
		// Pooled mode: the VM already polls GitLab on the pool's shared
		// runner, so a job is picked with no FireRunner action.
		pr := newBenchRig(b, dir, func(cfg *config.Config) {
			pooledConfig(true)(cfg)
			cfg.Pools[0].MinIdle, cfg.Pools[0].MaxIdle = 1, 1
		})
		for range pooledJobs {
			deadline := time.Now().Add(3 * time.Minute)
			for len(pr.pollers()) == 0 && time.Now().Before(deadline) {
				time.Sleep(20 * time.Millisecond)
			}
			time.Sleep(time.Second) // its gitlab-runner is in a long poll by now
			id := pr.pipeline(gitlabstandin.JobSpec{Name: "pooled", Tags: []string{small}, Script: []string{"true"}})[0]
			pr.waitDone(id)
			if d := pr.pendingToPick(id); d > 0 {
				pooled = append(pooled, d)
			}
		}
		pr.stop()
		c := newBenchRig(b, dir, nil)
		for range coldJobs {
			id := c.pipeline(gitlabstandin.JobSpec{Name: "cold", Tags: []string{small}, Script: []string{"true"}})[0]
			c.waitDone(id)
			cold = append(cold, c.firstRequest(id))
		}
		c.stop()
	}
	q := func(d []time.Duration, p int) string {
		s := slices.Clone(d)
		slices.Sort(s)
		if v := s[(len(s)-1)*p/100]; v < 100*time.Millisecond {
			return fmt.Sprintf("%.1f ms", float64(v.Microseconds())/1000)
		}
		return fmt.Sprintf("%.2f s", s[(len(s)-1)*p/100].Seconds())
	}
	fmt.Printf("\nWarm pools, real QEMU microVMs (%s), real gitlab-runner, GitLab stand-in on loopback\n", accel)
	fmt.Printf("%-58s %10s %10s %6s\n", "measure", "p50", "p95", "n")
	fmt.Printf("%-58s %10s %10s %6d\n", "webhook → runner's first job request, warm hit", q(warm, 50), q(warm, 95), len(warm))
	if len(pooled) > 0 {
		fmt.Printf("%-58s %10s %10s %6d\n", "job pending → picked, pooled mode (VM already polling)", q(pooled, 50), q(pooled, 95), len(pooled))
	}
	fmt.Printf("%-58s %10s %10s %6d\n", "webhook → runner's first job request, cold (no pool)", q(cold, 50), q(cold, 95), len(cold))
	fmt.Printf("%-58s %10s %10s %6d\n", "refill: warm VM planned → guest ready (runner waiting)", q(refill, 50), q(refill, 95), len(refill))
	if len(rss) > 0 {
		slices.Sort(rss)
		fmt.Printf("%-58s %7d MiB %7d MiB %6d\n", "RSS of an idle warm VM's VMM (1 vCPU, 1 GiB guest)", rss[len(rss)/2]/1024, rss[len(rss)-1]/1024, len(rss))
	}
	fmt.Printf("target here (TCG): warm p50 <= 1.0 s\n\n")
}

// pendingToPick is the time from the job turning pending in GitLab to
// GitLab handing it to a runner (0 if unknown). In pooled mode a polling VM
// usually picks the job before its pending webhook is even delivered, so
// the webhook is no start mark here.
func (r *reconcileRig) pendingToPick(id int64) time.Duration {
	js, _ := r.gl.Job(id)
	if js.QueuedAt.IsZero() || js.StartedAt.IsZero() {
		return 0
	}
	return js.StartedAt.Sub(js.QueuedAt)
}

// newBenchRig is a reconcileRig for a benchmark, with the given config change.
func newBenchRig(b *testing.B, dir string, mod func(*config.Config)) *reconcileRig {
	if mod == nil {
		return newReconcileRig(b, dir)
	}
	return newReconcileRig(b, dir, mod)
}

type warmVM struct {
	vm    job.VM
	ready time.Time
}

// waitWarmReady waits for a warm VM whose guest reported it is ready, and
// when it did (the console log's modification time of that line is not
// kept: the first poll that sees it).
func (r *reconcileRig) waitWarmReady(tb testing.TB) warmVM {
	tb.Helper()
	deadline := time.Now().Add(3 * time.Minute)
	for time.Now().Before(deadline) {
		if ws := r.warmReady(); len(ws) > 0 {
			return warmVM{vm: ws[0], ready: readyTime(r.d.Config.StateDir, ws[0].ID)}
		}
		time.Sleep(10 * time.Millisecond)
	}
	tb.Fatalf("no warm VM ready")
	return warmVM{}
}

// readyTime is when the guest printed guestconfig.MarkerWarm: the console
// log's mtime is refreshed by each line, so it is read right when seen.
func readyTime(stateDir, id string) time.Time {
	p := filepath.Join(stateDir, "vms", id, vm.ConsoleFile)
	b, err := os.ReadFile(p)
	if err != nil || !strings.Contains(string(b), guestconfig.MarkerWarm) {
		return time.Now()
	}
	if fi, err := os.Stat(p); err == nil {
		return fi.ModTime()
	}
	return time.Now()
}

// vmmRSSKiB is the resident memory of a VM's VMM (0 if unknown).
func vmmRSSKiB(workDir, id string) int {
	for _, p := range vm.FindProcs(id) {
		f, err := os.Open(fmt.Sprintf("/proc/%d/status", p.PID))
		if err != nil {
			continue
		}
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			if fs := strings.Fields(sc.Text()); len(fs) >= 2 && fs[0] == "VmRSS:" {
				f.Close()
				n, _ := strconv.Atoi(fs[1])
				return n
			}
		}
		f.Close()
	}
	_ = workDir
	return 0
}
