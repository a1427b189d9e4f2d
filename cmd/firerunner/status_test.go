package main

import (
	"context"
	"io"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/firerunner/firerunner/internal/job"
	"github.com/firerunner/firerunner/internal/store"
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
	if _, _, err := st.Create(ctx, job.Job{ID: 4242, ProjectID: 7, ProjectPath: "g/p", Tags: []string{"firecracker-2cpu-4gb"},
		SizeTag: "firecracker-2cpu-4gb", VCPUs: 2, MemoryMiB: 4096, State: job.Queued, Source: "webhook",
		Timeline: job.Timeline{WebhookReceived: now}}); err != nil {
		t.Fatal(err)
	}
	if _, err := st.UpdatePath(ctx, 4242, []job.State{job.RunnerCreated, job.VMStarting}, func(j *job.Job) error {
		j.RunnerID, j.VMID, j.Timeline.RunnerCreated = 99, job.VMIDFor(4242), now.Add(time.Millisecond)
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	out := captureStdout(t, func() error { return status([]string{"--state-dir", dir}) })
	if !strings.Contains(out, "4242") || !strings.Contains(out, "vm_starting") || !strings.Contains(out, job.VMIDFor(4242)) {
		t.Fatalf("status output:\n%s", out)
	}
	out = captureStdout(t, func() error { return status([]string{"--state-dir", dir, "--job", "4242"}) })
	for _, want := range []string{"runner created", "(+1ms)", "queued", "runner_created", "-> vm_starting"} {
		if !strings.Contains(out, want) {
			t.Errorf("job detail lacks %q:\n%s", want, out)
		}
	}
	st.Close()
}
