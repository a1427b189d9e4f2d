package planner

import "testing"

func TestHostCapacity(t *testing.T) {
	c, err := HostCapacity(0, 0, 0, 0, 0)
	if err != nil || c.VCPUs < 1 || c.MemoryMiB < 128 {
		t.Fatalf("%+v %v", c, err)
	}
	if _, err := HostCapacity(0, 0, 1000, 0, 0); err == nil {
		t.Fatal("reserve larger than host accepted")
	}
	if c, _ := HostCapacity(3, 1000, 1, 1, 2); c != (Capacity{3, 1000, 2}) {
		t.Fatalf("explicit values not used: %+v", c)
	}
}
