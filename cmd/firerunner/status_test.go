package main

import (
	"context"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/firerunner/firerunner/internal/job"
	"github.com/firerunner/firerunner/internal/store"
	"github.com/firerunner/firerunner/internal/tags"
	"github.com/firerunner/firerunner/internal/testsupport/pgtest"
)

func captureStdout(t *testing.T, f func() error) string {
	t.Helper()
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	old := os.Stdout
	os.Stdout = w
	ferr := f()
	os.Stdout = old
	w.Close()
	b, _ := io.ReadAll(r)
	if ferr != nil {
		t.Fatal(ferr)
	}
	return string(b)
}

func TestStatusReadsTheStore(t *testing.T) {
	dir := t.TempDir()
	ctx := context.Background()
	st, err := store.Open(ctx, dir)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	if _, _, err := st.Observe(ctx, store.Observation{JobID: 4242, ProjectID: 7, ProjectPath: "g/p", Status: "pending", Source: "webhook", At: now, Create: true}); err != nil {
		t.Fatal(err)
	}
	size, _, _ := tags.Parse([]string{"firecracker-2cpu-4gb"}, tags.Limits{})
	j, err := st.UpdateJob(ctx, 4242, func(j *job.Job) error { return j.Accept([]string{"firecracker-2cpu-4gb"}, size, now) })
	if err != nil {
		t.Fatal(err)
	}
	v := job.PlanVM("fr-aaaaaaaaaa", "h", j, now)
	if err := st.Tx(ctx, func(tx *store.Tx) error {
		if err := tx.CreateVM(&v); err != nil {
			return err
		}
		if _, err := tx.UpdateVM(v.ID, func(x *job.VM) error { return x.RunnerCreated(99, x.Tags, now.Add(time.Millisecond)) }); err != nil {
			return err
		}
		_, err := tx.UpdateJob(4242, func(r *job.Job) error { return r.Retry(job.ReasonVMStart+": boom", now) })
		return err
	}); err != nil {
		t.Fatal(err)
	}
	w := job.PlanWarmVM("fr-wwwwwwwwww", "h", 2, 4096, now)
	if err := st.Tx(ctx, func(tx *store.Tx) error {
		if err := tx.CreateVM(&w); err != nil {
			return err
		}
		_, err := tx.UpdateVM(w.ID, func(x *job.VM) error { return x.WarmStarted(now) })
		return err
	}); err != nil {
		t.Fatal(err)
	}
	// A VM polling on a pool's shared runner (runners.mode pooled).
	pv := job.PlanWarmVM("fr-pppppppppp", "h", 1, 1024, now)
	if err := st.Tx(ctx, func(tx *store.Tx) error {
		if err := tx.CreateVM(&pv); err != nil {
			return err
		}
		if _, err := tx.UpdateVM(pv.ID, func(x *job.VM) error {
			if err := x.WarmStarted(now); err != nil {
				return err
			}
			x.Tags = []string{"firecracker-1cpu-1gb"}
			return x.RunnerCreated(77, x.Tags, now)
		}); err != nil {
			return err
		}
		return tx.PutRunner(job.Runner{ID: 77, HostID: "h", Mode: "pooled", Tags: []string{"firecracker-1cpu-1gb"}})
	}); err != nil {
		t.Fatal(err)
	}
	out := captureStdout(t, func() error { return status([]string{"--state-dir", dir}) })
	if !strings.Contains(out, "pool firecracker-2cpu-4gb: 1 warm VMs ready, 0 booting; they hold 2 vCPUs and 4096 MiB") {
		t.Fatalf("no pool line:\n%s", out)
	}
	if !strings.Contains(out, "pooled runner 77 (pool firecracker-1cpu-1gb): 1 VMs polling, 0 running a job") ||
		!strings.Contains(out, "manager fr-pppppppppp (s_frpppppppppp, polling)") {
		t.Fatalf("no pooled runner lines:\n%s", out)
	}
	if !strings.Contains(out, "4242") || !strings.Contains(out, "queued") || !strings.Contains(out, "vm_start: boom (attempt 1)") {
		t.Fatalf("status output:\n%s", out)
	}
	out = captureStdout(t, func() error { return status([]string{"--state-dir", dir, "--vms"}) })
	if !strings.Contains(out, "fr-aaaaaaaaaa") || !strings.Contains(out, "starting") || !strings.Contains(out, "99") {
		t.Fatalf("vms output:\n%s", out)
	}
	out = captureStdout(t, func() error { return status([]string{"--state-dir", dir, "--job", "4242"}) })
	for _, want := range []string{"runner created", "(+1ms)", "vm  fr-aaaaaaaaaa", "-> starting", "-> queued", "attempt 1"} {
		if !strings.Contains(out, want) {
			t.Errorf("job detail lacks %q:\n%s", want, out)
		}
	}
	st.Close()
}

// TestStatusFleet: --fleet reads the hosts of a PostgreSQL store named by
// the config (state.backend postgres, the DSN in a 0600 file): a live host
// with its claimed job, a dead one, the unclaimed jobs. A DSN file others
// can read is refused.
func TestStatusFleet(t *testing.T) {
	ctx := context.Background()
	dsn := pgtest.NewDatabase(t)
	st, err := store.OpenPostgres(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	if _, err := st.Heartbeat(ctx, store.Host{ID: "kvm-1", VCPUs: 8, MemoryMiB: 16384, MaxVMs: 4}, time.Hour); err != nil {
		t.Fatal(err)
	}
	if _, err := st.Heartbeat(ctx, store.Host{ID: "kvm-2", VCPUs: 4, MemoryMiB: 8192}, time.Millisecond); err != nil {
		t.Fatal(err)
	}
	size, _, _ := tags.Parse([]string{"firecracker-2cpu-4gb"}, tags.Limits{})
	for _, id := range []int64{1, 2} {
		if _, _, err := st.Observe(ctx, store.Observation{JobID: id, ProjectID: 7, Status: "pending", Source: "webhook", At: time.Now(), Create: true}); err != nil {
			t.Fatal(err)
		}
		if _, err := st.UpdateJob(ctx, id, func(j *job.Job) error { return j.Accept([]string{"firecracker-2cpu-4gb"}, size, time.Now()) }); err != nil {
			t.Fatal(err)
		}
	}
	if err := st.Tx(ctx, func(tx *store.Tx) error { return tx.ClaimJob(1, "kvm-1") }); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	dsnFile := pgtest.DSNFile(t, dir, dsn)
	cfgPath := filepath.Join(dir, "config.yaml")
	if err := os.WriteFile(cfgPath, []byte("gitlab:\n  url: https://gitlab.example\nstate:\n  backend: postgres\n  postgres_dsn_file: "+dsnFile+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	out := captureStdout(t, func() error { return status([]string{"--config", cfgPath, "--fleet"}) })
	for _, want := range []string{"HOST", "kvm-1", "yes", "8 vCPU / 16384 MiB", "kvm-2", "no", "lease ended; not reconciled yet", "(unclaimed)"} {
		if !strings.Contains(out, want) {
			t.Errorf("status --fleet lacks %q:\n%s", want, out)
		}
	}
	if err := os.Chmod(dsnFile, 0o644); err != nil {
		t.Fatal(err)
	}
	err = status([]string{"--config", cfgPath, "--fleet"})
	if err == nil || !strings.Contains(err.Error(), "state.postgres_dsn_file") || !strings.Contains(err.Error(), "0600") || strings.Contains(err.Error(), "host=") {
		t.Fatalf("a world-readable DSN file: %v", err)
	}
}
