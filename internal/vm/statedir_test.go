package vm

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"
	"time"
)

func TestStateDirLifecycle(t *testing.T) {
	sd := NewStateDir(t.TempDir())
	if ids, err := sd.IDs(); err != nil || len(ids) != 0 {
		t.Fatalf("IDs on missing root = %v, %v", ids, err)
	}
	if _, err := sd.Create("../etc"); err == nil {
		t.Fatal("Create accepted an invalid id")
	}
	dir, err := sd.Create("fr-a1")
	if err != nil {
		t.Fatal(err)
	}
	if fi, _ := os.Stat(dir); fi.Mode().Perm() != 0o700 {
		t.Fatalf("dir mode %v, want 0700", fi.Mode().Perm())
	}
	if _, err := sd.Create("fr-a1"); !errors.Is(err, ErrExists) {
		t.Fatalf("second Create: %v, want ErrExists", err)
	}
	if err := os.Mkdir(filepath.Join(sd.Root, "not-a-vm"), 0o700); err != nil {
		t.Fatal(err)
	}
	self, err := LookupProc(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	m := MetaFromSpec("test", Spec{ID: "fr-a1", VCPUs: 2, MemoryMiB: 512, Timeout: time.Minute}, time.Now())
	m.Proc = self
	if err := sd.WriteMeta(m); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{MetaFile, PIDFile} {
		if fi, err := os.Stat(sd.File("fr-a1", f)); err != nil || fi.Mode().Perm() != 0o600 {
			t.Fatalf("%s: %v %v", f, fi, err)
		}
	}
	got, err := sd.ReadMeta("fr-a1")
	if err != nil || got.Proc != self || got.VCPUs != 2 || got.Timeout != time.Minute {
		t.Fatalf("ReadMeta = %+v, %v", got, err)
	}
	if ids, _ := sd.IDs(); len(ids) != 1 || ids[0] != "fr-a1" {
		t.Fatalf("IDs = %v", ids)
	}
	// Our own cmdline does not mention the VM id: the pidfile alone must not
	// be trusted to name the VMM.
	if _, err := sd.ReadPID("fr-a1"); !errors.Is(err, ErrProcGone) {
		t.Fatalf("ReadPID of a foreign process: %v, want ErrProcGone", err)
	}
	if err := sd.Remove("fr-a1"); err != nil || sd.Exists("fr-a1") {
		t.Fatalf("Remove: %v, exists=%v", err, sd.Exists("fr-a1"))
	}
	if err := sd.Remove("fr-a1"); err != nil {
		t.Fatalf("second Remove: %v", err)
	}
	if _, err := os.Stat(filepath.Join(sd.Root, "not-a-vm")); err != nil {
		t.Fatal("a non-VM entry was touched")
	}
}

func TestProcKillGroupAndWaitGone(t *testing.T) {
	// A group leader with a child: KillGroup must take both.
	cmd := exec.Command("sh", "-c", "sleep 1000 & wait")
	cmd.SysProcAttr = SysProcAttr()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	reaped := make(chan struct{})
	go func() { cmd.Wait(); close(reaped) }()
	p, err := LookupProc(cmd.Process.Pid)
	if err != nil {
		t.Fatal(err)
	}
	if !p.Alive() {
		t.Fatal("fresh process not alive")
	}
	stale := Proc{PID: p.PID, StartTime: p.StartTime + 1}
	if stale.Alive() || stale.Exists() {
		t.Fatal("a Proc with the wrong start time counts as alive")
	}
	if err := stale.KillGroup(); err != nil || !p.Alive() {
		t.Fatalf("KillGroup on a reused pid killed the process (err %v)", err)
	}
	// Find the sleep child before killing.
	var child Proc
	deadline := time.Now().Add(10 * time.Second)
	for child.PID == 0 && time.Now().Before(deadline) {
		b, _ := os.ReadFile("/proc/" + strconv.Itoa(p.PID) + "/task/" + strconv.Itoa(p.PID) + "/children")
		var pid int
		for _, c := range b {
			if c >= '0' && c <= '9' {
				pid = pid*10 + int(c-'0')
			} else if pid > 0 {
				break
			}
		}
		if pid > 0 {
			child, _ = LookupProc(pid)
		}
		time.Sleep(10 * time.Millisecond)
	}
	if child.PID == 0 {
		t.Fatal("no child process found")
	}
	if err := p.KillGroup(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := p.WaitGone(ctx); err != nil {
		t.Fatalf("WaitGone: %v", err)
	}
	<-reaped
	if err := child.WaitGone(ctx); err != nil {
		t.Fatalf("child survived KillGroup: %v", err)
	}
	if p.Alive() || p.Exists() {
		t.Fatal("killed and reaped process still exists")
	}
	if err := p.KillGroup(); err != nil {
		t.Fatalf("KillGroup on a gone process: %v", err)
	}
}
