package config_test

import (
	"strings"
	"testing"
	"time"

	"github.com/firerunner/firerunner/internal/config"
)

func TestPoolsValidation(t *testing.T) {
	ok := valid()
	ok.Pools = []config.Pool{{Size: "firecracker-2cpu-4gb", MinIdle: 2, MaxIdle: 4, IdleTimeout: 30 * time.Minute}, {Size: "firecracker-1cpu-1gb", MinIdle: 1}}
	if err := ok.Validate(drivers); err != nil {
		t.Fatalf("valid pools refused: %v", err)
	}
	if got := ok.Pools[1].PoolIdleTimeout(); got != 30*time.Minute {
		t.Fatalf("default idle timeout %s", got)
	}
	for _, c := range []struct {
		pool  config.Pool
		field string
	}{
		{config.Pool{Size: "docker", MinIdle: 1}, "pools[0].size"},
		{config.Pool{Size: "firecracker-64cpu-1gb", MinIdle: 1}, "pools[0].size"},
		{config.Pool{Size: "firecracker-1cpu-1gb", MinIdle: 3, MaxIdle: 2}, "pools[0]: need 0 <= min_idle <= max_idle"},
		{config.Pool{Size: "firecracker-1cpu-1gb", MinIdle: -1}, "pools[0]: need"},
		{config.Pool{Size: "firecracker-1cpu-1gb", MinIdle: 1, IdleTimeout: time.Millisecond}, "pools[0].idle_timeout"},
	} {
		c2 := valid()
		c2.Pools = []config.Pool{c.pool}
		if err := c2.Validate(drivers); err == nil || !strings.Contains(err.Error(), c.field) {
			t.Errorf("%+v: got %v, want an error naming %s", c.pool, err, c.field)
		}
	}
	dup := valid()
	dup.Pools = []config.Pool{{Size: "firecracker-1cpu-1gb"}, {Size: "Firecracker-1CPU-1GB"}}
	if err := dup.Validate(drivers); err == nil || !strings.Contains(err.Error(), "pools[1].size") {
		t.Errorf("a size twice: %v", err)
	}
}

// TestPooledModeValidationAndBudget: runners.mode pooled needs group or
// instance runners (a pool's VMs get their runner before any job names a
// project); a pool whose pollers would exceed the 2,000 job requests per
// minute its shared runner gets from GitLab is a warning, not an error.
func TestPooledModeValidationAndBudget(t *testing.T) {
	c := valid()
	c.Runners.Mode = "pooled"
	c.Runners.Scope = "project"
	if err := c.Validate(drivers); err == nil || !strings.Contains(err.Error(), "runners.mode: pooled needs runners.scope group or instance") {
		t.Fatalf("pooled with project scope: %v", err)
	}
	c.Runners.Scope = "instance"
	c.Pools = []config.Pool{{Size: "firecracker-1cpu-1gb", MinIdle: 2, MaxIdle: 100}}
	if err := c.Validate(drivers); err != nil {
		t.Fatalf("pooled with instance scope: %v", err)
	}
	if w := c.Warnings(); len(w) != 0 {
		t.Fatalf("100 pollers are within budget: %v", w)
	}
	c.Pools[0].MaxIdle = 101
	if w := c.Warnings(); len(w) != 1 || !strings.Contains(w[0], "2020 job requests/min, over GitLab's 2000 per runner") {
		t.Fatalf("101 pollers: %v", w)
	}
	c.Runners.Mode = "bogus"
	if err := c.Validate(drivers); err == nil || !strings.Contains(err.Error(), `runners.mode: "bogus" is not one of oneoff, pooled`) {
		t.Fatalf("bogus mode: %v", err)
	}
	if w := config.Default().Warnings(); len(w) != 0 {
		t.Fatalf("defaults warn: %v", w)
	}
}
