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
