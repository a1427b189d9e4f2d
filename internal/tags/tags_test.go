package tags

import (
	"errors"
	"testing"
)

func TestParse(t *testing.T) {
	lim := Limits{MaxVCPUs: 8, MaxMemoryGiB: 16}
	for _, tc := range []struct {
		name   string
		tags   []string
		size   Size
		ok     bool
		reason string // "" = no error
	}{
		{"none", nil, Size{}, false, ""},
		{"unrelated", []string{"docker", "linux"}, Size{}, false, ""},
		{"bare word firecracker", []string{"firecracker"}, Size{}, false, ""},
		{"prefix-like but not ours", []string{"firecrackers-2cpu-4gb", "my-firecracker-2cpu-4gb"}, Size{}, false, ""},
		{"simple", []string{"firecracker-2cpu-4gb"}, Size{2, 4}, true, ""},
		{"with other tags", []string{"linux", "firecracker-4cpu-8gb", "docker"}, Size{4, 8}, true, ""},
		{"at limits", []string{"firecracker-8cpu-16gb"}, Size{8, 16}, true, ""},
		{"smallest", []string{"firecracker-1cpu-1gb"}, Size{1, 1}, true, ""},
		{"upper case", []string{"FIRECRACKER-2CPU-4GB"}, Size{2, 4}, true, ""},
		{"mixed case", []string{"Firecracker-2Cpu-4Gb"}, Size{2, 4}, true, ""},
		{"surrounding space", []string{"  firecracker-2cpu-4gb\t"}, Size{2, 4}, true, ""},
		{"duplicate same size", []string{"firecracker-2cpu-4gb", "firecracker-2cpu-4gb"}, Size{2, 4}, true, ""},
		{"same size differently cased", []string{"firecracker-2cpu-4gb", "FIRECRACKER-2cpu-4GB"}, Size{2, 4}, true, ""},
		{"two sizes", []string{"firecracker-2cpu-4gb", "firecracker-4cpu-8gb"}, Size{}, false, ReasonAmbiguous},
		{"two sizes plus duplicate", []string{"firecracker-2cpu-4gb", "firecracker-2cpu-4gb", "firecracker-1cpu-4gb"}, Size{}, false, ReasonAmbiguous},
		{"cpu over", []string{"firecracker-9cpu-4gb"}, Size{}, false, ReasonOverLimit},
		{"mem over", []string{"firecracker-2cpu-17gb"}, Size{}, false, ReasonOverLimit},
		{"huge number", []string{"firecracker-99999999999999999999999cpu-4gb"}, Size{}, false, ReasonOverLimit},
		{"zero cpu", []string{"firecracker-0cpu-4gb"}, Size{}, false, ReasonZeroSize},
		{"zero mem", []string{"firecracker-2cpu-0gb"}, Size{}, false, ReasonZeroSize},
		{"leading zero", []string{"firecracker-02cpu-4gb"}, Size{}, false, ReasonMalformed},
		{"leading zeros mem", []string{"firecracker-2cpu-004gb"}, Size{}, false, ReasonMalformed},
		{"double zero", []string{"firecracker-00cpu-4gb"}, Size{}, false, ReasonMalformed},
		{"negative", []string{"firecracker--2cpu-4gb"}, Size{}, false, ReasonMalformed},
		{"plus sign", []string{"firecracker-+2cpu-4gb"}, Size{}, false, ReasonMalformed},
		{"inner space", []string{"firecracker-2 cpu-4gb"}, Size{}, false, ReasonMalformed},
		{"missing mem", []string{"firecracker-2cpu"}, Size{}, false, ReasonMalformed},
		{"only prefix", []string{"firecracker-"}, Size{}, false, ReasonMalformed},
		{"swapped", []string{"firecracker-4gb-2cpu"}, Size{}, false, ReasonMalformed},
		{"mib unit", []string{"firecracker-2cpu-4096mb"}, Size{}, false, ReasonMalformed},
		{"trailing junk", []string{"firecracker-2cpu-4gbx"}, Size{}, false, ReasonMalformed},
		{"decimal", []string{"firecracker-2cpu-1.5gb"}, Size{}, false, ReasonMalformed},
		{"word", []string{"firecracker-large"}, Size{}, false, ReasonMalformed},
		{"unicode digit", []string{"firecracker-２cpu-4gb"}, Size{}, false, ReasonMalformed},
		{"valid then malformed", []string{"firecracker-2cpu-4gb", "firecracker-x"}, Size{}, false, ReasonMalformed},
		{"malformed wins over ambiguity", []string{"firecracker-2cpu-4gb", "firecracker-4cpu-8gb", "firecracker-x"}, Size{}, false, ReasonMalformed},
	} {
		t.Run(tc.name, func(t *testing.T) {
			size, ok, err := Parse(tc.tags, lim)
			if tc.reason == "" {
				if err != nil {
					t.Fatalf("unexpected error %v", err)
				}
			} else {
				var te *Error
				if !errors.As(err, &te) {
					t.Fatalf("err = %v, want *Error %s", err, tc.reason)
				}
				if te.Reason != tc.reason {
					t.Fatalf("reason %q, want %q (%v)", te.Reason, tc.reason, err)
				}
				if err.Error() == "" {
					t.Fatal("empty error message")
				}
			}
			if ok != tc.ok || size != tc.size {
				t.Fatalf("got %v %v, want %v %v", size, ok, tc.size, tc.ok)
			}
		})
	}
}

func TestZeroLimitsUseAbsoluteBounds(t *testing.T) {
	if s, ok, err := Parse([]string{"firecracker-64cpu-256gb"}, Limits{}); err != nil || !ok || s != (Size{64, 256}) {
		t.Fatalf("%v %v %v", s, ok, err)
	}
	for _, tag := range []string{"firecracker-1025cpu-1gb", "firecracker-1cpu-4097gb"} {
		var te *Error
		if _, ok, err := Parse([]string{tag}, Limits{}); ok || !errors.As(err, &te) || te.Reason != ReasonOverLimit || te.Tag != tag {
			t.Fatalf("%s: ok %v err %v; want over_limit above the absolute bound", tag, ok, err)
		}
	}
	// The bounds themselves are served.
	if s, ok, err := Parse([]string{"firecracker-1024cpu-4096gb"}, Limits{}); err != nil || !ok || s != (Size{1024, 4096}) {
		t.Fatalf("at the absolute bounds: %v %v %v", s, ok, err)
	}
}

func TestSize(t *testing.T) {
	s := Size{VCPUs: 4, MemoryGiB: 8}
	if s.Tag() != "firecracker-4cpu-8gb" || s.MemoryMiB() != 8192 || s.String() != s.Tag() {
		t.Fatalf("%s %d", s.Tag(), s.MemoryMiB())
	}
	// The canonical tag round-trips.
	got, ok, err := Parse([]string{s.Tag()}, Limits{})
	if err != nil || !ok || got != s {
		t.Fatalf("%v %v %v", got, ok, err)
	}
}

func TestErrorClipsLongTags(t *testing.T) {
	long := "firecracker-" + string(make([]byte, 500))
	_, _, err := Parse([]string{long}, Limits{})
	var te *Error
	if !errors.As(err, &te) || len(te.Tag) > 70 {
		t.Fatalf("tag not clipped: %d", len(te.Tag))
	}
}
