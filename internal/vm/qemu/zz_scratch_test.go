package qemu

import (
	"testing"
	"time"
	"context"

	"github.com/firerunner/firerunner/internal/vm"
)

func scratchEnv(t *testing.T, initrd string) realEnv {
	state := t.TempDir()
	d, err := New(Options{Accel: AccelAuto, StateDir: state})
	if err != nil {
		t.Fatal(err)
	}
	e := realEnv{img: vm.Image{Kernel: "/tmp/h4/vmlinux", Initrd: initrd, Rootfs: "/tmp/h4/disk.img"}, state: state, drv: d}
	t.Cleanup(func() { e.assertNothingLeft(t) })
	return e
}

func TestScratchBoot(t *testing.T) {
	e := scratchEnv(t, "/tmp/h4/initrd.gz")
	res, console, tl := e.runVM(t, e.spec("fr-s1", time.Minute, "x"), func(pid int) { t.Log("pid", pid) })
	t.Logf("%+v\n%s", res, tail(console, 8))
	printTimeline(t, "s1", tl)
}

func TestScratchHang(t *testing.T) {
	e := scratchEnv(t, "/tmp/h4/initrd-hang.gz")
	res, console, tl := e.runVM(t, e.spec("fr-s2", 25*time.Second, "x"), nil)
	t.Logf("%+v\n%s", res, tail(console, 4))
	printTimeline(t, "s2", tl)
}

func TestScratchAdopt(t *testing.T) {
	e := scratchEnv(t, "/tmp/h4/initrd-hang.gz")
	long := e.spec("fr-orph1", time.Hour, "sleep 100000")
	short := e.spec("fr-orph2", 5*time.Second, "sleep 100000")
	startOrphan(t, e, long)
	startOrphan(t, e, short)
	d2, _ := New(Options{Accel: AccelTCG, StateDir: e.state})
	ctx := context.Background()
	l, _ := d2.List(ctx)
	t.Logf("list %+v", l)
	res, err := d2.Wait(ctx, "fr-orph2")
	t.Logf("wait %+v %v", res, err)
	sctx, c := context.WithTimeout(ctx, time.Second); defer c()
	res, err = d2.Wait(sctx, "fr-orph1")
	t.Logf("wait %+v %v", res, err)
	for _, id := range []string{"fr-orph1", "fr-orph2"} {
		if err := d2.Destroy(ctx, id); err != nil { t.Fatal(err) }
	}
	l, _ = d2.List(ctx)
	t.Logf("list %+v", l)
}

func TestScratchProbe(t *testing.T) {
	e := scratchEnv(t, "/tmp/h4/initrd.gz")
	tcg := []string{"-accel", "tcg", "-cpu", "max"}
	t0 := time.Now()
	err := probeBoot(context.Background(), e.drv.binary, e.img.Kernel, tcg, "tsc_early_khz=2096006", bootBudget)
	t.Log(err, time.Since(t0))
	err = probeBoot(context.Background(), e.drv.binary, "/etc/passwd", tcg, "", bootBudget)
	t.Log(err)
	err = probeBoot(context.Background(), e.drv.binary, e.img.Kernel, tcg, "tsc_early_khz=2096006", 2*time.Second)
	t.Log(err)
}
