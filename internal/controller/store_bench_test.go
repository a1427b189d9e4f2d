package controller

import (
	"context"
	"crypto/sha256"
	"database/sql"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/firerunner/firerunner/internal/metrics"
	"github.com/firerunner/firerunner/internal/store"
)

// BenchmarkStoreHistory (make bench-store) is state retention's target:
// with a long history in the store (1,000,000 ended jobs by default, each
// with its transitions, its gone VM and that VM's transitions, its deleted
// runner; all younger than state.retention, so nothing is pruned), a job's
// webhook → VM start request p99 and a /metrics scrape's p99 stay within
// 2× of an empty store. Each run sends the same 1,000 jobs one at a time
// through the real webhook handler, API client, SQLite store, queue,
// planner and reconcilers (fake VM driver, loopback GitLab stub), then
// scrapes /metrics 500 times. Empty and history runs alternate, three of
// each, and the median of each p99 is compared: the machine is shared, and
// a single run's tail mostly measures its neighbours. Last, the whole
// history is pruned as successive sweeps would, to show what a first
// prune costs. FIRERUNNER_BENCH_STORE_JOBS sets the history's size.
func BenchmarkStoreHistory(b *testing.B) {
	hist := 1_000_000
	if v := os.Getenv("FIRERUNNER_BENCH_STORE_JOBS"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 0 {
			b.Fatalf("FIRERUNNER_BENCH_STORE_JOBS=%q", v)
		}
		hist = n
	}
	const jobs, scrapes, rounds = 1000, 500, 3
	type run struct {
		res    benchResult
		scrape [2]time.Duration // p50, p99
		dbMiB  float64
	}
	once := func(dir string) run {
		var r run
		r.res = runBenchIn(b, dir, jobs, 1, func(m *metrics.Metrics) { r.scrape = scrape(b, m, scrapes) })
		if fi, err := os.Stat(filepath.Join(dir, store.FileName)); err == nil {
			r.dbMiB = float64(fi.Size()) / (1 << 20)
		}
		return r
	}
	var runs [2][]run // empty, history
	var fillTook time.Duration
	var pruned store.Pruned
	var pruneTook, pruneCallMax, pruneTxMax time.Duration
	var pruneCalls int
	for i := 0; i < b.N; i++ {
		runs = [2][]run{}
		var last string
		for range rounds {
			runs[0] = append(runs[0], once(b.TempDir()))
			last = b.TempDir()
			t0 := time.Now()
			fillCached(b, last, hist)
			fillTook = time.Since(t0)
			runs[1] = append(runs[1], once(last))
		}
		pruned, pruneCalls, pruneTook, pruneCallMax, pruneTxMax = pruneAll(b, last)
	}
	med := func(rs []run, f func(run) time.Duration) time.Duration {
		d := make([]time.Duration, len(rs))
		for i, r := range rs {
			d[i] = f(r)
		}
		slices.Sort(d)
		return d[len(d)/2]
	}
	type col struct {
		name string
		f    func(run) time.Duration
	}
	cols := []col{
		{"p50 webhook→VM start req", func(r run) time.Duration { return r.res.p50 }},
		{"p99 webhook→VM start req", func(r run) time.Duration { return r.res.p99 }},
		{"p99 webhook answer", func(r run) time.Duration { return r.res.hookP99 }},
		{"p50 /metrics scrape", func(r run) time.Duration { return r.scrape[0] }},
		{"p99 /metrics scrape", func(r run) time.Duration { return r.scrape[1] }},
	}
	ratio := func(c col) float64 {
		return float64(med(runs[1], c.f)) / float64(max(med(runs[0], c.f), time.Microsecond))
	}
	startRatio, scrapeRatio := ratio(cols[1]), ratio(cols[4])
	b.ReportMetric(med(runs[1], cols[1].f).Seconds()*1e3, "p99-ms")
	b.ReportMetric(med(runs[1], cols[4].f).Seconds()*1e3, "scrape-p99-ms")
	b.ReportMetric(startRatio, "p99-ratio")
	b.ReportMetric(scrapeRatio, "scrape-ratio")

	fmt.Printf("\nFireRunner with a long history in the store: %d jobs one at a time, then %d /metrics scrapes, per run; %d runs of each store,\n"+
		"alternating; medians (each run's value in brackets). GOMAXPROCS=%d, fake VM driver, loopback GitLab stub, real SQLite.\n",
		jobs, scrapes, rounds, runtime.GOMAXPROCS(0))
	fmt.Printf("%-26s %-36s %-36s %8s\n", "", "empty store", fmt.Sprintf("%d ended jobs (%.0f MiB)", hist, runs[1][0].dbMiB), "ratio")
	for _, c := range cols {
		cell := func(rs []run) string {
			var each []string
			for _, r := range rs {
				each = append(each, fmt.Sprintf("%.2f", c.f(r).Seconds()*1e3))
			}
			return fmt.Sprintf("%s [%s]", ms(med(rs, c.f)), strings.Join(each, " "))
		}
		fmt.Printf("%-26s %-36s %-36s %7.2fx\n", c.name, cell(runs[0]), cell(runs[1]), ratio(c))
	}
	verdict := func(x float64) string {
		if x <= 2 {
			return "within 2x"
		}
		return "OVER 2x"
	}
	fmt.Printf("target: p99 webhook→VM start request %s, p99 /metrics scrape %s of the empty store\n", verdict(startRatio), verdict(scrapeRatio))
	fmt.Printf("history in place in %.1f s (written, or copied from %s)\n", fillTook.Seconds(), benchCacheDir())
	fmt.Printf("pruning everything ended (the history and the last run's jobs) as successive sweeps would: %d jobs, %d VMs, %d runners,\n"+
		"%d transitions in %.1f s over %d Prune calls; longest call %s, made of transactions of at most %s (the store serves webhooks between them)\n",
		pruned.Jobs, pruned.VMs, pruned.Runners, pruned.Transitions, pruneTook.Seconds(), pruneCalls, ms(pruneCallMax), ms(pruneTxMax))
	if l, err := os.ReadFile("/proc/loadavg"); err == nil {
		fmt.Printf("host load average: %s", l)
	}
	fmt.Println()
	if startRatio > 2 || scrapeRatio > 2 {
		b.Errorf("with %d ended jobs: webhook→VM start request p99 %.2fx, /metrics scrape p99 %.2fx of the empty store (medians of %d runs); target <= 2x",
			hist, startRatio, scrapeRatio, rounds)
	}
}

// scrape times n GET /metrics through the metrics handler; p50 and p99.
func scrape(b *testing.B, m *metrics.Metrics, n int) [2]time.Duration {
	h := m.Handler()
	d := make([]time.Duration, n)
	for i := range d {
		rec := httptest.NewRecorder()
		t0 := time.Now()
		h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/metrics", nil))
		d[i] = time.Since(t0)
		if rec.Code != 200 {
			b.Fatalf("/metrics: HTTP %d", rec.Code)
		}
	}
	slices.Sort(d)
	return [2]time.Duration{d[n/2], d[n*99/100]}
}

// benchCacheDir keeps written histories ($FIRERUNNER_CACHE/bench-store):
// writing 1,000,000 jobs takes about half a minute, copying the file a few
// seconds.
func benchCacheDir() string {
	c := os.Getenv("FIRERUNNER_CACHE")
	if c == "" {
		c = "/var/cache/firerunner"
	}
	return filepath.Join(c, "bench-store")
}

// fillCached puts a store with n historical jobs into dir: a copy of the
// cached one, written first if needed (keyed by n, the schema version, the
// text of fillHistory's statements and the day).
func fillCached(b *testing.B, dir string, n int) {
	b.Helper()
	// The history is dated relative to when it was written and must stay
	// within the default retention: a cached one is used on its day only.
	key := sha256.Sum256([]byte(fmt.Sprint(n, historySQL(), schemaVersion(b))))
	cached := filepath.Join(benchCacheDir(), fmt.Sprintf("history-%d-%x-%s.db", n, key[:6], time.Now().UTC().Format("20060102")))
	if _, err := os.Stat(cached); err != nil {
		old, _ := filepath.Glob(filepath.Join(benchCacheDir(), "history-*.db"))
		for _, f := range old {
			os.Remove(f)
		}
		tmp := filepath.Join(benchCacheDir(), fmt.Sprintf("tmp-%d", os.Getpid()))
		if err := os.MkdirAll(tmp, 0o700); err != nil {
			b.Fatal(err)
		}
		defer os.RemoveAll(tmp)
		fillHistory(b, tmp, n)
		if err := os.Rename(filepath.Join(tmp, store.FileName), cached); err != nil {
			b.Fatal(err)
		}
	}
	in, err := os.Open(cached)
	if err != nil {
		b.Fatal(err)
	}
	defer in.Close()
	out, err := os.OpenFile(filepath.Join(dir, store.FileName), os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		b.Fatal(err)
	}
	if _, err := io.Copy(out, in); err != nil {
		b.Fatal(err)
	}
	// On disk before the run: a gigabyte of dirty page cache would be
	// written back during it (the first checkpoint's fsync) and measured
	// as the history's cost.
	if err := out.Sync(); err != nil {
		b.Fatal(err)
	}
	if err := out.Close(); err != nil {
		b.Fatal(err)
	}
}

// schemaVersion is the store's migration number (a fresh store's).
func schemaVersion(b *testing.B) int {
	st, err := store.Open(context.Background(), b.TempDir())
	if err != nil {
		b.Fatal(err)
	}
	defer st.Close()
	v, err := st.SchemaVersion(context.Background())
	if err != nil {
		b.Fatal(err)
	}
	return v
}

// fillHistory writes n ended jobs into a new store in dir, as FireRunner
// would have over days: each (but the ignored twentieth) with its 4
// transitions, one gone VM with its 5 transitions and one deleted runner;
// 1,000 projects whose last hook is older than the poll window. Ids stay
// clear of the benchmark's own (jobs from 100,000,000, runners from
// 1,000,000,000). Every record is younger than the default retention.
func fillHistory(b *testing.B, dir string, n int) {
	b.Helper()
	st, err := store.Open(context.Background(), dir) // schema, migrations
	if err != nil {
		b.Fatal(err)
	}
	st.Close()
	db, err := sql.Open("sqlite", "file:"+filepath.Join(dir, store.FileName)+"?_pragma=journal_mode(WAL)&_pragma=synchronous(OFF)")
	if err != nil {
		b.Fatal(err)
	}
	defer db.Close()
	db.SetMaxOpenConns(1)
	now := time.Now().UnixNano()
	day := int64(24 * time.Hour)
	stmts := historySQL()
	if n == 0 {
		return
	}
	tx, err := db.Begin()
	if err != nil {
		b.Fatal(err)
	}
	for _, q := range stmts {
		if _, err := tx.Exec(q, n, now, day); err != nil {
			tx.Rollback()
			b.Fatalf("fill history: %v\n%s", err, q)
		}
	}
	if err := tx.Commit(); err != nil {
		b.Fatal(err)
	}
	if _, err := db.Exec(`PRAGMA wal_checkpoint(TRUNCATE)`); err != nil {
		b.Fatal(err)
	}
}

// historySQL is fillHistory's statements: ?1 the number of jobs, ?2 now
// (unix ns), ?3 a day in ns.
func historySQL() []string {
	seq := `WITH RECURSIVE seq(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM seq WHERE i < ?1 - 1) `
	// t: when job i ended, spread over the last 13 days.
	const t = `(?2 - (i % 13) * ?3 - (i % 86400) * 1000000000)`
	const state = `(CASE i % 20 WHEN 0 THEN 'failed' WHEN 1 THEN 'canceled' WHEN 2 THEN 'ignored' ELSE 'done' END)`
	return []string{
		seq + `INSERT INTO jobs(job_id, project_id, project_path, pipeline_id, name, ref, tags, size_tag, vcpus, memory_mib, source, state, reason,
			attempts, gitlab_status, gitlab_runner, observed_at, vm_id, runner_id, exit_code, created_at, updated_at,
			t_webhook, t_tags, t_vm_start_req, t_job_picked, t_finished)
		SELECT 100000000 + i, 1000 + i % 1000, 'group/project-' || (i % 1000), 5000000 + i / 4, 'build', 'main',
			'["firecracker-2cpu-4gb","linux"]', 'firecracker-2cpu-4gb', 2, 4096, 'webhook', ` + state + `,
			CASE i % 20 WHEN 0 THEN 'job_failed' WHEN 1 THEN 'job_canceled' WHEN 2 THEN 'not_ours' ELSE 'job_succeeded' END,
			0, CASE i % 20 WHEN 0 THEN 'failed' WHEN 1 THEN 'canceled' WHEN 2 THEN 'pending' ELSE 'success' END,
			1000000000 + i, ` + t + `, CASE WHEN i % 20 = 2 THEN '' ELSE printf('fr-h%09d', i) END, CASE WHEN i % 20 = 2 THEN 0 ELSE 1000000000 + i END,
			CASE WHEN i % 20 = 2 THEN NULL ELSE 0 END, ` + t + ` - 60000000000, ` + t + `,
			` + t + ` - 60000000000, ` + t + ` - 59000000000, ` + t + ` - 58000000000, ` + t + ` - 50000000000, ` + t + `
		FROM seq`,
		seq + `INSERT INTO transitions(job_id, from_state, to_state, reason, at)
		SELECT 100000000 + i, s.f, CASE WHEN s.t = 'END' THEN ` + state + ` ELSE s.t END, '', ` + t + ` - s.ago
		FROM seq CROSS JOIN (SELECT '' AS f, 'new' AS t, 60000000000 AS ago UNION ALL SELECT 'new', 'queued', 59000000000
			UNION ALL SELECT 'queued', 'running', 50000000000 UNION ALL SELECT 'running', 'END', 0) AS s
		WHERE i % 20 != 2`,
		seq + `INSERT INTO vms(vm_id, host_id, for_job, project_id, tags, vcpus, memory_mib, state, reason, runner_id, picked_job_id, exit_code,
			exit_reason, created_at, updated_at, t_planned, t_runner_created, t_start_req, t_started, t_picked, t_exited, t_stop_req,
			t_destroyed, t_runner_deleted, t_gone)
		SELECT printf('fr-h%09d', i), 'test-host', 100000000 + i, 1000 + i % 1000, '["firecracker-2cpu-4gb","linux"]', 2, 4096, 'gone',
			'ran_job', 1000000000 + i, 100000000 + i, 0, '', ` + t + ` - 58000000000, ` + t + `,
			` + t + ` - 58000000000, ` + t + ` - 57000000000, ` + t + ` - 56000000000, ` + t + ` - 55000000000, ` + t + ` - 50000000000,
			` + t + ` - 3000000000, ` + t + ` - 2000000000, ` + t + ` - 1000000000, ` + t + ` - 500000000, ` + t + `
		FROM seq WHERE i % 20 != 2`,
		seq + `INSERT INTO vm_transitions(vm_id, from_state, to_state, reason, at)
		SELECT printf('fr-h%09d', i), s.f, s.t, '', ` + t + ` - s.ago
		FROM seq CROSS JOIN (SELECT '' AS f, 'pending' AS t, 58000000000 AS ago UNION ALL SELECT 'pending', 'starting', 57000000000
			UNION ALL SELECT 'starting', 'busy', 50000000000 UNION ALL SELECT 'busy', 'stopping', 3000000000 UNION ALL SELECT 'stopping', 'gone', 0) AS s
		WHERE i % 20 != 2`,
		seq + `INSERT INTO runners(runner_id, host_id, mode, vm_id, tags, created_at, deleted_at)
		SELECT 1000000000 + i, 'test-host', 'oneoff', printf('fr-h%09d', i), '["firecracker-2cpu-4gb","linux"]', ` + t + ` - 57000000000, ` + t + ` - 500000000
		FROM seq WHERE i % 20 != 2`,
		`WITH RECURSIVE seq(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM seq WHERE i < 999)
		INSERT INTO projects(project_id, path, last_hook_at) SELECT 1000 + i, 'group/project-' || i, ?2 - 30 * ?3 FROM seq`,
	}
}

// pruneAll prunes everything ended, as successive sweeps would: how long
// it takes in all and the longest single Prune call.
func pruneAll(b *testing.B, dir string) (total store.Pruned, calls int, took, longest, longestTx time.Duration) {
	st, err := store.Open(context.Background(), dir)
	if err != nil {
		b.Fatal(err)
	}
	defer st.Close()
	t0 := time.Now()
	for {
		c0 := time.Now()
		p, err := st.Prune(context.Background(), time.Now().Add(time.Minute))
		if err != nil {
			b.Fatal(err)
		}
		calls++
		longest = max(longest, time.Since(c0))
		total.Jobs, total.VMs, total.Runners, total.Transitions = total.Jobs+p.Jobs, total.VMs+p.VMs, total.Runners+p.Runners, total.Transitions+p.Transitions
		longestTx = max(longestTx, p.LongestTx)
		if !p.Any() {
			return total, calls, time.Since(t0), longest, longestTx
		}
	}
}
