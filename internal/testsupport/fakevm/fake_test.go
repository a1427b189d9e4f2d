package fakevm

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/firerunner/firerunner/internal/guestconfig"
	"github.com/firerunner/firerunner/internal/vm"
)

func spec(id string) vm.Spec {
	return vm.Spec{ID: id, VCPUs: 1, MemoryMiB: 256, Image: vm.Image{Kernel: "k", Initrd: "i", Rootfs: "r"},
		Guest: guestconfig.Config{JobTimeoutSec: 60, Command: []string{"true"}}}
}

func TestFakeDriver(t *testing.T) {
	ctx := context.Background()
	d := New(Options{StartError: func(s vm.Spec) error {
		if s.ID == "fr-bad" {
			return errors.New("injected")
		}
		return nil
	}})
	if err := d.Start(ctx, vm.Spec{ID: "bad id"}); err == nil {
		t.Fatal("invalid spec accepted")
	}
	if err := d.Start(ctx, spec("fr-bad")); err == nil {
		t.Fatal("injected failure ignored")
	}
	if err := d.Start(ctx, spec("fr-a")); err != nil {
		t.Fatal(err)
	}
	if err := d.Start(ctx, spec("fr-a")); err == nil {
		t.Fatal("duplicate id accepted")
	}
	if err := d.Exit("fr-a", 3); err != nil {
		t.Fatal(err)
	}
	if r, err := d.Wait(ctx, "fr-a"); err != nil || r.ExitCode != 3 {
		t.Fatalf("wait: %+v %v", r, err)
	}
	if _, err := d.Wait(ctx, "fr-none"); !errors.Is(err, vm.ErrNotFound) {
		t.Fatalf("wait unknown: %v", err)
	}
	_ = d.Start(ctx, spec("fr-b"))
	go func() { time.Sleep(10 * time.Millisecond); _ = d.Destroy(ctx, "fr-b") }()
	if r, _ := d.Wait(ctx, "fr-b"); r.Reason != "killed" || r.ExitCode != -1 {
		t.Fatalf("destroyed vm result %+v", r)
	}
	_ = d.Destroy(ctx, "fr-a")
	if l, _ := d.List(ctx); len(l) != 0 {
		t.Fatalf("list after destroy: %v", l)
	}
	if err := d.Destroy(ctx, "fr-a"); err != nil {
		t.Fatal("destroy is not idempotent")
	}
	auto := New(Options{RunFor: time.Millisecond, ExitCode: 0})
	_ = auto.Start(ctx, spec("fr-c"))
	if r, err := auto.Wait(ctx, "fr-c"); err != nil || r.ExitCode != 0 || r.Reason != "" {
		t.Fatalf("self power-off: %+v %v", r, err)
	}
}
